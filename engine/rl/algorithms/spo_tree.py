"""SPO-tree (Segment Policy Optimization, Guo et al. 2025, arXiv 2505.23564): sampling is a tree,
and every leaf is a training response.

Sampling (`sample`, the trainer's hook for an algorithm that builds its own episodes): level i
forks `tree_branching[i]` continuations of `tree_segment_tokens` tokens from every open node;
the last level runs to EOS or `max_new_tokens`. A branch that ends (EOS or a stop string) before
its segment is complete is a leaf early. Each level is ONE `Engine.generate` call with n = b from
every open node's state (prompt + the segments above it). Those states are the tokens the Engine
has just generated, still in its radix cache, so a node's state costs about one token of prefill
(the last sampled token, whose KV was never computed) at any depth: `tree_prefill_tokens`.

Credit (`credit`): a node's value V is the mean 0/1 reward of the leaves below it (a leaf's V is
its reward; the root's is the mean over the prompt's leaves). A segment's advantage is
V(node) - V(parent), given to each of that segment's tokens in every leaf that contains it.
With early leaves the leaf mean weighs a subtree by its number of leaves (the issue's and
the paper's definition), not by its branching.

Shared segments count once: a token shared by m leaves carries a policy-gradient weight of
1/m in each of them (`Episode.token_weights`; the PPO-clip term is linear in a positive weight,
so this equals training on the unique segments once with their prefixes as context). The
weights apply to the policy-gradient term; the KL and entropy terms stay per leaf, as for every
other algorithm, and the loss normaliser counts every leaf token. Advantages are not whitened by
default (they are value differences already); with whitening on, its statistics count a shared
token once per leaf.

`tree_prob_mask: p` (SPO-chain's probability mask, off by default): a token the sampler drew with
probability >= p gets advantage 0; only the uncertain tokens carry the segment's advantage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from engine.rl.algorithms.base import TrainerContext
from engine.rl.algorithms.policy_gradient import PolicyGradient
from engine.rl.config import ConfigError, TrainConfig
from engine.rl.rollout import Episode, graded_episode, response_text
from engine.runtime import SamplingParams
from engine.runtime.params import mix_seed


@dataclass(eq=False)
class Node:
    """One tree node: the segment that leads to it from its parent (the root's is empty)."""

    parent: "Node | None"
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish: str | None = None        # its segment's finish reason ("length": the segment is complete)
    children: list["Node"] = field(default_factory=list)
    leaf: Episode | None = None      # set on a leaf
    value: float = math.nan          # mean reward of the leaves below (set by tree_values)
    leaves: int = 0                  # leaves below (itself, for a leaf)
    prefill: int = 0                 # tokens of its state whose KV was computed when it was expanded
    cover: list[int] = field(default_factory=list)  # per segment token: leaves whose response holds it

    def path(self) -> list["Node"]:
        """The non-root nodes from the root's child down to this node."""
        out, node = [], self
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def response(self) -> list[int]:
        return [t for n in self.path() for t in n.tokens]


def tree_values(root: Node) -> None:
    """Set `value` and `leaves` on every node: a leaf's value is its episode's reward; a node's
    the mean reward of all leaves below it (sum over children of value x leaves / leaves)."""
    if root.leaf is not None:
        root.value, root.leaves = float(root.leaf.reward), 1
        return
    if not root.children:
        raise ValueError("a tree node with neither children nor a leaf episode")
    total = 0.0
    root.leaves = 0
    for child in root.children:
        tree_values(child)
        total += child.value * child.leaves
        root.leaves += child.leaves
    root.value = total / root.leaves


def leaves_of(root: Node) -> list[Node]:
    """The leaves below `root`, depth first in sampling order."""
    if root.leaf is not None:
        return [root]
    return [leaf for child in root.children for leaf in leaves_of(child)]


def _shared_length(response: list[int], offset: int, segment: list[int]) -> int:
    """How many of `segment`'s tokens the response holds unchanged from `offset` (a stop string's
    trim may cut a segment short or replace its last kept token by EOS)."""
    n = 0
    while n < len(segment) and offset + n < len(response) and response[offset + n] == segment[n]:
        n += 1
    return n


def tree_credit(root: Node, prob_mask: float | None = None) -> None:
    """Values (tree_values), then each leaf episode's per-token `advantages` and `token_weights`.

    A leaf's token at response position p belongs to the segment of the deepest path node whose
    tokens it holds unchanged; it gets that node's V(node) - V(parent) and weight 1 / (the leaves
    whose responses hold that same token). Tokens past the path's (an EOS that replaced a stop
    string) belong to the leaf's own segment, weight 1."""
    tree_values(root)
    leaves = leaves_of(root)
    spans: dict[int, list[tuple[Node, int, int]]] = {}
    for leaf in leaves:
        ep = leaf.leaf
        parts, offset = [], 0
        for node in leaf.path():
            if not node.cover:
                node.cover = [0] * len(node.tokens)
            n = _shared_length(ep.response_ids, offset, node.tokens)
            for i in range(n):
                node.cover[i] += 1
            parts.append((node, offset, n))
            offset += len(node.tokens)
        spans[id(leaf)] = parts
    for leaf in leaves:
        ep = leaf.leaf
        adv = torch.empty(ep.num_tokens)
        weights = torch.ones(ep.num_tokens)
        own = leaf.value - leaf.parent.value
        adv.fill_(own)  # (positions no segment holds unchanged: the leaf's own segment)
        for node, offset, n in spans[id(leaf)]:
            if n:
                adv[offset:offset + n] = node.value - node.parent.value
                weights[offset:offset + n] = 1.0 / torch.tensor(node.cover[:n], dtype=torch.float32)
        if prob_mask is not None and ep.sampler_logprobs is not None:
            confident = torch.exp(ep.sampler_logprobs) >= prob_mask  # (NaN, a token not drawn: False)
            adv = torch.where(confident, torch.zeros_like(adv), adv)
        ep.advantages, ep.token_weights = adv, weights


@dataclass
class TreeStats:
    """What one iteration's tree sampling did (this rank)."""

    nodes: int = 0                   # nodes below the roots (one per sampled segment)
    leaves: int = 0
    early_leaves: int = 0            # leaves that ended before the last level
    expanded: int = 0                # non-root nodes that were forked from
    prefill_tokens: int = 0          # prefill of the expanded non-root nodes' states
    max_node_prefill: int = 0        # the largest of those
    tokens: int = 0                  # tokens sampled (each segment once)
    calls: int = 0                   # generate calls


def grow_trees(engine, task, items: list, prompts: list[list[int]], *, branching: list[int], segment_tokens: int,
               params: SamplingParams, seeds: list[int] | None, first_group: int = 0,
               progress: bool | str = False) -> tuple[list[Node], list[Episode], TreeStats]:
    """Sample one tree per prompt, level by level: one `engine.generate` call per level with
    n = branching[level] from every open node's state. Returns the roots, the leaf episodes
    (graded; a prompt's leaves are consecutive, group = first_group + its index) and the stats.

    params: temperature, top_p, stop, max_new_tokens (the whole response's budget), logprobs.
    seeds: one per prompt (node k of prompt j, numbered in expansion order, samples with
    mix_seed(seeds[j], k)); None draws from torch's generator."""
    stats = TreeStats()
    tok, stop, eos = engine.tokenizer, params.stop, set(engine.eos_token_ids)
    roots = [Node(parent=None) for _ in items]
    owner = {id(r): j for j, r in enumerate(roots)}
    counters = [0] * len(roots)
    frontier = list(roots)
    depth = len(branching)
    for level, b in enumerate(branching):
        if not frontier:
            break
        last = level == depth - 1
        budget = params.max_new_tokens - level * segment_tokens if last else segment_tokens
        states, per_node = [], []
        for node in frontier:
            j = owner[id(node)]
            states.append(prompts[j] + node.response())
            seed = None
            if seeds is not None:
                seed = mix_seed(seeds[j], counters[j])
                counters[j] += 1
            per_node.append(replace(params, n=b, max_new_tokens=budget, seed=seed))
        outs = engine.generate(states, per_node, progress=progress if level == 0 else False)
        stats.calls += 1
        opened = []
        for node, state, completions in zip(frontier, states, outs):
            # the state's tokens whose KV was computed (the n forks share the first one's prefill)
            node.prefill = len(state) - max(c.cached_tokens for c in completions)
            if node.parent is not None:
                stats.expanded += 1
                stats.prefill_tokens += node.prefill
                stats.max_node_prefill = max(stats.max_node_prefill, node.prefill)
            for c in completions:
                child = Node(parent=node, tokens=list(c.token_ids), logprobs=c.logprobs, finish=c.finish_reason)
                owner[id(child)] = owner[id(node)]
                node.children.append(child)
                stats.nodes += 1
                stats.tokens += len(c.token_ids)
                if last or c.finish_reason != "length":  # the end of the response, or a leaf early
                    j = owner[id(node)]
                    ids = child.response()
                    lps = [x for n in child.path() for x in n.logprobs] if params.logprobs else None
                    text = response_text(tok, ids, stop)
                    child.leaf = graded_episode(tok, task, items[j], first_group + j, prompts[j], ids, text,
                                                c.finish_reason, lps, stop, eos)
                    stats.leaves += 1
                    stats.early_leaves += not last
                else:
                    opened.append(child)
        frontier = opened
    episodes = [leaf.leaf for root in roots for leaf in leaves_of(root)]
    return roots, episodes, stats


class SPOTree(PolicyGradient):
    name = "spo-tree"
    owns_sampling = True

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.roots: list[Node] = []       # this iteration's trees (this rank's prompts)
        self.stats = TreeStats()

    @classmethod
    def validate(cls, cfg: TrainConfig) -> None:
        super().validate(cfg)
        b = cfg.tree_branching
        if (not isinstance(b, (list, tuple)) or not b
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in b)):
            raise ConfigError(f"tree_branching must be a non-empty list of integers >= 1, got {b!r}")
        seg = cfg.tree_segment_tokens
        if isinstance(seg, bool) or not isinstance(seg, int) or seg < 1:
            raise ConfigError(f"tree_segment_tokens must be an integer >= 1, got {seg!r}")
        if (len(b) - 1) * seg >= cfg.max_new_tokens:
            raise ConfigError(f"{len(b) - 1} fixed segments of tree_segment_tokens {seg} leave no tokens for the "
                              f"last level within max_new_tokens {cfg.max_new_tokens}")
        p = cfg.tree_prob_mask
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ConfigError(f"tree_prob_mask must be in (0, 1] or null, got {p!r}")

    @classmethod
    def max_samples_per_prompt(cls, cfg: TrainConfig) -> int:
        return math.prod(cfg.tree_branching)  # a full tree's leaves (early leaves make fewer)

    def sample(self, items: list, first_group: int, ctx: TrainerContext) -> list[Episode]:
        cfg = self.cfg
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                stop=ctx.stop, logprobs=True)
        base = ctx.iteration_seed("sample")
        seeds = [mix_seed(base, g) for g in range(first_group, first_group + len(items))] if ctx.seeded else None
        prompts = [ctx.tokenizer.encode(ctx.task.prompt(it)) for it in items]
        self.roots, episodes, self.stats = grow_trees(
            ctx.engine, ctx.task, items, prompts, branching=list(cfg.tree_branching),
            segment_tokens=cfg.tree_segment_tokens, params=params, seeds=seeds, first_group=first_group,
            progress=ctx.progress and "tree level 1")
        return episodes

    def credit(self, episodes: list[Episode], ctx: TrainerContext) -> dict[str, float]:
        leaves = [leaf.leaf for root in self.roots for leaf in leaves_of(root)]
        if len(leaves) != len(episodes) or any(a is not b for a, b in zip(leaves, episodes)):
            raise RuntimeError("spo-tree credit needs the episodes of its own last sample() call")
        for root in self.roots:
            tree_credit(root, self.cfg.tree_prob_mask)
        s = self.stats
        nodes, leaves_n, early, expanded, prefill, tokens, value_sum = ctx.dist.all_reduce_sum(
            [s.nodes, s.leaves, s.early_leaves, s.expanded, s.prefill_tokens, s.tokens,
             sum(r.value for r in self.roots)])
        (max_prefill,) = ctx.dist.all_reduce_max([s.max_node_prefill])
        prompts = len(self.roots) * ctx.dist.world_size
        return dict(tree_nodes=int(nodes), tree_leaves=int(leaves_n), tree_early_leaves=int(early),
                    tree_prefill_tokens=int(prefill), tree_node_prefill_mean=prefill / max(1, expanded),
                    tree_node_prefill_max=int(max_prefill), tree_tokens=int(tokens),
                    tree_root_value_mean=value_sum / max(1, prompts))
