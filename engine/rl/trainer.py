"""The RL loop: sample -> values -> advantages -> PPO update, on ONE set of weights.

    trainer = Trainer(load_config("smoke"))
    summary = trainer.run()

Per iteration:
1. sample `samples_per_prompt` responses for `prompts_per_iteration` train prompts through the
   Engine (the responses stay in its prefix cache) and grade them;
2. values: VinePPO forks K rollouts from each step boundary of each response (cache hits);
   PPO runs its critic; GRPO and RLOO compare the samples of a prompt;
3. advantages per token (engine.rl.advantages);
4. old and reference log-probs at the sampling temperature (no grad), then `epochs` passes over
   shuffled minibatches; each minibatch is one AdamW step, accumulated over micro-batches with
   the minibatch's global token/sequence counts as the loss normalisers;
5. `engine.invalidate_cache()`: the Engine reads the same parameter tensors the optimizer just
   changed (it holds the module, not a copy), so its cached KV is now stale.

RestEM and DPO+ (`_offline_iteration`) share step 1, then train on the iteration's correct
samples (RestEM: cross-entropy) or (correct, incorrect) pairs (DPO+: DPO-Positive against the
frozen reference) for `epochs` passes, with a fresh optimizer each iteration.

Held-out evaluation every `eval_every` iterations; one metrics row per iteration in
<run_dir>/metrics.jsonl; checkpoints (HF model + optimizer, scheduler, RNG and critic state)
every `save_every` iterations; `resume=True` continues from the latest one exactly.

Data parallelism (`dist`, engine/rl/distributed.py; `torchrun --nproc-per-node N -m engine.train`):
every rank holds the whole model and its own Engine. Rank r samples a contiguous shard of the
iteration's prompts (a prompt's samples stay on one rank, so GRPO/RLOO/CAPO groups are whole;
episode groups keep the prompts' global indices), and every prompt's sampling seed is mixed from
(run seed, iteration, global prompt index), MC rollouts from (run seed, iteration, the state's
tokens): the episodes do not depend on the world size. The update walks the same global
shuffled minibatches on every rank; a rank computes the loss of the minibatch's episodes it
owns with the GLOBAL minibatch's token/sequence counts as normalisers (and global whitening
statistics), the gradients are summed over ranks before clipping, and every rank applies the
same step: the gradient is the one-process gradient of the same global batch. The ratio guard
(skip_ratio_above) still acts per micro-batch, i.e. per rank's share: a skipped micro-batch (or a
rank with no episode in a minibatch) contributes zero gradient and still joins the all-reduce.
Metrics are reduced over ranks; rank 0 alone writes the run directory.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from engine.evaluate import STOP_STRINGS  # the template's next "Problem:" ends a response
from engine.model import Transformer, create_tiny_checkpoint, load_model
from engine.rl import advantages as adv_lib
from engine.rl.config import ALL, ConfigError, TrainConfig, config_from_run, dump_config
from engine.rl.distributed import Dist
from engine.rl.loss import aggregate, ppo_loss
from engine.rl.capo import flag_counts, group_token_advantages, rule_wrong_steps, token_rewards, vote
from engine.rl.judge import JudgeRequest, ModelJudge, RuleJudge
from engine.rl.offline import dpo_pairs, dpop_loss, restem_pick_epoch, restem_select
from engine.rl.optim import AdamW, clip_grad_norm, warmup_linear_decay
from engine.rl.rollout import AdaptiveK, Episode, MCStats, mc_values, sample_episodes
from engine.rl.steps import step_spans, step_token_ends
from engine.runtime import Engine, SamplingParams
from engine.runtime.params import mix_seed
from engine.tasks import Item, Task, TaskDataError, load_task
from engine.kernels.fused_logprobs import fused_logprobs

STATE_FILE = "trainer_state.pt"
SHARDED_DIR = "sharded"  # parallel fsdp: the parameter and optimizer shards (torch.distributed.checkpoint)
SHARDED_CRITIC_DIR = "sharded_critic"  # (PPO's critic, the same)
GLOBALLY_NORMALISED = ("loss", "pg_loss", "kl_loss", "entropy_loss")
RESUME_MAY_CHANGE = ("iterations", "stop_after", "dist_timeout_s")
PREVIOUS_RUN_FILES = ("checkpoints", "sft", "init", "final", "tb", "metrics.jsonl", "curves.png", "summary.json")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the update was not applied and the last checkpoint stands."""


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


