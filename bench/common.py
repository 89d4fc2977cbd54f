"""Bench plumbing: timers, machine facts, and RESULTS.md sections that each bench rewrites in place."""
from __future__ import annotations

import os
import platform
import re
import time
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {dev}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def best_of(fn, repeats: int = 3) -> float:
    """Minimum wall seconds of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Best wall time of each callable over ``rounds`` rounds, after one warm-up; order rotates per round."""
    names = list(fns)
    for name in names:
        fns[name]()
    best = {name: float("inf") for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


@contextmanager
def patched_timer(module, name: str, bucket: list):
    """Time every call of ``module.name`` into ``bucket`` (seconds), restoring it afterwards."""
    original = getattr(module, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            bucket.append(time.perf_counter() - t)

    setattr(module, name, timed)
    try:
        yield bucket
    finally:
        setattr(module, name, original)


def write_section(key: str, markdown: str) -> None:
    """Replace the ``<!-- bench:key -->`` … ``<!-- /bench:key -->`` block of RESULTS.md (append if new)."""
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else "# guardalign benchmark results\n\nWritten by `python -m bench`.\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, RESULTS)


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
