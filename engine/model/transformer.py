"""Decoder-only transformer for the Llama, Qwen2, Qwen3 and Mistral families.

Parameter names are Hugging Face's (`model.layers.3.self_attn.q_proj.weight`, ...), so
`state_dict()` maps 1:1 onto their checkpoints. Pre-norm blocks:

    h = x + o_proj(attn(rope(q_norm?(q_proj(rms(x)))), rope(k_norm?(k_proj(rms(x)))), v_proj(rms(x))))
    y = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))

Two entry points: `forward` (logits [B, T, V]) and `hidden_states` ([B, T, d], after the
final norm) so the RL loss can apply the LM head itself, chunked, without materialising
the [tokens x vocab] logits. Both run the dense training path; the engine's paged path
calls `model.model(input_ids, positions, ctx)` with an attention context of its own.

Fewer kernels per layer:
- q/k/v and gate/up are one matmul each (`FusedLinears`): the HF-named weights are row
  blocks of one storage (see engine/model/fused_linear.py for the invariant and how
  `.to()`, checkpoint loads and the optimizer keep it).
- Without autograd (`Backbone.forward` under no_grad: the engine), each residual add and the
  RMSNorm after it are one `engine.kernels.rmsnorm.fused_add_rms_norm` (Triton on CUDA, its torch
  twin elsewhere): the residual stream is carried next to the normed activations and the
  next layer's input norm is fused into this layer's last add. `hidden_states` (the trainer's
  path, with or without grad) always runs the unfused torch norms, so PPO's old (no_grad)
  and new (grad) log-probs come from the same arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.model.attention import (
    AttentionContext,
    PaddedAttention,
    VarlenAttention,
    cu_seqlens_from_positions,
    flash_attn_varlen,
)
from engine.model.config import ModelConfig
from engine.model.fused_linear import FusedLinears
from engine.model.rope import apply_rope, inv_freq_and_scale, rope_cos_sin
from engine.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_reference, rms_norm, rms_norm_reference


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and scaled in the input dtype (as HF does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _norm_kernel(x: torch.Tensor) -> bool:
    """Whether the inference path calls the kernels' dispatching ops (Triton) rather than their
    torch twins: on CUDA only. On the CPU the interpreter would be far slower than torch."""
    return x.is_cuda


def _rms_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    return (rms_norm if _norm_kernel(x) else rms_norm_reference)(x, norm.weight, norm.eps)


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual) in one kernel on CUDA."""
    op = fused_add_rms_norm if _norm_kernel(x) else fused_add_rms_norm_reference
    return op(x, residual, norm.weight, norm.eps)


