"""One command for every benchmark: ``python -m bench [--only detector,scan,answer,quality,scene,mask,eval,ray,probe,fills] [--quick]``.

Each bench measures ratios side by side in one run and rewrites its own section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import importlib
import sys

BENCHES = ["detector", "scan", "answer", "quality", "scene", "mask", "eval", "ray", "probe", "fills"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of: " + ", ".join(BENCHES))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args(argv)
    failed = []
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        if name not in BENCHES:
            parser.error(f"unknown bench {name!r}; choose from {', '.join(BENCHES)}")
        try:
            module = importlib.import_module(f"bench.bench_{name}")
        except ModuleNotFoundError as exc:
            print(f"[bench] {name}: not available ({exc})", file=sys.stderr)
            failed.append(name)
            continue
        print(f"[bench] running {name} …", file=sys.stderr)
        module.run(quick=args.quick)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