@dataclass
class Packed:
    """Episodes packed back to back for one training forward (no padding)."""

    ids: torch.Tensor      # [1, T] prompt + response tokens of every episode
    cu: torch.Tensor       # [S + 1] sequence starts
    rows: torch.Tensor     # [N] positions whose hidden state predicts a response token
    targets: torch.Tensor  # [N] the response tokens
    lengths: list[int]     # response length per episode

    @classmethod
    def build(cls, episodes: Sequence[Episode], device: torch.device) -> "Packed":
        ids, rows, targets, lengths, cu, start = [], [], [], [], [0], 0
        for ep in episodes:
            p, r = len(ep.prompt_ids), len(ep.response_ids)
            ids += ep.prompt_ids + ep.response_ids
            rows.append(torch.arange(start + p - 1, start + p + r - 1))
            targets += ep.response_ids
            lengths.append(r)
            start += p + r
            cu.append(start)
        t = lambda x: torch.as_tensor(x, dtype=torch.long).to(device)  # noqa: E731
        return cls(t(ids)[None], t(cu), torch.cat(rows).to(device), t(targets), lengths)

    def pad(self, flat: torch.Tensor) -> torch.Tensor:
        """[N] per-token values -> [S, max_len], zero-padded on the right."""
        return nn.utils.rnn.pad_sequence(list(flat.split(self.lengths)), batch_first=True)

    def mask(self) -> torch.Tensor:
        return self.pad(torch.ones(len(self.targets), dtype=torch.bool, device=self.targets.device))


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {cfg.device} was asked for but CUDA is not available")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """random.setstate needs the nested tuples back (a saved state may come back as lists)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class Trainer:
    """VinePPO / PPO / GRPO / RLOO / RestEM / DPO+ on a model the Engine samples from directly."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, progress: bool = True, dist: Dist | None = None):
        self.cfg = cfg.validate()
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
        self.stop = STOP_STRINGS.get(cfg.task, ())
        self.train_items: list[Item] = self.task.items("train")
        self.eval_sets: dict[str, list[Item]] = self._eval_sets()  # may carve a validation split off the train items
        cfg.check_batch_division(len(self.train_items))  # prompts_per_iteration "all": known only now
        self.prompts_per_iteration = (len(self.train_items) if cfg.prompts_per_iteration == ALL
                                      else cfg.prompts_per_iteration)
        self._check_world_size()
        self.iteration = 0
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            saved = config_from_run(self.run_dir)
            now = cfg.to_dict()
            differ = sorted(k for k in set(saved) | set(now)
                            if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k))
            if differ:
                raise ConfigError(f"--resume: the config differs from the one {self.run_dir} was started with in "
                                 f"{', '.join(differ)} (only {', '.join(RESUME_MAY_CHANGE)} may change; a run saved "
                                 f"before a key existed lacks it)")
        elif dist.is_main:
            self._clear_previous_run()
        dist.barrier()  # every rank has read the run directory before rank 0 rewrites it
        if dist.is_main:
            dump_config(cfg, self.run_dir / "config.yaml")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        # Every rank builds the starting checkpoint together (SFT data-parallel; rank 0 writes the
        # folders); then every rank's random streams start alike.
        start_dir = self._initial_policy()
        if dist.distributed:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
        # Seeded sampling (config seeded_sampling): the episodes do not depend on the world size.
        self.seeded = cfg.seeded_sampling is True or (cfg.seeded_sampling == "auto" and dist.distributed)
        self.policy, self.tokenizer = load_model(start_dir, dtype=self.dtype, device=self.device)
        if self.tokenizer is None:
            raise ValueError(f"{start_dir} has no tokenizer files; the trainer needs one to read and grade responses")
        self.policy.gradient_checkpointing = cfg.gradient_checkpointing
        # The frozen starting model: PPO's KL reference, DPO+'s reference, RestEM's base.
        self.ref = (self._frozen_copy(start_dir)
                    if cfg.algo == "dpo+" or (cfg.algo == "restem" and cfg.restem_from_base)
                    or (cfg.algo != "restem" and cfg.kl_coef > 0)  # (RestEM has no KL term)
                    else None)
        self.critic: ValueModel | None = None
        if cfg.algo == "ppo":
            body, _ = load_model(start_dir, dtype=self.dtype, device=self.device)
            body.gradient_checkpointing = cfg.gradient_checkpointing
            self.critic = ValueModel(body, seed=cfg.seed)
        # --parallel fsdp (engine/rl/fsdp.py): the policy sharded over the ranks; generation runs
        # inside self._gathered() (whole parameters), training forwards all-gather through FSDP.
        self._fsdp: list = []
        self._critic_fsdp: list = []
        self._local_episodes: list[Episode] = []  # (this rank's episodes during an update)
        if cfg.parallel == "fsdp" and dist.distributed:
            from engine.rl.fsdp import shard_policy, shard_value_model

            self._fsdp = shard_policy(self.policy)
            if self.critic is not None:
                self._critic_fsdp = shard_value_model(self.critic)
        self.steps_per_iteration = cfg.epochs * (cfg.episodes_per_iteration(len(self.train_items))
                                                 // cfg.minibatch_size)
        total = cfg.iterations * self.steps_per_iteration
        self.opt = AdamW(self.policy.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_linear_decay(total, cfg.warmup_ratio,
                                                                                       cfg.warmup_type))
        if self.critic is not None:
            self.critic_opt = AdamW(self.critic.parameters(), lr=cfg.critic_lr or cfg.lr, betas=cfg.adam_betas)
            self.critic_sched = torch.optim.lr_scheduler.LambdaLR(
                self.critic_opt, warmup_linear_decay(total, cfg.warmup_ratio, cfg.warmup_type))
        # The Engine holds the policy module itself: same parameter tensors, no copy.
        with self._gathered():
            self.engine = Engine(self.policy, self.tokenizer, page_size=cfg.page_size, max_num_seqs=cfg.max_num_seqs,
                                 max_batch_tokens=cfg.max_batch_tokens, kv_cache_tokens=cfg.kv_cache_tokens,
                                 kv_memory_fraction=cfg.kv_memory_fraction)
        self.judge = self._make_judge(start_dir) if cfg.algo == "capo" else None
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume:
            self._load_latest()
        self._tb = self._tensorboard() if cfg.tensorboard and dist.is_main else None

    # ------------------------------------------------------------------ setup
    def _gathered(self):
        """Under FSDP: the policy's whole parameters for the block (collective); else nothing."""
        if not self._fsdp:
            return contextlib.nullcontext()
        from engine.rl.fsdp import gathered

        return gathered(self._fsdp)

    def _release_kv_for_update(self) -> None:
        """Under FSDP: the KV pool's memory goes to the update (the whole parameters of the
        generation phase are freed too); the next generate() allocates the pool again. (Not in
        other modes: their parameters keep their storage, so the Engine's CUDA graphs stay valid,
        and releasing the pool would make them recapture every iteration; under FSDP the
        whole parameters are freed and allocated again every iteration anyway.)"""
        if self._fsdp:
            self.engine.release_kv_memory()

    def _check_world_size(self) -> None:
        """What data parallelism does not support (yet): errors before any work."""
        world = self.dist.world_size
        if world == 1:
            return
        if self.cfg.sft_steps and self.cfg.sft_batch_size < world:
            raise ConfigError(f"sft_batch_size {self.cfg.sft_batch_size} is smaller than the world size {world}: "
                              f"every rank trains on a share of each SFT batch")
        if self.prompts_per_iteration % world:
            raise ConfigError(f"prompts_per_iteration {self.prompts_per_iteration} is not divisible by the world size "
                              f"{world}: every rank samples an equal share of the prompts")

    def _clear_previous_run(self) -> None:
        """A fresh start in a used run directory: drop what the old run left (or --resume would mix them)."""
        stale = [p for p in PREVIOUS_RUN_FILES if (self.run_dir / p).exists()]
        if stale and self.progress:
            print(f"starting afresh in {self.run_dir}: removing the previous run's {', '.join(stale)} "
                  f"(pass --resume to continue it instead)")
        for name in stale:
            path = self.run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()

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

        model, tok = load_model(base, dtype=self.dtype, device=self.device)
        if cfg.parallel == "fsdp" and dist.distributed:
            from engine.rl.fsdp import shard_policy

            shard_policy(model)
        t0 = time.perf_counter()
        losses = sft(model, tok, self.task, steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr,
                     seed=cfg.seed, progress=self.progress, items=self.train_items,  # never the validation items
                     dist=dist)
        save_checkpoint(model, tok, sft_dir, dist)  # (rank 0 writes; FSDP: gathered first)
        if dist.is_main:  # written last: its presence means sft/ is whole
            (sft_dir / "sft_done.json").write_text(json.dumps(
                {"steps": cfg.sft_steps, "first_loss": losses[0], "last_loss": losses[-1],
                 "seconds": round(time.perf_counter() - t0, 1), "world_size": dist.world_size}))
        dist.barrier()  # sft/ is whole before any rank reads it
        return sft_dir

    def _make_judge(self, start_dir: Path) -> RuleJudge | ModelJudge:
        """CAPO's judge: the rule checker, or a frozen LLM (judge_model, else the starting
        policy) served by its own Engine on the training device."""
        cfg = self.cfg
        if cfg.judge == "rule":
            return RuleJudge()
        path = Path(cfg.judge_model) if cfg.judge_model is not None else start_dir
        model, tokenizer = load_model(path, dtype=self.dtype, device=self.device)
        if tokenizer is None:
            raise ConfigError(f"the judge checkpoint {path} has no tokenizer; the judge reads and writes text")
        model.eval().requires_grad_(False)
        # On a GPU the judge's KV pool takes kv_memory_fraction of what the policy's Engine left free.
        engine = Engine(model, tokenizer, page_size=cfg.page_size, max_num_seqs=cfg.max_num_seqs,
                        max_batch_tokens=cfg.max_batch_tokens, kv_cache_tokens=cfg.kv_cache_tokens,
                        kv_memory_fraction=cfg.kv_memory_fraction)
        return ModelJudge(engine, votes=cfg.capo_votes, temperature=cfg.capo_judge_temperature,
                          top_p=cfg.capo_judge_top_p, max_new_tokens=cfg.capo_judge_max_new_tokens,
                          show_answer=cfg.capo_show_answer, chat=cfg.capo_judge_chat, progress=self.progress)

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
        bar = tqdm(range(self.iteration + 1, last + 1), desc=f"{cfg.algo} iterations", disable=not self.progress,
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
                self.save_checkpoint()  # (rank 0 writes; under FSDP every rank gathers the weights)
        if self.iteration == cfg.iterations:
            state = self._full_state_dict()
            if self.dist.is_main:
                from engine.rl.plots import plot_metrics

                plot_metrics(self.metrics_path, self.run_dir / "curves.png", title=f"{cfg.algo} on {cfg.task}")
                final = self.run_dir / "final"
                self.policy.save_pretrained(str(final), tokenizer=self.tokenizer, state_dict=state)
        if self._tb is not None:
            self._tb.close()
        return row

    def _items_for(self, iteration: int) -> list[Item]:
        """The iteration's prompts: a shuffle of the train set seeded by (seed, iteration), first N."""
        rng = random.Random(f"prompts-{self.cfg.seed}-{iteration}")
        n = self.prompts_per_iteration
        return rng.sample(self.train_items, n) if n <= len(self.train_items) else rng.choices(self.train_items, k=n)

    def _iteration_seed(self, purpose: str) -> int:
        """The seed of this iteration's sampling ("sample"), MC rollouts ("mc") or CAPO judge votes
        ("judge"), from the run seed."""
        salt = {"sample": 0x5A3D, "mc": 0x3C7F, "judge": 0x1D6E}[purpose]
        return mix_seed(mix_seed(self.cfg.seed, salt), self.iteration)

    def _sum(self, values) -> float:
        """Sum of this rank's `values` over all ranks."""
        return self.dist.all_reduce_sum([float(sum(values))])[0]

    def _gather_episodes(self, episodes: list[Episode], with_advantages: bool = False) -> dict[str, list]:
        """Per-episode metrics inputs of every rank, concatenated in global episode order."""
        local = {"reward": [e.reward for e in episodes], "num_tokens": [e.num_tokens for e in episodes],
                 "finish_reason": [e.finish_reason for e in episodes]}
        if with_advantages:
            local["advantages"] = torch.cat([e.advantages for e in episodes])
        parts = self.dist.all_gather_object(local)
        out = {k: [x for p in parts for x in p[k]] for k in local if k != "advantages"}
        if with_advantages:
            out["advantages"] = torch.cat([p["advantages"] for p in parts])
        return out

    def train_iteration(self) -> dict:
        cfg, row = self.cfg, {"iteration": self.iteration}
        times: dict[str, float] = {}
        self.engine.invalidate_cache()  # KV of the last evaluation is of no use here
        self.policy.eval()

        t0 = time.perf_counter()
        self.engine.stats.reset()
        # (FSDP: the whole parameters from sampling to the end of the MC values, one all-gather)
        generation = contextlib.ExitStack()
        generation.enter_context(self._gathered())
        episodes = self._sample_episodes()
        times["sample"] = time.perf_counter() - t0
        row["sample_tokens_per_s"] = self._sum(e.num_tokens for e in episodes) / times["sample"]
        if cfg.algo in ("restem", "dpo+"):
            generation.close()
            self._release_kv_for_update()
            return self._offline_iteration(row, episodes, times)

        t0 = time.perf_counter()
        self.engine.stats.reset()
        mc = None
        if cfg.algo == "capo":
            row.update(self._capo_advantages(episodes))
        else:
            mc = self._values_and_advantages(episodes)
        generation.close()
        self._release_kv_for_update()
        times["judge" if cfg.algo == "capo" else "values"] = time.perf_counter() - t0
        if mc is not None:
            s = self.engine.stats
            # summed over ranks (a state shared by two ranks' episodes counts once per rank)
            states, requested, backfilled, rollouts, rollout_tokens, truncated, value_sum, cached, prefill, steps = (
                self.dist.all_reduce_sum([mc.states, mc.states_requested, mc.backfilled, mc.rollouts,
                                          mc.rollout_tokens, mc.truncated, mc.value_mean * mc.states,
                                          s.cached_tokens, s.prefill_tokens, sum(len(e.step_ends) for e in episodes)]))
            k_max_used, rounds = self.dist.all_reduce_max([mc.k_max_used, mc.rounds])
            row.update(mc_states=int(states), mc_states_requested=int(requested), mc_backfilled=int(backfilled),
                       mc_rollouts=int(rollouts), mc_k_max=int(k_max_used), mc_rounds=int(rounds),
                       mc_truncated_frac=truncated / max(1, rollouts),
                       value_mean=value_sum / max(1, states), mc_tokens_per_s=rollout_tokens / times["values"],
                       prefix_cache_hit_rate=cached / max(1, cached + prefill),
                       mc_prefill_tokens=int(prefill), mc_cached_tokens=int(cached),
                       steps_per_response=steps / (len(episodes) * self.dist.world_size))

        t0 = time.perf_counter()
        self._logprobs(episodes)
        times["logprobs"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        update = self._update(episodes)
        times["update"] = time.perf_counter() - t0
        self.engine.invalidate_cache()  # the weights changed in place: cached KV is stale

        update_tokens = update.pop("tokens")
        every = self._gather_episodes(episodes, with_advantages=True)  # all ranks' episodes, in global order
        rewards = np.array(every["reward"])
        all_adv = every["advantages"]
        row.update(
            reward_mean=float(rewards.mean()), train_accuracy=float((rewards == 1.0).mean()),
            response_length=float(np.mean(every["num_tokens"])),
            truncated_frac=float(np.mean([f == "length" for f in every["finish_reason"]])),
            # stopped without a final answer (cut by length: truncated_frac)
            unfinished_frac=float(np.mean([f == "unfinished" for f in every["finish_reason"]])),
            adv_mean=float(all_adv.mean()), adv_std=float(all_adv.std()) if all_adv.numel() > 1 else 0.0,
            adv_abs_mean=float(all_adv.abs().mean()), adv_zero_frac=float((all_adv == 0).float().mean()),
            **update,
            **{f"time_{k}": round(v, 3) for k, v in times.items()},
            update_tokens_per_s=update_tokens * cfg.epochs / max(times["update"], 1e-9),
            lr=self.sched.get_last_lr()[0],
        )
        return row

    def _sample_episodes(self) -> list[Episode]:
        """This rank's episodes of the current iteration: samples_per_prompt responses to each of
        its contiguous share of the iteration's prompts, graded. Seeded sampling: each prompt is
        seeded by (seed, iteration, its global index), so its samples are the same whatever the
        world size and batch. (Under FSDP, call it inside self._gathered().)"""
        cfg = self.cfg
        params = SamplingParams(n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens, stop=self.stop)
        items = self._items_for(self.iteration)
        lo, hi = self.dist.shard(len(items))
        base = self._iteration_seed("sample")
        per_item = [replace(params, seed=mix_seed(base, g)) for g in range(lo, hi)] if self.seeded else params
        return sample_episodes(self.engine, self.task, items[lo:hi], per_item, self.progress and "sampling",
                               first_group=lo)

    # ------------------------------------------------------------------ RestEM and DPO+
    def _offline_iteration(self, row: dict, episodes: list[Episode], times: dict[str, float]) -> dict:
        """RestEM or DPO+ on the sampled episodes: build the data, then `epochs` passes over it.

        Data parallel: every rank gathers all ranks' episodes (in global order) and builds the same
        data; each minibatch's micro-batches are dealt to the ranks in turn and the gradients summed.
        """
        cfg = self.cfg
        rng = random.Random(f"{cfg.algo}-data-{cfg.seed}-{self.iteration}")
        t0 = time.perf_counter()
        if self.dist.distributed:
            episodes = [e for part in self.dist.all_gather_object(episodes) for e in part]
        if cfg.algo == "restem":
            kept = restem_select(episodes, cfg.restem_max_per_prompt, rng)
            row.update(restem_kept=len(kept), restem_kept_frac=len(kept) / len(episodes))
            if cfg.restem_from_base:
                # ReST-EM fine-tunes the starting model on each iteration's data, not the last
                # iteration's model. Copy in place: the Engine reads these very tensors.
                if self._fsdp:
                    from engine.rl.fsdp import load_full_weights

                    load_full_weights(self.policy, self.ref)
                else:
                    with torch.no_grad():
                        for p, q in zip(self.policy.parameters(), self.ref.parameters(), strict=True):
                            p.copy_(q)
            units: list = kept
            empty = "no correct sample"
        else:
            found = dpo_pairs(episodes, cfg.dpo_max_pairs_per_prompt, rng)
            row.update(dpo_pairs=len(found.pairs), dpo_prompts_without_pair=found.prompts_without_pair,
                       dpo_prompts_without_pair_frac=found.prompts_without_pair / found.prompts)
            units = found.pairs
            empty = "no prompt has both a correct and an incorrect sample"
            if units:
                self._reference_seq_logprobs({id(e): e for pair in units for e in pair}.values())
        times["data"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if units:
            row.update(self._offline_update(units), update_skipped=0)
        else:  # nothing to learn from: the weights stay as they are (RestEM from base: the base model)
            warnings.warn(f"{cfg.algo} iteration {self.iteration}: {empty}; the update is skipped", RuntimeWarning,
                          stacklevel=2)
            row.update(update_skipped=1, optimizer_steps=0, lr=0.0)
        times["update"] = time.perf_counter() - t0
        self.engine.invalidate_cache()  # the weights changed in place (or were reset): cached KV is stale
        rewards = np.array([e.reward for e in episodes])
        row.update(
            reward_mean=float(rewards.mean()), train_accuracy=float((rewards == 1.0).mean()),
            response_length=float(np.mean([e.num_tokens for e in episodes])),
            truncated_frac=float(np.mean([e.finish_reason == "length" for e in episodes])),
            unfinished_frac=float(np.mean([e.finish_reason == "unfinished" for e in episodes])),
            **{f"time_{k}": round(v, 3) for k, v in times.items()},
        )
        return row

    @torch.no_grad()
    def _reference_seq_logprobs(self, episodes) -> None:
        """Each episode's summed reference log-prob (DPO+), at the sampling temperature as PPO's."""
        episodes = list(episodes)
        if self.cfg.ref_offload:
            self.ref.to(self.device)
        for chunk in _chunks(episodes, self.cfg.micro_batch_size):
            packed = Packed.build(chunk, self.device)
            lp = self._token_logprobs(self.ref, packed)
            for ep, seq in zip(chunk, lp.split(packed.lengths)):
                ep.ref_logprobs = seq.float().cpu()
        if self.cfg.ref_offload:
            self.ref.to("cpu")

    def _offline_update(self, units: list) -> dict[str, float]:
        """`epochs` shuffled passes over RestEM episodes or DPO+ pairs: one AdamW step per
        `minibatch_size` units (the last one may be smaller), micro-batches of `micro_batch_size`
        units. A fresh optimizer and warmup/decay schedule each iteration (the data size varies);
        self.opt / self.sched point at them so checkpoints hold the live state."""
        cfg = self.cfg
        rng = random.Random(f"minibatches-{cfg.seed}-{self.iteration}")
        steps = cfg.epochs * math.ceil(len(units) / cfg.minibatch_size)
        self.opt = AdamW(self.policy.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_linear_decay(steps, cfg.warmup_ratio,
                                                                                       cfg.warmup_type))
        picker = (EpochPicker(self, cfg.restem_early_stop)
                  if cfg.algo == "restem" and cfg.restem_early_stop != "off" else None)
        self.policy.train()
        sums: dict[str, float] = {}
        lr = self.sched.get_last_lr()[0]
        steps_done = 0
        for epoch in range(cfg.epochs):
            order = list(range(len(units)))
            rng.shuffle(order)
            for start in range(0, len(order), cfg.minibatch_size):
                minibatch = [units[i] for i in order[start: start + cfg.minibatch_size]]
                where = f"iteration {self.iteration}, epoch {epoch}, minibatch {start // cfg.minibatch_size}"
                self.opt.zero_grad(set_to_none=True)
                stats: dict[str, float] = {}
                # this rank's micro-batches: every world_size-th (the normalisers are the whole minibatch's)
                mine = list(_chunks(minibatch, cfg.micro_batch_size))[self.dist.rank::self.dist.world_size]
                if self._fsdp and not mine:  # FSDP's gradient sync needs every rank in a backward
                    first = units[0] if cfg.algo == "restem" else units[0][0]
                    self._fsdp_zero_backward(first)
                for j, micro in enumerate(mine):
                    if self._fsdp:
                        from engine.rl.fsdp import set_sync

                        set_sync(self._fsdp, last=j == len(mine) - 1)
                    part = self._restem_backward(micro, minibatch) if cfg.algo == "restem" else \
                        self._dpo_backward(micro, len(minibatch))
                    if not math.isfinite(part["loss"]):
                        raise TrainingDiverged(f"non-finite {cfg.algo} loss at {where}; the update was not applied "
                                               f"and the last checkpoint in {self.run_dir / 'checkpoints'} is kept")
                    for k, v in part.items():
                        stats[k] = stats.get(k, 0.0) + v
                if not self._fsdp:  # (FSDP has reduce-scattered the sums in the last backward)
                    self.dist.all_reduce_grads(list(self.policy.parameters()))
                if self.dist.distributed:
                    summed: dict[str, float] = {}
                    for part in self.dist.all_gather_object(stats):
                        for k, v in part.items():
                            summed[k] = summed.get(k, 0.0) + v
                    stats = summed
                grad_norm = clip_grad_norm(self.policy.parameters(), cfg.grad_clip)
                if not math.isfinite(grad_norm):
                    raise TrainingDiverged(f"non-finite gradient norm at {where}; the update was not applied and "
                                           f"the last checkpoint in {self.run_dir / 'checkpoints'} is kept")
                lr = self.sched.get_last_lr()[0]
                self.opt.step()
                self.sched.step()
                stats["grad_norm"] = grad_norm
                steps_done += 1
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
            if picker is not None and not picker.after_epoch(epoch + 1):
                break  # first-drop: a later epoch can no longer be picked
        self.policy.eval()
        out = {k: v / steps_done for k, v in sums.items()}  # minibatch means, averaged over the steps taken
        out.update(optimizer_steps=steps_done, lr=lr)
        if picker is not None:
            out.update(picker.finish())
        return out

    def _restem_backward(self, micro: list[Episode], minibatch: list[Episode]) -> dict[str, float]:
        """Cross-entropy (temperature 1) of the response tokens, reduced over the minibatch by
        `loss_aggregation` (token-mean; the authors' trainer: seq-mean-token-mean)."""
        packed = Packed.build(micro, self.device)
        lp = self._token_logprobs(self.policy, packed, temperature=1.0)
        loss = aggregate(-packed.pad(lp), packed.mask(), self.cfg.loss_aggregation,
                         num_tokens=sum(e.num_tokens for e in minibatch), num_seqs=len(minibatch),
                         norm_length=self.cfg.max_new_tokens)
        loss.backward()
        return {"loss": loss.item()}

    def _dpo_backward(self, micro: list[tuple[Episode, Episode]], num_pairs: int) -> dict[str, float]:
        """DPO+ on a micro-batch of pairs: chosen and rejected responses packed in one forward."""
        cfg = self.cfg
        episodes = [c for c, _ in micro] + [r for _, r in micro]  # chosen first, then rejected
        packed = Packed.build(episodes, self.device)
        lp = self._token_logprobs(self.policy, packed)
        seq = torch.stack([t.sum() for t in lp.split(packed.lengths)])
        ref = torch.stack([e.ref_logprobs.sum() for e in episodes]).to(seq.device)
        m = len(micro)
        loss, stats = dpop_loss(seq[:m], seq[m:], ref[:m], ref[m:], beta=cfg.dpo_beta, nll_coef=cfg.dpo_nll_coef,
                                num_pairs=num_pairs)
        loss.backward()
        return {"loss": loss.item(), **{k: v / num_pairs for k, v in stats.items()}}

    # ------------------------------------------------------------------ values and advantages
    def _values_and_advantages(self, episodes: list[Episode]) -> MCStats | None:
        cfg = self.cfg
        groups: dict[int, list[Episode]] = {}
        for ep in episodes:
            groups.setdefault(ep.group, []).append(ep)
        if cfg.algo == "vineppo":
            for ep in episodes:
                ep.step_ends = self._step_ends(ep)
            params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                    max_new_tokens=cfg.mc_max_new_tokens or cfg.max_new_tokens, stop=self.stop)
            adaptive = AdaptiveK(cfg.k_min, cfg.k_max, cfg.k) if cfg.k_adaptive else None
            stats = mc_values(self.engine, self.task, episodes, k=cfg.k, params=params,
                              max_states=cfg.max_states_per_response, progress=self.progress and "MC values",
                              adaptive=adaptive, seed=self._iteration_seed("mc") if self.seeded else None)
            for ep in episodes:
                step_adv = adv_lib.vineppo_step_advantages(ep.state_values, ep.reward)
                ep.advantages = adv_lib.broadcast_steps(step_adv, ep.step_ends)
            return stats
        if cfg.algo == "ppo":
            with torch.no_grad():
                for chunk in _chunks(episodes, cfg.micro_batch_size):
                    packed = Packed.build(chunk, self.device)
                    values = self.critic(packed.ids, packed.cu, packed.rows).float().cpu()
                    for ep, v in zip(chunk, values.split(packed.lengths)):
                        ep.old_values = v
                        ep.advantages, ep.returns = adv_lib.gae_advantages(v, ep.reward, cfg.gamma, cfg.gae_lambda)
            return None
        for members in groups.values():
            rewards = [e.reward for e in members]
            if cfg.algo == "grpo":
                values = adv_lib.grpo_advantages(rewards, scale_by_std=cfg.grpo_scale_by_std)
            else:
                values = adv_lib.rloo_advantages(rewards)
            for ep, a in zip(members, values):
                ep.advantages = torch.full((ep.num_tokens,), float(a))
        return None

    def _capo_advantages(self, episodes: list[Episode]) -> dict[str, float]:
        """CAPO: the judge's votes on each response's steps -> token rewards -> advantages
        normalised over all tokens of each prompt's samples (a prompt's samples are on one rank).
        Returns the judge's metrics over every rank's responses."""
        cfg = self.cfg
        style = self.task.step_style if cfg.step_split == "task" else cfg.step_split
        requests = []
        for ep in episodes:
            texts, ep.step_ends = step_spans(ep.response_ids, self.tokenizer, style)
            requests.append(JudgeRequest(ep.item.question, texts, ep.item.answer))
        seeds = None
        if self.seeded:  # each response's votes seeded by (seed, iteration, its global index)
            base, seen = self._iteration_seed("judge"), {}
            seeds = []
            for ep in episodes:
                index = seen[ep.group] = seen.get(ep.group, -1) + 1
                seeds.append(mix_seed(base, ep.group * cfg.samples_per_prompt + index))
        result = self.judge.critique(requests, seeds)
        flagged = [vote(cs, len(r.steps), cfg.capo_voting) for cs, r in zip(result.critiques, requests)]
        rewards = [token_rewards(ep.num_tokens, ep.step_ends, f, ep.reward, cfg.capo_w_whole, cfg.capo_w_process)
                   for ep, f in zip(episodes, flagged)]
        for ep, adv in zip(episodes, group_token_advantages(rewards, [ep.group for ep in episodes])):
            ep.advantages = adv
        critiques = [c for cs in result.critiques for c in cs]
        oracle = cfg.judge == "rule" or cfg.judge_oracle == "rule"
        hits, n_pred, n_true = flag_counts(flagged, [rule_wrong_steps(r.steps) for r in requests]) if oracle \
            else (0, 0, 0)
        # counts summed over ranks (the ratios are of the sums); the judge's time is the slowest rank's
        (steps, responses, flagged_steps, flagged_responses, abstained, n_critiques, out_of_range, generated,
         prompt_tokens, prefill, cached, preemptions, hits, n_pred, n_true) = self.dist.all_reduce_sum(
            [sum(len(r.steps) for r in requests), len(requests), sum(len(f) for f in flagged),
             sum(bool(f) for f in flagged), sum(c.flagged is None for c in critiques), len(critiques),
             sum(c.out_of_range for c in critiques), result.generated_tokens, result.prompt_tokens,
             result.prefill_tokens, result.cached_tokens, result.preemptions, hits, n_pred, n_true])
        (seconds,) = self.dist.all_reduce_max([result.seconds])
        out = {
            "judge_flagged_step_frac": flagged_steps / max(1, steps),
            "judge_flagged_response_frac": flagged_responses / max(1, responses),
            "judge_abstain_frac": abstained / max(1, n_critiques),
            "judge_out_of_range": int(out_of_range),
            "judge_critiques": int(n_critiques),
            "steps_per_response": steps / max(1, responses),
            "time_judge": round(seconds, 3),
        }
        if isinstance(self.judge, ModelJudge):
            out.update(judge_tokens_per_s=generated / max(seconds, 1e-9), judge_generated_tokens=int(generated),
                       judge_prompt_tokens=int(prompt_tokens), judge_prefill_tokens=int(prefill),
                       judge_cached_tokens=int(cached), judge_preemptions=int(preemptions))
        if oracle:
            out["judge_true_wrong_step_frac"] = n_true / max(1, steps)
            if n_pred:
                out["judge_precision"] = hits / n_pred
            if n_true:
                out["judge_recall"] = hits / n_true
        return out

    def _step_ends(self, ep: Episode) -> list[int]:
        cfg = self.cfg
        if cfg.step_split == "chunks":
            return step_token_ends(ep.response_ids, self.tokenizer, chunk_tokens=cfg.chunk_tokens)
        style = self.task.step_style if cfg.step_split == "task" else cfg.step_split
        return step_token_ends(ep.response_ids, self.tokenizer, style)

    # ------------------------------------------------------------------ log-probs
    def _token_logprobs(self, model: Transformer, packed: Packed, with_entropy: bool = False,
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
        for chunk in _chunks(episodes, self.cfg.micro_batch_size):
            packed = Packed.build(chunk, self.device)
            lp, ent = self._token_logprobs(self.policy, packed, with_entropy=True)
            ref = self._token_logprobs(self.ref, packed) if self.ref is not None else None
            per_episode = lambda x: [t.float().cpu() for t in x.split(packed.lengths)]  # noqa: E731
            refs = per_episode(ref) if ref is not None else [None] * len(chunk)
            for ep, lp_i, ent_i, ref_i in zip(chunk, per_episode(lp), per_episode(ent), refs):
                ep.old_logprobs, ep.entropy, ep.ref_logprobs = lp_i, ent_i, ref_i
        if self.ref is not None and self.cfg.ref_offload:
            self.ref.to("cpu")  # its log-probs are all computed: free the GPU memory for the update

    # ------------------------------------------------------------------ update
    def _update(self, episodes: list[Episode]) -> dict:
        cfg = self.cfg
        rng = random.Random(f"minibatches-{cfg.seed}-{self.iteration}")
        self.policy.train()  # (gradient checkpointing only acts in training mode)
        if self.critic is not None:
            self.critic.train()
        sums: dict[str, float] = {}
        count = 0

        def add(name: str, value: float) -> None:
            sums[name] = sums.get(name, 0.0) + value

        # The global episode list is every rank's episodes in rank order; this rank's are the
        # global indices [offset, offset + len(episodes)). Every rank walks the same shuffled order.
        self._local_episodes = episodes
        lengths_by_rank = self.dist.all_gather_object([e.num_tokens for e in episodes])
        lengths = [n for part in lengths_by_rank for n in part]
        offset = sum(len(part) for part in lengths_by_rank[: self.dist.rank])
        bar = tqdm(total=self.steps_per_iteration, desc="update", leave=False, disable=not self.progress)
        for epoch in range(cfg.epochs):
            order = list(range(len(lengths)))
            rng.shuffle(order)
            for mb_start in range(0, len(order), cfg.minibatch_size):
                ids = order[mb_start: mb_start + cfg.minibatch_size]
                minibatch = [episodes[i - offset] for i in ids if offset <= i < offset + len(episodes)]
                stats = self._minibatch_step(minibatch, epoch, mb_start // cfg.minibatch_size,
                                             num_tokens=sum(lengths[i] for i in ids), num_seqs=len(ids))
                for k, v in stats.items():
                    add(k, v)
                count += 1
                bar.update()
        bar.close()
        self._local_episodes = []
        self.policy.eval()
        if self.critic is not None:
            self.critic.eval()
        out = {k: v / count for k, v in sums.items()}
        out["tokens"] = sum(lengths)
        gathered = self.dist.all_gather_object(
            {"entropy": torch.cat([e.entropy for e in episodes]),
             "old": torch.cat([e.old_logprobs for e in episodes]) if self.ref is not None else None,
             "ref": torch.cat([e.ref_logprobs for e in episodes]) if self.ref is not None else None})
        out["entropy"] = float(torch.cat([g["entropy"] for g in gathered]).mean())
        if self.ref is not None:
            lp = torch.cat([g["old"] for g in gathered])
            ref = torch.cat([g["ref"] for g in gathered])
            d = ref - lp
            out["kl_ref"] = float((torch.exp(d) - d - 1).mean())  # k3 on the sampled tokens, before the update
        return out

    def _whiten(self, minibatch: list[Episode]) -> dict[int, torch.Tensor]:
        """Advantages whitened over every token of the (global) minibatch, as adv_lib.whiten:
        (x - mean) / sqrt(unbiased var + 1e-8), the mean and variance summed over ranks (float64)."""
        flat = torch.cat([e.advantages for e in minibatch]) if minibatch else torch.zeros(0)
        if not self.dist.distributed:  # one process: the minibatch is all here
            white = adv_lib.whiten(flat, torch.ones_like(flat, dtype=torch.bool))
            return {id(e): a for e, a in zip(minibatch, white.split([e.num_tokens for e in minibatch]))}
        x = flat.double()
        n, total = self.dist.all_reduce_sum([x.numel(), float(x.sum())])
        if n == 0:
            return {id(e): torch.zeros_like(e.advantages) for e in minibatch}
        mean = total / n
        (squares,) = self.dist.all_reduce_sum([float((x - mean).square().sum())])
        var = squares / (n - 1) if n > 1 else 0.0
        white = ((x - mean) * (var + 1e-8) ** -0.5).to(flat.dtype)
        return {id(e): a for e, a in zip(minibatch, white.split([e.num_tokens for e in minibatch]))}

    def _minibatch_step(self, minibatch: list[Episode], epoch: int, index: int, *, num_tokens: int | None = None,
                        num_seqs: int | None = None) -> dict[str, float]:
        """One optimizer step on a global minibatch, of which `minibatch` is this rank's part (maybe
        empty); num_tokens / num_seqs are the global minibatch's counts (default: this part's)."""
        cfg = self.cfg
        where = f"iteration {self.iteration}, epoch {epoch}, minibatch {index}"
        adv = self._whiten(minibatch) if cfg.whiten else {id(e): e.advantages for e in minibatch}
        num_tokens = sum(e.num_tokens for e in minibatch) if num_tokens is None else num_tokens
        num_seqs = len(minibatch) if num_seqs is None else num_seqs
        self.opt.zero_grad(set_to_none=True)
        if self.critic is not None:
            self.critic_opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        micros = list(_chunks(minibatch, cfg.micro_batch_size))
        if self._fsdp and not micros:
            # FSDP syncs gradients in a backward that every rank must join: without an episode
            # in this minibatch, this rank backpropagates one of its episodes with weight 0.
            self._fsdp_zero_backward()
        for j, micro in enumerate(micros):
            if self._fsdp:
                from engine.rl.fsdp import set_sync

                set_sync(self._fsdp, last=j == len(micros) - 1)
            packed = Packed.build(micro, self.device)
            mask = packed.mask()
            pad = lambda xs: packed.pad(torch.cat(xs).to(self.device))  # noqa: E731
            need_entropy = cfg.entropy_coef != 0
            out = self._token_logprobs(self.policy, packed, with_entropy=need_entropy)
            lp, ent = out if need_entropy else (out, None)
            loss, st = ppo_loss(
                packed.pad(lp), pad([e.old_logprobs for e in micro]), pad([adv[id(e)] for e in micro]), mask,
                clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                ref_logprobs=pad([e.ref_logprobs for e in micro]) if self.ref is not None else None,
                kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, kl_aggregation=cfg.kl_aggregation,
                entropy=packed.pad(ent) if ent is not None else None, entropy_coef=cfg.entropy_coef,
                aggregation=cfg.loss_aggregation, num_tokens=num_tokens, num_seqs=num_seqs,
                norm_length=cfg.max_new_tokens)  # the constant of "seq-mean-token-sum-norm" (Dr.GRPO)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"non-finite policy loss ({loss.item()}) at {where}; the update was not "
                                       f"applied and the last checkpoint in {self.run_dir / 'checkpoints'} is kept")
            if cfg.skip_ratio_above is not None and float(st.ratio_mean) > cfg.skip_ratio_above:
                # VinePPO's guard: far off-policy, its policy gradient would be noise. Drop the graph.
                totals["skipped_micro_batches"] = totals.get("skipped_micro_batches", 0.0) + 1
                if self._fsdp:  # (FSDP: every backward of the schedule runs; this one adds zero)
                    (loss * 0.0).backward()
                del loss, out, lp, ent
            else:
                loss.backward()
                share = mask.sum().item() / num_tokens
                for k, v in st.scalars().items():
                    if k == "ratio_max":
                        totals[k] = max(totals.get(k, 0.0), v)
                    elif k in GLOBALLY_NORMALISED:  # already divided by the minibatch's counts
                        totals[k] = totals.get(k, 0.0) + v
                    else:  # token means of this micro-batch -> token mean of the minibatch
                        totals[k] = totals.get(k, 0.0) + v * share
        if self.critic is not None:
            # The critic trains on every micro-batch, skipped or not, as in the reference; after the
            # policy's passes, so that under FSDP every rank runs the two models' all-gathers and
            # reduce-scatters in the same order, whatever its number of micro-batches.
            if self._critic_fsdp and not micros:
                self._fsdp_zero_backward(critic=True)
            for j, micro in enumerate(micros):
                if self._critic_fsdp:
                    from engine.rl.fsdp import set_sync

                    set_sync(self._critic_fsdp, last=j == len(micros) - 1)
                packed = Packed.build(micro, self.device)
                totals["value_loss"] = totals.get("value_loss", 0.0) + self._critic_backward(micro, packed, num_tokens)
        # Sum over ranks: every rank now holds the gradient of the whole minibatch, and the statistics
        # (already divided by the global counts) add up as the micro-batches' do (ratio_max: the max).
        if not self._fsdp:  # (FSDP has reduce-scattered the sums in the last backward)
            self.dist.all_reduce_grads(list(self.policy.parameters()))
        if self.critic is not None and not self._fsdp:
            self.dist.all_reduce_grads(list(self.critic.parameters()))
        if self.dist.distributed:
            parts = self.dist.all_gather_object(totals)
            totals = {}
            for part in parts:
                for k, v in part.items():
                    totals[k] = max(totals.get(k, 0.0), v) if k == "ratio_max" else totals.get(k, 0.0) + v
        grad_norm = clip_grad_norm(self.policy.parameters(), cfg.grad_clip)
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"non-finite gradient norm at {where}; the update was not applied and the last "
                                   f"checkpoint in {self.run_dir / 'checkpoints'} is kept")
        if self.critic is not None:
            critic_norm = clip_grad_norm(self.critic.parameters(), cfg.grad_clip)
            if not math.isfinite(critic_norm):
                raise TrainingDiverged(f"non-finite critic gradient norm at {where}; the update was not applied "
                                       f"and the last checkpoint in {self.run_dir / 'checkpoints'} is kept")
            totals["critic_grad_norm"] = critic_norm
            self.critic_opt.step()
            self.critic_sched.step()
        self.opt.step()
        self.sched.step()
        totals["grad_norm"] = grad_norm
        return totals

    def _fsdp_zero_backward(self, episode: Episode | None = None, critic: bool = False) -> None:
        """A backward of the policy (or the critic) that adds zero to every gradient (FSDP's
        gradient sync needs every rank), through `episode` (default: this rank's first episode
        of the update)."""
        from engine.rl.fsdp import set_sync

        set_sync(self._critic_fsdp if critic else self._fsdp, last=True)
        packed = Packed.build([episode] if episode is not None else self._local_episodes[:1], self.device)
        out = self.critic(packed.ids, packed.cu, packed.rows) if critic else self._token_logprobs(self.policy, packed)
        (out.sum() * 0.0).backward()

    def _critic_backward(self, micro: list[Episode], packed: Packed, num_tokens: int) -> float:
        """Clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2), token-mean over the minibatch."""
        values = self.critic(packed.ids, packed.cu, packed.rows)
        old = torch.cat([e.old_values for e in micro]).to(values.device)
        ret = torch.cat([e.returns for e in micro]).to(values.device)
        clipped = old + (values - old).clamp(-self.cfg.value_clip, self.cfg.value_clip)
        loss = 0.5 * torch.maximum((values - ret).square(), (clipped - ret).square()).sum() / num_tokens
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite value loss at iteration {self.iteration}; the last checkpoint is kept")
        loss.backward()
        return loss.item()

    # ------------------------------------------------------------------ evaluation
    def _eval_sets(self) -> dict[str, list[Item]]:
        """The items of each evaluated split (cfg.eval_splits), fixed for the whole run.

        validation: the last `validation_items` of the train items in a fixed shuffled order;
        they are removed from `self.train_items`, so the run never trains on them. train: the
        first `eval_items` of the (remaining) train items in another fixed order.
        """
        cfg = self.cfg
        sets: dict[str, list[Item]] = {}
        if "validation" in cfg.eval_splits:
            order = list(self.train_items)
            random.Random("validation-split").shuffle(order)
            if cfg.validation_items >= len(order):
                raise ConfigError(f"validation_items {cfg.validation_items} leaves no train item: the train split "
                                  f"has {len(order)}")
            held = {id(it) for it in order[-cfg.validation_items:]}
            self.train_items = [it for it in self.train_items if id(it) not in held]
            sets["validation"] = order[-cfg.validation_items:][: cfg.eval_items]
        for split in cfg.eval_splits:
            if split == "test":
                sets["test"] = self.task.items("test")[: cfg.eval_items]
            elif split == "train":
                order = list(self.train_items)
                random.Random("train-eval").shuffle(order)
                sets["train"] = order[: cfg.eval_items]
        return {split: sets[split] for split in cfg.eval_splits}

    @torch.no_grad()
    def evaluate(self, splits: Sequence[str] | None = None) -> dict:
        """Accuracy on each evaluated split through the Engine: the mean reward over eval_samples
        samples per item, its standard error over items, and (n > 1) the majority-vote accuracy.

        Metrics eval_<split>_accuracy / _stderr / _majority_accuracy; the held-out split (test,
        else validation; none when only train is evaluated) is also eval_accuracy / eval_stderr /
        eval_majority_accuracy, which the plots and the summary read.
        """
        cfg = self.cfg
        t0 = time.perf_counter()
        self.policy.eval()
        # Evaluation draws from its own seeded generators, so it never moves the training RNG; one
        # seed per item, so the items' samples are independent draws.
        params = SamplingParams(n=cfg.eval_samples, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                                max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens, stop=self.stop,
                                seed=cfg.seed if cfg.eval_temperature > 0 else None)
        out: dict[str, float] = {}
        held_out = next((x for x in ("test", "validation") if x in self.eval_sets), None)
        with self._gathered():
            self._evaluate_splits(splits, params, held_out, out)
        out["time_eval"] = round(time.perf_counter() - t0, 3)
        return out

    def _evaluate_splits(self, splits, params: SamplingParams, held_out: str | None, out: dict) -> None:
        from engine.evaluate import majority_correct

        cfg = self.cfg
        for split, items in self.eval_sets.items():
            if splits is not None and split not in splits:
                continue
            # This rank's contiguous share of the items, with the seeds they have in one process;
            # the per-item results are gathered, so every rank computes the same metrics.
            lo, hi = self.dist.shard(len(items))
            outs = self.engine.generate([self.task.prompt(it) for it in items[lo:hi]],
                                        params.per_prompt(len(items))[lo:hi],
                                        progress=self.progress and f"evaluation ({split})") if hi > lo else []
            local = []
            for it, cs in zip(items[lo:hi], outs):
                rewards = [self.task.reward(c.text, it, c.finish_reason) for c in cs]
                local.append((float(np.mean(rewards)), majority_correct(self.task, it, [c.text for c in cs])))
            every = [x for part in self.dist.all_gather_object(local) for x in part]
            item_means, majority = [m for m, _ in every], [v for _, v in every]
            means = np.array(item_means)
            # Standard error over items (the samples of one item are not independent of each other).
            stderr = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else 0.0
            metrics = {"accuracy": float(means.mean()), "stderr": stderr}
            if cfg.eval_samples > 1:
                metrics["majority_accuracy"] = float(np.mean(majority))
            for k, v in metrics.items():
                out[f"eval_{split}_{k}"] = v
                if split == held_out:
                    out[f"eval_{k}"] = v

    # ------------------------------------------------------------------ logging
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

    # ------------------------------------------------------------------ checkpoints
    def _full_state_dict(self, module: nn.Module | None = None) -> dict[str, torch.Tensor] | None:
        """Under FSDP the whole weights of `module` (default the policy) on rank 0's CPU, {} on the
        other ranks (collective: every rank calls it); else None (save_pretrained reads the module)."""
        if not self._fsdp:
            return None
        from engine.rl.fsdp import gather_full_state_dict

        return gather_full_state_dict(self.policy if module is None else module)

    def save_checkpoint(self) -> Path:
        """checkpoints/iter_NNNNNN: the policy in HF format (+ critic) and trainer_state.pt; then prune.
        Every rank calls it (FSDP gathers the weights); rank 0 writes."""
        root = self.run_dir / "checkpoints"
        path = root / f"iter_{self.iteration:06d}"
        tmp = root / f".tmp_iter_{self.iteration:06d}"
        full = self._full_state_dict()
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            self.policy.save_pretrained(str(tmp), tokenizer=self.tokenizer, state_dict=full)
        del full  # (FSDP: one whole model at a time, on rank 0's CPU)
        critic_full = self._full_state_dict(self.critic) if self.critic is not None else None
        if self.dist.is_main:
            if self.critic is not None:  # critic/: the body in HF format plus value_head.safetensors
                from safetensors.torch import save_file

                body = {k[len("body."):]: v for k, v in critic_full.items() if k.startswith("body.")} \
                    if critic_full is not None else None
                head = {k[len("head."):]: v for k, v in critic_full.items() if k.startswith("head.")} \
                    if critic_full is not None else self.critic.head.state_dict()
                self.critic.body.save_pretrained(str(tmp / "critic"), state_dict=body)
                save_file({k: v.contiguous() for k, v in head.items()}, str(tmp / "critic" / "value_head.safetensors"))
        del critic_full
        fsdp_meta = critic_meta = None
        if self._fsdp:  # every rank writes its shards (DCP) before rank 0 publishes the folder
            from engine.rl.fsdp import save_sharded_state

            self.dist.barrier()  # (rank 0 has made tmp/)
            fsdp_meta = save_sharded_state(self.policy, self.opt, tmp / SHARDED_DIR)
            if self.critic is not None:
                critic_meta = save_sharded_state(self.critic, self.critic_opt, tmp / SHARDED_CRITIC_DIR)
            self.dist.barrier()
        if not self.dist.is_main:
            return path
        state = {"iteration": self.iteration, "scheduler": self.sched.state_dict(), "rng": _rng_state()}
        if self._fsdp:
            state["fsdp"] = {"world_size": self.dist.world_size, **fsdp_meta}
        else:
            state["optimizer"] = self.opt.state_dict()
        if self.critic is not None:
            state["critic_scheduler"] = self.critic_sched.state_dict()
            if self._fsdp:
                state["fsdp_critic"] = critic_meta
            else:
                state["critic_optimizer"] = self.critic_opt.state_dict()
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)  # a checkpoint directory exists only once complete
        (root / "latest").write_text(path.name)
        kept = sorted(p for p in root.glob("iter_*") if p.is_dir())
        for old in kept[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def _load_latest(self) -> None:
        root = self.run_dir / "checkpoints"
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
        if bool(written) != bool(self._fsdp):
            # (FSDP trains the q/k/v and gate/up matrices unfused, so the optimizer state does not
            # map onto the fused parameters of an unsharded run, nor the other way round)
            was = f"with parallel fsdp on {written['world_size']} ranks" if written else "without parallel fsdp"
            now = f"parallel fsdp on {self.dist.world_size} ranks" if self._fsdp else "not sharded"
            raise ConfigError(f"cannot resume {path}: it was written {was}, and this run is {now}; resume it as "
                              f"it was written (a sharded run resumes on any number of ranks >= 2)")
        if self._fsdp:  # each rank reads its rows of the weights and the optimizer state, whatever wrote them
            from engine.rl.fsdp import load_sharded_state

            load_sharded_state(self.policy, self.opt, path / SHARDED_DIR, written)
        else:
            loaded, _ = load_model(path, dtype=self.dtype, device=self.device)
            with torch.no_grad():  # copy into the existing tensors: the Engine keeps reading the same storage
                for p, q in zip(self.policy.parameters(), loaded.parameters(), strict=True):
                    p.copy_(q)
            self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.critic is not None:
            if self._fsdp:
                from engine.rl.fsdp import load_sharded_state

                load_sharded_state(self.critic, self.critic_opt, path / SHARDED_CRITIC_DIR, state["fsdp_critic"])
            else:
                body, _ = load_model(path / "critic", dtype=self.dtype, device=self.device)
                self.critic.body.load_state_dict(body.state_dict())
                from safetensors.torch import load_file
                self.critic.head.load_state_dict(load_file(str(path / "critic" / "value_head.safetensors"),
                                                           device=str(self.device)))
                self.critic_opt.load_state_dict(state["critic_optimizer"])
            self.critic_sched.load_state_dict(state["critic_scheduler"])
        _set_rng_state(state["rng"])
        self.iteration = int(state["iteration"])
        if self.metrics_path.exists() and self.dist.is_main:  # drop rows written after the checkpoint (an interrupted iteration)
            rows = [json.loads(x) for x in self.metrics_path.read_text().splitlines() if x.strip()]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["iteration"] <= self.iteration))
        self.engine.invalidate_cache()


