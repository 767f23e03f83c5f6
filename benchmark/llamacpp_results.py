"""The llama.cpp comparison's pure parts: reading `llama-batched-bench --output-format jsonl`,
medians over repetitions, the markdown tables with their ratios, and the figure
(benchmark/bench_llamacpp.py writes the rows; `bench_llamacpp.py report` calls these).

A row is one measurement of one system at one batch in one repetition: `run` (which invocation
of the script), `scenario` ("memory", or "disk" for weights streamed from disk), `variant` (one of
VARIANTS), `batch`, `rep`, `status` and, when "ok", `decode_tok_s`, `prefill_tok_s`, `decode_s`,
`prefill_s`, `throughput` (generated tokens / (prefill + decode time), as peer_results.py reads).
Decode tok/s = sequences × decode steps / decode time, for both systems.
"""
from __future__ import annotations

import json
import os
import statistics

from peer_results import scenarios

# variant -> (label, system, the llama.cpp variant it is compared with: None, a variant, or "best")
VARIANTS = {
    "bf16": ("llama.cpp BF16", "llama.cpp", None),
    "16bit": ("flexgen-dist 16-bit", "flexgen", "bf16"),
    "q4_0": ("llama.cpp Q4_0", "llama.cpp", None),
    "4bit": ("flexgen-dist 4-bit", "flexgen", "q4_0"),
    "plan": ("flexgen-dist, its own plan", "flexgen", "best"),
}


def parse_batched_bench(text: str) -> dict[int, dict]:
    """batch (`pl`) -> llama-batched-bench's JSON line for it; log lines in between are skipped."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict) and {"pl", "speed_tg", "speed_pp", "t_tg", "t_pp"} <= item.keys():
            out[int(item["pl"])] = item
    return out


def llamacpp_measure(item: dict, gen_len: int) -> dict:
    """A row's measurement from one llama-batched-bench line (speed_tg: decode, speed_pp: prefill)."""
    batch, latency = int(item["pl"]), item["t_pp"] + item["t_tg"]
    return {"decode_tok_s": item["speed_tg"], "prefill_tok_s": item["speed_pp"], "decode_s": item["t_tg"],
            "prefill_s": item["t_pp"], "latency_s": latency, "throughput": batch * gen_len / latency}


def engine_measure(log: dict) -> dict:
    """A row's measurement from one `python -m flexgen_dist.run --log-file` line."""
    latency = log["prefill_latency_s"] + log["decode_latency_s"]
    return {"decode_tok_s": log["decode_throughput"], "prefill_tok_s": log["prefill_throughput"],
            "decode_s": log["decode_latency_s"], "prefill_s": log["prefill_latency_s"], "latency_s": latency,
            "throughput": log["generated_tokens"] / latency}


def latest_run(rows: list[dict], run: str | None = None) -> list[dict]:
    """The rows of `run`, or of the last run in the file (results files are appended to)."""
    if not rows:
        return []
    run = run or rows[-1].get("run")
    return [r for r in rows if r.get("run") == run]


def medians(rows: list[dict], scenario: str, key: str = "decode_tok_s") -> dict[str, dict[int, float]]:
    """variant -> batch -> median of `key` over the successful repetitions."""
    values: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if r["scenario"] == scenario and r["status"] == "ok":
            values.setdefault(r["variant"], {}).setdefault(r["batch"], []).append(r[key])
    return {v: {b: statistics.median(xs) for b, xs in sorted(by.items())} for v, by in values.items()}


def baseline(table: dict[str, dict[int, float]], versus: str | None, batch: int) -> float | None:
    if versus == "best":
        found = [table[v][batch] for v in ("bf16", "q4_0") if batch in table.get(v, {})]
        return max(found) if found else None
    return table.get(versus, {}).get(batch) if versus else None


