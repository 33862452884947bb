"""Compare two runs' ``metrics.jsonl`` key by key, timings aside: what a refactor or a default must not change.

Usage: ``python tools/compare_metrics.py A/metrics.jsonl B/metrics.jsonl [--ignore-prefix time/ ...]``.
Exits 0 when every step has the same keys and values (keys under an ignored prefix, and the
timing-derived ``perf/`` throughput, are left out), 1 with one line per difference otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys

DEFAULT_IGNORED = ("time/", "perf/")  # wall-clock times and what is computed from them


def read(path: str) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.setdefault(int(row["step"]), {}).update(row)
    return rows


def differences(a: dict[int, dict], b: dict[int, dict], ignored=DEFAULT_IGNORED) -> list[str]:
    out = [f"step {s}: only in {'first' if s in a else 'second'}" for s in sorted(set(a) ^ set(b))]
    for step in sorted(set(a) & set(b)):
        x = {k: v for k, v in a[step].items() if not k.startswith(tuple(ignored))}
        y = {k: v for k, v in b[step].items() if not k.startswith(tuple(ignored))}
        out += [f"step {step}: key {k} only in {'first' if k in x else 'second'}" for k in sorted(set(x) ^ set(y))]
        out += [f"step {step}: {k} {x[k]!r} != {y[k]!r}" for k in sorted(set(x) & set(y)) if x[k] != y[k]]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--ignore-prefix", action="append", default=None,
                        help=f"key prefixes left out (default {list(DEFAULT_IGNORED)})")
    args = parser.parse_args(argv)
    a, b = read(args.first), read(args.second)
    diff = differences(a, b, tuple(args.ignore_prefix) if args.ignore_prefix else DEFAULT_IGNORED)
    for line in diff:
        print(line)
    keys = len({k for row in a.values() for k in row})
    print(f"{len(a)} steps, {keys} keys: {'identical' if not diff else f'{len(diff)} differences'}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
