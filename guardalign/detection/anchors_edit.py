"""Edit an anchors YAML's τ values in place, keeping comments, order and quoting (ruamel round-trip).

Used by ``guardalign calibrate`` to make a tuned copy of the user's anchors file: only ``tau`` keys
change and the copy is validated against the original (no file is written here).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from guardalign.errors import ConfigError

_INDENTS = [(2, 4, 2), (2, 2, 0), (4, 4, 2), (4, 6, 4), (4, 4, 0), (2, 4, 0), (3, 5, 3)]


def _yaml_for(text: str):
    """A ruamel round-trip YAML whose indentation reproduces ``text`` best (exactly, when possible)."""
    from ruamel.yaml import YAML

    best, best_diff = None, None
    for mapping, sequence, offset in _INDENTS:
        y = YAML(typ="rt")
        y.preserve_quotes = True
        y.width = 4096
        y.indent(mapping=mapping, sequence=sequence, offset=offset)
        buf = io.StringIO()
        y.dump(y.load(text), buf)
        diff = sum(a != b for a, b in zip(buf.getvalue().splitlines(), text.splitlines()))
        diff += abs(len(buf.getvalue().splitlines()) - len(text.splitlines()))
        if best_diff is None or diff < best_diff:
            best, best_diff = y, diff
        if diff == 0:
            break
    if best_diff:
        warnings.warn("could not reproduce the anchors file's layout exactly; lines other than tau may be "
                      "re-indented in the copy", UserWarning, stacklevel=3)
    return best


def _set_category_tau(cat, value: float) -> None:
    """Update a category's ``tau``, or insert it right after ``variants`` (moving the blank lines and
    comments that followed the variants list so that they still precede the next key or category)."""
    if "tau" in cat:
        cat["tau"] = value
        return
    keys = list(cat.keys())
    pos = keys.index("variants") + 1
    cat.insert(pos, "tau", value)
    variants = cat["variants"]
    trailing = None
    items = getattr(getattr(variants, "ca", None), "items", {})
    if len(variants) and (len(variants) - 1) in items and items[len(variants) - 1][0] is not None:
        trailing = items[len(variants) - 1][0]
        items[len(variants) - 1][0] = None
    elif "variants" in cat.ca.items and cat.ca.items["variants"][2] is not None:
        trailing = cat.ca.items["variants"][2]
        cat.ca.items["variants"][2] = None
    if trailing is not None:
        cat.ca.items["tau"] = [None, None, trailing, None]


_FITTED_COMMENT = "written by guardalign calibrate: what tau was fitted for (a scan with other settings warns)"


def _set_fitted_for(data, fitted_for: dict) -> None:
    """Replace (or add, at the end, with a comment) the top-level ``fitted_for`` mapping."""
    from ruamel.yaml.comments import CommentedMap

    value = CommentedMap((k, v) for k, v in fitted_for.items())
    if "fitted_for" in data:
        data["fitted_for"] = value
        return
    data["fitted_for"] = value
    data.yaml_set_comment_before_after_key("fitted_for", before="\n" + _FITTED_COMMENT)


def tuned_yaml(text: str, tau: float | None, per_category: dict[str, float], reset_overrides: bool = True,
               fitted_for: dict | None = None) -> str:
    """Return ``text`` with the global ``tau`` set, then each category in ``per_category`` given its own ``tau``.

    ``reset_overrides`` also sets every existing per-category ``tau`` to the global one (a global fit
    assumes one τ for all). ``fitted_for`` ({model, pretrained, method, patches, grid, stride}) is written
    as the top-level ``fitted_for`` mapping. Comments, order and quoting are kept; a file without a ``tau``
    key gets one just before ``categories``."""
    y = _yaml_for(text)
    data = y.load(text)
    if tau is not None:
        if "tau" in data:
            data["tau"] = tau
        else:
            data.insert(list(data.keys()).index("categories"), "tau", tau)
        for cat in data["categories"] if reset_overrides else ():
            if "tau" in cat:
                cat["tau"] = tau
    for cat in data["categories"]:
        if cat["name"] in per_category:
            _set_category_tau(cat, per_category[cat["name"]])
    if fitted_for:
        _set_fitted_for(data, fitted_for)
    buf = io.StringIO()
    y.dump(data, buf)
    return buf.getvalue()


def tuned_anchors_text(src: str | Path, tau: float | None, per_category: dict[str, float], *,
                       reset_overrides: bool = True, fitted_for: dict | None = None) -> str:
    """The tuned copy of the anchors file ``src`` as text, checked to differ from it in τ values (and
    ``fitted_for``) only.

    Writing it is the caller's job (``guardalign.commands.anchors_out`` writes it atomically).
    """
    from guardalign.detection.anchors import AnchorError, FittedFor, load_anchors, parse_anchors

    original = load_anchors(src)
    text = tuned_yaml(Path(src).read_text(encoding="utf-8-sig"), tau, per_category, reset_overrides, fitted_for)
    try:
        tuned = parse_anchors(text, source=str(src))
    except AnchorError as exc:  # a bug in the editing, never the user's fault: keep their files untouched
        raise ConfigError(f"internal error: the tuned anchors do not validate ({exc}); nothing written") from None
    strip = lambda d: {**d, "tau": None, "categories": [{**c, "tau": None} for c in d["categories"]]}  # noqa: E731
    if strip(tuned.to_dict()) != strip(original.to_dict()):
        raise ConfigError("internal error: editing tau changed other fields of the anchors; nothing written")
    if fitted_for and tuned.fitted_for != FittedFor(**fitted_for):
        raise ConfigError("internal error: fitted_for did not round-trip through the anchors; nothing written")
    return text