def engine_ratios(rows: list[dict], scenario: str = "memory", key: str = "decode_tok_s") -> dict:
    """(variant, batch) -> the engine's median over its llama.cpp counterpart's (16-bit vs BF16,
    4-bit vs Q4_0, its own plan vs llama.cpp's faster one), plus ("4bit/16bit", batch)."""
    table, out = medians(rows, scenario, key), {}
    for variant, by_batch in table.items():
        for batch, value in by_batch.items():
            base = baseline(table, VARIANTS[variant][2], batch)
            if base:
                out[(variant, batch)] = value / base
            if variant == "4bit" and table.get("16bit", {}).get(batch):
                out[("4bit/16bit", batch)] = value / table["16bit"][batch]
    return out


def batches(rows: list[dict], scenario: str) -> list[int]:
    return sorted({r["batch"] for r in rows if r["scenario"] == scenario})


def cell(value: float | None, ratio: float | None = None, over: str = "", extra: str = "") -> str:
    if value is None:
        return "–"
    parts = [f"{ratio:.2f}× {over}".strip()] if ratio is not None else []
    parts += [extra] if extra else []
    return f"{value:.1f}" + (f" ({'; '.join(parts)})" if parts else "")


def speed_table(rows: list[dict], scenario: str = "memory", key: str = "decode_tok_s") -> str:
    """System × batch, the engine's cells with their ratio to llama.cpp (and 4-bit over 16-bit)."""
    table, ratio, cols = medians(rows, scenario, key), engine_ratios(rows, scenario, key), batches(rows, scenario)
    what = "decode" if key == "decode_tok_s" else "prefill"
    out = [f"| {what} tok/s | " + " | ".join(f"batch {b}" for b in cols) + " |", "| --- |" + " --- |" * len(cols)]
    for variant, (label, _, versus) in VARIANTS.items():
        if variant not in table:
            continue
        over = {"bf16": "BF16", "q4_0": "Q4_0", "best": "llama.cpp's faster"}.get(versus, "")
        cells = []
        for b in cols:
            four = ratio.get(("4bit/16bit", b)) if variant == "4bit" else None
            base_ratio = ratio.get((variant, b))
            cells.append(cell(table[variant].get(b), base_ratio, over if base_ratio is not None else "",
                              f"{four:.2f}× 16-bit" if four is not None else ""))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def disk_table(rows: list[dict]) -> str:
    """Weights on disk: the engine's 16-bit and 4-bit decode and prefill, and 4-bit over 16-bit."""
    dec, pre = medians(rows, "disk"), medians(rows, "disk", "prefill_tok_s")
    out = [("| batch | 16-bit decode tok/s | 4-bit decode tok/s | 4-bit ÷ 16-bit (decode) | 16-bit prefill tok/s "
            "| 4-bit prefill tok/s | cgroup peak GiB (16-bit / 4-bit) |"), "| --- | --- | --- | --- | --- | --- | --- |"]
    for b in batches(rows, "disk"):
        d16, d4 = dec.get("16bit", {}).get(b), dec.get("4bit", {}).get(b)
        peaks = [max((r.get("cgroup_peak_bytes") or 0 for r in rows if r["scenario"] == "disk" and r["batch"] == b
                      and r["variant"] == v), default=0) for v in ("16bit", "4bit")]
        out.append(f"| {b} | {cell(d16)} | {cell(d4)} | {f'{d4 / d16:.2f}×' if d16 and d4 else '–'} | "
                   f"{cell(pre.get('16bit', {}).get(b))} | {cell(pre.get('4bit', {}).get(b))} | "
                   + " / ".join(f"{p / 2**30:.2f}" if p else "–" for p in peaks) + " |")
    return "\n".join(out)


def failures(rows: list[dict]) -> list[str]:
    return [f"- {r['scenario']}, {VARIANTS[r['variant']][0]}, batch {r['batch']}, rep {r['rep']}: "
            f"{r['status']} ({r.get('error', '')})" for r in rows if r["status"] != "ok"]


def machine_line(m: dict) -> str:
    return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('mem_bytes', 0) / 2**30:.0f} GiB RAM, "
            f"flags {' '.join(m.get('flags', [])) or 'none of note'} (AMX: {'yes' if m.get('amx') else 'no'}); "
            f"torch {m.get('torch', '?')}")


