"""SPO-tree: values and advantages of a small tree by hand, shared tokens counted once, the
probability mask, a node's prefill at any depth, per-prompt seeding, and the trainer end to end."""
from __future__ import annotations

import math

import pytest
import torch

from engine.rl.algorithms.policy_gradient import loss_weights
from engine.rl.algorithms.spo_tree import Node, grow_trees, leaves_of, tree_credit
from engine.rl.config import ConfigError
from engine.rl.rollout import Episode
from engine.runtime import SamplingParams
from engine.tasks import Item
from test_trainer import assert_resume_reproduces, fast_config, make_trainer, rows_of  # the helpers of the same folder

ITEM = Item(id="0", question="q", answer="1")


def _child(parent: Node, tokens: list[int], reward: float | None = None, logprobs=None) -> Node:
    """A node under `parent`; with a reward it is a leaf whose response is the path's tokens."""
    node = Node(parent=parent, tokens=tokens, logprobs=logprobs)
    parent.children.append(node)
    if reward is not None:
        response = node.response()
        lps = torch.tensor([x for n in node.path() for x in n.logprobs]) if logprobs is not None else None
        node.leaf = Episode(group=0, item=ITEM, prompt_ids=[9], response_ids=response, text="",
                            finish_reason="stop", reward=reward, sampler_logprobs=lps)
    return node


def _small_tree() -> tuple[Node, dict[str, Node]]:
    """root -> a [1, 2] -> a1 [5] (reward 1), a2 [6, 7] (reward 0)
            -> b [3, 4] (ended early: a leaf, reward 1)
            -> c [8] -> c1 [10] (reward 0), c2 [11] (reward 0)"""
    root = Node(parent=None)
    a = _child(root, [1, 2])
    a1, a2 = _child(a, [5], 1.0), _child(a, [6, 7], 0.0)
    b = _child(root, [3, 4], 1.0)
    c = _child(root, [8])
    c1, c2 = _child(c, [10], 0.0), _child(c, [11], 0.0)
    return root, dict(a=a, a1=a1, a2=a2, b=b, c=c, c1=c1, c2=c2)


def test_values_and_advantages_of_a_small_tree_by_hand():
    root, n = _small_tree()
    tree_credit(root)
    # V = mean reward of the leaves below: a 1/2, c 0, root (1 + 0 + 1 + 0 + 0) / 5
    assert n["a"].value == 0.5 and n["c"].value == 0.0 and n["b"].value == 1.0
    assert root.value == pytest.approx(2 / 5)
    assert [leaf.leaf.reward for leaf in leaves_of(root)] == [1.0, 0.0, 1.0, 0.0, 0.0]
    # a segment's advantage is V(node) - V(parent), on that segment's tokens
    r = 2 / 5
    expect = {
        "a1": [0.5 - r, 0.5 - r, 1 - 0.5],
        "a2": [0.5 - r, 0.5 - r, 0 - 0.5, 0 - 0.5],
        "b": [1 - r, 1 - r],
        "c1": [0 - r, 0 - 0],
        "c2": [0 - r, 0 - 0],
    }
    for name, adv in expect.items():
        assert n[name].leaf.advantages.tolist() == pytest.approx(adv), name
    # shared tokens weigh 1 / (the leaves holding them): each segment counts once in total
    weights = {"a1": [0.5, 0.5, 1], "a2": [0.5, 0.5, 1, 1], "b": [1, 1], "c1": [0.5, 1], "c2": [0.5, 1]}
    for name, w in weights.items():
        assert n[name].leaf.token_weights.tolist() == pytest.approx(w), name


def test_every_segment_token_counts_once_in_the_policy_gradient():
    """Summed over the leaves, each segment's tokens weigh exactly 1 (the loss's weights)."""
    root, n = _small_tree()
    tree_credit(root)
    leaves = [leaf.leaf for leaf in leaves_of(root)]
    total: dict[tuple[int, int], float] = {}
    for leaf_node, w in zip(leaves_of(root), loss_weights(leaves, tis_cap=None)):
        pos = 0
        for node in leaf_node.path():
            for i in range(len(node.tokens)):
                key = (id(node), i)
                total[key] = total.get(key, 0.0) + float(w[pos])
                pos += 1
    assert len(total) == 2 + 1 + 2 + 2 + 1 + 1 + 1  # the tree's segment tokens, each once
    assert all(v == pytest.approx(1.0) for v in total.values())


def test_a_leaf_trimmed_into_its_parents_segment_counts_only_what_it_holds():
    """A stop string's trim can cut a shared segment short in one leaf: the others' copies of
    those tokens then weigh 1 each, and the replacing EOS is the leaf's own segment's."""
    root = Node(parent=None)
    a = _child(root, [1, 2, 3])
    a1, a2 = _child(a, [4], 1.0), _child(a, [5], 0.0)
    a2.leaf.response_ids = [1, 2, 99]  # trimmed before token 3 and ended with EOS (99)
    tree_credit(root)
    assert a1.leaf.token_weights.tolist() == [0.5, 0.5, 1.0, 1.0]
    assert a2.leaf.token_weights.tolist() == [0.5, 0.5, 1.0]
    assert a2.leaf.advantages.tolist() == pytest.approx([0.0, 0.0, -0.5])  # V(a) = V(root) = 0.5


