"""Run one benchmark: ``python -m jobs.bench NAME [options]`` (``python -m jobs.bench`` lists them)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import jobs.bench as pkg


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m jobs.bench NAME [options]\n\nbenchmarks: " + ", ".join(names))
        return 0 if argv else 2
    name = argv.pop(0)
    if name not in names:
        print(f"unknown benchmark {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(f"jobs.bench.{name}").main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
