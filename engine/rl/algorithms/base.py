"""The interface every RL algorithm implements, and what the trainer lends it.

One iteration is always: sample episodes -> score them -> assign credit -> update -> invalidate
the cache. The trainer owns everything shared: sampling, old and reference log-probs, the
minibatch walk, the gradient sync, clipping, stepping every trainable, distribution,
checkpoints, metrics and evaluation. An algorithm says what it needs and provides the rest:

- class attributes: what it needs (`needs_old_logprobs`, `needs_reference(cfg)`), whether it
  starts a fresh optimizer each iteration (`fresh_optimizer`) and whether its training units
  are built from every rank's episodes (`units_from_all_ranks`);
- `validate(cfg)`: its config rules (ConfigError naming the value), before any work;
- `setup(ctx)`: builds its own extra trainables (PPO's critic) and helpers (CAPO's judge).
  Called once, after the policy and the reference exist and before the optimizer, the
  sharding and the Engine;
- `after_engine(ctx)`: once the policy's Engine exists (CAPO builds its judge's Engine here, so
  that the judge's KV pool is sized from what the policy's left free, before any work);
- `sample(items, first_group, ctx)`: only where `owns_sampling` (SPO-tree's tree rollouts): this
  rank's episodes of the iteration's prompts `items` (global indices from `first_group`), instead
  of the trainer's `samples_per_prompt` independent responses per prompt. It generates through
  `ctx.engine`, seeds each prompt from (`ctx.iteration_seed("sample")`, its global index) when
  `ctx.seeded`, and may not touch the parameters;
- `credit(episodes, ctx)`: sets each episode's per-token `advantages`; returns metrics. It may
  generate through `ctx.engine` (VinePPO's MC rollouts); it may not touch the parameters;
- `units(episodes, ctx)`: what the update walks (the episodes; RestEM's kept samples, DPO+'s
  pairs); returns (units, metrics). RestEM may reset the policy to its base here;
- `begin_minibatch(batch, ctx)`: per-minibatch statistics before the micro-batches (the
  global whitening of the advantages; a collective: every rank calls it);
- `loss(micro, batch, ctx)`: the objective of one micro-batch, not yet backpropagated; the
  trainer checks it is finite, runs the backward and sums the returned statistics;
- `on_update_start` / `after_epoch` / `on_update_end`: RestEM's epoch picker.

An algorithm never steps an optimizer, syncs gradients, writes checkpoints or metrics rows.
Adding one is a file in this folder and a line in `REGISTRY` (engine/rl/algorithms/__init__.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from engine.rl.config import TrainConfig
from engine.rl.distributed import Dist
from engine.rl.packed import Packed
from engine.rl.rollout import Episode


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the update was not applied and the last checkpoint stands."""


