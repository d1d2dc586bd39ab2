"""RestEM (ReST-EM): supervised fine-tuning on each iteration's correct samples (at most
`restem_max_per_prompt` per prompt), by default from the starting model each iteration, with
the epoch picked on validation accuracy (`restem_early_stop`)."""
from __future__ import annotations

import random
import time
from typing import Any

import torch

from engine.rl.algorithms.base import LossOut, Minibatch, TrainerContext
from engine.rl.algorithms.supervised import SelectedData
from engine.rl.config import ConfigError, TrainConfig
from engine.rl.loss import aggregate
from engine.rl.offline import restem_pick_epoch, restem_select
from engine.rl.packed import Packed
from engine.rl.rollout import Episode


class RestEM(SelectedData):
    name = "restem"
    empty_message = "no correct sample"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.picker: EpochPicker | None = None

    @classmethod
    def validate(cls, cfg: TrainConfig) -> None:
        super().validate(cfg)
        if cfg.restem_early_stop != "off" and "validation" not in cfg.eval_splits:
            raise ConfigError(f"restem_early_stop {cfg.restem_early_stop} picks epochs by validation accuracy: "
                              f"add validation to eval_splits (got {cfg.eval_splits!r})")

    @classmethod
    def needs_reference(cls, cfg: TrainConfig) -> bool:
        return cfg.restem_from_base  # the base model to start each iteration from (RestEM has no KL term)

    def units(self, episodes: list[Episode], ctx: TrainerContext) -> tuple[list, dict]:
        cfg = self.cfg
        rng = random.Random(f"{self.name}-data-{cfg.seed}-{ctx.iteration}")
        kept = restem_select(episodes, cfg.restem_max_per_prompt, rng)
        if cfg.restem_from_base:
            # ReST-EM fine-tunes the starting model on each iteration's data, not the last
            # iteration's model. Copy in place: the Engine reads these very tensors.
            if ctx.sharded:
                from engine.rl.fsdp import load_full_weights

                load_full_weights(ctx.policy, ctx.ref)
            else:
                with torch.no_grad():
                    for p, q in zip(ctx.policy.parameters(), ctx.ref.parameters(), strict=True):
                        p.copy_(q)
        return kept, {"restem_kept": len(kept), "restem_kept_frac": len(kept) / len(episodes)}

    def loss(self, micro: list[Episode], batch: Minibatch, ctx: TrainerContext) -> LossOut:
        """Cross-entropy (temperature 1) of the response tokens, reduced over the minibatch by
        `loss_aggregation` (token-mean; the authors' trainer: seq-mean-token-mean)."""
        packed = Packed.build(micro, ctx.device)
        lp = ctx.token_logprobs(ctx.policy, packed, temperature=1.0)
        loss = aggregate(-packed.pad(lp), packed.mask(), self.cfg.loss_aggregation,
                         num_tokens=batch.num_tokens, num_seqs=batch.num_units, norm_length=self.cfg.max_new_tokens)
        return LossOut(loss, {"loss": loss.item()})

    def on_update_start(self, ctx: TrainerContext) -> None:
        mode = self.cfg.restem_early_stop
        self.picker = EpochPicker(ctx, mode) if mode != "off" else None

    def after_epoch(self, epoch: int, ctx: TrainerContext) -> bool:
        return self.picker is None or self.picker.after_epoch(epoch)

    def on_update_end(self, ctx: TrainerContext) -> dict[str, Any]:
        out = self.picker.finish() if self.picker is not None else {}
        self.picker = None
        return out


class EpochPicker:
    """RestEM's choice among the models of one iteration's epochs, by validation accuracy.

    It evaluates the weights before training (epoch 0) and after each epoch, keeps a CPU copy of
    the model `restem_pick_epoch` currently picks, and `finish` copies that model back into the
    policy's own tensors (the Engine reads them). The decision is `restem_pick_epoch`'s alone;
    with first-drop, training stops at the first epoch that is not an improvement, since no later
    epoch can be picked (the authors train all epochs and then pick: the same model, less work).
    """

    def __init__(self, ctx: TrainerContext, mode: str):
        self.ctx, self.mode = ctx, mode
        self.seconds = 0.0
        self.accuracies: list[float] = []
        self.kept: list[torch.Tensor] = []
        self.chosen = 0
        self._evaluate_and_keep()

    def _evaluate_and_keep(self) -> None:
        t0 = time.perf_counter()
        ctx = self.ctx
        ctx.engine.invalidate_cache()  # the weights changed since the cache was filled
        acc = ctx.evaluate(splits=("validation",))["eval_validation_accuracy"]
        ctx.engine.invalidate_cache()
        ctx.release_kv_for_update()  # (fsdp: the evaluation allocated the pool again)
        ctx.policy.train()
        self.accuracies.append(acc)
        self.chosen = restem_pick_epoch(self.accuracies, self.mode)
        if self.chosen == len(self.accuracies) - 1:  # the newest model is the pick (so far)
            # (under fsdp each rank keeps its own shards)
            self.kept = [_local(p).detach().to("cpu", copy=True) for p in ctx.policy.parameters()]
        self.seconds += time.perf_counter() - t0

    def after_epoch(self, epoch: int) -> bool:
        """Evaluate the model after `epoch` (1-based); whether training should go on."""
        self._evaluate_and_keep()
        return self.mode != "first-drop" or self.chosen == epoch

    def finish(self) -> dict[str, Any]:
        """Load the picked model into the policy; the metrics of the choice."""
        if self.chosen != len(self.accuracies) - 1:
            with torch.no_grad():
                for p, q in zip(self.ctx.policy.parameters(), self.kept, strict=True):
                    _local(p).copy_(q)
        self.kept = []
        return {"restem_chosen_epoch": self.chosen, "restem_epochs_trained": len(self.accuracies) - 1,
                "restem_val_accuracy": self.accuracies[self.chosen], "restem_val_accuracy_start": self.accuracies[0],
                "restem_val_accuracy_by_epoch": list(self.accuracies),
                "restem_validation_seconds": round(self.seconds, 3)}  # (part of time_update)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an fsdp (DTensor) parameter; a plain tensor as it is."""
    return p.to_local() if hasattr(p, "to_local") else p
