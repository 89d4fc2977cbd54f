"""Anchor sets: YAML → validated :class:`AnchorSet` (DESIGN §1.1, §2).

An anchor set holds the unsafe categories (each a list of CLIP text variants ``z_i^n``), the
global decision threshold τ with optional per-category overrides, the safety prefix and the
refusal phrases. Files are parsed with PyYAML's SafeLoader only; the node tree is kept so that
every validation error names the file, the line and the field, e.g.::

    anchors.yaml:14: categories[2].variants: expected a non-empty list of strings

Category and variant indices in field paths count from 0.

Only ``categories`` (each with ``name`` and ``variants``) is required; every other key has a default
(:data:`DEFAULTS`, documented in docs/anchors.md). A key left out hashes the same as the key written
with its default value. ``tau: 0`` (or ``--tau 0``) flags nothing; ``prefix: ""`` means no prefix.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import yaml

from guardalign.detection.anchor_schema import (  # noqa: F401 (re-exported)
    CATEGORY_KEYS, CATEGORY_REQUIRED, DEFAULT_PREFIX, DEFAULT_REFUSAL_PHRASES, DEFAULT_TAU, DEFAULTS, FITTED_KEYS,
    MAX_CATEGORIES, MAX_DEPTH, MAX_FILE_BYTES, MAX_PREFIX_CHARS, MAX_REFUSAL_PHRASES, MAX_TEXT_CHARS, MAX_VARIANTS,
    MAX_REFUSAL_TOKENS, NAME_RE, _content, _sha256, SUPPORTED_VERSIONS, TOP_KEYS, TOP_REQUIRED, FittedFor, check_depth,
)
from guardalign.errors import ConfigError

class AnchorError(ConfigError):
    """An anchors file that is missing, unreadable or invalid (exit 2)."""


@dataclass(frozen=True)
class Category:
    name: str  # short id, unique in the set
    description: str  # human description shown in reports
    variants: tuple[str, ...]  # anchor texts (≥ 1; the shipped set has ≥ 6)
    tau: float | None  # per-category τ override, None = the set's global τ


@dataclass(frozen=True)
class AnchorSet:
    version: int  # schema version of the file (only 1 exists)
    tau: float  # global threshold on the OT cost 1 − cos, in [0, 2]; 0 flags nothing
    categories: tuple[Category, ...]  # unsafe categories, in file order
    prefix: str  # safety prefix text for `guardalign answer` ("" = no prefix)
    refusal_phrases: tuple[str, ...]  # phrases whose presence marks an answer as a refusal
    source: str  # path (or "<string>") it came from
    sha256: str  # hash of the validated content (canonical JSON), not of the file's bytes
    fitted_for: FittedFor | None = None  # settings its τ was fitted for (not part of sha256), None if unknown
    refusal_tokens: tuple[str, ...] = ()  # optional words for `probe`'s logit lens; () = not given

    @property
    def names(self) -> tuple[str, ...]:
        """Category names, in order."""
        return tuple(c.name for c in self.categories)

    def texts(self) -> tuple[list[str], list[int]]:
        """All variants flattened in category order, and the owning category index of each.

        Returns
        -------
        texts : list[str], length N = Σ_i N_i
        owner : list[int], length N; ``owner[k]`` is the index i of the category of ``texts[k]``
        """
        texts: list[str] = []
        owner: list[int] = []
        for i, cat in enumerate(self.categories):
            texts.extend(cat.variants)
            owner.extend([i] * len(cat.variants))
        return texts, owner

    def tau_for(self, name: str, override: float | None = None) -> float:
        """τ of category ``name``: ``override`` if given, else the category's own τ, else the global τ."""
        for cat in self.categories:
            if cat.name == name:
                if override is not None:
                    return _check_override(override)
                return self.tau if cat.tau is None else cat.tau
        hint = difflib.get_close_matches(name, self.names, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else f"; known: {', '.join(self.names)}"
        raise AnchorError(f"{self.source}: unknown category {name!r}{extra}")

    def taus(self, override: float | None = None) -> list[float]:
        """τ_i per category, in order (``override`` replaces every one of them)."""
        if override is not None:
            return [_check_override(override)] * len(self.categories)
        return [self.tau if c.tau is None else c.tau for c in self.categories]

    def to_dict(self) -> dict:
        """The validated content as plain data (what :attr:`sha256` hashes)."""
        return _content(self.version, self.tau, self.prefix, self.refusal_phrases, self.categories,
                        self.refusal_tokens)

    def refusal_words(self) -> tuple[str, ...]:
        """The words `probe` ranks: ``refusal_tokens`` when given, else the first word of each refusal phrase."""
        if self.refusal_tokens:
            return self.refusal_tokens
        return tuple(dict.fromkeys(p.split()[0] for p in self.refusal_phrases))


def default_anchors_path() -> Path:
    """Path of the shipped ``anchors/default.yaml`` (package ``guardalign_anchors``)."""
    from importlib.resources import files

    return Path(str(files("guardalign_anchors").joinpath("default.yaml")))


def load_anchors(path: str | Path | None = None) -> AnchorSet:
    """Read and validate an anchors YAML file; ``None`` loads the shipped default.

    Raises
    ------
    AnchorError
        The file is missing, unreadable, a directory, too large, not UTF-8, or invalid; the
        message names the file, and for content errors the line and the field.
    """
    p = default_anchors_path() if path is None else Path(path)
    src = str(p)
    try:
        if p.is_dir():
            raise AnchorError(f"{src}: is a directory; expected an anchors YAML file")
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise AnchorError(f"{src}: file is {size} bytes; an anchors file may be at most {MAX_FILE_BYTES}")
        data = p.read_bytes()
    except FileNotFoundError:
        raise AnchorError(f"{src}: anchors file not found") from None
    except PermissionError as e:
        raise AnchorError(f"{src}: cannot read anchors file: permission denied ({e.strerror or e})") from None
    except OSError as e:
        raise AnchorError(f"{src}: cannot read anchors file: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise AnchorError(f"{src}:{line}: file is not valid UTF-8 text (byte {e.start})") from None
    return parse_anchors(text, source=src)


def parse_anchors(text: str, source: str = "<string>") -> AnchorSet:
    """Validate anchors YAML given as text; ``source`` names it in error messages."""
    check_depth(text, source, AnchorError)
    try:
        loader = yaml.SafeLoader(text)  # the reader already rejects non-printable characters
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        char = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        raise AnchorError(f"{source}:{line}: YAML syntax error: {e.reason} (found {char})") from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            raise _yaml_error(source, e) from None
        except yaml.reader.ReaderError as e:
            line = text[: e.position].count("\n") + 1
            raise AnchorError(f"{source}:{line}: YAML syntax error: {e.reason}") from None
        if root is None:
            raise AnchorError(f"{source}:1: file is empty; expected a mapping with at least a 'categories' key "
                              "(see docs/anchors.md)")
        return _Validator(source, loader).anchor_set(root)
    except RecursionError:  # a YAML nested thousands deep: the parser recurses per level
        raise AnchorError(f"{source}: YAML nested too deeply; an anchors file is a few levels deep") from None
    finally:
        loader.dispose()


def _check_override(tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau) or not 0 <= tau <= 2:
        raise AnchorError(f"tau override {tau!r}: expected a number in [0, 2] (a cost 1 − cos; 0 flags nothing)")
    return float(tau)


def _yaml_error(source: str, e: yaml.MarkedYAMLError) -> AnchorError:
    mark = e.problem_mark or e.context_mark
    where = f"{source}:{mark.line + 1}" if mark is not None else source
    kind = "unsupported YAML value" if isinstance(e, yaml.constructor.ConstructorError) else "YAML syntax error"
    msg = f"{where}: {kind}: {e.problem or e.context}"
    if mark is not None:
        msg += f" (column {mark.column + 1})"
    if e.context and e.problem and e.context_mark is not None:
        msg += f"; {e.context} that started at line {e.context_mark.line + 1}"
    return AnchorError(msg)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _normalise(text: str) -> str:
    # CLIP's tokenizer lower-cases and collapses whitespace, so these variants encode identically.
    return " ".join(text.split()).casefold()


class _Validator:
    """Walks the composed node tree; every failure raises AnchorError with file:line: field."""

    def __init__(self, source: str, loader: yaml.SafeLoader):
        self.source = source
        self.loader = loader

    def fail(self, node_or_line, field: str, msg: str) -> AnchorError:
        line = node_or_line if isinstance(node_or_line, int) else _line(node_or_line)
        return AnchorError(f"{self.source}:{line}: {field}: {msg}")

    def check_tags(self, root: yaml.Node) -> None:
        """Reject tags that SafeLoader cannot build (e.g. ``!!python/object``) wherever they are."""
        stack, seen = [root], set()
        while stack:
            node = stack.pop()
            if id(node) in seen:  # aliases share nodes; visit each once
                continue
            seen.add(id(node))
            if node.tag not in self.loader.yaml_constructors and node.tag != "tag:yaml.org,2002:merge":
                raise AnchorError(f"{self.source}:{_line(node)}: unsupported YAML value: the tag {node.tag!r} "
                                  "is not allowed (anchors files are plain YAML)")
            if isinstance(node, yaml.SequenceNode):
                stack.extend(node.value)
            elif isinstance(node, yaml.MappingNode):
                stack.extend(n for pair in node.value for n in pair)

    # -- structure ---------------------------------------------------------------------------
    def anchor_set(self, root: yaml.Node) -> AnchorSet:
        self.check_tags(root)
        top = self.mapping(root, "(top level)", TOP_KEYS, TOP_REQUIRED, what="the anchors file")
        version = self.version(top["version"]) if "version" in top else DEFAULTS["version"]
        tau = self.tau(top["tau"], "tau", allow_null=False) if "tau" in top else DEFAULTS["tau"]
        prefix = (self.string(top["prefix"], "prefix", MAX_PREFIX_CHARS, collapse=False, allow_empty=True)
                  if "prefix" in top else DEFAULTS["prefix"])
        phrases = (self.string_list(top["refusal_phrases"], "refusal_phrases", MAX_REFUSAL_PHRASES)
                   if "refusal_phrases" in top else DEFAULTS["refusal_phrases"])
        categories = self.categories(top["categories"])
        fitted = self.fitted_for(top["fitted_for"]) if "fitted_for" in top else None
        tokens = self.words(top["refusal_tokens"]) if "refusal_tokens" in top else ()
        content = _content(version, tau, prefix, phrases, categories, tokens)
        return AnchorSet(version=version, tau=tau, categories=categories, prefix=prefix,
                         refusal_phrases=phrases, source=self.source, sha256=_sha256(content), fitted_for=fitted,
                         refusal_tokens=tokens)

    def words(self, node) -> tuple[str, ...]:
        """``refusal_tokens``: a list of single words (no spaces)."""
        words = self.string_list(node, "refusal_tokens", MAX_REFUSAL_TOKENS)
        for j, (item, word) in enumerate(zip(node.value, words)):
            if len(word.split()) != 1:
                raise self.fail(item, f"refusal_tokens[{j}]", f"{word!r} is not a single word (no spaces)")
        return words

    def fitted_for(self, node) -> FittedFor | None:
        """The optional ``fitted_for`` mapping: {model, pretrained, method, patches: str; grid: int; stride: float}."""
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return None
        m = self.mapping(node, "fitted_for", FITTED_KEYS, (), what="fitted_for")
        values: dict = {}
        for key, vnode in m.items():
            field = f"fitted_for.{key}"
            v = self.scalar(vnode, field)
            if v is None:
                continue
            if key == "grid":
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 32:
                    raise self.fail(vnode, field, f"expected an integer in [1, 32], got {v!r}")
            elif key == "stride":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                    raise self.fail(vnode, field, f"expected a fraction in (0, 1], got {v!r}")
                v = float(v)
            elif not isinstance(v, str) or not v.strip():
                raise self.fail(vnode, field, f"expected a non-empty string, got {v!r}")
            values[key] = v
        return FittedFor(**values)

    def mapping(self, node, field, allowed, required, what) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, field, f"expected a mapping (key: value lines) for {what}, got {self.kind(node)}")
        own = {id(k) for k, _ in node.value}  # keys written here, as opposed to merged in with <<
        try:
            self.loader.flatten_mapping(node)  # resolve YAML merge keys (<<) like safe_load does
        except yaml.MarkedYAMLError as e:
            raise _yaml_error(self.source, e) from None
        out: dict[str, yaml.Node] = {}
        first: dict[str, yaml.Node] = {}
        prefix = "" if field == "(top level)" else field + "."
        for knode, vnode in node.value:
            key = self.scalar(knode, field)
            if not isinstance(key, str):
                raise self.fail(knode, field, f"keys must be strings, got {key!r}")
            if key in out and id(first[key]) in own:  # a merged-in key may be overridden, nothing else
                raise self.fail(knode, prefix + key, f"duplicate key (first at line {_line(first[key])})")
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                tip = f"did you mean {hint[0]!r}?" if hint else f"expected one of: {', '.join(allowed)}"
                raise self.fail(knode, prefix + key, f"unknown key; {tip}")
            out[key], first[key] = vnode, knode
        missing = [k for k in required if k not in out]
        if missing:
            raise self.fail(node, field, f"missing required key{'s' if len(missing) > 1 else ''} "
                                         f"{', '.join(missing)} in {what}")
        return out

    def categories(self, node) -> tuple[Category, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.fail(node, "categories", f"expected a non-empty list of categories, got {self.kind(node)}")
        if len(node.value) > MAX_CATEGORIES:
            raise self.fail(node, "categories", f"{len(node.value)} categories; at most {MAX_CATEGORIES} are allowed")
        cats: list[Category] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(node.value):
            field = f"categories[{i}]"
            m = self.mapping(item, field, CATEGORY_KEYS, CATEGORY_REQUIRED, what=f"category {i}")
            name = self.string(m["name"], f"{field}.name", 64)
            if not NAME_RE.match(name):
                raise self.fail(m["name"], f"{field}.name", f"{name!r} is not a valid id; expected a short "
                                "id of letters, digits, '_' or '-' starting with a letter (e.g. self_harm)")
            if name in seen:
                raise self.fail(m["name"], f"{field}.name",
                                f"duplicate category name {name!r} (first defined at line {seen[name]})")
            seen[name] = _line(m["name"])
            desc = self.string(m["description"], f"{field}.description", MAX_TEXT_CHARS) if "description" in m else name
            variants = self.string_list(m["variants"], f"{field}.variants", MAX_VARIANTS)
            tau = self.tau(m["tau"], f"{field}.tau", allow_null=True) if "tau" in m else None
            cats.append(Category(name=name, description=desc, variants=variants, tau=tau))
        return tuple(cats)

    # -- leaves ------------------------------------------------------------------------------
    def scalar(self, node, field):
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, field, f"expected a single value, got {self.kind(node)}")
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as e:
            raise _yaml_error(self.source, e) from None

    def version(self, node) -> int:
        v = self.scalar(node, "version")
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(node, "version", f"expected an integer schema version, got {v!r}")
        if v not in SUPPORTED_VERSIONS:
            raise self.fail(node, "version", f"unsupported version {v}; this guardalign reads version "
                                             f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
        return v

    def tau(self, node, field: str, allow_null: bool) -> float | None:
        v = self.scalar(node, field)
        if v is None and allow_null:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(node, field, f"expected a number in [0, 2] (a cost 1 − cos; 0 flags nothing), got {v!r}")
        if not math.isfinite(v) or not 0 <= v <= 2:
            raise self.fail(node, field, f"{v!r} is out of range; expected a number in [0, 2] (a cost 1 − cos; "
                                         "0 flags nothing)")
        return float(v)

    def string(self, node, field: str, max_chars: int, collapse: bool = True, allow_empty: bool = False) -> str:
        v = self.scalar(node, field)
        if not isinstance(v, str):
            raise self.fail(node, field, f"expected a string, got {v!r}")
        if not v.strip() and not allow_empty:
            raise self.fail(node, field, "expected a non-empty string, got a blank one")
        if len(v) > max_chars:
            raise self.fail(node, field, f"string of {len(v)} characters; at most {max_chars} are allowed")
        return " ".join(v.split()) if collapse else v.strip()

    def string_list(self, node, field: str, max_items: int) -> tuple[str, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.fail(node, field, f"expected a non-empty list of strings, got {self.kind(node)}")
        if len(node.value) > max_items:
            raise self.fail(node, field, f"{len(node.value)} entries; at most {max_items} are allowed")
        out: list[str] = []
        seen: dict[str, int] = {}
        for j, item in enumerate(node.value):
            text = self.string(item, f"{field}[{j}]", MAX_TEXT_CHARS)
            key = _normalise(text)
            if key in seen:
                raise self.fail(item, f"{field}[{j}]", f"duplicate entry {text!r} (first at line {seen[key]}; "
                                                       "compared ignoring case and spacing)")
            seen[key] = _line(item)
            out.append(text)
        return tuple(out)

    @staticmethod
    def kind(node) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "an empty list" if not node.value else "a list"
        if node.tag == "tag:yaml.org,2002:null":
            return "nothing (null)"
        text = node.value if len(node.value) <= 60 else node.value[:57] + "..."
        return f"the value {text!r}"
