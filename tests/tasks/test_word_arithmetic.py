"""word-arithmetic (stories of adding and taking away) and chat-formatted prompts for every task."""
from __future__ import annotations

import re

import pytest

from engine.model.tiny import char_tokenizer
from engine.tasks import TASKS, load_task

# One role per line; the generation prompt opens the assistant's line.
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def solve(question: str) -> int:
    """The answer read back from the story, sentence by sentence (independent of the generator)."""
    sentences = re.findall(r"[^.?]+[.?]", question)
    value = int(re.search(r"has (\d+) ", sentences[0]).group(1))
    assert sentences[-1].strip().startswith("How many")
    for sentence in sentences[1:-1]:
        n = int(re.search(r"(\d+)", sentence).group(1))
        gain = any(v in sentence for v in ("buys", "finds", "gives him", "gives her"))
        loss = any(v in sentence for v in ("to a friend", "loses", "sells"))
        assert gain != loss, sentence
        value += n if gain else -n
    return value


@pytest.mark.parametrize("knobs", [{}, {"steps": 3, "max_operand": 20}, {"steps": 1, "ops": "-"}])
def test_answers_correct_by_construction(knobs):
    task = load_task("word-arithmetic", n_train=1000, n_test=100, **knobs)
    train, test = task.items("train"), task.items("test")
    assert len(train) == 1000 and len(test) == 100
    assert not {i.question for i in train} & {i.question for i in test}  # held out
    lo, hi = task.steps
    for item in train + test:
        assert solve(item.question) == int(item.answer) >= 0
        assert lo <= item.question.count(".") - 1 <= hi  # one sentence an operation, after the first
        assert item.solution.splitlines()[-1] == f"#### {item.answer}"
        assert len(item.solution.splitlines()) == item.question.count(".")  # one line an operation
        assert task.reward(item.solution, item) == 1.0
        assert task.reward(f"So the answer is {item.answer} {item.question.split()[3]}.", item) == 1.0
        assert task.reward(f"#### {int(item.answer) + 1}", item) == 0.0
        assert task.reward(item.solution, item, finish_reason="length") == 0.0
    if knobs.get("ops") == "-":
        assert all("more" not in i.question for i in train)


def test_deterministic_given_seed_and_registered():
    assert "word-arithmetic" in TASKS
    a, b = load_task("word-arithmetic", n_train=50, n_test=20), load_task("word-arithmetic", n_train=50, n_test=20)
    assert a.items("train") == b.items("train") and a.items("test") == b.items("test")
    assert load_task("word-arithmetic", seed=1, n_train=50, n_test=20).items("test") != a.items("test")
    assert a.prompt(a.items("test")[0]) == a.items("test")[0].question  # the default template: the story alone
    assert a.items("test")[0].id == "word-arithmetic-test-0"


def test_bad_knobs():
    with pytest.raises(ValueError, match=r"word-arithmetic: ops must be a non-empty subset of '\+-', got '\*'"):
        load_task("word-arithmetic", ops="*")
    with pytest.raises(ValueError, match=r"word-arithmetic: ops must be a non-empty subset of '\+-', got ''"):
        load_task("word-arithmetic", ops="")
    with pytest.raises(ValueError, match="word-arithmetic: steps must be >= 1"):
        load_task("word-arithmetic", steps=0)
    with pytest.raises(ValueError, match="chat must be true or false, got 'yes'"):
        load_task("word-arithmetic", chat="yes")


@pytest.mark.parametrize("name, kwargs", [("word-arithmetic", {}), ("arithmetic", {}),
                                          ("gsm8k", {"data": "sample"})])
def test_chat_prompts_use_the_tokenizers_template(name, kwargs):
    tok = char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    plain, chat = load_task(name, **kwargs), load_task(name, chat=True, **kwargs)
    item = plain.items("test")[0]
    with pytest.raises(RuntimeError, match="call task.use_tokenizer"):
        chat.prompt(item)
    chat.use_tokenizer(tok)
    assert chat.prompt(item) == f"<user>{plain.prompt(item)}\n<assistant>"
    plain.use_tokenizer(tok)  # (a no-op when chat is off)
    assert plain.prompt(item) == plain.template.replace("{question}", item.question)


def test_chat_needs_a_template():
    task = load_task("word-arithmetic", chat=True)
    with pytest.raises(ValueError, match="chat is on, but the model's tokenizer has no chat template"):
        task.use_tokenizer(char_tokenizer())


def test_chat_prompt_leaves_out_a_bos_that_encoding_adds_back():
    """A template that writes BOS, with a tokenizer that adds BOS when encoding: one BOS in the ids."""
    from tokenizers import processors

    tok = char_tokenizer()
    tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.encode("") == [tok.bos_token_id]
    task = load_task("word-arithmetic", chat=True)
    task.use_tokenizer(tok)
    ids = tok.encode(task.prompt(task.items("test")[0]))
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    # A tokenizer that adds no BOS keeps the template's.
    tok._tokenizer.post_processor = None
    assert tok.encode("") == []
    assert tok.encode(task.prompt(task.items("test")[0]))[0] == tok.bos_token_id
