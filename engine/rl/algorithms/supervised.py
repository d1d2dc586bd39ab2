"""The shape RestEM and DPO+ share: no per-token credit; each iteration selects training units
from every rank's episodes (kept samples, preference pairs) and trains on them for `epochs`
passes with a fresh optimizer and schedule (the data size varies from one iteration to the next)."""
from __future__ import annotations

from typing import ClassVar

from engine.rl.algorithms.base import Algorithm, TrainerContext
from engine.rl.rollout import Episode


class SelectedData(Algorithm):
    needs_old_logprobs = False
    fresh_optimizer = True
    units_from_all_ranks = True
    credit_phase = None
    empty_message: ClassVar[str] = "no training unit"  # the warning when an iteration selects nothing

    def credit(self, episodes: list[Episode], ctx: TrainerContext) -> dict[str, float]:
        return {}
