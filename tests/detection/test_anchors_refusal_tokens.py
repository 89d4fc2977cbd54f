"""The optional ``refusal_tokens`` key of the anchors YAML (``guardalign probe``'s logit-lens words)."""
from __future__ import annotations

import pytest

from guardalign.detection.anchors import AnchorError, load_anchors, parse_anchors

BASE = """\
version: 1
tau: 0.75
prefix: Be careful.
refusal_phrases:
  - I cannot
  - "I'm sorry"
  - As an AI
  - I will not
categories:
  - name: weapons
    description: Weapons
    variants: [a photo of a gun]
"""


def test_default_words_are_the_first_word_of_each_phrase():
    s = parse_anchors(BASE)
    assert s.refusal_tokens == () and s.refusal_words() == ("I", "I'm", "As")
    assert "refusal_tokens" not in s.to_dict()  # absent key: the content (and its hash) is what it always was
    assert load_anchors().refusal_words()[:2] == ("I'm", "I")  # the shipped set


def test_refusal_tokens_are_validated_and_hashed():
    s = parse_anchors(BASE + "refusal_tokens: [Sorry, I, cannot]\n")
    assert s.refusal_tokens == ("Sorry", "I", "cannot") and s.refusal_words() == s.refusal_tokens
    assert s.to_dict()["refusal_tokens"] == ["Sorry", "I", "cannot"]
    assert s.sha256 != parse_anchors(BASE).sha256
    with pytest.raises(AnchorError, match=r"<string>:15: refusal_tokens\[1\]: 'I cannot' is not a single word"):
        parse_anchors(BASE + "refusal_tokens:\n  - Sorry\n  - I cannot\n")
    with pytest.raises(AnchorError, match=r"refusal_tokens: expected a non-empty list"):
        parse_anchors(BASE + "refusal_tokens: []\n")
    with pytest.raises(AnchorError, match=r"refusal_tokens\[1\]: duplicate entry"):
        parse_anchors(BASE + "refusal_tokens: [Sorry, sorry]\n")
    with pytest.raises(AnchorError, match="did you mean 'refusal_tokens'"):
        parse_anchors(BASE + "refusal_token: [Sorry]\n")
