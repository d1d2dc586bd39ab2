"""PPO with a critic: a value model (the policy's body plus a scalar head) predicts each
token's value; advantages are GAE over the response; the critic trains on the clipped value
loss beside the policy."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from engine.model import Transformer, load_model
from engine.rl import advantages as adv_lib
from engine.rl.algorithms.base import Minibatch, Trainable, TrainerContext, TrainingDiverged
from engine.rl.algorithms.policy_gradient import PolicyGradient
from engine.rl.packed import Packed, chunks
from engine.rl.rollout import Episode

VALUE_HEAD = "value_head.safetensors"


class ValueModel(nn.Module):
    """PPO's critic: a transformer body (initialised from the policy) and a scalar value head."""

    def __init__(self, body: Transformer, seed: int = 0):
        super().__init__()
        self.body = body
        w = body.lm_head_weight
        hidden = body.config.hidden_size
        self.head = nn.utils.skip_init(nn.Linear, hidden, 1, device=w.device, dtype=torch.float32)
        # The reference's value head: weights N(0, 1 / sqrt(hidden + 1)), bias 0, drawn from
        # a generator of its own (the run's random stream is not moved).
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(1, hidden, generator=gen) / math.sqrt(hidden + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, cu: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        hidden = self.body.hidden_states(ids, cu_seqlens=cu)[0][rows]
        return self.head(hidden.float()).squeeze(-1)

    def save(self, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """The body in HF format plus value_head.safetensors (`state`: the whole state dict, e.g.
        gathered from fsdp shards; None: this module's own)."""
        from safetensors.torch import save_file

        body = {k[len("body."):]: v for k, v in state.items() if k.startswith("body.")} if state is not None else None
        head = ({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")} if state is not None
                else self.head.state_dict())
        self.body.save_pretrained(str(folder), state_dict=body)
        save_file({k: v.contiguous() for k, v in head.items()}, str(folder / VALUE_HEAD))

    @classmethod
    def from_folder(cls, folder: Path, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu") -> "ValueModel":
        """A critic saved by `save` (a PPO checkpoint's critic/)."""
        from safetensors.torch import load_file

        body, _ = load_model(folder, dtype=dtype, device=device)
        model = cls(body)
        model.head.load_state_dict(load_file(str(Path(folder) / VALUE_HEAD), device=str(device)))
        return model

    def load(self, folder: Path) -> None:
        """Copy a folder written by `save` into this module (its tensors keep their storage)."""
        saved = ValueModel.from_folder(folder, self.body.lm_head_weight.dtype, self.head.weight.device)
        self.load_state_dict(saved.state_dict())


class PPO(PolicyGradient):
    name = "ppo"
    whitens_by_default = True

    def setup(self, ctx: TrainerContext) -> list[Trainable]:
        cfg = self.cfg
        # (sharded: on the host; shard() moves each group to ctx.device)
        body, _ = load_model(ctx.start_dir, dtype=ctx.dtype, device="cpu" if ctx.sharded else ctx.device)
        body.gradient_checkpointing = cfg.gradient_checkpointing
        self.critic = critic = ValueModel(body, seed=cfg.seed)
        self.ctx = ctx

        def shard(module: nn.Module) -> list:
            from engine.rl.fsdp import shard_value_model

            return shard_value_model(module, ctx.device)

        def zero_backward(episode: Episode) -> None:
            packed = Packed.build([episode], ctx.device)
            (critic(packed.ids, packed.cu, packed.rows).sum() * 0.0).backward()

        return [Trainable("critic", critic, lr=cfg.critic_lr or cfg.lr, micro_backward=self.critic_backward,
                          zero_backward=zero_backward, save=critic.save, load=critic.load, shard=shard)]

    @torch.no_grad()
    def credit(self, episodes: list[Episode], ctx: TrainerContext) -> dict[str, float]:
        cfg = self.cfg
        for chunk in chunks(episodes, cfg.micro_batch_size):
            packed = Packed.build(chunk, ctx.device)
            values = self.critic(packed.ids, packed.cu, packed.rows).float().cpu()
            for ep, v in zip(chunk, values.split(packed.lengths)):
                ep.old_values = v
                ep.advantages, ep.returns = adv_lib.gae_advantages(v, ep.reward, cfg.gamma, cfg.gae_lambda)
        return {}

    def critic_backward(self, micro: list[Episode], batch: Minibatch) -> dict[str, float]:
        """Clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2), token-mean over the
        minibatch. The critic trains on every micro-batch, skipped by the ratio guard or not, as in
        the reference."""
        packed = Packed.build(micro, self.ctx.device)
        values = self.critic(packed.ids, packed.cu, packed.rows)
        old = torch.cat([e.old_values for e in micro]).to(values.device)
        ret = torch.cat([e.returns for e in micro]).to(values.device)
        clipped = old + (values - old).clamp(-self.cfg.value_clip, self.cfg.value_clip)
        loss = 0.5 * torch.maximum((values - ret).square(), (clipped - ret).square()).sum() / batch.num_tokens
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite value loss at {batch.where}; the last checkpoint is kept")
        loss.backward()
        return {"value_loss": loss.item()}
