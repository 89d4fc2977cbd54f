"""Tests for guardalign.detection.anchors: the shipped set, every validation error, the content hash."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from guardalign.detection import anchors as A
from guardalign.detection.anchors import AnchorError, AnchorSet, default_anchors_path, load_anchors, parse_anchors
from guardalign.errors import ConfigError

# Line numbers are fixed: the assertions below name them.
VALID = textwrap.dedent(
    """\
    version: 1
    tau: 0.75
    prefix: Be careful.
    refusal_phrases:
      - I cannot
      - I'm sorry
    categories:
      - name: weapons
        description: Weapons
        variants:
          - a photo of a gun
          - a photo of a knife
      - name: drugs
        description: Drugs
        tau: 0.6
        variants:
          - a photo of pills
          - a photo of a syringe
    """
)
SRC = "anchors.yaml"


def edit(old: str, new: str, text: str = VALID) -> str:
    assert old in text, old  # guard against a typo silently making the case valid
    return text.replace(old, new, 1)


def error_of(text: str) -> str:
    with pytest.raises(AnchorError) as info:
        parse_anchors(text, source=SRC)
    return str(info.value)


# -- the shipped default --------------------------------------------------------------------------
REQUIRED = ("sexual", "violence", "weapons", "self_harm", "hate", "drugs", "crime", "privacy")


def test_default_path_resolves_to_shipped_yaml():
    p = default_anchors_path()
    assert p.name == "default.yaml" and p.is_file()
    import guardalign_anchors

    assert p.parent == Path(guardalign_anchors.__file__).parent


def test_default_set_loads_and_covers_required_categories():
    s = load_anchors()
    assert s.version == 1 and s.tau == pytest.approx(0.75)
    assert set(REQUIRED) <= set(s.names)
    for cat in s.categories:
        assert len(cat.variants) >= 6, cat.name
        assert cat.description.strip()
        assert len({v.lower() for v in cat.variants}) == len(cat.variants)
    assert Path(s.source) == default_anchors_path()
    assert len(s.sha256) == 64 and int(s.sha256, 16) >= 0
    # the same file loaded by explicit path gives the same content hash
    assert load_anchors(default_anchors_path()).sha256 == s.sha256


def test_default_set_prefix_phrases_and_typographic_anchors():
    s = load_anchors()
    assert "refuse" in s.prefix and "\n" not in s.prefix
    assert len(s.refusal_phrases) >= 20
    for phrase in ("I'm sorry", "I am sorry", "I cannot", "I can't", "As an AI", "I apologize",
                   "is illegal and unethical"):
        assert phrase in s.refusal_phrases
    crime = s.categories[s.names.index("crime")]
    assert sum("text" in v or "instructions" in v for v in crime.variants) >= 3  # FigStep-style images
    privacy = " ".join(s.categories[s.names.index("privacy")].variants)
    for word in ("passport", "credit card", "identity card"):
        assert word in privacy


# -- a valid set and its accessors ----------------------------------------------------------------
def test_valid_set_fields():
    s = parse_anchors(VALID, source=SRC)
    assert s.source == SRC and s.prefix == "Be careful."
    assert s.names == ("weapons", "drugs")
    assert s.refusal_phrases == ("I cannot", "I'm sorry")
    assert s.categories[0].tau is None and s.categories[1].tau == 0.6
    assert s.categories[1].variants == ("a photo of pills", "a photo of a syringe")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tau = 0.1  # type: ignore[misc]


def test_texts_and_owner():
    s = parse_anchors(edit("      - a photo of a syringe\n", "      - a photo of a syringe\n      - a photo of a bong\n"))
    texts, owner = s.texts()
    assert texts == ["a photo of a gun", "a photo of a knife", "a photo of pills", "a photo of a syringe",
                     "a photo of a bong"]
    assert owner == [0, 0, 1, 1, 1]
    for t, i in zip(texts, owner):
        assert t in s.categories[i].variants


def test_tau_for_and_taus():
    s = parse_anchors(VALID)
    assert s.tau_for("weapons") == 0.75  # falls back to the global τ
    assert s.tau_for("drugs") == 0.6  # per-category override
    assert s.tau_for("drugs", override=0.5) == 0.5 and s.tau_for("weapons", 0.5) == 0.5
    assert s.taus() == [0.75, 0.6]
    assert s.taus(override=1.2) == [1.2, 1.2]
    with pytest.raises(AnchorError, match="did you mean 'drugs'"):
        s.tau_for("drug")
    assert s.taus(override=np.float32(0.5)) == [0.5, 0.5]
    assert s.taus(override=0) == [0.0, 0.0] and s.tau_for("drugs", override=0) == 0.0  # 0 flags nothing
    for bad in (-0.1, 2.5, float("nan"), True, "0.5"):
        with pytest.raises(AnchorError, match=r"\[0, 2\]"):
            s.taus(override=bad)
        with pytest.raises(AnchorError, match=r"\[0, 2\]"):
            s.tau_for("weapons", override=bad)


def test_whitespace_normalised_and_tau_boundaries():
    s = parse_anchors(edit("      - a photo of a knife", "      - \"a  photo of\\n a knife \""))
    assert s.categories[0].variants[1] == "a photo of a knife"
    assert parse_anchors(edit("tau: 0.75", "tau: 2")).tau == 2.0  # upper bound is inclusive
    assert parse_anchors(edit("    tau: 0.6\n", "    tau: null\n")).categories[1].tau is None
    assert parse_anchors("\ufeff" + VALID).names == ("weapons", "drugs")  # a BOM is fine


MINIMAL = "categories:\n  - name: guns\n    variants: [a photo of a gun, a photo of a rifle]\n"


def test_only_categories_required_and_defaults_documented():
    s = parse_anchors(MINIMAL)
    assert (s.version, s.tau, s.prefix, s.refusal_phrases) == (1, A.DEFAULT_TAU, A.DEFAULT_PREFIX,
                                                               A.DEFAULT_REFUSAL_PHRASES)
    assert s.categories[0].description == "guns" and s.categories[0].tau is None and s.fitted_for is None
    # a key left out hashes the same as the key written with its default value
    full = ("version: 1\ntau: 0.75\nprefix: " + json.dumps(A.DEFAULT_PREFIX) + "\nrefusal_phrases: "
            + json.dumps(list(A.DEFAULT_REFUSAL_PHRASES)) + "\n" + MINIMAL.replace("    variants", "    description: guns\n    variants"))
    assert parse_anchors(full).sha256 == s.sha256
    # the defaults are the shipped default.yaml's values, so omitting a key behaves like the shipped set
    shipped = load_anchors()
    assert (shipped.version, shipped.tau, shipped.prefix, shipped.refusal_phrases) == (
        s.version, s.tau, s.prefix, s.refusal_phrases)
    # and they are listed in the docs
    root = Path(__file__).resolve().parents[2]
    for doc in (root / "docs" / "anchors.md", root / "README.md"):
        text = doc.read_text()
        assert "`tau`" in text and "0.75" in text and "description" in text, doc
    assert A.DEFAULT_PREFIX in " ".join((root / "docs" / "anchors.md").read_text().split())


def test_empty_prefix_and_zero_tau_accepted():
    s = parse_anchors('prefix: ""\ntau: 0\n' + MINIMAL)
    assert s.prefix == "" and s.tau == 0.0 and s.taus() == [0.0]
    assert parse_anchors("prefix: '   '\n" + MINIMAL).prefix == ""  # blank is no prefix too
    assert parse_anchors(edit("tau: 0.6", "tau: 0.0")).categories[1].tau == 0.0
    assert parse_anchors('prefix: ""\n' + MINIMAL).sha256 != parse_anchors(MINIMAL).sha256


def test_fitted_for_parsed_and_not_hashed():
    text = MINIMAL + "fitted_for:\n  model: ViT-B-32\n  pretrained: openai\n  method: ot\n  patches: grid\n  grid: 3\n  stride: 1\n"
    s = parse_anchors(text)
    assert s.fitted_for == A.FittedFor("ViT-B-32", "openai", "ot", "grid", 3, 1.0)
    assert s.fitted_for.to_dict() == {"model": "ViT-B-32", "pretrained": "openai", "method": "ot",
                                      "patches": "grid", "grid": 3, "stride": 1.0}
    assert s.sha256 == parse_anchors(MINIMAL).sha256  # provenance, not content
    assert parse_anchors(MINIMAL + "fitted_for: {model: ViT-L-14}\n").fitted_for.to_dict() == {"model": "ViT-L-14"}
    assert "fitted_for.grid: expected an integer" in error_of(MINIMAL + "fitted_for: {grid: 2.5}\n")
    assert "fitted_for.gird: unknown key; did you mean 'grid'" in error_of(MINIMAL + "fitted_for: {gird: 3}\n")
    assert "fitted_for.stride: expected a fraction" in error_of(MINIMAL + "fitted_for: {stride: 0}\n")


@pytest.mark.parametrize("deep", [
    "a: " + "[" * 5000 + "]" * 5000 + "\n",  # flow style
    "- " * 5000 + "x\n",  # block style
    MINIMAL + "fitted_for: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
], ids=["flow", "block", "inside-a-valid-file"])
def test_deeply_nested_yaml_is_a_config_error_not_recursion(deep, tmp_path):
    msg = error_of(deep)
    assert "nested more than" in msg and msg.startswith(f"{SRC}:"), msg
    f = tmp_path / "deep.yaml"
    f.write_text(deep)
    with pytest.raises(ConfigError, match="nested more than") as info:
        load_anchors(f)
    assert info.value.exit_code == 2


def test_yaml_merge_keys_and_aliases():
    text = VALID + "  - <<: *base\n    name: guns\n    tau: 0.5\n"
    text = edit("  - name: weapons", "  - &base\n    name: weapons", text)
    s = parse_anchors(text)
    assert s.names == ("weapons", "drugs", "guns")
    assert s.categories[2].variants == s.categories[0].variants and s.categories[2].tau == 0.5


def test_anchor_error_is_a_config_error():
    assert issubclass(AnchorError, ConfigError) and AnchorError.exit_code == 2


# -- validation errors: (text, line, field, expected wording) -------------------------------------
CATEGORY_TAIL = "  - name: x\n    description: X\n    variants: [a]\n"
CASES = {
    "yaml_syntax": (edit("  - I'm sorry", "  - [I'm sorry"), 7, None, "YAML syntax error"),
    "control_char": (edit("Be careful.", "Be careful.\x07"), 3, None, "YAML syntax error: special characters"),
    "yaml_tab": (edit("tau: 0.75", "\ttau: 0.75"), 2, None, "YAML syntax error"),
    "unsafe_tag": (edit("tau: 0.75", "tau: !!python/object/apply:os.system [echo]"), 2, None,
                   "unsupported YAML value"),
    "top_is_list": ("- version: 1\n- tau: 0.7\n", 1, "(top level)", "expected a mapping"),
    "top_is_scalar": ("just text\n", 1, "(top level)", "expected a mapping"),
    "empty_file": ("# only a comment\n", 1, None, "file is empty"),
    "missing_categories": (VALID[: VALID.index("categories:")], 1, "(top level)", "missing required key categories"),
    "missing_category_key": (edit("    variants:\n      - a photo of pills\n      - a photo of a syringe\n", ""), 13,
                             "categories[1]", "missing required key variants"),
    "missing_category_name": (edit("  - name: drugs\n    description: Drugs", "  - description: Drugs"), 13,
                              "categories[1]", "missing required key name"),
    "unknown_top_key": (edit("tau: 0.75", "tua: 0.75"), 2, "tua", "did you mean 'tau'"),
    "unknown_top_key_far": (VALID + "colour: red\n", 19, "colour", "expected one of: version, tau"),
    "unknown_category_key": (edit("    variants:\n      - a photo of pills", "    varients:\n      - a photo of pills"),
                             16, "categories[1].varients", "did you mean 'variants'"),
    "duplicate_top_key": (VALID + "tau: 0.5\n", 19, "tau", "duplicate key (first at line 2)"),
    "non_string_key": (VALID + "1: one\n", 19, "(top level)", "keys must be strings"),
    "version_type": (edit("version: 1", "version: one"), 1, "version", "expected an integer"),
    "version_float": (edit("version: 1", "version: 1.0"), 1, "version", "expected an integer"),
    "version_unsupported": (edit("version: 1", "version: 2"), 1, "version", "unsupported version 2"),
    "tau_type": (edit("tau: 0.75", "tau: high"), 2, "tau", "expected a number in [0, 2]"),
    "tau_bool": (edit("tau: 0.75", "tau: true"), 2, "tau", "expected a number in [0, 2]"),
    "tau_null": (edit("tau: 0.75", "tau: null"), 2, "tau", "expected a number in [0, 2]"),
    "tau_negative": (edit("tau: 0.75", "tau: -0.2"), 2, "tau", "out of range"),
    "tau_too_big": (edit("tau: 0.75", "tau: 2.01"), 2, "tau", "out of range"),
    "tau_inf": (edit("tau: 0.75", "tau: .inf"), 2, "tau", "out of range"),
    "tau_nan": (edit("tau: 0.75", "tau: .nan"), 2, "tau", "out of range"),
    "category_tau_range": (edit("tau: 0.6", "tau: 3"), 15, "categories[1].tau", "out of range"),
    "category_tau_negative": (edit("tau: 0.6", "tau: -0.0001"), 15, "categories[1].tau", "out of range"),
    "category_tau_type": (edit("tau: 0.6", "tau: [0.6]"), 15, "categories[1].tau", "expected a single value"),
    "prefix_type": (edit("prefix: Be careful.", "prefix: [a, b]"), 3, "prefix", "expected a single value"),
    "prefix_null": (edit("prefix: Be careful.", "prefix:"), 3, "prefix", "expected a string, got None"),
    "prefix_number": (edit("prefix: Be careful.", "prefix: 12"), 3, "prefix", "expected a string"),
    "phrases_empty": (edit("refusal_phrases:\n  - I cannot\n  - I'm sorry", "refusal_phrases: []"), 4,
                      "refusal_phrases", "expected a non-empty list of strings"),
    "phrases_duplicate": (edit("  - I'm sorry", "  - i  CANNOT"), 6, "refusal_phrases[1]",
                          "duplicate entry 'i CANNOT' (first at line 5"),
    "categories_empty": (edit(VALID[VALID.index("categories:"):], "categories: []\n"), 7, "categories",
                         "expected a non-empty list of categories"),
    "categories_mapping": (edit(VALID[VALID.index("categories:"):], "categories:\n  weapons: [a]\n"), 8,
                           "categories", "expected a non-empty list of categories"),
    "category_not_mapping": (VALID + "  - just a string\n", 19, "categories[2]", "expected a mapping"),
    "duplicate_category": (edit("name: drugs", "name: weapons"), 13, "categories[1].name",
                           "duplicate category name 'weapons' (first defined at line 8)"),
    "category_name_invalid": (edit("name: drugs", "name: 'hard drugs'"), 13, "categories[1].name",
                              "is not a valid id"),
    "category_name_type": (edit("name: drugs", "name: 7"), 13, "categories[1].name", "expected a string"),
    "description_blank": (edit("description: Drugs", "description: ''"), 14, "categories[1].description",
                          "non-empty string"),
    "variants_string": (edit("    variants:\n      - a photo of a gun\n      - a photo of a knife",
                             "    variants: a photo of a gun"), 10, "categories[0].variants",
                        "expected a non-empty list of strings"),
    "variants_empty": (edit("    variants:\n      - a photo of a gun\n      - a photo of a knife",
                            "    variants: []"), 10, "categories[0].variants",
                       "expected a non-empty list of strings"),
    "variants_null": (edit("    variants:\n      - a photo of a gun\n      - a photo of a knife",
                           "    variants:"), 10, "categories[0].variants", "expected a non-empty list of strings"),
    "variant_blank": (edit("      - a photo of a knife", "      - '  '"), 12, "categories[0].variants[1]",
                      "non-empty string"),
    "variant_null": (edit("      - a photo of a knife", "      -"), 12, "categories[0].variants[1]",
                     "expected a string, got None"),
    "variant_number": (edit("      - a photo of a syringe", "      - 42"), 18, "categories[1].variants[1]",
                       "expected a string, got 42"),
    "variant_nested": (edit("      - a photo of a syringe", "      - [a, b]"), 18, "categories[1].variants[1]",
                       "expected a single value"),
    "variant_duplicate": (edit("      - a photo of a knife", "      - A photo of  a GUN"), 12,
                          "categories[0].variants[1]", "duplicate entry 'A photo of a GUN' (first at line 11"),
    "variant_too_long": (edit("      - a photo of a knife", "      - " + "x" * 2001), 12,
                         "categories[0].variants[1]", "at most 2000"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_validation_error_names_file_line_and_field(name):
    text, line, field, wording = CASES[name]
    msg = error_of(text)
    head = f"{SRC}:{line}: " + (f"{field}: " if field else "")
    assert msg.startswith(head), msg
    assert wording in msg, msg


def test_too_many_categories():
    cats = "".join(f"  - name: c{i}\n    description: C\n    variants: [a]\n" for i in range(A.MAX_CATEGORIES + 1))
    text = VALID[: VALID.index("categories:")] + "categories:\n" + cats
    msg = error_of(text)
    assert msg.startswith(f"{SRC}:8: categories: 257 categories; at most 256"), msg
    ok = VALID[: VALID.index("categories:")] + "categories:\n" + cats[: cats.index("  - name: c256")]
    assert len(parse_anchors(ok).categories) == A.MAX_CATEGORIES


def test_too_many_variants():
    many = "".join(f"      - variant {i}\n" for i in range(A.MAX_VARIANTS + 1))
    text = edit("      - a photo of pills\n      - a photo of a syringe\n", many)
    msg = error_of(text)
    assert msg.startswith(f"{SRC}:17: categories[1].variants: 1025 entries; at most 1024"), msg


def test_unsafe_tag_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    text = edit("tau: 0.75", f"tau: !!python/object/apply:os.system ['touch {marker}']")
    assert "unsupported YAML value" in error_of(text)
    assert not marker.exists()


# -- file-level errors ----------------------------------------------------------------------------
def test_load_file_ok_and_error_names_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text(VALID, encoding="utf-8")
    s = load_anchors(p)
    assert s.source == str(p) and s.names == ("weapons", "drugs")
    p.write_text(edit("tau: 0.6", "tau: 9"), encoding="utf-8")
    with pytest.raises(AnchorError) as info:
        load_anchors(str(p))
    assert str(info.value).startswith(f"{p}:15: categories[1].tau: ")


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(AnchorError, match="anchors file not found") as info:
        load_anchors(p)
    assert str(p) in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(AnchorError, match="is a directory") as info:
        load_anchors(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_unreadable_file_reported(tmp_path, monkeypatch):
    p = tmp_path / "locked.yaml"
    p.write_text(VALID, encoding="utf-8")

    def deny(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(AnchorError, match="cannot read anchors file: permission denied") as info:
        load_anchors(p)
    assert str(p) in str(info.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read mode-000 files")
def test_unreadable_file_by_mode(tmp_path):
    p = tmp_path / "locked.yaml"
    p.write_text(VALID, encoding="utf-8")
    p.chmod(0)
    try:
        with pytest.raises(AnchorError, match="cannot read anchors file"):
            load_anchors(p)
    finally:
        p.chmod(0o600)


def test_not_utf8(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(edit("Be careful.", "Vorsicht, \u00e4u\u00dferst.").encode("latin-1"))
    with pytest.raises(AnchorError) as info:
        load_anchors(p)
    assert str(info.value).startswith(f"{p}:3: file is not valid UTF-8")


def test_file_too_large(tmp_path, monkeypatch):
    p = tmp_path / "big.yaml"
    p.write_text(VALID, encoding="utf-8")
    monkeypatch.setattr(A, "MAX_FILE_BYTES", 100)
    with pytest.raises(AnchorError, match="may be at most 100") as info:
        load_anchors(p)
    assert str(p) in str(info.value)


# -- the content hash -----------------------------------------------------------------------------
def test_sha256_is_canonical_json_of_content():
    s = parse_anchors(VALID)
    content = {
        "version": 1, "tau": 0.75, "prefix": "Be careful.", "refusal_phrases": ["I cannot", "I'm sorry"],
        "categories": [
            {"name": "weapons", "description": "Weapons", "variants": ["a photo of a gun", "a photo of a knife"],
             "tau": None},
            {"name": "drugs", "description": "Drugs", "variants": ["a photo of pills", "a photo of a syringe"],
             "tau": 0.6},
        ],
    }
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert s.sha256 == hashlib.sha256(blob.encode()).hexdigest()
    assert s.to_dict() == content


def test_sha256_ignores_comments_whitespace_key_order_and_source():
    reformatted = textwrap.dedent(
        """\
        # a different layout of the same content
        categories:   # key order changed, flow style, quotes, comments
          - {variants: ["a photo of a gun", 'a photo of a knife'], description: "Weapons", name: weapons}
          - tau: 0.60
            variants: [a photo of pills,   a photo of a syringe]   # trailing comment
            name: drugs
            description: >-
              Drugs


        refusal_phrases: ["I cannot", "I'm sorry"]
        prefix: |
          Be careful.
        tau: 7.5e-1
        version: 1
        """
    )
    a = parse_anchors(VALID, source="a.yaml")
    b = parse_anchors(reformatted, source="b.yaml")
    assert a.sha256 == b.sha256 and a.source != b.source
    assert parse_anchors(edit("tau: 0.75", "tau: 1")).sha256 == parse_anchors(edit("tau: 0.75", "tau: 1.0")).sha256


@pytest.mark.parametrize("old,new", [
    ("a photo of a knife", "a photo of a dagger"),  # a variant
    ("tau: 0.75", "tau: 0.74"),  # the global τ
    ("tau: 0.6", "tau: 0.61"),  # a category τ
    ("    tau: 0.6\n", ""),  # dropping a category τ
    ("Be careful.", "Be very careful."),  # the prefix
    ("  - I'm sorry", "  - I am sorry"),  # a refusal phrase
    ("description: Drugs", "description: Narcotics"),
    ("name: drugs", "name: narcotics"),
])
def test_sha256_changes_with_content(old, new):
    assert parse_anchors(edit(old, new)).sha256 != parse_anchors(VALID).sha256


def test_sha256_depends_on_category_order():
    # category order defines the indices that texts()/taus() return, so it is content
    head, cats = VALID.split("categories:\n")
    first, second = cats.split("  - name: drugs")
    swapped = head + "categories:\n  - name: drugs" + second + first
    s = parse_anchors(swapped)
    assert s.names == ("drugs", "weapons")
    assert s.sha256 != parse_anchors(VALID).sha256


def test_anchor_set_type():
    assert isinstance(load_anchors(), AnchorSet)