def test_the_probability_mask_keeps_the_advantage_only_on_uncertain_tokens():
    root = Node(parent=None)
    lp = math.log
    a = _child(root, [1, 2], logprobs=[lp(0.95), lp(0.3)])
    _child(a, [5], 1.0, logprobs=[lp(0.5)])
    _child(a, [6], 0.0, logprobs=[lp(0.99)])
    b = _child(root, [3], 0.0, logprobs=[lp(0.2)])
    tree_credit(root, prob_mask=0.9)
    a1, a2 = a.children
    v = 1 / 3
    assert a1.leaf.advantages.tolist() == pytest.approx([0.0, 0.5 - v, 0.5])
    assert a2.leaf.advantages.tolist() == pytest.approx([0.0, 0.5 - v, 0.0])  # drawn with p 0.99
    assert b.leaf.advantages.tolist() == pytest.approx([-v])


# ---------------------------------------------------------------- sampling through the Engine
@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return make_trainer(fast_config(tmp_path_factory.mktemp("spo"), algo="spo-tree", tree_segment_tokens=2,
                                    tree_branching=[2, 2, 2, 2], max_new_tokens=12))


def _grow(trainer, items, seeds, branching=(2, 2, 2, 2)):
    prompts = [trainer.tokenizer.encode(trainer.task.prompt(it)) for it in items]
    params = SamplingParams(temperature=1.0, max_new_tokens=12, logprobs=True, ignore_eos=True)  # (no stop: full trees)
    trainer.engine.invalidate_cache()
    return grow_trees(trainer.engine, trainer.task, items, prompts, branching=list(branching), segment_tokens=2,
                      params=params, seeds=seeds)


def test_a_nodes_prefill_does_not_grow_with_its_depth(trainer):
    items = trainer.train_items[:3]
    roots, episodes, stats = _grow(trainer, items, seeds=[11, 12, 13])
    by_depth: dict[int, list[int]] = {}

    def walk(node: Node, depth: int) -> None:
        if node.children:  # expanded: its state was prefilled (the root's is the whole prompt)
            if depth:
                by_depth.setdefault(depth, []).append(node.prefill)
            for child in node.children:
                walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    assert sorted(by_depth) == [1, 2, 3]  # (ignore_eos: every branch runs to the last level)
    # one token (the last sampled one, whose KV was never computed) at depth 1, 2 and 3 alike
    assert all(p == 1 for ps in by_depth.values() for p in ps), by_depth
    assert roots[0].prefill > 1  # the root's state is the whole prompt
    assert stats.leaves == len(episodes) == 3 * 16 and stats.early_leaves == 0
    assert stats.max_node_prefill == 1 and stats.prefill_tokens == stats.expanded == 3 * (2 + 4 + 8)
    assert all(e.num_tokens == 12 for e in episodes)  # 3 segments of 2, then the last level's 6


def test_a_prompts_tree_does_not_depend_on_the_other_prompts(trainer):
    """Seeded per prompt (and per node): the same tree alone or beside another prompt's."""
    items = trainer.train_items[:2]
    _, both, _ = _grow(trainer, items, seeds=[5, 6], branching=(2, 2))
    _, alone, _ = _grow(trainer, items[1:], seeds=[6], branching=(2, 2))
    assert [e.response_ids for e in both[4:]] == [e.response_ids for e in alone]
    assert [e.response_ids for e in both[:4]] != [e.response_ids for e in alone]


def test_the_tree_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"tree_branching must be a non-empty list of integers >= 1, got \[2, 0\]"):
        fast_config(tmp_path, algo="spo-tree", tree_branching=[2, 0])
    with pytest.raises(ConfigError, match="tree_segment_tokens 6 leave no tokens for the last level within "
                                          "max_new_tokens 12"):
        fast_config(tmp_path, algo="spo-tree", tree_segment_tokens=6)
    with pytest.raises(ConfigError, match=r"tree_prob_mask must be in \(0, 1\] or null, got 1.5"):
        fast_config(tmp_path, algo="spo-tree", tree_segment_tokens=3, tree_prob_mask=1.5)


def test_two_iterations_of_spo_tree(tmp_path):
    trainer = make_trainer(fast_config(tmp_path, algo="spo-tree", tree_segment_tokens=3))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.run()
    rows = rows_of(trainer)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert 1 <= r["tree_leaves"] <= 4 * 8 and r["tree_nodes"] >= r["tree_leaves"]
        assert r["tree_node_prefill_max"] <= trainer.cfg.page_size
        for key in ("reward_mean", "loss", "kl_ref", "adv_std", "grad_norm", "eval_accuracy", "tree_prefill_tokens"):
            assert key in r and math.isfinite(r[key]), key
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


def test_spo_tree_resume_reproduces(tmp_path):
    assert_resume_reproduces(tmp_path, algo="spo-tree", tree_segment_tokens=3)