class EpochPicker:
    """RestEM's choice among the models of one iteration's epochs, by validation accuracy.

    It evaluates the weights before training (epoch 0) and after each epoch, keeps a CPU copy of
    the model `restem_pick_epoch` currently picks, and `finish` copies that model back into the
    policy's own tensors (the Engine reads them). The decision is `restem_pick_epoch`'s alone;
    with first-drop, training stops at the first epoch that is not an improvement, since no later
    epoch can be picked (the authors train all epochs and then pick: the same model, less work).
    """

    def __init__(self, trainer: "Trainer", mode: str):
        self.trainer, self.mode = trainer, mode
        self.seconds = 0.0
        self.accuracies: list[float] = []
        self.kept: list[torch.Tensor] = []
        self.chosen = 0
        self._evaluate_and_keep()

    def _evaluate_and_keep(self) -> None:
        t0 = time.perf_counter()
        trainer = self.trainer
        trainer.engine.invalidate_cache()  # the weights changed since the cache was filled
        acc = trainer.evaluate(splits=("validation",))["eval_validation_accuracy"]
        trainer.engine.invalidate_cache()
        trainer._release_kv_for_update()  # (FSDP: the evaluation allocated the pool again)
        trainer.policy.train()
        self.accuracies.append(acc)
        self.chosen = restem_pick_epoch(self.accuracies, self.mode)
        if self.chosen == len(self.accuracies) - 1:  # the newest model is the pick (so far)
            # (under FSDP each rank keeps its own shards)
            self.kept = [_local(p).detach().to("cpu", copy=True) for p in trainer.policy.parameters()]
        self.seconds += time.perf_counter() - t0

    def after_epoch(self, epoch: int) -> bool:
        """Evaluate the model after `epoch` (1-based); whether training should go on."""
        self._evaluate_and_keep()
        return self.mode != "first-drop" or self.chosen == epoch

    def finish(self) -> dict[str, float]:
        """Load the picked model into the policy; the metrics of the choice."""
        if self.chosen != len(self.accuracies) - 1:
            with torch.no_grad():
                for p, q in zip(self.trainer.policy.parameters(), self.kept, strict=True):
                    _local(p).copy_(q)
        self.kept = []
        return {"restem_chosen_epoch": self.chosen, "restem_epochs_trained": len(self.accuracies) - 1,
                "restem_val_accuracy": self.accuracies[self.chosen], "restem_val_accuracy_start": self.accuracies[0],
                "restem_val_accuracy_by_epoch": list(self.accuracies),
                "restem_validation_seconds": round(self.seconds, 3)}  # (part of time_update)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP (DTensor) parameter; a plain tensor as it is."""
    return p.to_local() if hasattr(p, "to_local") else p


def _chunks(xs: list, size: int):
    for i in range(0, len(xs), size):
        yield xs[i: i + size]
