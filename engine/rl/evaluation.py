"""Held-out evaluation during training: the evaluated splits, fixed for the run, and their
accuracy through the trainer's Engine (data-parallel: each rank scores its share of the items)."""
from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.rl.config import ConfigError, TrainConfig
from engine.runtime import SamplingParams
from engine.tasks import Item, Task

if TYPE_CHECKING:
    from engine.rl.trainer import Trainer


def eval_sets(cfg: TrainConfig, task: Task, train_items: list[Item]) -> tuple[dict[str, list[Item]], list[Item]]:
    """The items of each evaluated split (cfg.eval_splits), and the train items left to train on.

    validation: the last `validation_items` of the train items in a fixed shuffled order; they
    are removed from the train items, so the run never trains on them. train: the first
    `eval_items` of the (remaining) train items in another fixed order.
    """
    sets: dict[str, list[Item]] = {}
    if "validation" in cfg.eval_splits:
        order = list(train_items)
        random.Random("validation-split").shuffle(order)
        if cfg.validation_items >= len(order):
            raise ConfigError(f"validation_items {cfg.validation_items} leaves no train item: the train split "
                              f"has {len(order)}")
        held = {id(it) for it in order[-cfg.validation_items:]}
        train_items = [it for it in train_items if id(it) not in held]
        sets["validation"] = order[-cfg.validation_items:][: cfg.eval_items]
    for split in cfg.eval_splits:
        if split == "test":
            sets["test"] = task.items("test")[: cfg.eval_items]
        elif split == "train":
            order = list(train_items)
            random.Random("train-eval").shuffle(order)
            sets["train"] = order[: cfg.eval_items]
    return {split: sets[split] for split in cfg.eval_splits}, train_items


@torch.no_grad()
def evaluate(trainer: "Trainer", splits: Sequence[str] | None = None) -> dict:
    """Accuracy on each evaluated split through the Engine: the mean reward over eval_samples
    samples per item, its standard error over items, and (n > 1) the majority-vote accuracy.

    Metrics eval_<split>_accuracy / _stderr / _majority_accuracy; the held-out split (test,
    else validation; none when only train is evaluated) is also eval_accuracy / eval_stderr /
    eval_majority_accuracy, which the plots and the summary read.
    """
    cfg = trainer.cfg
    t0 = time.perf_counter()
    trainer.policy.eval()
    # Evaluation draws from its own seeded generators, so it never moves the training RNG; one
    # seed per item, so the items' samples are independent draws.
    params = SamplingParams(n=cfg.eval_samples, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                            max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens, stop=trainer.stop,
                            seed=cfg.seed if cfg.eval_temperature > 0 else None)
    out: dict[str, float] = {}
    held_out = next((x for x in ("test", "validation") if x in trainer.eval_sets), None)
    with trainer.gathered():
        for split, items in trainer.eval_sets.items():
            if splits is None or split in splits:
                for k, v in _evaluate_split(trainer, split, items, params).items():
                    out[f"eval_{split}_{k}"] = v
                    if split == held_out:
                        out[f"eval_{k}"] = v
    out["time_eval"] = round(time.perf_counter() - t0, 3)
    return out


def _evaluate_split(trainer: "Trainer", split: str, items: list[Item], params: SamplingParams) -> dict[str, float]:
    from engine.evaluate import majority_correct

    task, dist = trainer.task, trainer.dist
    # This rank's contiguous share of the items, with the seeds they have in one process; the
    # per-item results are gathered, so every rank computes the same metrics.
    lo, hi = dist.shard(len(items))
    outs = trainer.engine.generate([task.prompt(it) for it in items[lo:hi]], params.per_prompt(len(items))[lo:hi],
                                   progress=trainer.progress and f"evaluation ({split})") if hi > lo else []
    local = []
    for it, cs in zip(items[lo:hi], outs):
        rewards = [task.reward(c.text, it, c.finish_reason) for c in cs]
        local.append((float(np.mean(rewards)), majority_correct(task, it, [c.text for c in cs])))
    every = [x for part in dist.all_gather_object(local) for x in part]
    means = np.array([m for m, _ in every])
    # Standard error over items (the samples of one item are not independent of each other).
    stderr = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else 0.0
    metrics = {"accuracy": float(means.mean()), "stderr": stderr}
    if params.n > 1:
        metrics["majority_accuracy"] = float(np.mean([v for _, v in every]))
    return metrics
