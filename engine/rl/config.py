"""The trainer's configuration: one flat dataclass, YAML presets, command-line overrides.

A preset (engine/presets/<name>.yaml, or a path to a YAML file) sets any subset of the
fields below; command-line flags (`--k 4`, `--algo grpo`, `--task-args '{"steps": 3}'`) set
them again. Unknown keys are errors, never ignored. A value of "???" in a preset means the
user must supply it (the gsm8k and math presets need `--model`).
"""
from __future__ import annotations

import dataclasses

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args

import yaml

from engine.rl.loss import Aggregation, KLEstimator
from engine.rl.optim import WARMUP_TYPES

EVAL_SPLITS = ("test", "validation", "train")
RESTEM_EARLY_STOP = ("off", "first-drop", "best")
JUDGES = ("model", "rule")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
ALL = "all"  # prompts_per_iteration: every train item, each iteration
PER_ALGO = "per_algo"  # a preset's section of values that apply only to one algorithm

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
REQUIRED = "???"


def algorithms() -> tuple[str, ...]:
    """The registered algorithm names (engine/rl/algorithms; imported here only when asked for,
    since the algorithms import this module)."""
    from engine.rl.algorithms import REGISTRY

    return tuple(REGISTRY)


def _algorithm(name: str):
    from engine.rl.algorithms import REGISTRY

    if name not in REGISTRY:
        raise ConfigError(f"unknown algo {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


class ConfigError(ValueError):
    """A preset or an override that cannot be used; raised before any work starts."""


@dataclass
class TrainConfig:
    # ---- what to train
    algo: str = "vineppo"              # a name in engine.rl.algorithms.REGISTRY: vineppo, ppo, grpo, rloo, capo, ...
    task: str = "arithmetic"           # gsm8k | math | arithmetic | word-arithmetic
    task_args: dict = field(default_factory=dict)  # keyword options of load_task (data=, steps=, ...)
    model: str | None = None           # HF checkpoint folder; None = the built-in tiny model
    tiny_model_args: dict = field(default_factory=dict)  # overrides of engine.model.tiny_config
    seed: int = 0
    device: str = "auto"               # auto = cuda when available, else cpu
    dtype: str = "auto"                # auto = bfloat16 on cuda, float32 on cpu
    # ---- SFT warm-up (before RL; skipped when sft_steps == 0)
    sft_steps: int = 0
    sft_batch_size: int = 64
    sft_lr: float = 1e-5
    # ---- sampling (trajectories)
    iterations: int = 1000
    prompts_per_iteration: int | str = 64  # or "all": the whole train split (less validation) each iteration
    samples_per_prompt: int = 8
    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 1024
    # ---- VinePPO Monte Carlo values
    k: int = 9                         # rollouts per state
    mc_max_new_tokens: int | None = None  # None = max_new_tokens (a fresh budget per rollout)
    k_adaptive: bool = False           # k rollouts per state on average: k_min each, the rest to the most uncertain states
    k_min: int = 2                     # (k_adaptive) rollouts every state gets first; also the increment per round
    k_max: int = 16                    # (k_adaptive) most rollouts one state gets
    max_states_per_response: int | None = None  # cap on valued states, the prompt's included; later ones are back-filled with the return
    step_split: str = "task"           # task (the task's step style) | newline | math | math-legacy | chunks
    chunk_tokens: int = 100            # step length for step_split = chunks
    # ---- SPO-tree (algo = spo-tree): level i forks tree_branching[i] continuations of every node
    tree_branching: list[int] = field(default_factory=lambda: [6, 6, 6])  # the paper's 6-6-6
    tree_segment_tokens: int = 30      # tokens per segment; the last level runs to EOS or max_new_tokens
    tree_prob_mask: float | None = None  # SPO-chain's mask: advantage only on tokens sampled with p < this; null = off
    # ---- PPO critic (algo = ppo)
    gae_lambda: float = 1.0
    gamma: float = 1.0
    value_clip: float = 0.2
    critic_lr: float | None = None     # None = lr
    # ---- GRPO
    grpo_scale_by_std: bool = True     # False = Dr.GRPO (no std division, constant length normaliser)
    # ---- RestEM and DPO+ (epochs = passes over the iteration's data, the authors' 8; a fresh
    # AdamW and warmup/decay schedule each iteration, since the amount of data varies)
    # the authors' max_response_per_question default (from the ReST-EM paper); None = all
    restem_max_per_prompt: int | None = 10  # cap on kept correct samples per prompt
    restem_from_base: bool = True      # fine-tune the starting model each iteration (ReST-EM, the authors' trainer), else continue
    # which of the iteration's models samples next, by validation accuracy after each epoch (epoch 0 =
    # the weights before training): off = the last; first-drop = train while accuracy rises, keep the
    # last model before the first epoch that does not improve (ReST-EM's early stopping, the authors'
    # default "restem_paper_original"); best = the most accurate of all epochs
    restem_early_stop: str = "off"
    dpo_beta: float = 0.1              # the authors' dpo_beta
    dpo_nll_coef: float = 50.0         # the authors' dpo_positive_lambda (hinge NLL of the chosen response)
    dpo_max_pairs_per_prompt: int | None = 8  # the authors' max_pairs_per_question; None = all pairs
    # ---- CAPO (algo = capo): a frozen judge flags each response's wrong steps, `capo_votes`
    # critiques vote, R_t = reward * capo_w_whole - [t in a flagged step] * capo_w_process,
    # normalised over all tokens of a prompt's samples (trainers.md section 5)
    judge: str = "model"               # model (an LLM through its own Engine) | rule (exact checker, arithmetic only)
    judge_model: str | None = None     # the judge's HF checkpoint; None = the frozen starting policy
    judge_oracle: str | None = None    # rule: also score the judge's flags against the rule checker (arithmetic)
    capo_votes: int = 4                # critiques per response (the paper's k)
    capo_voting: str = "intersection"  # intersection | majority | union
    capo_judge_temperature: float = 0.7
    capo_judge_top_p: float = 1.0
    capo_judge_max_new_tokens: int = 512  # a critique cut before its verdict line abstains
    capo_judge_chat: str | bool = "auto"  # the prompt as a chat user turn: auto = when the judge's tokenizer has a template
    capo_show_answer: bool = True      # put the gold final answer in the judge's prompt (the paper does)
    capo_w_whole: float = 2.0          # weight of the 0/1 outcome reward
    capo_w_process: float = 1.0        # penalty per token of a flagged step
    # ---- update
    epochs: int = 2
    minibatch_size: int = 64           # episodes per optimizer step
    micro_batch_size: int = 8          # episodes per forward/backward (gradient accumulation)
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    warmup_type: str = "linear"        # linear | log (DeepSpeed WarmupDecayLR's default: the reference's)
    grad_clip: float = 1.0
    adam_betas: tuple = (0.9, 0.999)
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None     # cap -A * ratio at -A * dual_clip where A < 0 (verl's default 3.0; VinePPO: off)
    tis_cap: float | None = None       # truncated importance sampling: weight each token's policy-gradient term by
    #                                    min(exp(old_logprob - sampler_logprob), tis_cap) (Yao et al. 2025); off
    kl_coef: float = 1e-4
    kl_estimator: str = "k3"
    kl_aggregation: str = "seq-mean-token-sum"
    loss_aggregation: str = "token-mean"
    entropy_coef: float = 0.0
    skip_ratio_above: float | None = 10.0  # skip a micro-batch whose mean ratio exceeds this (VinePPO's guard)
    whiten_advantages: str | bool = "auto"  # auto = the algorithm's choice (on for vineppo and ppo)
    gradient_checkpointing: bool = False
    # ---- engine
    page_size: int = 16
    max_num_seqs: int = 256
    max_batch_tokens: int = 8192
    kv_cache_tokens: int | None = None  # None = kv_memory_fraction of free GPU memory (CPU: the Engine's default)
    kv_memory_fraction: float = 0.4    # on GPU; leaves room for optimizer state and activations
    ref_offload: bool = False          # keep the reference model on the CPU between its log-prob passes
    # ---- evaluation and bookkeeping
    eval_every: int = 10               # iterations between held-out evaluations (and at start/end)
    eval_items: int = 500
    eval_samples: int = 1
    eval_temperature: float = 0.0      # 0 = greedy
    eval_max_new_tokens: int | None = None  # None = max_new_tokens
    eval_top_p: float = 1.0
    # test | validation (a fixed held-out part of the train split, then never trained on) |
    # train (a fixed subset of the train items): metrics eval_<split>_accuracy; test also as eval_accuracy
    eval_splits: list[str] = field(default_factory=lambda: ["test"])
    validation_items: int = 500        # size of the validation split carved from train (when evaluated)
    save_every: int = 50               # iterations between checkpoints (and at the end)
    keep_checkpoints: int = 2
    run_dir: str = "runs/default"
    tensorboard: bool = True           # when installed
    stop_after: int | None = None      # stop after this iteration as if interrupted (resume later)
    # ---- data parallelism (torchrun --nproc-per-node N -m engine.train; engine/rl/distributed.py)
    parallel: str = "ddp"              # ddp: every rank holds the whole model | fsdp: sharded with FSDP2 (every algorithm)
    dist_timeout_s: int = 300          # collective timeout: a failed rank ends the others within this
    checkpoint_timeout_s: int = 3600   # how long the other ranks wait for rank 0's own writes (checkpoints, export)
    # auto = on under torchrun: every prompt's samples seeded by (seed, iteration, prompt index) and
    # every MC state's rollouts by (seed, iteration, its tokens), so the episodes do not depend on
    # the world size; off, sampling draws from torch's generator (cheaper on the host: no per-row
    # seed mixing); true gives a single process the data-parallel run's episodes
    seeded_sampling: str | bool = "auto"

    # ------------------------------------------------------------------ derived values
    def episodes_per_iteration(self, num_train_items: int | None = None) -> int:
        """Episodes sampled per iteration; prompts_per_iteration "all" needs the train split's size."""
        if self.prompts_per_iteration == ALL:
            if num_train_items is None:
                raise ValueError('prompts_per_iteration is "all": pass the number of train items')
            return num_train_items * self._samples_per_prompt()
        return self.prompts_per_iteration * self._samples_per_prompt()

    def _samples_per_prompt(self) -> int:
        """Episodes per prompt: samples_per_prompt, or the algorithm's own count (a tree's leaves)."""
        return _algorithm(self.algo).max_samples_per_prompt(self) if self.algo in algorithms() else self.samples_per_prompt

    def check_batch_division(self, num_train_items: int | None = None) -> None:
        """The on-policy algorithms split an iteration's episodes into equal minibatches."""
        if self.algo not in algorithms():
            return  # (validate names the choices)
        if _algorithm(self.algo).units_from_all_ranks or (self.prompts_per_iteration == ALL and num_train_items is None):
            return
        n = self.episodes_per_iteration(num_train_items)
        if n % self.minibatch_size:
            prompts = num_train_items if self.prompts_per_iteration == ALL else self.prompts_per_iteration
            source = " (all train items)" if self.prompts_per_iteration == ALL else ""
            raise ConfigError(
                f"a batch of {n} episodes ({prompts} prompts{source} x {self._samples_per_prompt()} samples) "
                f"does not divide into minibatches of {self.minibatch_size}")

    @property
    def whiten(self) -> bool:
        if self.whiten_advantages == "auto":
            return _algorithm(self.algo).whitens_by_default  # (group-relative credit is normalised already)
        return bool(self.whiten_advantages)

    def validate(self) -> "TrainConfig":
        """Raise ConfigError on any value that would fail later; returns self."""
        from engine.tasks import TASKS  # (the task registry imports the graders: load it only here)

        missing = [f.name for f in fields(self) if getattr(self, f.name) == REQUIRED]
        if missing:
            raise ConfigError(f"the preset needs a value for {', '.join(missing)} (e.g. --{missing[0].replace('_', '-')} ...)")
        if self.algo not in algorithms():
            raise ConfigError(f"unknown algo {self.algo!r}; choose one of {', '.join(algorithms())}")
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(sorted(TASKS))}")
        if self.model is not None and not Path(self.model).is_dir():
            raise ConfigError(f"model directory {self.model} does not exist")
        if self.step_split not in ("task", "newline", "math", "math-legacy", "chunks"):
            raise ConfigError(f"step_split must be task, newline, math, math-legacy or chunks; got {self.step_split!r}")
        positive = ["iterations", "samples_per_prompt", "max_new_tokens", "epochs",
                    "minibatch_size", "micro_batch_size", "chunk_tokens", "page_size", "max_num_seqs",
                    "max_batch_tokens", "eval_every", "eval_items", "eval_samples", "save_every",
                    "keep_checkpoints", "sft_batch_size"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        ppi = self.prompts_per_iteration
        if ppi != ALL and (not isinstance(ppi, int) or isinstance(ppi, bool) or ppi < 1):
            raise ConfigError(f'prompts_per_iteration must be an integer >= 1 or "all", got {ppi!r}')
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"k (MC rollouts per state) must be an integer >= 1, got {self.k!r}")
        if not isinstance(self.k_adaptive, bool):
            raise ConfigError(f"k_adaptive must be true or false, got {self.k_adaptive!r}")
        if self.k_adaptive and not (isinstance(self.k_min, int) and isinstance(self.k_max, int)
                                    and 1 <= self.k_min <= self.k <= self.k_max):
            raise ConfigError(f"k_adaptive needs integers 1 <= k_min <= k <= k_max (k is the mean budget per state); "
                              f"got k_min {self.k_min!r}, k {self.k}, k_max {self.k_max!r}")
        for name in ("max_states_per_response", "mc_max_new_tokens", "eval_max_new_tokens", "stop_after",
                     "kv_cache_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1 or null, got {value!r}")
        if not isinstance(self.sft_steps, int) or self.sft_steps < 0:
            raise ConfigError(f"sft_steps must be an integer >= 0, got {self.sft_steps!r}")
        self.check_batch_division()
        if self.minibatch_size % self.micro_batch_size:
            raise ConfigError(f"minibatch_size {self.minibatch_size} is not a multiple of micro_batch_size "
                              f"{self.micro_batch_size}")
        for name in ("restem_max_per_prompt", "dpo_max_pairs_per_prompt"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1 or null, got {value!r}")
        if self.restem_early_stop not in RESTEM_EARLY_STOP:
            raise ConfigError(f"restem_early_stop must be one of {', '.join(RESTEM_EARLY_STOP)}, "
                              f"got {self.restem_early_stop!r}")
        if not isinstance(self.restem_from_base, bool):
            raise ConfigError(f"restem_from_base must be true or false, got {self.restem_from_base!r}")
        if not (isinstance(self.dpo_beta, (int, float)) and 0 < self.dpo_beta < math.inf):
            raise ConfigError(f"dpo_beta must be a positive number, got {self.dpo_beta!r}")
        if not (isinstance(self.dpo_nll_coef, (int, float)) and 0 <= self.dpo_nll_coef < math.inf):
            raise ConfigError(f"dpo_nll_coef must be a number >= 0, got {self.dpo_nll_coef!r}")
        self._validate_capo()
        for name in ("lr", "sft_lr", "temperature"):
            if not (isinstance(getattr(self, name), (int, float)) and 0 < getattr(self, name) < math.inf):
                raise ConfigError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_type not in WARMUP_TYPES:
            raise ConfigError(f"warmup_type must be one of {WARMUP_TYPES}, got {self.warmup_type!r}")
        if self.eval_temperature < 0:
            raise ConfigError(f"eval_temperature must be >= 0, got {self.eval_temperature}")
        if not 0 < self.eval_top_p <= 1:
            raise ConfigError(f"eval_top_p must be in (0, 1], got {self.eval_top_p}")
        bad = [s for s in self.eval_splits if s not in EVAL_SPLITS] if isinstance(self.eval_splits, list) else None
        if bad is None or bad or not self.eval_splits or len(set(self.eval_splits)) != len(self.eval_splits):
            raise ConfigError(f"eval_splits must be a non-empty list of distinct names from {EVAL_SPLITS}, "
                              f"got {self.eval_splits!r}")
        if not isinstance(self.validation_items, int) or self.validation_items < 1:
            raise ConfigError(f"validation_items must be an integer >= 1, got {self.validation_items!r}")
        if self.kl_estimator not in get_args(KLEstimator):
            raise ConfigError(f"kl_estimator must be one of {get_args(KLEstimator)}, got {self.kl_estimator!r}")
        for name in ("kl_aggregation", "loss_aggregation"):
            if getattr(self, name) not in get_args(Aggregation):
                raise ConfigError(f"{name} must be one of {get_args(Aggregation)}, got {getattr(self, name)!r}")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ConfigError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        for name in ("dual_clip", "tis_cap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 1 < value < math.inf):
                raise ConfigError(f"{name} must be a number > 1 or null, got {value!r}")
        if self.skip_ratio_above is not None and not self.skip_ratio_above > 1:
            raise ConfigError(f"skip_ratio_above must be > 1 or null, got {self.skip_ratio_above}")
        if self.seeded_sampling not in ("auto", True, False):
            raise ConfigError(f"seeded_sampling must be auto, true or false, got {self.seeded_sampling!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        for name in ("dist_timeout_s", "checkpoint_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1 (seconds), got {value!r}")
        if self.whiten_advantages not in ("auto", True, False):
            raise ConfigError(f"whiten_advantages must be auto, true or false, got {self.whiten_advantages!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"adam_betas must be two numbers, got {self.adam_betas!r}")
        _algorithm(self.algo).validate(self)  # the algorithm's own rules (engine/rl/algorithms)
        return self

    def _validate_capo(self) -> None:
        from engine.rl.capo import VOTING_MODES

        if self.judge not in JUDGES:
            raise ConfigError(f"judge must be one of {', '.join(JUDGES)}, got {self.judge!r}")
        if self.judge_oracle not in (None, "rule"):
            raise ConfigError(f"judge_oracle must be rule or null, got {self.judge_oracle!r}")
        if not isinstance(self.capo_votes, int) or isinstance(self.capo_votes, bool) or self.capo_votes < 1:
            raise ConfigError(f"capo_votes must be an integer >= 1, got {self.capo_votes!r}")
        if self.capo_voting not in VOTING_MODES:
            raise ConfigError(f"capo_voting must be one of {', '.join(VOTING_MODES)}, got {self.capo_voting!r}")
        if not (isinstance(self.capo_w_process, (int, float)) and 0 <= self.capo_w_process < math.inf):
            raise ConfigError(f"capo_w_process must be a number >= 0 (a penalty), got {self.capo_w_process!r}")
        if not (isinstance(self.capo_w_whole, (int, float)) and 0 < self.capo_w_whole < math.inf):
            raise ConfigError(f"capo_w_whole must be a positive number, got {self.capo_w_whole!r}")
        if not (isinstance(self.capo_judge_temperature, (int, float)) and 0 <= self.capo_judge_temperature < math.inf):
            raise ConfigError(f"capo_judge_temperature must be a number >= 0, got {self.capo_judge_temperature!r}")
        if not 0 < self.capo_judge_top_p <= 1:
            raise ConfigError(f"capo_judge_top_p must be in (0, 1], got {self.capo_judge_top_p}")
        if (not isinstance(self.capo_judge_max_new_tokens, int) or isinstance(self.capo_judge_max_new_tokens, bool)
                or self.capo_judge_max_new_tokens < 1):
            raise ConfigError(f"capo_judge_max_new_tokens must be an integer >= 1, got "
                              f"{self.capo_judge_max_new_tokens!r}")
        if self.capo_judge_chat not in ("auto", True, False):
            raise ConfigError(f"capo_judge_chat must be auto, true or false, got {self.capo_judge_chat!r}")
        if not isinstance(self.capo_show_answer, bool):
            raise ConfigError(f"capo_show_answer must be true or false, got {self.capo_show_answer!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d


FIELD_TYPES = {f.name: f for f in fields(TrainConfig)}


def preset_path(preset: str) -> Path:
    """engine/presets/<preset>.yaml, or `preset` itself when it is a YAML file path."""
    p = Path(preset)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"preset file {p} does not exist")
        return p
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(known)} (or a path to a .yaml file)")
    return path


def load_config(preset: str = "default", overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The preset's values, then `overrides` on top; unknown keys raise ConfigError. Validated."""
    path = preset_path(preset)
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"preset {path} must be a mapping of config keys, got {type(values).__name__}")
    overrides = dict(overrides or {})
    values = _apply_per_algo(values, overrides.get("algo", values.get("algo", TrainConfig.algo)), path)
    same_task = overrides.get("task", values.get("task")) == values.get("task")
    if same_task and isinstance(values.get("task_args"), dict) and isinstance(overrides.get("task_args"), dict):
        # Key by key: `--task-args '{data: X}'` keeps the preset's other task options (e.g. gsm8k's
        # strict grading); a key set to null drops the preset's value. Another task: replaced.
        overrides["task_args"] = {k: v for k, v in {**values["task_args"], **overrides["task_args"]}.items()
                                  if v is not None}
    merged = {**values, **overrides}
    unknown = sorted(set(merged) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)} (in preset {path.name} or the command line); "
                          f"valid keys: {', '.join(FIELD_TYPES)}")
    merged = {k: _coerce(k, v) for k, v in merged.items()}
    if "adam_betas" in merged:
        merged["adam_betas"] = tuple(merged["adam_betas"])
    return TrainConfig(**merged).validate()


def _apply_per_algo(values: dict[str, Any], algo: str, path: Path) -> dict[str, Any]:
    """The preset's values with its `per_algo: {<algo>: {...}}` section for `algo` on top.

    A preset tuned for one algorithm (gsm8k: VinePPO) can carry the settings the paper used for
    the others (RestEM's whole-train-set iterations, DPO+'s 64 samples): `--algo restem
    --preset gsm8k` then gets them, and command-line flags still override everything.
    """
    values = dict(values)
    sections = values.pop(PER_ALGO, None)
    if sections is None:
        return values
    if not isinstance(sections, dict) or not all(isinstance(v, dict) for v in sections.values()):
        raise ConfigError(f"{PER_ALGO} in preset {path.name} must map algorithm names to mappings of config keys")
    unknown = sorted(set(sections) - set(algorithms()))
    if unknown:
        raise ConfigError(f"{PER_ALGO} in preset {path.name} names unknown algorithm(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(algorithms())}")
    section = dict(sections.get(algo, {}))
    if PER_ALGO in section or "algo" in section:
        raise ConfigError(f"{PER_ALGO}.{algo} in preset {path.name} may not set algo or {PER_ALGO}")
    if isinstance(values.get("task_args"), dict) and isinstance(section.get("task_args"), dict):
        section["task_args"] = {**values["task_args"], **section["task_args"]}
    return {**values, **section}


def _coerce(name: str, value: Any) -> Any:
    """YAML 1.1 reads 1e-6 (no dot) as a string: make it the number a float field expects."""
    if isinstance(value, str) and "float" in str(FIELD_TYPES[name].type):
        try:
            return float(value)
        except ValueError:
            return value  # validate() names the bad value
    return value


def parse_value(name: str, text: str) -> Any:
    """A command-line string as the type of config field `name` (YAML syntax: 1e-6, true, null, {a: 1})."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--{name.replace('_', '-')} {text!r} is not valid YAML ({e})") from None
    default = FIELD_TYPES[name].default
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if name in ("task_args", "tiny_model_args") and not isinstance(value, dict):
        raise ConfigError(f"--{name.replace('_', '-')} takes a mapping such as '{{steps: 3}}', got {text!r}")
    return value


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_run(run_dir: str | Path) -> dict[str, Any]:
    """The config a run was started with (its config.yaml), as a dict."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"cannot resume: {path} does not exist")
    return yaml.safe_load(path.read_text())


