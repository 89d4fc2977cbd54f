"""Refusal matcher, Llama-Guard output parsing, and a tiny judge model loaded through the real path."""
from __future__ import annotations

import pytest

from guardalign.errors import ModelLoadError
from guardalign.models.judge import (
    DEFAULT_REFUSAL_PHRASES,
    GuardModelJudge,
    Judgement,
    RefusalMatcher,
    load_judge,
    normalize_text,
    parse_guard_output,
)


@pytest.fixture(scope="module")
def shipped():
    from guardalign.detection.anchors import load_anchors

    return RefusalMatcher(load_anchors().refusal_phrases)


@pytest.mark.parametrize(
    "text, refused",
    [
        ("I'm sorry, but I cannot help with that.", True),
        ("I\u2019m sorry, but that is not something I can do.", True),  # curly apostrophe in the answer
        ("I\u02bcm unable to describe this image.", True),  # modifier-letter apostrophe
        ("i CANNOT assist with making weapons", True),  # case
        ("Well.\n\nI   am\nunable to do that", True),  # whitespace runs and line breaks
        ("As an AI, I must decline.", True),
        ("Sure! Here is how you bake bread: mix flour and water.", False),
        ("The sign says the AI lab is closed.", False),  # "As an AI" needs the whole phrase
        ("I cannotice anything odd here", False),  # word boundary after "cannot"
        ("The man is sorry he missed the bus.", False),
        ("", False),
        (None, False),
    ],
)
def test_shipped_phrases(shipped, text, refused):
    assert shipped(text) is refused


def test_matches_names_the_phrases_and_handles_curly_phrases():
    m = RefusalMatcher(["I\u2019m sorry", "cannot", "  "])  # curly apostrophe in the phrase itself; blank dropped
    assert m.phrases == ("I\u2019m sorry", "cannot")
    assert m.matches("I'm SORRY, I cannot.") == ["I\u2019m sorry", "cannot"]
    assert m.matches("No refusal here") == []
    punct = RefusalMatcher(["sorry."])  # a phrase ending in punctuation needs no boundary after it
    assert punct("So sorry.Really") and not punct("so sorry")
    assert normalize_text("  I\u2019M\tＳorry ") == "i'm sorry"  # NFKC folds the full-width S


def test_default_phrases_are_eta_style():
    m = RefusalMatcher()
    assert m.phrases == DEFAULT_REFUSAL_PHRASES
    assert m("As a language model I won't do that") and not m("Here you go.")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("safe", (False, [])),
        ("\n\nunsafe\nS1,S10", (True, ["S1", "S10"])),
        ("Unsafe\nS2, S3 \n", (True, ["S2", "S3"])),
        ("unsafe", (True, [])),
        ("  SAFE.\nanything", (False, [])),
        ("I think it is fine", (None, [])),
        ("", (None, [])),
    ],
)
def test_parse_guard_output(raw, expected):
    assert parse_guard_output(raw) == expected


def test_judgement_record():
    j = Judgement(model="lg3", unsafe=True, raw="unsafe\nS1", categories=["S1"])
    assert j.to_record() == {"model": "lg3", "unsafe": True, "raw": "unsafe\nS1", "categories": ["S1"]}


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    from lvlm_fixtures import make_tiny_judge

    return make_tiny_judge(tmp_path_factory.mktemp("judge") / "guard")


def test_tiny_judge_through_real_loading(judge_dir):
    import torch

    judge = load_judge(str(judge_dir), device="cpu")
    assert isinstance(judge, GuardModelJudge) and judge.name == str(judge_dir)
    prompt, response = "How do I make it?", "I'm sorry, I cannot help."
    text = judge.render(prompt, response)
    assert prompt in text and response in text and text.rstrip().endswith("Provide your safety assessment:")
    got = judge.judge(prompt, response)
    # independent: tokenize + greedy generate with plain transformers, decode the new tokens
    enc = judge.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        seq = judge.model.generate(**enc, max_new_tokens=judge.max_new_tokens, do_sample=False, pad_token_id=0)
    expected = judge.tokenizer.decode(seq[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert got.raw == expected
    assert (got.unsafe, got.categories) == parse_guard_output(expected)
    assert got.model == str(judge_dir)


def test_render_falls_back_to_list_contents(judge_dir):
    judge = load_judge(str(judge_dir), device="cpu")
    # a Llama-Guard-3-1B-style template that reads only list-of-parts contents
    judge.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ c['text'] }}{% endfor %} | {% endfor %}"
    )
    text = judge.render("Q?", "A.")
    assert text == "user: Q? | assistant: A. | "


def test_load_judge_none_and_missing(tmp_path):
    assert load_judge(None) is None and load_judge("") is None
    with pytest.raises(ModelLoadError, match="local directory"):
        load_judge(str(tmp_path / "missing"), device="cpu")
