"""The trainer's checkpoints: checkpoints/iter_NNNNNN holds the policy in HF format, each extra
trainable (a critic) under its name, and trainer_state.pt (optimizers, schedules, RNG);
under fsdp the shards through torch.distributed.checkpoint. Resume continues exactly."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.model import load_model
from engine.rl.config import ConfigError, TrainConfig, config_from_run

if TYPE_CHECKING:
    from engine.rl.trainer import Trainer

STATE_FILE = "trainer_state.pt"
SHARDED_DIR = "sharded"  # parallel fsdp: the parameter and optimizer shards (torch.distributed.checkpoint)
RESUME_MAY_CHANGE = ("iterations", "stop_after", "dist_timeout_s", "checkpoint_timeout_s")
PREVIOUS_RUN_FILES = ("checkpoints", "sft", "init", "final", "tb", "metrics.jsonl", "curves.png", "summary.json")


def check_resume_config(cfg: TrainConfig, run_dir: Path) -> None:
    """--resume continues the run it was started as: only RESUME_MAY_CHANGE may differ."""
    saved = config_from_run(run_dir)
    now = cfg.to_dict()
    differ = sorted(k for k in set(saved) | set(now) if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k))
    if differ:
        raise ConfigError(f"--resume: the config differs from the one {run_dir} was started with in "
                          f"{', '.join(differ)} (only {', '.join(RESUME_MAY_CHANGE)} may change; a run saved "
                          f"before a key existed lacks it)")


def clear_previous_run(run_dir: Path, verbose: bool) -> None:
    """A fresh start in a used run directory: drop what the old run left (or --resume would mix them)."""
    stale = [p for p in PREVIOUS_RUN_FILES if (run_dir / p).exists()]
    if stale and verbose:
        print(f"starting afresh in {run_dir}: removing the previous run's {', '.join(stale)} "
              f"(pass --resume to continue it instead)")
    for name in stale:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def rng_state(cuda_by_rank: list[torch.Tensor] | None = None) -> dict:
    """The host generators (rank 0's: every rank seeds them alike) and each rank's own CUDA
    generator state (`cuda_by_rank`, gathered by `cuda_states`), for an exact resume."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if cuda_by_rank is not None:
        state["cuda_by_rank"] = cuda_by_rank
    return state


def cuda_states(trainer: "Trainer") -> list[torch.Tensor] | None:
    """Every rank's CUDA generator state of its own device, by rank (collective); None off CUDA."""
    if trainer.device.type != "cuda":
        return None
    return trainer.dist.all_gather_object(torch.cuda.get_rng_state(trainer.device).cpu())


def set_rng_state(state: dict, rank: int = 0, device: torch.device = torch.device("cpu")) -> None:
    """Restore `state` on this rank: the host generators, and this rank's saved CUDA state on its
    current device (a node with fewer GPUs than the saving one is fine; a rank that did not exist
    then keeps its seeded state)."""
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type != "cuda":
        return
    if "cuda_by_rank" in state:
        saved = state["cuda_by_rank"]
        mine = saved[rank] if rank < len(saved) else None
    else:  # (before 2026-12-06: rank 0's get_rng_state_all(), one state per GPU it could see)
        saved = state.get("cuda", [])
        index = device.index if device.index is not None else 0
        mine = saved[index] if index < len(saved) else None
    if mine is not None:
        torch.cuda.set_rng_state(mine, device)


def _tuples(x):
    """random.setstate needs the nested tuples back (a saved state may come back as lists)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(trainer: "Trainer") -> Path:
    """checkpoints/iter_NNNNNN: the policy in HF format (+ trainables) and trainer_state.pt; then
    prune. Every rank calls it (fsdp gathers the weights); rank 0 writes."""
    dist = trainer.dist
    root = trainer.run_dir / "checkpoints"
    path = root / f"iter_{trainer.iteration:06d}"
    tmp = root / f".tmp_iter_{trainer.iteration:06d}"
    full = trainer.full_state_dict()
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.policy.save_pretrained(str(tmp), tokenizer=trainer.tokenizer, state_dict=full)
    del full  # (fsdp: one whole model at a time, on rank 0's CPU)
    for t in trainer.trainables:
        t_full = trainer.full_state_dict(t.module)
        if dist.is_main:
            t.save(tmp / t.name, t_full)
        del t_full
    metas: dict[str, dict] = {}
    if trainer.sharded:  # every rank writes its shards (DCP) before rank 0 publishes the folder
        from engine.rl.fsdp import save_sharded_state

        dist.wait_for_main()  # (rank 0 has made tmp/ and written the whole weights)
        metas["fsdp"] = save_sharded_state(trainer.policy, trainer.opt, tmp / SHARDED_DIR)
        for t in trainer.trainables:
            metas[f"fsdp_{t.name}"] = save_sharded_state(t.module, t.opt, tmp / f"{SHARDED_DIR}_{t.name}")
        dist.barrier()
    by_rank = cuda_states(trainer)  # (collective)
    if dist.is_main:
        _write_state(trainer, tmp, path, root, by_rank, metas)
    dist.wait_for_main()  # (the other ranks wait for the whole checkpoint, with the main-only timeout)
    return path


def _write_state(trainer: "Trainer", tmp: Path, path: Path, root: Path, by_rank, metas: dict) -> None:
    """Rank 0: trainer_state.pt, then publish tmp/ as path/ and prune the oldest checkpoints."""
    dist = trainer.dist
    state = {"iteration": trainer.iteration, "scheduler": trainer.sched.state_dict(), "rng": rng_state(by_rank)}
    if trainer.sharded:
        state["fsdp"] = {"world_size": dist.world_size, **metas["fsdp"]}
    else:
        state["optimizer"] = trainer.opt.state_dict()
    for t in trainer.trainables:
        state[f"{t.name}_scheduler"] = t.sched.state_dict()
        if trainer.sharded:
            state[f"fsdp_{t.name}"] = metas[f"fsdp_{t.name}"]
        else:
            state[f"{t.name}_optimizer"] = t.opt.state_dict()
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # a checkpoint directory exists only once complete
    (root / "latest").write_text(path.name)
    kept = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in kept[: -trainer.cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def load_latest(trainer: "Trainer") -> None:
    """Restore the latest checkpoint into the trainer's own tensors (the Engine keeps reading them)."""
    root = trainer.run_dir / "checkpoints"
    pointer = root / "latest"
    if not pointer.exists():
        raise FileNotFoundError(f"cannot resume: no checkpoint in {root}")
    path = root / pointer.read_text().strip()
    # weights_only: plain tensors and containers, no code runs from the file.
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if "fsdp_world_size" in state:
        raise ConfigError(f"cannot resume {path}: it was written by an earlier version of parallel fsdp "
                          f"(optimizer_rank<r>.pt files), which this version does not read; start the run "
                          f"again, or from its weights with --model {path}")
    written = state.get("fsdp")
    if bool(written) != trainer.sharded:
        # (fsdp trains the q/k/v and gate/up matrices unfused, so the optimizer state does not
        # map onto the fused parameters of an unsharded run, nor the other way round)
        was = f"with parallel fsdp on {written['world_size']} ranks" if written else "without parallel fsdp"
        now = f"parallel fsdp on {trainer.dist.world_size} ranks" if trainer.sharded else "not sharded"
        raise ConfigError(f"cannot resume {path}: it was written {was}, and this run is {now}; resume it as "
                          f"it was written (a sharded run resumes on any number of ranks >= 2)")
    if trainer.sharded:  # each rank reads its rows of the weights and the optimizer state, whatever wrote them
        from engine.rl.fsdp import load_sharded_state

        load_sharded_state(trainer.policy, trainer.opt, path / SHARDED_DIR, written)
    else:
        loaded, _ = load_model(path, dtype=trainer.dtype, device=trainer.device)
        with torch.no_grad():  # copy into the existing tensors: the Engine keeps reading the same storage
            for p, q in zip(trainer.policy.parameters(), loaded.parameters(), strict=True):
                p.copy_(q)
        trainer.opt.load_state_dict(state["optimizer"])
    trainer.sched.load_state_dict(state["scheduler"])
    for t in trainer.trainables:
        if trainer.sharded:
            from engine.rl.fsdp import load_sharded_state

            load_sharded_state(t.module, t.opt, path / f"{SHARDED_DIR}_{t.name}", state[f"fsdp_{t.name}"])
        else:
            t.load(path / t.name)
            t.opt.load_state_dict(state[f"{t.name}_optimizer"])
        t.sched.load_state_dict(state[f"{t.name}_scheduler"])
    set_rng_state(state["rng"], trainer.dist.rank, trainer.device)
    trainer.iteration = int(state["iteration"])
    metrics = trainer.metrics_path
    if metrics.exists() and trainer.dist.is_main:  # drop rows written after the checkpoint (an interrupted iteration)
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows if r["iteration"] <= trainer.iteration))
    trainer.engine.invalidate_cache()
