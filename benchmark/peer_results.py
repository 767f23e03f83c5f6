"""Reading the peer benchmark's JSON lines and turning them into the tables of RESULTS.md.

Each line is one run: the scenario it belongs to, the system and batch, and either the worker's
measurement (status "ok") or why there is none ("oom", "error", "timeout"). Throughput is
generated tokens / (prefill + decode time), FlexGen's definition; a system's number in a scenario
is its best batch, as FlexGen tunes the batch per system.
"""
from __future__ import annotations

import json
import re

GiB = 2 ** 30
REQUIRED = ("scenario", "label", "system", "batch", "status")
BASE_SYSTEM = "flexgen"  # the ratios compare every row with this project's best run
RESULTS_BEGIN = "<!-- peers:{preset}:begin (written by {writer}; edits here are replaced) -->"
RESULTS_END = "<!-- peers:{preset}:end -->"


def load_rows(path: str) -> list[dict]:
    """The runs in a JSON-lines file; a malformed line is an error naming its line number."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            missing = [k for k in REQUIRED if k not in row]
            if not isinstance(row, dict) or missing:
                raise ValueError(f"{path}:{number}: a run needs {', '.join(missing or REQUIRED)}")
            if row["status"] == "ok" and not isinstance(row.get("throughput"), (int, float)):
                raise ValueError(f"{path}:{number}: an ok run needs a numeric throughput")
            rows.append(row)
    return rows


def scenarios(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["scenario"] for r in rows))


def labels(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["label"] for r in rows))


def best_runs(rows: list[dict], scenario: str) -> dict[str, dict]:
    """label -> the run with the highest throughput among that label's successful runs."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["scenario"] == scenario and r["status"] == "ok":
            if r["label"] not in best or r["throughput"] > best[r["label"]]["throughput"]:
                best[r["label"]] = r
    return best


def base_run(best: dict[str, dict]) -> dict | None:
    """This project's best run in a scenario (over its plain and compressed rows)."""
    ours = [r for r in best.values() if r["system"] == BASE_SYSTEM]
    return max(ours, key=lambda r: r["throughput"]) if ours else None


def ratios(rows: list[dict], scenario: str) -> dict[str, float]:
    """label -> this project's best throughput over that label's best (peers only)."""
    best = best_runs(rows, scenario)
    base = base_run(best)
    if base is None:
        return {}
    return {label: base["throughput"] / r["throughput"] for label, r in best.items() if r["system"] != BASE_SYSTEM}


def batch_text(r: dict) -> str:
    ngb = r.get("ngb", 1)
    return f"{r['batch'] // ngb}×{ngb}" if ngb > 1 else str(r["batch"])


def gib(value) -> str:
    return f"{value / GiB:.2f}" if isinstance(value, (int, float)) else "–"


def workload_text(rows: list[dict], scenario: str) -> str:
    r = next(r for r in rows if r["scenario"] == scenario)
    limit = r.get("memory_limit") or "none"
    enforced = {True: "enforced by a memory cgroup, page cache included",
                False: "NOT enforced (no writable memory cgroup)"}.get(r.get("limit_enforced"), "not recorded")
    dropped = [x.get("page_cache_dropped") for x in rows if x["scenario"] == scenario and x["status"] == "ok"]
    cache = ("page cache dropped before each timed run" if dropped and all(dropped) else
             "page cache NOT dropped before some timed runs (needs root)" if r.get("disk_bound") else
             "in memory, page cache left as is")
    return (f"Workload: {r['model']}, {r['prompt_len']} prompt tokens and {r['gen_len']} generated tokens per "
            f"sequence (random prompt ids, greedy, no early stop), bf16. Throughput = generated tokens / "
            f"(prefill + decode time); latency = prefill + decode time of the batch. Memory limit {limit} "
            f"({enforced}); {cache}. Batch tuned per system; the best batch is shown.")


def peer_table(rows: list[dict], scenario: str) -> str:
    best = best_runs(rows, scenario)
    base = base_run(best)
    out = ["| system | best batch | tok/s | prefill s | decode s | latency s | peak memory GiB (cgroup / RSS) "
           "| disk read GB | flexgen-dist ÷ system |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label in labels([r for r in rows if r["scenario"] == scenario]):
        r = best.get(label)
        if r is None:
            reasons = sorted({x["status"] for x in rows if x["scenario"] == scenario and x["label"] == label})
            out.append(f"| {label} | – | no successful run ({', '.join(reasons)}) | | | | | | |")
            continue
        ratio = f"{base['throughput'] / r['throughput']:.2f}×" if base else "–"
        disk = f"{r['disk_read_bytes'] / 1e9:.1f}" if "disk_read_bytes" in r else "–"
        out.append(f"| {label} | {batch_text(r)} | {r['throughput']:.2f} | {r['prefill_s']:.1f} | {r['decode_s']:.1f} | "
                   f"{r['latency_s']:.1f} | {gib(r.get('cgroup_peak_bytes'))} / {gib(r.get('peak_rss_bytes'))} | "
                   f"{disk} | {ratio} |")
    return "\n".join(out)


def runs_table(rows: list[dict], scenario: str) -> str:
    out = ["| system | batch | status | tok/s | latency s | peak memory GiB (cgroup) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["scenario"] != scenario:
            continue
        ok = r["status"] == "ok"
        detail = r["status"] if ok else f"{r['status']}: {r.get('error', '')}".rstrip(": ")
        out.append(f"| {r['label']} | {batch_text(r)} | {detail} | {r['throughput']:.2f} | {r['latency_s']:.1f} | "
                   f"{gib(r.get('cgroup_peak_bytes'))} |" if ok else
                   f"| {r['label']} | {batch_text(r)} | {detail} | – | – | {gib(r.get('cgroup_peak_bytes'))} |")
    return "\n".join(out)


def replace_section(text: str, preset: str, section: str, writer: str = "benchmark/bench_peers.py") -> str:
    """`text` with the preset's generated section replaced (or appended when it has none yet)."""
    begin, end = RESULTS_BEGIN.format(preset=preset, writer=writer), RESULTS_END.format(preset=preset)
    block = f"{begin}\n{section.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"
