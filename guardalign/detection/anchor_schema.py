"""The anchors-YAML schema: keys, limits, defaults of the optional keys, the ``fitted_for`` record (docs/anchors.md).

Kept apart from the loader (guardalign.detection.anchors) so that the documented values live in one short
place; a test checks that the shipped ``anchors/default.yaml`` writes the same defaults.
"""
from __future__ import annotations

import hashlib
import json

import re
from dataclasses import dataclass

import yaml

SUPPORTED_VERSIONS = (1,)
MAX_FILE_BYTES = 4 * 1024 * 1024  # anchor files are small; refuse anything larger
MAX_CATEGORIES = 256
MAX_VARIANTS = 1024  # per category
MAX_REFUSAL_PHRASES = 1024
MAX_TEXT_CHARS = 2000  # per variant / description / refusal phrase
MAX_PREFIX_CHARS = 20000
MAX_DEPTH = 32  # YAML nesting depth; the schema needs 4 (top, categories, category, variants)
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")

TOP_KEYS = ("version", "tau", "prefix", "refusal_phrases", "categories", "fitted_for", "refusal_tokens")
MAX_REFUSAL_TOKENS = 256  # optional refusal_tokens: the words whose first token `guardalign probe` ranks
TOP_REQUIRED = ("categories",)
CATEGORY_KEYS = ("name", "description", "variants", "tau")
CATEGORY_REQUIRED = ("name", "variants")
FITTED_KEYS = ("model", "pretrained", "method", "patches", "grid", "stride")

DEFAULT_TAU = 0.75  # the shipped starting point for ViT-B-32 / openai (anchors/default.yaml)
DEFAULT_PREFIX = ("Before answering, examine the image and the request carefully. If either involves unsafe, "
                  "harmful, illegal or private content, refuse and explain why; otherwise answer helpfully.")
DEFAULT_REFUSAL_PHRASES = (
    "I'm sorry", "I am sorry", "I'm really sorry", "I am really sorry", "My apologies", "I apologize",
    "I cannot", "I can't", "I can not", "I won't", "I will not", "I'm not able", "I am not able", "I'm unable",
    "I am unable", "As an AI", "As a language model", "As an assistant", "is illegal and unethical",
    "I must decline", "I must refuse", "not appropriate for me to", "If you have any other non-malicious requests",
)
# Value of each optional top-level key when it is left out (the shipped default.yaml writes the same ones;
# a test keeps them equal). A category's description defaults to its name.
DEFAULTS = {"version": 1, "tau": DEFAULT_TAU, "prefix": DEFAULT_PREFIX, "refusal_phrases": DEFAULT_REFUSAL_PHRASES}


@dataclass(frozen=True)
class FittedFor:
    """Settings a tuned τ was fitted for (written by ``guardalign calibrate``); None = not recorded."""

    model: str | None = None  # CLIP model: registry name or config-JSON file name (e.g. "ViT-B-32")
    pretrained: str | None = None  # weights: tag ("openai"), resolved checkpoint path, or "none"
    method: str | None = None  # "ot" or "global"
    patches: str | None = None  # "grid" or "dense"
    grid: int | None = None  # grid mode: windows per side
    stride: float | None = None  # grid mode: window stride as a fraction of the window

    def to_dict(self) -> dict:
        """The recorded settings only (keys with a value)."""
        return {k: getattr(self, k) for k in FITTED_KEYS if getattr(self, k) is not None}


def split_model_name(name: str) -> tuple[str, str | None]:
    """(model, pretrained) of an encoder name as ``load_encoder`` builds it: ``"<model>:<pretrained>"``, or
    just ``<model>`` for ``hf-hub:``/``local-dir:`` models, whose weights come with the model."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return name, None
    model, sep, pretrained = name.partition(":")
    return model, (pretrained if sep else None)


def fitted_settings(settings: dict) -> dict:
    """The ``fitted_for`` keys of a detector's settings (``Detector.settings()``, which every record carries).

    ``grid`` and ``stride`` only matter, and are only kept, for ``patches: grid``; patch settings only for
    ``method: ot``.
    """
    out: dict = {}
    if isinstance(settings.get("model"), str):
        model, pretrained = split_model_name(settings["model"])
        out["model"] = model
        if pretrained is not None:
            out["pretrained"] = pretrained
    for key in ("method", "patches", "grid", "stride"):
        if settings.get(key) is not None:
            out[key] = settings[key]
    if "stride" in out and isinstance(out["stride"], (int, float)) and not isinstance(out["stride"], bool):
        out["stride"] = float(out["stride"])
    if out.get("method") == "global":
        for key in ("patches", "grid", "stride"):
            out.pop(key, None)
    elif out.get("patches") == "dense":
        out.pop("grid", None)
        out.pop("stride", None)
    return out


def check_depth(text: str, source: str, error: type[Exception]) -> None:
    """Refuse YAML nested deeper than MAX_DEPTH before composing it (PyYAML's composer recurses per level,
    so a file nested thousands deep would end in RecursionError). The event parser itself is iterative."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise error(f"{source}:{event.start_mark.line + 1}: YAML nested more than {MAX_DEPTH} "
                                      "levels deep; an anchors file needs 4 (categories → category → variants)")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError:
        return  # syntax errors are reported, with their line, by the real parse that follows


def _content(version, tau, prefix, phrases, categories, tokens=()) -> dict:
    cats = [{"name": c.name, "description": c.description, "variants": list(c.variants),
             "tau": c.tau} for c in categories]
    content = {"version": version, "tau": tau, "prefix": prefix,
               "refusal_phrases": list(phrases), "categories": cats}
    if tokens:  # only when given, so that files without the key keep their hash
        content["refusal_tokens"] = list(tokens)
    return content


def _sha256(content: dict) -> str:
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
