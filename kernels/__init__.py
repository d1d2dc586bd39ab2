"""Triton kernels, each with a plain-torch reference twin of the same signature."""
from kernels.fused_logprobs import fused_logprobs, fused_logprobs_reference

__all__ = ["fused_logprobs", "fused_logprobs_reference"]
