"""The RL loop on ONE set of weights: sample -> credit -> update -> invalidate, for any algorithm.

    trainer = Trainer(load_config("smoke"))
    summary = trainer.run()

Per iteration:
1. sample `samples_per_prompt` responses for `prompts_per_iteration` train prompts through the
   Engine (the responses stay in its prefix cache) and grade them (an algorithm that
   `owns_sampling` builds its episodes itself: tree rollouts);
2. credit: the algorithm (engine/rl/algorithms, picked by `cfg.algo`) sets each response's
   per-token advantages; it may generate through the Engine (MC rollouts hit the cache);
3. units: what the update walks (the episodes, or the algorithm's selection of them);
4. old and reference log-probs at the sampling temperature (no grad), when the algorithm needs
   them; then `epochs` passes over shuffled minibatches; each minibatch is one AdamW step of the
   policy and of every extra trainable, accumulated over micro-batches with the minibatch's
   global counts as the loss normalisers;
5. `engine.invalidate_cache()`: the Engine reads the same parameter tensors the optimizer just
   changed (it holds the module, not a copy), so its cached KV is now stale.

Held-out evaluation every `eval_every` iterations (engine/rl/evaluation.py); one metrics row per
iteration in <run_dir>/metrics.jsonl; checkpoints every `save_every` iterations
(engine/rl/checkpointing.py); `resume=True` continues from the latest one exactly.

Data parallelism (`torchrun --nproc-per-node N -m engine.train`, engine/rl/distributed.py): every
rank holds the whole model (or its fsdp shards) and its own Engine, and samples a contiguous share
of the iteration's prompts, seeded by (run seed, iteration, global prompt index): the episodes do
not depend on the world size. Every rank walks the same shuffled minibatches; a rank computes the
loss of the units it owns (units built from every rank's episodes: every world_size-th
micro-batch), normalised by the GLOBAL minibatch's counts; gradients are summed over ranks before
clipping, so N ranks take the one-process step. A rank with nothing in a minibatch (or a micro-batch
the ratio guard skips) adds zero and still joins the sync. Rank 0 writes the run directory.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.evaluate import STOP_STRINGS  # the template's next "Problem:" ends a response
from engine.kernels.fused_logprobs import fused_logprobs
from engine.model import Transformer, create_tiny_checkpoint, load_model
from engine.progress import progress_bar
from engine.rl import checkpointing, evaluation, metrics
from engine.rl.algorithms import REGISTRY, Minibatch, Trainable, TrainingDiverged
from engine.rl.algorithms.base import MAX_STATS
from engine.rl.config import ALL, ConfigError, TrainConfig, dump_config
from engine.rl.distributed import Dist
from engine.rl.optim import AdamW, clip_grad_norm, warmup_linear_decay
from engine.rl.packed import Packed, chunks
from engine.rl.rollout import Episode, sample_episodes
from engine.runtime import Engine, SamplingParams
from engine.runtime.params import mix_seed
from engine.tasks import ChatTemplateError, Item, Task, TaskDataError, load_task

__all__ = ["Trainer", "TrainingDiverged", "resolve_device"]



def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {cfg.device} was asked for but CUDA is not available")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


class Trainer:
    """Any registered algorithm on a model the Engine samples from directly (the algorithm's
    TrainerContext: engine/rl/algorithms/base.py)."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, progress: bool = True, dist: Dist | None = None):
        self.cfg = cfg.validate()
        self.algorithm = REGISTRY[cfg.algo](cfg)
        self.dist = dist = dist if dist is not None else Dist()
        self.progress = progress and dist.is_main  # (one set of progress bars)
        self.run_dir = Path(cfg.run_dir)
        self.device, self.dtype = resolve_device(cfg)
        self.device = dist.device(self.device)
        try:
            self.task: Task = load_task(cfg.task, **cfg.task_args)
        except TaskDataError:
            raise
        except (TypeError, ValueError) as e:  # a bad task option (unknown grading, ...): a config error
            raise ConfigError(f"task_args for {cfg.task}: {e}") from None
        if self.task.chat:  # checked before the run directory is touched
            from engine.model.checkpoint import load_tokenizer

            try:  # the task's own check (the tokenizer is set again once the model is loaded)
                self.task.use_tokenizer(load_tokenizer(cfg.model) if cfg.model is not None else None)
            except ChatTemplateError:
                raise ConfigError(f"task_args chat: true needs a tokenizer with a chat template; "
                                  f"{cfg.model or 'the built-in tiny model'} has none") from None
        self.stop = STOP_STRINGS.get(cfg.task, ())
        # may carve a validation split off the train items
        self.eval_sets, self.train_items = evaluation.eval_sets(cfg, self.task, self.task.items("train"))
        cfg.check_batch_division(len(self.train_items))  # prompts_per_iteration "all": known only now
        self.prompts_per_iteration = (len(self.train_items) if cfg.prompts_per_iteration == ALL
                                      else cfg.prompts_per_iteration)
        self._check_world_size()
        self.iteration = 0
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            checkpointing.check_resume_config(cfg, self.run_dir)
        elif dist.is_main:
            checkpointing.clear_previous_run(self.run_dir, self.progress)
        dist.wait_for_main()  # every rank has read the run directory before rank 0 rewrites it
        if dist.is_main:
            dump_config(cfg, self.run_dir / "config.yaml")
        self._seed_everything()

        # Every rank builds the starting checkpoint together (SFT data-parallel; rank 0 writes the
        # folders); then every rank's random streams start alike.
        self.start_dir = self._initial_policy()
        if dist.distributed:
            self._seed_everything()
        # Seeded sampling (config seeded_sampling): the episodes do not depend on the world size.
        self.seeded = cfg.seeded_sampling is True or (cfg.seeded_sampling == "auto" and dist.distributed)
        self.sharded = cfg.parallel == "fsdp" and dist.distributed
        # (sharded: loaded on the host, then each group moved to the device as it is sharded)
        self.policy, self.tokenizer = load_model(self.start_dir, dtype=self.dtype,
                                                 device="cpu" if self.sharded else self.device)
        if self.tokenizer is None:
            raise ValueError(f"{self.start_dir} has no tokenizer files; the trainer needs one to read and grade "
                             f"responses")
        self.task.use_tokenizer(self.tokenizer)
        self.policy.gradient_checkpointing = cfg.gradient_checkpointing
        # The frozen starting model (the KL reference, a preference loss's reference, a base to restart from).
        self.ref = self._frozen_copy(self.start_dir) if self.algorithm.needs_reference(cfg) else None
        self.trainables: list[Trainable] = self.algorithm.setup(self)
        # --parallel fsdp (engine/rl/fsdp.py): the policy sharded over the ranks; generation runs
        # inside self.gathered() (whole parameters), training forwards all-gather through FSDP.
        self._fsdp: list = []
        if self.sharded:
            from engine.rl.fsdp import shard_policy

            self._fsdp = shard_policy(self.policy, self.device)
            for t in self.trainables:
                t.fsdp = t.shard(t.module)  # (to ctx.device)
        self.steps_per_iteration = cfg.epochs * (cfg.episodes_per_iteration(len(self.train_items))
                                                 // cfg.minibatch_size)
        total = cfg.iterations * self.steps_per_iteration
        self.opt, self.sched = self._optimizer(self.policy, cfg.lr, cfg.weight_decay, total)
        for t in self.trainables:
            t.opt, t.sched = self._optimizer(t.module, t.lr, t.weight_decay, total)
        # The Engine holds the policy module itself: same parameter tensors, no copy.
        with self.gathered():
            self.engine = Engine(self.policy, self.tokenizer, page_size=cfg.page_size, max_num_seqs=cfg.max_num_seqs,
                                 max_batch_tokens=cfg.max_batch_tokens, kv_cache_tokens=cfg.kv_cache_tokens,
                                 kv_memory_fraction=cfg.kv_memory_fraction)
        self.algorithm.after_engine(self)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume:
            checkpointing.load_latest(self)
        self._tb = self._tensorboard() if cfg.tensorboard and dist.is_main else None

    # ------------------------------------------------------------------ setup
    def _seed_everything(self) -> None:
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)

    def _optimizer(self, module: nn.Module, lr: float, weight_decay: float | None, steps: int):
        """AdamW and its warmup/decay schedule over `steps` optimizer steps."""
        cfg = self.cfg
        extra = {} if weight_decay is None else {"weight_decay": weight_decay}
        opt = AdamW(module.parameters(), lr=lr, betas=cfg.adam_betas, **extra)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(steps, cfg.warmup_ratio,
                                                                                 cfg.warmup_type))

    def gathered(self):
        """Under fsdp: the policy's whole parameters for the block (collective); else nothing."""
        if not self._fsdp:
            return contextlib.nullcontext()
        from engine.rl.fsdp import gathered

        return gathered(self._fsdp)

    def release_kv_for_update(self) -> None:
        """Under fsdp: the KV pool's memory goes to the update (the whole parameters of the
        generation phase are freed too); the next generate() allocates the pool again. (Not in
        other modes: their parameters keep their storage, so the Engine's CUDA graphs stay valid,
        and releasing the pool would make them recapture every iteration; under fsdp the
        whole parameters are freed and allocated again every iteration anyway.)"""
        if self._fsdp:
            self.engine.release_kv_memory()

    def _check_world_size(self) -> None:
        """What data parallelism cannot do (yet): errors before any work."""
        world = self.dist.world_size
        if world == 1:
            return
        if self.cfg.sft_steps and self.cfg.sft_batch_size < world:
            raise ConfigError(f"sft_batch_size {self.cfg.sft_batch_size} is smaller than the world size {world}: "
                              f"every rank trains on a share of each SFT batch")
        if self.cfg.seeded_sampling is False:
            raise ConfigError(f"seeded_sampling: false under data parallelism (world size {world}) would give every "
                              f"rank the same random draws (every rank seeds torch alike): use auto or true")
        if self.prompts_per_iteration % world:
            raise ConfigError(f"prompts_per_iteration {self.prompts_per_iteration} is not divisible by the world size "
                              f"{world}: every rank samples an equal share of the prompts")

    def _initial_policy(self) -> Path:
        """The checkpoint RL starts from (also the frozen reference): the model, after SFT if asked.

        Collective: every rank calls it and runs the SFT stage (data-parallel, engine.sft); rank 0
        alone writes init/ and sft/, and every rank returns only once they are whole."""
        cfg, dist = self.cfg, self.dist
        if cfg.model is None:
            base = self.run_dir / "init"
            if dist.is_main and not (base / "config.json").exists():
                create_tiny_checkpoint(base, seed=cfg.seed, **cfg.tiny_model_args)
        else:
            base = Path(cfg.model)
        sft_dir = self.run_dir / "sft"
        # Rank 0's view decides whether SFT is done (a rank may not see the file system as rank 0
        # does); the broadcast also holds the other ranks until init/ is written.
        done = dist.broadcast_object((sft_dir / "sft_done.json").exists() if dist.is_main else None)
        if cfg.sft_steps == 0:
            return base
        if done:
            return sft_dir
        from engine.sft import save_checkpoint, sft  # the SFT stage shares the optimizer code, not the RL loop

        sharded = cfg.parallel == "fsdp" and dist.distributed
        model, tok = load_model(base, dtype=self.dtype, device="cpu" if sharded else self.device)
        if sharded:
            from engine.rl.fsdp import shard_policy

            shard_policy(model, self.device)
        t0 = time.perf_counter()
        losses = sft(model, tok, self.task, steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr,
                     seed=cfg.seed, progress=self.progress, items=self.train_items,  # never the validation items
                     dist=dist)
        save_checkpoint(model, tok, sft_dir, dist)  # (rank 0 writes; fsdp: gathered first)
        if dist.is_main:  # written last: its presence means sft/ is whole
            (sft_dir / "sft_done.json").write_text(json.dumps(
                {"steps": cfg.sft_steps, "first_loss": losses[0], "last_loss": losses[-1],
                 "seconds": round(time.perf_counter() - t0, 1), "world_size": dist.world_size}))
        dist.wait_for_main()  # sft/ is whole before any rank reads it
        return sft_dir

    def _frozen_copy(self, path: Path) -> Transformer:
        ref, _ = load_model(path, dtype=self.dtype, device="cpu" if self.cfg.ref_offload else self.device)
        ref.eval().requires_grad_(False)
        return ref

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.run_dir / "tb"))

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Train until `iterations` (or `stop_after`); returns the last metrics row."""
        cfg = self.cfg
        row: dict = {}
        if self.iteration == 0:
            row = self._log({"iteration": 0, **self.evaluate()})
        last = min(cfg.iterations, cfg.stop_after or cfg.iterations)
        bar = progress_bar(range(self.iteration + 1, last + 1), desc=f"{cfg.algo} iterations", disable=not self.progress,
                   initial=self.iteration, total=cfg.iterations)
        for it in bar:
            self.iteration = it
            row = self.train_iteration()
            if it % cfg.eval_every == 0 or it == cfg.iterations:
                row.update(self.evaluate())
            self._log(row)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", **(
                {"eval": f"{row['eval_accuracy']:.3f}"} if "eval_accuracy" in row else {}))
            if it % cfg.save_every == 0 or it == last:
                self.save_checkpoint()  # (rank 0 writes; under fsdp every rank gathers the weights)
        if self.iteration == cfg.iterations:
            state = self.full_state_dict()
            if self.dist.is_main:
                from engine.rl.plots import plot_metrics

                plot_metrics(self.metrics_path, self.run_dir / "curves.png", title=f"{cfg.algo} on {cfg.task}")
                final = self.run_dir / "final"
                self.policy.save_pretrained(str(final), tokenizer=self.tokenizer, state_dict=state)
            self.dist.wait_for_main()
        if self._tb is not None:
            self._tb.close()
        return row

    def _items_for(self, iteration: int) -> list[Item]:
        """The iteration's prompts: a shuffle of the train set seeded by (seed, iteration), first N."""
        rng = random.Random(f"prompts-{self.cfg.seed}-{iteration}")
        n = self.prompts_per_iteration
        return rng.sample(self.train_items, n) if n <= len(self.train_items) else rng.choices(self.train_items, k=n)

    def iteration_seed(self, purpose: str) -> int:
        """The seed of this iteration's sampling ("sample"), MC rollouts ("mc") or a judge's votes
        ("judge"), from the run seed."""
        salt = {"sample": 0x5A3D, "mc": 0x3C7F, "judge": 0x1D6E}[purpose]
        return mix_seed(mix_seed(self.cfg.seed, salt), self.iteration)

    def _gather_episodes(self, episodes: list[Episode]) -> dict[str, list]:
        """Per-episode metrics inputs of every rank, concatenated in global episode order."""
        with_advantages = all(e.advantages is not None for e in episodes)
        local = {"reward": [e.reward for e in episodes], "num_tokens": [e.num_tokens for e in episodes],
                 "finish_reason": [e.finish_reason for e in episodes],
                 "advantages": torch.cat([e.advantages for e in episodes]) if with_advantages else None}
        parts = self.dist.all_gather_object(local)
        out = {k: [x for p in parts for x in p[k]] for k in local if k != "advantages"}
        if all(p["advantages"] is not None for p in parts):
            out["advantages"] = torch.cat([p["advantages"] for p in parts])
        return out

    def train_iteration(self) -> dict:
        cfg, algo, row = self.cfg, self.algorithm, {"iteration": self.iteration}
        times: dict[str, float] = {}
        self.engine.invalidate_cache()  # KV of the last evaluation is of no use here
        self.policy.eval()

        t0 = time.perf_counter()
        self.engine.stats.reset()
        with self.gathered():  # (fsdp: the whole parameters from sampling to the end of the credit step)
            episodes = self._sample_episodes()
            times["sample"] = time.perf_counter() - t0
            row["sample_tokens_per_s"] = self.dist.all_reduce_sum([float(sum(e.num_tokens for e in episodes))])[0] \
                / times["sample"]
            row["sample_prefill_tokens"] = int(self.dist.all_reduce_sum([self.engine.stats.prefill_tokens])[0])
            t0 = time.perf_counter()
            self.engine.stats.reset()
            row.update(algo.credit(episodes, self))
        self.release_kv_for_update()
        if algo.credit_phase is not None:
            times[algo.credit_phase] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if algo.units_from_all_ranks and self.dist.distributed:  # (every rank builds the same units)
            source = [e for part in self.dist.all_gather_object(episodes) for e in part]
        else:
            source = episodes
        units, data_metrics = algo.units(source, self)
        row.update(data_metrics)
        times["data"] = time.perf_counter() - t0
        if algo.needs_old_logprobs:
            t0 = time.perf_counter()
            self._logprobs(episodes)
            times["logprobs"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if units:
            row.update(self._update(units))
        else:  # nothing to learn from: the weights stay as they are (or as the algorithm's units() reset them)
            warnings.warn(f"{cfg.algo} iteration {self.iteration}: {algo.empty_message}; the update is skipped",
                          RuntimeWarning, stacklevel=2)
            row.update(update_skipped=1, optimizer_steps=0, lr=0.0)
        times["update"] = time.perf_counter() - t0
        self.engine.invalidate_cache()  # the weights changed in place (or were reset): cached KV is stale

        every = self._gather_episodes(episodes)  # all ranks' episodes, in global order
        rewards = np.array(every["reward"])
        row.update(
            reward_mean=float(rewards.mean()), train_accuracy=float((rewards == 1.0).mean()),
            response_length=float(np.mean(every["num_tokens"])),
            truncated_frac=float(np.mean([f == "length" for f in every["finish_reason"]])),
            # stopped without a final answer (cut by length: truncated_frac)
            unfinished_frac=float(np.mean([f == "unfinished" for f in every["finish_reason"]])),
            **{f"time_{k}": round(v, 3) for k, v in times.items()},
        )
        if "advantages" in every:
            adv = every["advantages"]
            row.update(adv_mean=float(adv.mean()), adv_std=float(adv.std()) if adv.numel() > 1 else 0.0,
                       adv_abs_mean=float(adv.abs().mean()), adv_zero_frac=float((adv == 0).float().mean()))
        if algo.needs_old_logprobs:
            row.update(metrics.logprob_metrics(episodes, self.dist, with_ref=self.ref is not None),
                       **metrics.mismatch_metrics(episodes, self.dist),
                       update_tokens_per_s=sum(every["num_tokens"]) * cfg.epochs / max(times["update"], 1e-9))
        return row

    def _sample_episodes(self) -> list[Episode]:
        """This rank's episodes of the current iteration: samples_per_prompt responses to each of
        its contiguous share of the iteration's prompts, graded. Seeded sampling: each prompt is
        seeded by (seed, iteration, its global index), so its samples are the same whatever the
        world size and batch. (Under fsdp, call it inside self.gathered().)"""
        cfg = self.cfg
        params = SamplingParams(n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens, stop=self.stop, logprobs=True)
        items = self._items_for(self.iteration)
        lo, hi = self.dist.shard(len(items))
        if self.algorithm.owns_sampling:  # (e.g. tree rollouts: the algorithm builds its episodes itself)
            return self.algorithm.sample(items[lo:hi], lo, self)
        base = self.iteration_seed("sample")
        per_item = [replace(params, seed=mix_seed(base, g)) for g in range(lo, hi)] if self.seeded else params
        return sample_episodes(self.engine, self.task, items[lo:hi], per_item, self.progress and "sampling",
                               first_group=lo)

    # ------------------------------------------------------------------ log-probs
    def token_logprobs(self, model: Transformer, packed: Packed, with_entropy: bool = False,
                       temperature: float | None = None):
        """Log-probs of the response tokens, from logits / temperature (default: the sampling one)."""
        hidden = model.hidden_states(packed.ids, cu_seqlens=packed.cu)[0][packed.rows]
        t = self.cfg.temperature if temperature is None else temperature
        return fused_logprobs(hidden, model.lm_head_weight, packed.targets, t, with_entropy)

    @torch.no_grad()
    def _logprobs(self, episodes: list[Episode]) -> None:
        """Old (behaviour) and reference log-probs of every response token, and the policy's entropy."""
        if self.ref is not None and self.cfg.ref_offload:
            self.ref.to(self.device)
        for chunk in chunks(episodes, self.cfg.micro_batch_size):
            packed = Packed.build(chunk, self.device)
            lp, ent = self.token_logprobs(self.policy, packed, with_entropy=True)
            ref = self.token_logprobs(self.ref, packed) if self.ref is not None else None
            per_episode = lambda x: [t.float().cpu() for t in x.split(packed.lengths)]  # noqa: E731
            refs = per_episode(ref) if ref is not None else [None] * len(chunk)
            for ep, lp_i, ent_i, ref_i in zip(chunk, per_episode(lp), per_episode(ent), refs):
                ep.old_logprobs, ep.entropy, ep.ref_logprobs = lp_i, ent_i, ref_i
        if self.ref is not None and self.cfg.ref_offload:
            self.ref.to("cpu")  # its log-probs are all computed: free the GPU memory for the update

    # ------------------------------------------------------------------ update
    def _update(self, units: list) -> dict:
        """`epochs` shuffled passes over the units, one optimizer step per minibatch; the mean of
        each statistic over the steps taken."""
        cfg, algo = self.cfg, self.algorithm
        rng = random.Random(f"minibatches-{cfg.seed}-{self.iteration}")
        if algo.units_from_all_ranks:  # every rank holds every unit
            tokens = [sum(e.num_tokens for e in algo.episodes_of(u)) for u in units]
            offset, mine = 0, units
        else:  # the global list is every rank's units in rank order; this rank's are [offset, offset + len)
            by_rank = self.dist.all_gather_object([sum(e.num_tokens for e in algo.episodes_of(u)) for u in units])
            tokens = [n for part in by_rank for n in part]
            offset, mine = sum(len(part) for part in by_rank[: self.dist.rank]), units
        anchor = algo.episodes_of(units[0])[0]  # (fsdp: a rank without a micro-batch backpropagates it with weight 0)
        steps = cfg.epochs * math.ceil(len(tokens) / cfg.minibatch_size)
        if algo.fresh_optimizer:  # self.opt / self.sched point at them, so checkpoints hold the live state
            self.opt, self.sched = self._optimizer(self.policy, cfg.lr, cfg.weight_decay, steps)
        algo.on_update_start(self)
        self._train_mode(True)
        sums: dict[str, float] = {}
        lr, count = self.sched.get_last_lr()[0], 0
        bar = progress_bar(total=steps, desc="update", leave=False, disable=not self.progress)
        for epoch in range(cfg.epochs):
            order = list(range(len(tokens)))
            rng.shuffle(order)
            for start in range(0, len(order), cfg.minibatch_size):
                ids = order[start: start + cfg.minibatch_size]
                if algo.units_from_all_ranks:
                    part = [units[i] for i in ids]
                    micros = list(chunks(part, cfg.micro_batch_size))[self.dist.rank::self.dist.world_size]
                else:
                    part = [mine[i - offset] for i in ids if offset <= i < offset + len(mine)]
                    micros = list(chunks(part, cfg.micro_batch_size))
                batch = Minibatch(part, num_units=len(ids), num_tokens=sum(tokens[i] for i in ids),
                                  where=f"iteration {self.iteration}, epoch {epoch}, minibatch {start // cfg.minibatch_size}")
                lr = self.sched.get_last_lr()[0]
                for k, v in self._minibatch_step(batch, micros, anchor).items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.update()
            if not algo.after_epoch(epoch + 1, self):
                break  # (e.g. an epoch picker that can no longer pick a later epoch)
        bar.close()
        self._train_mode(False)
        out = {k: v / count for k, v in sums.items()}  # minibatch means, averaged over the steps taken
        if algo.fresh_optimizer:  # (its schedule ends at 0: report the rate of the last step taken)
            out.update(optimizer_steps=count, lr=lr, update_skipped=0)
        else:
            out["lr"] = self.sched.get_last_lr()[0]
        out.update(algo.on_update_end(self))
        return out

    def _train_mode(self, on: bool) -> None:
        """Training mode (gradient checkpointing acts only there) for the policy and every trainable."""
        for module in (self.policy, *(t.module for t in self.trainables)):
            module.train(on)

    def _minibatch_step(self, batch: Minibatch, micros: list[list], anchor: Episode) -> dict[str, float]:
        """One optimizer step on a global minibatch, of which `micros` are this rank's micro-batches
        (maybe none): the policy's backward passes, then each trainable's, one sync, clip, step."""
        algo, cfg = self.algorithm, self.cfg
        algo.begin_minibatch(batch, self)
        self.opt.zero_grad(set_to_none=True)
        for t in self.trainables:
            t.opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}

        def add(stats: dict[str, float]) -> None:
            for k, v in stats.items():
                totals[k] = max(totals.get(k, 0.0), v) if k in MAX_STATS else totals.get(k, 0.0) + v

        if self._fsdp and not micros:  # fsdp syncs gradients in a backward that every rank must join
            self._zero_backward(anchor)
        for j, micro in enumerate(micros):
            if self._fsdp:
                from engine.rl.fsdp import set_sync

                set_sync(self._fsdp, last=j == len(micros) - 1)
            out = algo.loss(micro, batch, self)
            if out.skipped:  # the ratio guard first: its graph is dropped, finite or not
                if self._fsdp:  # (every backward of the schedule runs; a fresh one adds zero, never NaN)
                    self._zero_backward(anchor, last=None)
            elif not torch.isfinite(out.loss):
                raise TrainingDiverged(f"non-finite {cfg.algo} loss ({out.loss.item()}) at {batch.where}; the update "
                                       f"was not applied and the last checkpoint in {self.run_dir / 'checkpoints'} "
                                       f"is kept")
            else:
                out.loss.backward()
            add(out.stats)
            del out
        for t in self.trainables:
            # After the policy's passes, so that under fsdp every rank runs the models' all-gathers and
            # reduce-scatters in the same order, whatever its number of micro-batches.
            if t.fsdp and not micros:
                t.set_sync(last=True)
                t.zero_backward(anchor)
            for j, micro in enumerate(micros):
                t.set_sync(last=j == len(micros) - 1)
                add(t.micro_backward(micro, batch))
        # Sum over ranks: every rank now holds the gradient of the whole minibatch, and the statistics
        # (already divided by the global counts) add up as the micro-batches' do (MAX_STATS: the max).
        if not self._fsdp:  # (fsdp has reduce-scattered the sums in the last backward)
            self.dist.all_reduce_grads(list(self.policy.parameters()))
            for t in self.trainables:
                self.dist.all_reduce_grads(list(t.module.parameters()))
        if self.dist.distributed:
            parts = self.dist.all_gather_object(totals)
            totals = {}
            for part in parts:
                add(part)
        grad_norm = clip_grad_norm(self.policy.parameters(), cfg.grad_clip)
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"non-finite gradient norm at {batch.where}; the update was not applied and the "
                                   f"last checkpoint in {self.run_dir / 'checkpoints'} is kept")
        for t in self.trainables:
            norm = clip_grad_norm(t.module.parameters(), cfg.grad_clip)
            if not math.isfinite(norm):
                raise TrainingDiverged(f"non-finite {t.name} gradient norm at {batch.where}; the update was not "
                                       f"applied and the last checkpoint in {self.run_dir / 'checkpoints'} is kept")
            totals[f"{t.name}_grad_norm"] = norm
            t.opt.step()
            t.sched.step()
        self.opt.step()
        self.sched.step()
        totals["grad_norm"] = grad_norm
        return totals

    def _zero_backward(self, episode: Episode, last: bool | None = True) -> None:
        """A backward of the policy that adds zero to every gradient (fsdp's gradient sync needs
        every rank); `last`: this minibatch's syncing backward (None: as set already)."""
        from engine.rl.fsdp import set_sync

        if last is not None:
            set_sync(self._fsdp, last=last)
        packed = Packed.build([episode], self.device)
        (self.token_logprobs(self.policy, packed).sum() * 0.0).backward()

    # ------------------------------------------------------------------ evaluation, logging, checkpoints
    def evaluate(self, splits=None) -> dict:
        """Accuracy on each evaluated split (engine/rl/evaluation.py)."""
        return evaluation.evaluate(self, splits)

    def _log(self, row: dict) -> dict:
        row = {k: (float(v) if isinstance(v, (np.floating, np.integer)) else v) for k, v in row.items()}
        row["world_size"] = self.dist.world_size
        if not self.dist.is_main:  # every rank has the same row; rank 0 writes it
            return row
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self._tb.add_scalar(k, v, row["iteration"])
        return row

    def full_state_dict(self, module: nn.Module | None = None) -> dict[str, torch.Tensor] | None:
        """Under fsdp the whole weights of `module` (default the policy) on rank 0's CPU, {} on the
        other ranks (collective: every rank calls it); else None (save_pretrained reads the module)."""
        if not self._fsdp:
            return None
        from engine.rl.fsdp import gather_full_state_dict

        return gather_full_state_dict(self.policy if module is None else module)

    def save_checkpoint(self) -> Path:
        """checkpoints/iter_NNNNNN (engine/rl/checkpointing.py); every rank calls it, rank 0 writes."""
        return checkpointing.save_checkpoint(self)
