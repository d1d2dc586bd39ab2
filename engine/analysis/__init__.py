"""`python -m engine.analysis`: the VinePPO paper's analyses at small scale.

    python -m engine.analysis values ...   # value prediction: MC estimates and a critic against MC ground truth
    python -m engine.analysis credit ...   # credit assignment: the algorithms' advantages and gradient noise

Each subcommand is one module (`values.py`, `credit.py`; `--help` on each says what it measures).
"""
from __future__ import annotations

import argparse

from engine.analysis import credit, values
from engine.analysis.values import VALUE_HEAD
from engine.tasks import parse_task_args


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """(the program's parser, its subcommands' parsers by name, which report their command's errors)."""
    ap = argparse.ArgumentParser(prog="python -m engine.analysis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("values", help="value-prediction analysis: MC estimates and a critic against MC ground truth",
                       description=values.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("--model", required=True, help="policy checkpoint folder (Hugging Face layout)")
    v.add_argument("--task", required=True, help="gsm8k | math | arithmetic")
    v.add_argument("--task-args", default=None, type=parse_task_args, help="task options as a YAML mapping")
    v.add_argument("--split", default="test")
    v.add_argument("--items", type=int, default=64, help="items sampled (one response each)")
    v.add_argument("--states", type=int, required=True, help="states drawn at random across the responses")
    v.add_argument("--truth-rollouts", type=int, required=True, help="rollouts per state for V*")
    v.add_argument("--k", type=int, nargs="+", required=True, help="MC rollout counts to evaluate")
    v.add_argument("--repeats", type=int, default=4, help="independent V_K estimates per state and K")
    v.add_argument("--critic", default=None, help="a PPO checkpoint dir holding critic/ and critic/" + VALUE_HEAD)
    v.add_argument("--k-adaptive", type=int, nargs=3, default=None, metavar=("K_MIN", "K_MAX", "MEAN_K"),
                   help="also the adaptive budget (the trainer's --k-adaptive), at MEAN_K rollouts per state")
    v.add_argument("--ranking-states", type=int, default=16)
    v.add_argument("--alternatives", type=int, default=3, help="next steps sampled per ranking state")
    v.add_argument("--temperature", type=float, default=0.6)
    v.add_argument("--top-p", type=float, default=1.0)
    v.add_argument("--max-new-tokens", type=int, default=256)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", default=None, help="report path (default: <model>/values-<task>-<split>.json)")
    v.add_argument("--device", default=None)
    v.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    v.add_argument("--kv-cache-tokens", type=int, default=None)
    v.add_argument("--quiet", action="store_true", help="no progress bars")
    c = sub.add_parser("credit", help="credit assignment: VinePPO's, GRPO's, RLOO's (and PPO's) advantages and "
                                      "policy gradients on one policy's batches",
                       description=credit.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--model", required=True, help="policy checkpoint folder (Hugging Face layout)")
    c.add_argument("--task", required=True, help="gsm8k | math | arithmetic (localisation: arithmetic only)")
    c.add_argument("--task-args", default=None, type=parse_task_args, help="task options as a YAML mapping")
    c.add_argument("--prompts", type=int, default=32, help="prompts per batch (the trainer's prompts_per_iteration)")
    c.add_argument("--samples", type=int, default=4, help="samples per prompt (>= 2: GRPO and RLOO compare them)")
    c.add_argument("--k", type=int, default=4, help="VinePPO's MC rollouts per state")
    c.add_argument("--batches", type=int, default=4, help="independent batches (the trainer's iterations 1..B)")
    c.add_argument("--critic", default=None, help="also PPO's GAE advantages with this PPO checkpoint's critic/")
    c.add_argument("--tree-branching", type=int, nargs="+", default=None,
                   help="sample each batch as SPO-tree does (e.g. 2 2 2) and report SPO-tree's credit on its leaves")
    c.add_argument("--tree-segment-tokens", type=int, default=30, help="SPO-tree's tokens per segment")
    c.add_argument("--temperature", type=float, default=0.6)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--loss-aggregation", default="token-mean", help="the trainer's loss_aggregation")
    c.add_argument("--seed", type=int, default=0, help="the run seed: batch b is iteration b of a run with it")
    c.add_argument("--out", default=None, help="report path (default: <model>/credit-<task>.json)")
    c.add_argument("--device", default="auto")
    c.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 (auto: the trainer's choice)")
    c.add_argument("--kv-cache-tokens", type=int, default=None)
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap, {"values": v, "credit": c}


def main(argv: list[str] | None = None) -> dict:
    ap, subs = _parser()
    args = ap.parse_args(argv)
    run = credit.credit_main if args.command == "credit" else values.values_main
    return run(args, subs[args.command])
