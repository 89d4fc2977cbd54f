"""Readers for published safety benchmarks, each turning its layout into a stream of ``Item`` (see ``common``).

A benchmark is named on the command line as ``NAME[,KEY=VALUE...]:DIR``, e.g. ``figstep:data/FigStep``,
``mmsafety,images=SD+TYPO:data/MM-SafetyBench``, ``hades,step=all,label=hades-all:data/HADES``.
``label=`` renames the benchmark in ids and tables (needed when one benchmark is given twice).

>>> spec = parse_spec("mmsafety,images=SD:/data/mm")
>>> (spec.name, spec.label, spec.options["images"], spec.options["question"], str(spec.root))
('mmsafety', 'mmsafety', 'SD', 'official', '/data/mm')
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterator, Sequence

from guardalign.errors import ConfigError
from guardalign.io.benchmarks import figstep, hades, jailbreakv, mmsafety, prompts, spavl, vlguard
from guardalign.io.benchmarks.common import bad_item, require_dir, resolve_options
from guardalign.io.sources import Item

READERS: dict[str, ModuleType] = {m.NAME: m for m in (figstep, mmsafety, vlguard, spavl, jailbreakv, hades, prompts)}
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str  # reader name, a key of READERS
    root: Path  # the DIR (or file) the user gave
    label: str  # name in ids, records and tables (default: the reader name)
    options: dict[str, str] = field(default_factory=dict)  # reader options, defaults filled in


def parse_spec(text: str) -> BenchmarkSpec:
    """Parse ``NAME[,KEY=VALUE...]:DIR``; ConfigError (exit 2) for an unknown name, option or value."""
    head, sep, root = text.partition(":")
    if not sep or not root:
        raise ConfigError(f"invalid benchmark {text!r}: expected NAME:DIR with NAME one of {', '.join(READERS)}")
    name, *pairs = head.split(",")
    name = name.strip().lower()
    if name not in READERS:
        raise ConfigError(f"unknown benchmark {name!r} in {text!r}: expected one of {', '.join(READERS)}")
    given: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"invalid benchmark option {pair!r} in {text!r}: expected KEY=VALUE")
        given[key.strip()] = value.strip()
    label = given.pop("label", name)
    if not _LABEL.match(label):
        raise ConfigError(f"invalid label {label!r} in {text!r}: letters, digits and _ . + - only")
    options = resolve_options(name, given, READERS[name].OPTIONS)
    return BenchmarkSpec(name=name, root=Path(root), label=label, options=options)


def parse_specs(texts: Sequence[str]) -> list[BenchmarkSpec]:
    """Parse several specs; ConfigError when two share a label (ids and table rows would collide)."""
    specs = [parse_spec(t) for t in texts]
    seen: dict[str, str] = {}
    for t, s in zip(texts, specs):
        if s.label in seen:
            raise ConfigError(f"benchmarks {seen[s.label]!r} and {t!r} share the label {s.label!r}; "
                              "give one a different label, e.g. NAME,label=OTHER:DIR")
        seen[s.label] = t
    return specs


def open_benchmark(spec: BenchmarkSpec) -> Iterator[Item]:
    """Check the layout now (InputError, exit 2), then stream the items; a repeated id becomes an error item."""
    reader = READERS[spec.name]
    stream = reader.read(require_dir(spec.root, spec.name), spec.options, spec.label)
    return _unique(stream, spec.label)


def open_benchmarks(specs: Sequence[BenchmarkSpec]) -> Iterator[Item]:
    """Check every layout now, then stream all items, benchmark after benchmark."""
    streams = [open_benchmark(s) for s in specs]
    return (it for stream in streams for it in stream)


def _unique(stream: Iterator[Item], label: str) -> Iterator[Item]:
    first: dict[str, str] = {}
    for it in stream:
        if it.id in first:
            yield bad_item(label, f"{it.id.split('/', 1)[1]}#dup@{it.source}", it.source,
                           f"{it.source}: duplicate id {it.id!r} (first from {first[it.id]})",
                           category=it.meta.get("category"), reference=it.meta.get("reference"))
            continue
        first[it.id] = it.source
        yield it


def describe() -> str:
    """One line per reader: name, layout and options (for --help and error messages)."""
    lines = []
    for name, m in READERS.items():
        opts = "; ".join(f"{k}={o.default} ({o.help})" for k, o in m.OPTIONS.items())
        lines.append(f"{name}: {m.SUMMARY}" + (f" [options: {opts}]" if opts else ""))
    return "\n".join(lines)
