"""The package's layering: data flows one way and imports only go downward (docs/architecture.md).

commands, reporting → pipeline → detection → models → attention, io → records / config / errors.
Every import counts, also those inside functions (lazy imports still tie modules together).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "guardalign"
# Rank of each layer: a module may import its own sub-package or a strictly lower rank.
RANK = {"pathnames": -1, "records": 0, "config": 0, "errors": 0, "io": 1, "attention": 1, "models": 2, "detection": 3,
        "pipeline": 4, "reporting": 4, "commands": 5, "__init__": 6}
BOTTOM = {"records", "config", "errors"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    """Every guardalign module (or name) imported anywhere in the file, as a dotted name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in ("guardalign", "cli")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in ("guardalign", "cli"):
                found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for mod, path in modules.items():
        targets = {_resolve(n, modules) for n in _imports(path) if n.startswith("guardalign")}
        graph[mod] = {t for t in targets if t and t != mod and not mod.startswith(t + ".") and t != "guardalign"}
    return graph


def test_every_layer_is_known():
    assert {_layer(m) for m in _modules()} <= set(RANK), "a new sub-package needs a rank in this test"


def upward(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in graph.items():
        for t in targets:
            a, b = _layer(mod), _layer(t)
            if a == b or (a, b) == ("config", "errors"):
                continue
            if RANK[b] >= RANK[a]:
                bad.append(f"{mod} imports {t} ({a} may not import {b})")
    return sorted(bad)


def test_imports_only_go_downward():
    bad = upward(_graph())
    assert not bad, "\n".join(bad)


def test_detection_and_attention_do_no_io_and_nothing_imports_cli():
    for mod, path in _modules().items():
        names = _imports(path)
        assert not any(n == "cli" or n.startswith("cli.") for n in names), f"{mod} imports cli"
        if _layer(mod) in ("detection", "attention"):
            assert not any(n.startswith("guardalign.io") for n in names), f"{mod} imports guardalign.io"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert not cycles(_graph()), f"import cycles: {cycles(_graph())}"


def test_the_checks_catch_a_planted_cycle_and_upward_import():
    planted = {"guardalign.io.a": {"guardalign.commands.b"}, "guardalign.commands.b": {"guardalign.io.a"},
               "guardalign.io.c": {"guardalign.records"}}
    assert upward(planted) == ["guardalign.io.a imports guardalign.commands.b (io may not import commands)"]
    assert cycles(planted) == [["guardalign.commands.b", "guardalign.io.a"]]


def test_modules_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not big, f"modules over 400 lines: {big}"