def report_text(rows: list[dict], command: str, figure: str | None = None) -> str:
    """The section of RESULTS.md: machine, workload, tables, what failed, the figure."""
    first = rows[0]
    ref = first.get("llamacpp") or {}
    reps = max(r["rep"] for r in rows) + 1
    out = ["#### CPU decode next to llama.cpp (benchmark/bench_llamacpp.py)", "",
           f"Machine: {machine_line(first.get('machine', {}))}. Date: {first.get('date', '?')}.",
           (f"llama.cpp {ref.get('version', 'not built')} (llama-cpp-python's vendored source, commit "
            f"{ref.get('commit', '?')}), `llama-batched-bench`; this engine `python -m flexgen_dist.run`."),
           f"Command: `{command}`", "",
           (f"Workload: {first.get('model', '?')}, {first['prompt_len']} prompt tokens and {first['gen_len']} new "
            f"tokens per sequence, {first.get('threads', '?')} threads, each run its own process after a warm-up; "
            f"median of {reps} repetition(s). Decode tok/s = sequences × decode steps / decode time; prefill tok/s = "
            "prompt tokens / prefill time. Ratios: the engine's 16-bit over llama.cpp BF16, its 4-bit "
            "(`--compress-weight --compress-embeddings`) over Q4_0, its own plan (`--policy auto --auto-compress 1`) "
            "over llama.cpp's faster variant."), ""]
    if "memory" in scenarios(rows):
        out += [speed_table(rows, "memory"), "", speed_table(rows, "memory", "prefill_tok_s"), ""]
    disk = [r for r in rows if r["scenario"] == "disk"]
    if disk:
        d = disk[0]
        enforced = "enforced by a memory cgroup" if d.get("limit_enforced") else "NOT enforced"
        dropped = "dropped" if all(r.get("page_cache_dropped") for r in disk) else "NOT dropped"
        out += [(f"Weights on disk (`--percent {' '.join(map(str, d.get('percent', [])))}`), memory limit "
                 f"{d.get('memory_limit')} ({enforced}), page cache {dropped} before each run:"),
                "", disk_table(rows), ""]
    notes = sorted({f"- llama.cpp {VARIANTS[r['variant']][0].removeprefix('llama.cpp ')}: {r['llamacpp_note']}"
                    for r in rows if r.get("llamacpp_note")})
    if notes:
        out += ["llama.cpp runs with other flags:", *notes, ""]
    failed = failures(rows)
    if failed:
        out += ["Runs without a measurement:", *failed, ""]
    if figure:
        out.append(f"![decode tok/s against batch]({os.path.relpath(figure, os.path.dirname(os.path.abspath(__file__)))})")
    return "\n".join(out)


def write_figure(rows: list[dict], path: str) -> str:
    """Decode tok/s against batch, one line per system (dashed: weights on disk)."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = 0
    colors = {"bf16": "C0", "16bit": "C0", "q4_0": "C1", "4bit": "C1", "plan": "C2"}  # one colour per precision
    for scenario in ("memory", "disk"):
        for variant, by_batch in medians(rows, scenario).items():
            xs = sorted(by_batch)
            label = VARIANTS[variant][0] + (", weights on disk" if scenario == "disk" else "")
            style = ":" if VARIANTS[variant][1] == "llama.cpp" else "--" if scenario == "disk" else "-"
            ax.plot(xs, [by_batch[x] for x in xs], style, color=colors[variant], label=label,
                    marker="s" if scenario == "disk" else "o")
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError("no successful runs to plot")
    first = rows[0]
    ax.set(xscale="log", yscale="log", xlabel="batch (sequences)", ylabel="decode tok/s",
           title=f"CPU decode, {first.get('model', '?')}, prompt {first['prompt_len']}, gen {first['gen_len']}, "
                 f"{first.get('threads', '?')} threads")
    ax.set_xticks(batches(rows, "memory") or batches(rows, "disk"))
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not powers of ten
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    ax.title.set_fontsize(9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
