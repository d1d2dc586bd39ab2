"""Data parallelism for the trainer: one process per device, launched by plain torchrun.

    torchrun --nproc-per-node 2 -m engine.train --preset smoke       # 2 ranks (gloo on CPU, NCCL on CUDA)
    python -m engine.train --preset smoke                            # 1 process: Dist() with no-op helpers

`init_from_env` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK; MASTER_ADDR and
MASTER_PORT through the default env:// rendezvous) and returns a `Dist`. Without WORLD_SIZE
(or with WORLD_SIZE 1) it returns the single-process `Dist()`, whose collectives return their
input, so the trainer has one code path for both.

Every collective has the timeout given to init_process_group: a rank that died (or raised and
left) makes the others fail in their next collective within that time instead of hanging.
"""
from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    """The process's place in the job. The default is a single process (world_size 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (single process)
    # A gloo group with a long timeout, for waits on work that rank 0 alone does (writing a
    # checkpoint, the HF export, removing an old run): see wait_for_main.
    main_only_group: Any = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory (metrics, config, plots, checkpoints, final/)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: cuda:LOCAL_RANK when `device` is CUDA and there are several ranks."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    @property
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def shard(self, count: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous share of `count` items (the first `count %
        world_size` ranks get one more)."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, x: torch.Tensor | Sequence[float]) -> torch.Tensor | list[float]:
        """Sum over ranks. A tensor is reduced in place (and returned); a sequence of floats
        comes back as a list of float64 sums."""
        if isinstance(x, torch.Tensor):
            if self.distributed:
                if x.device == self._comm_device:
                    tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
                else:
                    y = x.to(self._comm_device)
                    tdist.all_reduce(y, op=tdist.ReduceOp.SUM)
                    x.copy_(y)
            return x
        return self._reduce_floats(x, tdist.ReduceOp.SUM)

    def all_reduce_max(self, values: Sequence[float]) -> list[float]:
        return self._reduce_floats(values, tdist.ReduceOp.MAX)

    def _reduce_floats(self, values: Sequence[float], op) -> list[float]:
        """Element-wise `op` of a list of numbers over the ranks (float64 on the wire)."""
        values = [float(v) for v in values]
        if not self.distributed or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        tdist.all_reduce(t, op=op)
        return t.cpu().tolist()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                tdist.barrier(device_ids=[self.local_rank])
            else:
                tdist.barrier()

    def wait_for_main(self) -> None:
        """Every rank waits here until rank 0 arrives, after work that rank 0 alone does. The wait
        has the main-only timeout (`checkpoint_timeout_s`: a 7B checkpoint takes longer to write
        than the collectives' timeout), not the collectives' one. Without that group: a barrier."""
        if not self.distributed:
            return
        if self.main_only_group is None:
            self.barrier()
        else:
            tdist.barrier(group=self.main_only_group)

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter], bucket_elements: int = 1 << 25) -> None:
        """Sum the gradients of `params` over ranks, in place, so every rank steps with the same
        gradient. A parameter without a gradient on some rank counts as zero there; one without a
        gradient on every rank keeps `grad = None` (as in one process, the optimizer skips it)."""
        if not self.distributed:
            return
        params = list(params)
        has = self.all_reduce_sum(torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                                               device=self._comm_device))
        live = [p for p, h in zip(params, has.tolist()) if h > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for p in live + [None]:
            if p is not None:
                bucket.append(p.grad)
                size += p.grad.numel()
            if bucket and (p is None or size >= bucket_elements):
                # summed in fp32 whatever the gradients' dtype: a bf16 sum rounds at every
                # addition of the reduction, fp32 once when copied back
                flat = torch.cat([g.reshape(-1).float() for g in bucket])
                self.all_reduce_sum(flat)
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset: offset + g.numel()].view_as(g))
                    offset += g.numel()
                bucket, size = [], 0

    def shutdown(self) -> None:
        """Leave the process group (after a clean run, or when this rank failed: the others then
        fail in their next collective instead of waiting for it)."""
        if self.distributed and tdist.is_initialized():
            tdist.destroy_process_group()


T = TypeVar("T")


def run_ranks(dist: Dist, body: Callable[[], T]) -> T:
    """`body()` on this rank; under torchrun an error (or SystemExit) on any rank ends every rank.

    One process: body() as is (exceptions propagate). Several ranks: a failing rank prints its
    error and leaves at once with os._exit (non-zero), without the process group's shutdown
    handshake (the other ranks may be waiting in a collective): they fail in it when this rank's
    connections close, at the latest after the process group's timeout, and torchrun stops the
    job with a non-zero exit. After a clean run the rank leaves the process group.
    """
    if not dist.distributed:
        return body()
    try:
        out = body()
    except BaseException as e:  # noqa: BLE001 - any failure on one rank must end every rank
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
        if isinstance(e, SystemExit) and isinstance(e.code, str):  # SystemExit("message"): print it, as Python does
            print(e.code, file=sys.stderr)
        elif not isinstance(e, SystemExit):
            traceback.print_exc()
            print(f"error (rank {dist.rank} of {dist.world_size}): {e}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code or 1)
    dist.shutdown()
    return out


def init_from_env(timeout_s: float = 300, device: str = "auto", main_only_timeout_s: float = 3600) -> Dist:
    """The Dist of this process: from torchrun's environment, or the single-process Dist().

    device: the trainer's `device` setting; NCCL when the ranks run on CUDA, else gloo.
    timeout_s: every collective's; main_only_timeout_s: waits on rank 0's own work (wait_for_main).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    main_only = tdist.new_group(backend="gloo", timeout=timedelta(seconds=main_only_timeout_s))
    return Dist(rank=rank, world_size=world, local_rank=local, backend=backend, main_only_group=main_only)
