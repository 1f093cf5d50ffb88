"""Reports of benchmarks/bench_topology.py: Markdown tables with their rows as JSON beside them, merged with
an earlier run's rows (``--merge``), and the commit, command and hardware they were measured with."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import torch


def git_commit(mark_dirty: bool = False) -> str:
    """This checkout's short commit; with ``mark_dirty``, ``+dirty`` appended when files differ from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = (
            mark_dirty
            and subprocess.run(
                ["git", "-C", root, "status", "--porcelain"], capture_output=True, text=True
            ).stdout.strip()
        )
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def command_line() -> str:
    return f"python benchmarks/bench_topology.py {' '.join(os.sys.argv[1:])}"


def write_update_markdown(rows, path):
    runs = {(r.get("command", "?"), r.get("commit", "?"), r.get("reference_revision", "?")): r for r in rows}
    lines = [
        "# One full topology update of a LLaMA layer set: an engine vs a reference revision's",
        "",
        *(
            f"- Command: `{command}`; commit {commit}, reference `{ref}`, rows measured {row['measured']}"
            for (command, commit, ref), row in runs.items()
        ),
        f"- torch {torch.__version__}; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "CHTss (RI density decay, soft magnitude removal, chain removal, soft CH2-L3n regrowth), the update",
        "at step 50 of 100 (update_interval 10), final density 0.3 (0.336 at step 50). Medians; CPU",
        "time is the process's CPU time (stable on a shared machine, where wall time is not); host syncs are",
        "reads of device data by the host and ops are dispatched aten ops, both per update (OpCounter).",
        "Peak MB: growth of resident memory during one update, each engine in a fresh forked process (CPU),",
        "or of allocated memory (CUDA). Live MB and working MB count the bytes of the tensors the update",
        "allocates (PeakLiveBytes, independent of what the allocator keeps): live, the most held at once;",
        "working, the most held at once by those freed before the update returns (its working set beyond",
        "the returned new and grown masks). Same masks: whether both engines return the same masks (an",
        "engine before the counter-based streams, such as 2f232e3, draws other masks).",
        "",
        "| device | hardware | layer set | layers | engine | wall s | CPU s | peak MB | live MB | working MB "
        "| returned MB | host syncs | ops | same masks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for label in ("reference", "ours"):
            r = row.get(label)
            if r is None:
                continue
            if label == "reference":
                name = f"reference ({row.get('reference_revision', '?')})"
            else:
                name = f"this commit ({row.get('commit', '?')})"
            lines.append(
                f"| {row['device']} | {row['hardware']} | {row['layer_set']} ({row['blocks']} blocks) | "
                f"{row['layers']} | {name} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
                f"{r['peak_mb']:.0f} | {mb(r, 'live_peak_mb')} | {mb(r, 'working_mb')} | "
                f"{mb(r, 'returned_mb')} | {r['syncs']} | "
                f"{r['ops']} | {row.get('same_masks', '-')} |"
            )
    lines.append("")
    for row in rows:
        if "cpu_time_ratio" in row:
            lines.append(
                f"- {row['device']} {row['layer_set']}: CPU time this commit / reference = "
                f"{row['cpu_time_ratio']:.2f}, wall time {row['wall_time_ratio']:.2f}."
            )
    write_report(path, lines, rows)


def mb(result: dict, key: str) -> str:
    return f"{result[key]:.0f}" if key in result else "-"


def merge_rows(path: str, rows: list[dict], fields: tuple[str, ...]) -> list[dict]:
    """The rows of the JSON beside ``path``, with those of ``rows`` that match on ``fields`` replaced, in
    place, and the other new rows appended (``--merge``: re-measured rows into an earlier run)."""
    json_path = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(json_path):
        return rows
    with open(json_path) as f:
        old = json.load(f)
    fresh = {tuple(r[k] for k in fields): r for r in rows}
    return [fresh.pop(tuple(r[k] for k in fields), r) for r in old] + list(fresh.values())


def write_report(path: str, lines: list[str], rows: list[dict]) -> None:
    """The Markdown report at ``path`` and its rows as JSON beside it (same name, ``.json``)."""
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {path}")


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def fmt(result):
    if result is None:
        return "-", "-"
    if "error" in result:
        return "fails: " + result["error"], "-"
    return f"{result['seconds']:.3f}", f"{result['peak_mb']:.0f}"


def write_markdown(rows, args, path):
    commit = git_commit()
    lines = [
        "# Topology engine: speed and peak memory vs the research-code-style baseline",
        "",
        f"Command: `{command_line()}`"
        + (
            " (re-measured rows merged into the earlier full run; each row keeps its own `measured` time)"
            if args.merge
            else ""
        ),
        f"Commit: {commit}; torch {torch.__version__}; Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "Times are medians (ours over several runs, the slow baselines once); memory is the peak growth",
        "during the call. speedup = baseline time / ours; mem = our peak / baseline peak.",
        "",
        "| device | hardware | shape | density | op | ours s | ours MB | baseline s | baseline MB "
        "| speedup | mem |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        o_t, o_m = fmt(row["ours"])
        b_t, b_m = fmt(row["baseline"])
        speed = f"{row['speedup']:.2f}x" if "speedup" in row else "-"
        mem = f"{row['memory_ratio']:.2f}" if "memory_ratio" in row else "-"
        lines.append(
            f"| {row['device']} | {row['hardware']} | {row['shape']} ({row['model']}) | {row['density']} | "
            f"{row['op']} | {o_t} | {o_m} | {b_t} | {b_m} | {speed} | {mem} |"
        )
    write_report(path, lines, rows)


def write_precision_markdown(rows, path):
    lines = [
        '# CH2-L3n: `ch_precision` settings vs `"exact"`',
        "",
        f"Command: `{command_line()}`",
        f"Commit: {git_commit()}; torch {torch.__version__}; Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "ER masks. max error = max |score - exact| / max exact score over the candidates; mean rel = mean of",
        "|score - exact| / exact over candidates with a positive exact score; agree = fraction of the exact",
        "top-k candidates also in the top-k at this precision (k_update = 10% of the links, what one update",
        "regrows at zeta = 0.1; k_1pct = the top 1% of the candidates). On CPU the reduced precisions round",
        "the node weights as the GPU GEMMs read them (same error, no speed-up).",
        "",
        "| device | hardware | shape | density | precision | max error | mean rel | agree k_update | "
        "agree k_1pct | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["timing"]
        secs = f"{t['seconds']:.3f}" if "seconds" in t else "fails: " + t["error"]
        lines.append(
            f"| {r['device']} | {r['hardware']} | {r['shape']} ({r['model']}) | {r['density']} | "
            f"{r['precision']} | {r['max_error']:.2e} | {r['mean_rel_error']:.2e} | "
            f"{r['agree_k_update']:.4f} | {r['agree_k_1pct']:.4f} | {secs} |"
        )
    write_report(path, lines, rows)
