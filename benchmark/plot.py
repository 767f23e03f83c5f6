"""Figures from the peer benchmark's JSON lines (benchmark/bench_peers.py), as PNG.

    python benchmark/plot.py benchmark/results-peers-cpu.jsonl --out-dir benchmark/figures --prefix peers-cpu

- `<prefix>-latency-throughput.png`: FlexGen's trade-off figure, one panel per scenario: generation
  throughput against the latency of a batch as the batch grows, one line per system.
- `<prefix>-bars.png`: each system's best throughput per scenario, with this project's speedup
  over each peer written on the bars.
"""
from __future__ import annotations

import argparse
import os
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_results import batch_text, best_runs, labels, load_rows, ratios, scenarios  # noqa: E402


def _title(rows: list[dict], scenario: str) -> str:
    r = next(r for r in rows if r["scenario"] == scenario)
    return f"{scenario}: {r['model']}, {r['prompt_len']}/{r['gen_len']}, limit {r.get('memory_limit') or 'none'}"


def latency_throughput(rows: list[dict], path: str) -> str:
    names = scenarios(rows)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, scenario in zip(axes[0], names):
        ok = [r for r in rows if r["scenario"] == scenario and r["status"] == "ok"]
        for label in labels(ok):
            runs = sorted((r for r in ok if r["label"] == label), key=lambda r: r["batch"])
            ax.plot([r["latency_s"] for r in runs], [r["throughput"] for r in runs], marker="o", label=label)
            for r in runs:
                ax.annotate(batch_text(r), (r["latency_s"], r["throughput"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.set(xscale="log", yscale="log", xlabel="latency of a batch (s)", ylabel="generation throughput (tok/s)",
               title=_title(rows, scenario))
        for axis in (ax.xaxis, ax.yaxis):  # ticks at 1, 2, 5 × 10^k, written as plain numbers
            axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
            axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.title.set_fontsize(9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def peer_bars(rows: list[dict], path: str) -> str:
    names = scenarios(rows)
    colors = {label: f"C{i}" for i, label in enumerate(labels(rows))}  # one colour per system throughout
    fig, ax = plt.subplots(figsize=(2.6 + 2.6 * len(names), 4.4))
    drawn = set()
    for j, scenario in enumerate(names):
        best = best_runs(rows, scenario)
        speedups = ratios(rows, scenario)
        width = 0.8 / max(len(best), 1)
        for i, (label, run) in enumerate(best.items()):
            bar = ax.bar(j - 0.4 + width * (i + 0.5), run["throughput"], width, color=colors[label],
                         label=None if label in drawn else label)[0]
            drawn.add(label)
            note = f"{run['throughput']:.1f}" + (f"\nours ÷ this\n{speedups[label]:.2f}×" if label in speedups else "")
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7, textcoords="offset points", xytext=(0, 2))
    ax.set_xticks(range(len(names)), [_title(rows, s).replace(": ", "\n", 1) for s in names], fontsize=8)
    ax.set_ylabel("best generation throughput (tok/s)")
    ax.margins(y=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_figures(rows: list[dict], out_dir: str, prefix: str) -> list[str]:
    if not any(r["status"] == "ok" for r in rows):
        raise ValueError("no successful runs to plot")
    os.makedirs(out_dir, exist_ok=True)
    return [latency_throughput(rows, os.path.join(out_dir, f"{prefix}-latency-throughput.png")),
            peer_bars(rows, os.path.join(out_dir, f"{prefix}-bars.png"))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="JSON lines written by benchmark/bench_peers.py")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures"))
    p.add_argument("--prefix", default="peers")
    args = p.parse_args()
    try:
        for path in write_figures(load_rows(args.results), args.out_dir, args.prefix):
            print(path)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
