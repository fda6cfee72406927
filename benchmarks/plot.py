"""Bar charts from a benchmarks/results CSV: infer/s and p99 by server at one concurrency.

Run by benchmarks/run.py with the peers' venv (which has matplotlib):
  .bench/venvs/peers/bin/python benchmarks/plot.py --csv RESULTS.csv --out RESULTS.png
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

MODELS = ("tabular", "mlp", "tabular_skl")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--concurrency", type=int, default=32)
    a = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(a.csv, newline="") as f:
        rows = [
            r
            for r in csv.DictReader(f)
            if r["source"] != "ceiling"
            and r["status"].startswith("ok")
            and r["concurrency"] == str(a.concurrency)
        ]
    ceiling: dict[str, float] = {}
    bars: dict[str, list[tuple[str, float, float, bool, bool]]] = defaultdict(list)
    for r in rows:
        proto = "grpc" if r["protocol"] == "grpc" else f"http/{r['tensor_format']}"
        client = " [loadgen]" if r["source"] == "loadgen" else ""
        label = f"{r['server']} {r['config']}\n{proto}{client}"
        bars[r["model"]].append(
            (
                label,
                float(r["throughput_infer_s"]),
                float(r["p99_ms"]),
                r["server"] == "inferplane",
                bool(client),
            )
        )
        if r.get("ceiling_b1_rows_s"):
            ceiling[r["model"]] = float(r["ceiling_b1_rows_s"])
    models = [m for m in MODELS if bars.get(m)]
    if not models:
        print("no rows at this concurrency: no figure")
        return 0
    width = max(len(bars[m]) for m in models)
    fig, axes = plt.subplots(
        2, len(models), figsize=(max(6.0, 0.55 * width + 2) * len(models), 9), squeeze=False
    )
    for j, m in enumerate(models):
        pts = sorted(bars[m], key=lambda t: (not t[3], t[0]))
        labels = [t[0] for t in pts]
        colors = ["tab:green" if t[3] else "tab:blue" for t in pts]
        for i, (metric, title) in enumerate(((1, "infer/s"), (2, "p99 latency, ms"))):
            ax = axes[i][j]
            ax.bar(
                range(len(pts)),
                [t[metric] for t in pts],
                color=colors,
                hatch=["//" if t[4] else "" for t in pts],
            )
            ax.set_xticks(range(len(pts)))
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(title)
            ax.set_title(f"{m}, concurrency {a.concurrency}: {title}")
            ax.grid(True, axis="y", alpha=0.3)
            if metric == 1 and m in ceiling:
                ax.axhline(ceiling[m], color="grey", ls=":", lw=1)
                ax.set_yscale("log")
                ax.text(0, ceiling[m], " in-process b=1", fontsize=7, va="bottom", color="grey")
    fig.suptitle(
        "inferplane (green) vs peers, perf_analyzer (hatched: loadgen.py, compare only with each "
        "other); client and server share the same cores"
    )
    fig.tight_layout()
    fig.savefig(a.out, dpi=100)
    print(f"figure: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
