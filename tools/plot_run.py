"""Draw a run's curves from its ``metrics.jsonl`` to PNG files.

Usage: python tools/plot_run.py RUN_DIR [--keys train/acc_mean eval/avg@4 ...] [--out RUN_DIR/plots]

Default keys: reward, accuracy, response length, held-out @k metrics, influence weight, log-prob
mismatch, grad norm and step time (whichever the run logged). One PNG per key plus
``overview.png``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_KEYS = ("train/reward_mean", "train/acc_mean", "train/response_length_mean", "eval/avg@", "eval/cons@",
                "eval/pass@", "train/influence_weight_mean", "rollout/token_mult_prob_error", "train/grad_norm",
                "time/step_s")


def series(records: list, key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot(run_dir: str, keys=None, out_dir=None) -> list[str]:
    """Write the PNGs; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit(f"plotting needs matplotlib, which {sys.executable} does not have: run this with the "
                         "project's environment, .venv/bin/python tools/plot_run.py RUN_DIR (tools/bootstrap.sh "
                         "installs it), or pip install matplotlib") from err
    from megatron_fipo.train.tracking import read_metrics

    records = read_metrics(run_dir)
    present = sorted({k for r in records for k in r if k != "step"})
    keys = [k for want in (keys or DEFAULT_KEYS) for k in present if k == want or (want.endswith("@") and k.startswith(want))]
    if not keys:
        raise SystemExit(f"none of the keys are in {run_dir}/metrics.jsonl (it has: {', '.join(present[:20])})")
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    cols = min(3, len(keys))
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(5 * cols, 3.2 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = series(records, key)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        one, one_ax = plt.subplots(figsize=(6, 4))
        one_ax.plot(steps, values, marker="o" if len(steps) < 30 else None)
        one_ax.set_title(key)
        one_ax.set_xlabel("step")
        path = os.path.join(out_dir, key.replace("/", "_").replace("@", "_at_") + ".png")
        one.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(one)
        paths.append(path)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "overview.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--keys", nargs="*")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    for path in plot(args.run_dir, args.keys, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
