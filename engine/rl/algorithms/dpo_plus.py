"""DPO+ (DPO-Positive): pairs of a prompt's correct and incorrect samples, trained with the
DPO-Positive loss against the frozen starting model plus an NLL term on the correct sample."""
from __future__ import annotations

import random

import torch

from engine.rl.algorithms.base import LossOut, Minibatch, TrainerContext
from engine.rl.algorithms.supervised import SelectedData
from engine.rl.config import TrainConfig
from engine.rl.offline import dpo_pairs, dpop_loss
from engine.rl.packed import Packed, chunks
from engine.rl.rollout import Episode


class DPOPlus(SelectedData):
    name = "dpo+"
    empty_message = "no prompt has both a correct and an incorrect sample"
    uses_prompt_groups = "pairs a prompt's correct and incorrect samples"

    @classmethod
    def needs_reference(cls, cfg: TrainConfig) -> bool:
        return True

    @staticmethod
    def episodes_of(unit) -> list[Episode]:
        return list(unit)

    def units(self, episodes: list[Episode], ctx: TrainerContext) -> tuple[list, dict]:
        cfg = self.cfg
        rng = random.Random(f"{self.name}-data-{cfg.seed}-{ctx.iteration}")
        found = dpo_pairs(episodes, cfg.dpo_max_pairs_per_prompt, rng)
        if found.pairs:
            reference_seq_logprobs({id(e): e for pair in found.pairs for e in pair}.values(), ctx)
        return found.pairs, {"dpo_pairs": len(found.pairs), "dpo_prompts_without_pair": found.prompts_without_pair,
                             "dpo_prompts_without_pair_frac": found.prompts_without_pair / found.prompts}

    def loss(self, micro: list[tuple[Episode, Episode]], batch: Minibatch, ctx: TrainerContext) -> LossOut:
        """DPO+ on a micro-batch of pairs: chosen and rejected responses packed in one forward."""
        episodes = [c for c, _ in micro] + [r for _, r in micro]  # chosen first, then rejected
        packed = Packed.build(episodes, ctx.device)
        lp = ctx.token_logprobs(ctx.policy, packed)
        seq = torch.stack([t.sum() for t in lp.split(packed.lengths)])
        ref = torch.stack([e.ref_logprobs.sum() for e in episodes]).to(seq.device)
        m, num_pairs = len(micro), batch.num_units
        loss, stats = dpop_loss(seq[:m], seq[m:], ref[:m], ref[m:], beta=self.cfg.dpo_beta,
                                nll_coef=self.cfg.dpo_nll_coef, num_pairs=num_pairs)
        return LossOut(loss, {"loss": loss.item(), **{k: v / num_pairs for k, v in stats.items()}})


@torch.no_grad()
def reference_seq_logprobs(episodes, ctx: TrainerContext) -> None:
    """Each episode's per-token reference log-probs (summed by the loss), at the sampling
    temperature as PPO's."""
    episodes = list(episodes)
    cfg = ctx.cfg
    if cfg.ref_offload:
        ctx.ref.to(ctx.device)
    for chunk in chunks(episodes, cfg.micro_batch_size):
        packed = Packed.build(chunk, ctx.device)
        lp = ctx.token_logprobs(ctx.ref, packed)
        for ep, seq in zip(chunk, lp.split(packed.lengths)):
            ep.ref_logprobs = seq.float().cpu()
    if cfg.ref_offload:
        ctx.ref.to("cpu")
