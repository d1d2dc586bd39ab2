"""Triton kernels, each with a plain-torch reference twin of the same signature.

Each public function runs its Triton kernel on CUDA tensors (or on CPU tensors under
TRITON_INTERPRET=1) and its `_reference` twin otherwise.
"""
from engine.kernels.decode_attention import decode_attention, decode_attention_reference
from engine.kernels.extend_attention import extend_attention, extend_attention_reference
from engine.kernels.fused_logprobs import fused_logprobs, fused_logprobs_reference
from engine.kernels.merge_states import merge_states, merge_states_reference
from engine.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_reference, rms_norm, rms_norm_reference
from engine.kernels.shared_prefix_attention import (
    cascade_decode_attention,
    cascade_decode_attention_reference,
    shared_prefix_decode_attention,
    shared_prefix_decode_attention_reference,
)
from engine.kernels.store_kv import store_kv, store_kv_reference

__all__ = [
    "cascade_decode_attention", "cascade_decode_attention_reference",
    "decode_attention", "decode_attention_reference", "extend_attention", "extend_attention_reference",
    "fused_add_rms_norm", "fused_add_rms_norm_reference",
    "fused_logprobs", "fused_logprobs_reference", "merge_states", "merge_states_reference", "rms_norm",
    "rms_norm_reference",
    "shared_prefix_decode_attention", "shared_prefix_decode_attention_reference", "store_kv", "store_kv_reference",
]