class TrainerContext(Protocol):
    """What the trainer lends an algorithm (engine.rl.trainer.Trainer implements it)."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    dtype: torch.dtype
    engine: Any              # engine.runtime.Engine over the policy's own parameters
    task: Any                # engine.tasks.Task
    tokenizer: Any
    policy: nn.Module
    ref: nn.Module | None    # the frozen starting model, when needs_reference(cfg)
    start_dir: Path          # the checkpoint RL started from (after SFT)
    stop: tuple[str, ...]    # the task's stop strings
    iteration: int
    progress: bool
    seeded: bool             # per-prompt sampling seeds (the episodes do not depend on the world size)
    sharded: bool            # parallel fsdp over more than one rank

    def iteration_seed(self, purpose: str) -> int: ...
    def token_logprobs(self, model: nn.Module, packed: Packed, with_entropy: bool = False,
                       temperature: float | None = None): ...
    def evaluate(self, splits: Sequence[str] | None = None) -> dict: ...
    def gathered(self): ...  # fsdp: the policy's whole parameters for the block (collective)
    def release_kv_for_update(self) -> None: ...


@dataclass
class Trainable:
    """A model an algorithm trains beside the policy (PPO's critic), stepped by the trainer.

    The trainer builds its AdamW and schedule, shards it under fsdp, syncs, clips (metric
    `<name>_grad_norm`) and steps it with the policy, and saves it in each checkpoint under
    `<name>/` (whole weights, through `save`) and `sharded_<name>/` (fsdp shards)."""

    name: str
    module: nn.Module
    lr: float
    # (micro, batch) -> metrics; runs its backward. Called for every micro-batch after the policy's.
    micro_backward: Callable[[list[Episode], "Minibatch"], dict[str, float]]
    zero_backward: Callable[[Episode], None]   # a backward adding zero (fsdp: every rank joins the sync)
    save: Callable[[Path, dict | None], None]  # (folder, whole state dict or None: read the module)
    load: Callable[[Path], None]
    shard: Callable[[nn.Module], list]         # fsdp: shard the module, return its groups
    weight_decay: float | None = None          # None: AdamW's default
    opt: Any = None                            # (set by the trainer)
    sched: Any = None
    fsdp: list = field(default_factory=list)

    def set_sync(self, last: bool) -> None:
        """fsdp: reduce-scatter the gradients only in the last backward of a minibatch."""
        if self.fsdp:
            from engine.rl.fsdp import set_sync

            set_sync(self.fsdp, last=last)


@dataclass
class Minibatch:
    """One optimizer step's share of the data on this rank.

    `units` are this rank's part (all of it when units come from every rank); `num_units` and
    `num_tokens` count the GLOBAL minibatch, the loss normalisers, so that N ranks compute the
    one-process gradient. `advantages` maps id(episode) to the advantages the loss reads
    (begin_minibatch may whiten them)."""

    units: list
    num_units: int
    num_tokens: int
    where: str                       # "iteration i, epoch e, minibatch m" for error messages
    advantages: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class LossOut:
    loss: torch.Tensor
    stats: dict[str, float]          # summed over micro-batches and ranks (MAX_STATS: the max)
    skipped: bool = False            # the ratio guard dropped it: no gradient, stats counted as given


MAX_STATS = ("ratio_max",)           # statistics reduced by max instead of sum


class Algorithm:
    """Base class: an on-policy algorithm with no critic, judge or data selection."""

    name: ClassVar[str]
    needs_old_logprobs: ClassVar[bool] = True     # old (behaviour) and reference log-probs, entropy
    fresh_optimizer: ClassVar[bool] = False       # a new AdamW and schedule every iteration
    units_from_all_ranks: ClassVar[bool] = False  # units are built from every rank's episodes (replicated)
    whitens_by_default: ClassVar[bool] = False    # whiten_advantages: auto
    credit_phase: ClassVar[str | None] = "values"  # the timing key of the credit step (None: no credit step)
    # Why it needs samples_per_prompt >= 2 (e.g. "compares the samples of a prompt"); None: it does not
    uses_prompt_groups: ClassVar[str | None] = None
    owns_sampling: ClassVar[bool] = False           # the trainer calls `sample` instead of its own sampling

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    @classmethod
    def validate(cls, cfg: TrainConfig) -> None:
        """Raise ConfigError on a setting this algorithm cannot run with (subclasses call super)."""
        if cls.uses_prompt_groups is not None and cfg.samples_per_prompt < 2:
            from engine.rl.config import ConfigError

            raise ConfigError(f"{cfg.algo} {cls.uses_prompt_groups}: samples_per_prompt must be >= 2, "
                              f"got {cfg.samples_per_prompt}")

    @classmethod
    def max_samples_per_prompt(cls, cfg: TrainConfig) -> int:
        """The most episodes one prompt yields in an iteration (the minibatch arithmetic's count)."""
        return cfg.samples_per_prompt

    @classmethod
    def needs_reference(cls, cfg: TrainConfig) -> bool:
        """Whether the trainer keeps a frozen copy of the starting model (the KL reference)."""
        return cfg.kl_coef > 0

    def setup(self, ctx: TrainerContext) -> list[Trainable]:
        return []

    def after_engine(self, ctx: TrainerContext) -> None:
        pass

    def sample(self, items: list, first_group: int, ctx: TrainerContext) -> list[Episode]:
        """This rank's episodes for `items` (owns_sampling only; see the module docstring)."""
        raise NotImplementedError(f"{self.name} does not sample its own episodes (owns_sampling is False)")

    def credit(self, episodes: list[Episode], ctx: TrainerContext) -> dict[str, float]:
        raise NotImplementedError

    def units(self, episodes: list[Episode], ctx: TrainerContext) -> tuple[list, dict]:
        return episodes, {}

    @staticmethod
    def episodes_of(unit) -> list[Episode]:
        """The episodes one unit trains on (the unit itself, a DPO+ pair's two)."""
        return [unit]

    def begin_minibatch(self, batch: Minibatch, ctx: TrainerContext) -> None:
        """Per-minibatch preparation; a collective (every rank calls it, maybe with no unit)."""

    def loss(self, micro: list, batch: Minibatch, ctx: TrainerContext) -> LossOut:
        raise NotImplementedError

    def on_update_start(self, ctx: TrainerContext) -> None:
        pass

    def after_epoch(self, epoch: int, ctx: TrainerContext) -> bool:
        """After `epoch` (1-based) of the update: whether to go on."""
        return True

    def on_update_end(self, ctx: TrainerContext) -> dict[str, Any]:
        return {}