class Attention(FusedLinears):
    """q/k/v (one fused matmul), optional per-head q/k norms, RoPE, the context's attention, o_proj."""

    fused_groups = (("q_proj", "k_proj", "v_proj"),)

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.head_dim = cfg.head_dim
        d, hq, hkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(d, hq * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, hkv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, hkv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(hq * self.head_dim, d, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.qkv_sizes = (hq * self.head_dim, hkv * self.head_dim, hkv * self.head_dim)
        self.fuse_linears()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        # Column blocks of one [B, T, (Hq + 2 Hkv) D] output: strided views, no copies.
        q, k, v = self.fused_linear(x, 0).split(self.qkv_sizes, dim=-1)
        q = q.view(b, t, -1, self.head_dim)
        k = k.view(b, t, -1, self.head_dim)
        v = v.view(b, t, -1, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = ctx(self.layer, q, k, v)
        return self.o_proj(out.reshape(b, t, -1))


class MLP(FusedLinears):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), gate and up in one fused matmul."""

    fused_groups = (("gate_proj", "up_proj"),)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.intermediate_size = f
        self.fuse_linears()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fused_linear(x, 0).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, h: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      ctx: AttentionContext, next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(next_norm(y), y) for this layer's output y, given h = input_layernorm(x) and residual = x.

        Same arithmetic as `forward` followed by next_norm, with each residual add fused into
        the norm after it (no autograd through the Triton kernel: inference only).
        """
        h, residual = _add_rms_norm(self.self_attn(h, cos, sin, ctx), residual, self.post_attention_layernorm)
        return _add_rms_norm(self.mlp(h), residual, next_norm)


class Backbone(nn.Module):
    """Embedding, decoder layers and final norm: HF's `model.` prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        inv_freq, self.rope_scale = inv_freq_and_scale(cfg.rope_parameters, cfg.head_dim, cfg.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                fused_norms: bool | None = None) -> torch.Tensor:
        """input_ids, positions [B, T] -> final-normed hidden states [B, T, d].

        fused_norms: residual add + RMSNorm as one kernel (`DecoderLayer.forward_fused`);
        None (the engine's call): when autograd is off. Never with autograd (no backward).
        """
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, self.rope_scale, positions, x.dtype)
        if fused_norms is None:
            fused_norms = not torch.is_grad_enabled()
        if fused_norms:
            if torch.is_grad_enabled():
                raise RuntimeError("fused_norms=True has no backward: run it under torch.no_grad()")
            layers = list(self.layers)
            h = _rms_norm(x, layers[0].input_layernorm) if layers else x
            residual = x
            for i, layer in enumerate(layers):
                next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
                h, residual = layer.forward_fused(h, residual, cos, sin, ctx, next_norm)
            return h if layers else self.norm(x)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, ctx, use_reentrant=False)
            else:
                x = layer(x, cos, sin, ctx)
        return self.norm(x)


class Transformer(nn.Module):
    """A causal LM whose state dict is the Hugging Face checkpoint's, key for key.

    attn_impl: "auto" (flash-attn varlen for packed half-precision CUDA input when
    installed, SDPA otherwise), "sdpa" or "flash".
    """

    def __init__(self, cfg: ModelConfig, attn_impl: str = "auto"):
        super().__init__()
        if attn_impl not in ("auto", "sdpa", "flash"):
            raise ValueError(f"attn_impl must be 'auto', 'sdpa' or 'flash', got {attn_impl!r}")
        self.config = cfg
        self.attn_impl = attn_impl
        self.model = Backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    # --------------------------------------------------------------- parameters
    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, d] output projection (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.model.gradient_checkpointing = enabled

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float = 0.02) -> "Transformer":
        """Random init as transformers does it: N(0, std) matrices, zero biases, unit norms."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def reset_rope(self) -> None:
        """Recompute the RoPE buffer (needed after building the model on the meta device)."""
        inv_freq, self.model.rope_scale = inv_freq_and_scale(
            self.config.rope_parameters, self.config.head_dim, self.config.max_position_embeddings
        )
        self.model.inv_freq = inv_freq.to(self.model.embed_tokens.weight.device)

    # --------------------------------------------------------------- forward
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, d].

        Three input layouts:
        - padded batch: input_ids [B, T], attention_mask [B, T] (1 = token, 0 = padding,
          left or right). Positions default to the count of real tokens before each one.
        - packed: input_ids [1, T] with cu_seqlens [S + 1] (sequence s = tokens cu[s]:cu[s+1]);
          positions restart at 0 for each sequence.
        - packed by positions: input_ids [1, T] and position_ids [1, T] that restart at 0 for
          each sequence (the transformers convention for padding-free batches).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if t == 0:
            raise ValueError("input_ids has no tokens (T = 0)")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {self.config.vocab_size})")
        restarts = position_ids is not None and attention_mask is None and t > 1 and bool(
            (position_ids[..., 1:] != position_ids[..., :-1] + 1).any())
        if restarts and b > 1:
            raise ValueError("position_ids restart inside a row of a [B > 1, T] batch: pack sequences into "
                             "input_ids [1, T], or pass an attention_mask for a padded batch")
        packed = cu_seqlens is not None or restarts
        if packed:
            if b != 1 or attention_mask is not None:
                raise ValueError("packed sequences take input_ids [1, T] and no attention_mask")
            if cu_seqlens is None:
                cu_seqlens = cu_seqlens_from_positions(position_ids)
            cu_seqlens = _check_cu_seqlens(cu_seqlens, t)
            if position_ids is None:
                position_ids = _positions_from_cu_seqlens(cu_seqlens, input_ids.device)[None]
            ctx: AttentionContext = VarlenAttention(cu_seqlens, self.config.sliding_windows, self._varlen_backend(input_ids))
        else:
            valid = None
            if attention_mask is not None:
                if attention_mask.shape != input_ids.shape:
                    raise ValueError(
                        f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
                    )
                valid = attention_mask.to(torch.bool)
                if bool(valid.all()):
                    valid = None  # nothing is padded: take SDPA's causal fast path
            if position_ids is None:
                if attention_mask is None:
                    position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
                else:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            ctx = PaddedAttention(valid, self.config.sliding_windows, t)
        if position_ids.shape[-1] != t:
            raise ValueError(f"position_ids has {position_ids.shape[-1]} positions for {t} tokens")
        return self.model(input_ids, position_ids.expand(b, t), ctx, fused_norms=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] in the model's dtype; same inputs as `hidden_states`."""
        return F.linear(self.hidden_states(input_ids, attention_mask, position_ids, cu_seqlens), self.lm_head_weight)

    def _varlen_backend(self, input_ids: torch.Tensor) -> str:
        if self.attn_impl != "auto":
            return self.attn_impl
        half = self.model.embed_tokens.weight.dtype in (torch.float16, torch.bfloat16)
        return "flash" if input_ids.is_cuda and half and flash_attn_varlen() is not None else "sdpa"

    # --------------------------------------------------------------- checkpoints
    def save_pretrained(self, path: str, max_shard_size: int | str = "5GB", tokenizer=None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write config.json + safetensors (sharded above max_shard_size) in HF layout."""
        from engine.model.checkpoint import save_model

        save_model(self, path, max_shard_size=max_shard_size, tokenizer=tokenizer, state_dict=state_dict)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    cu = cu_seqlens.reshape(-1).to("cpu", torch.int64)
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens must rise strictly from 0 to the token count {total}, got {cu.tolist()[:8]}"
            + ("..." if cu.numel() > 8 else "")
        )
    return cu


def _positions_from_cu_seqlens(cu: torch.Tensor, device: torch.device) -> torch.Tensor:
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return (torch.arange(int(cu[-1])) - starts).to(device)
