"""Run every benchmark this script knows, and rewrite their tables in BENCHMARKS.md.

Each benchmark is a script in benchmarks/ that takes ``--json PATH`` and writes its results
there, with a ``results`` list and a ``command``; ``BENCHMARKS`` below says how to run it and how
to turn its JSON into the Markdown that goes between its markers in BENCHMARKS.md::

    <!-- NAME:start -->
    ... (rewritten on every run) ...
    <!-- NAME:end -->

    python benchmarks/run_all.py            # every benchmark, full size
    python benchmarks/run_all.py --quick    # smoke run: each benchmark's --quick
    python benchmarks/run_all.py --only loop_overhead --no-write
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOC = os.path.join(ROOT, "BENCHMARKS.md")
sys.path.insert(0, HERE)


def _loop_overhead_table(result: dict) -> str:
    from loop_overhead import format_table
    return format_table(result)


def _ray_overhead_table(r: dict) -> str:
    rows = ["| contender | step ms | fit() -> first step s | last step -> fit() returns s | whole fit s |",
            "|---|---|---|---|---|"]
    for name, m in r["median"].items():
        rows.append(f"| {name} | {m['step_ms']:.2f} | {m['start_cost_s']:.2f} | {m['end_cost_s']:.2f} | {m['total_s']:.2f} |")
    q = r["ratios"]
    rows.append(f"| **ratio** | **{q['step_ms']:.3f}x** | **{q['start_cost_s']:.3f}x** | **{q['end_cost_s']:.3f}x** | **{q['total_s']:.3f}x** |")
    return "\n".join(rows) + (f"\n\n{r['steps']} steps on 2 CPU workers (gloo), median of the repeats; "
                              f"ray.init {r['ray_init_s']:.1f} s not counted. Goal: {r['goal']}.")


def _checkpoint_table(r: dict) -> str:
    rows = ["| storage | sync blocked s | async blocked s | **async / sync** | fit sync s | fit async s |",
            "|---|---|---|---|---|---|"]
    for where, x in r["results"].items():
        rows.append(f"| {where} | {x['sync']['blocked_s']:.3f} | {x['async']['blocked_s']:.3f} | "
                    f"**{x['ratio']:.3f}x** | {x['sync']['fit_s']:.2f} | {x['async']['fit_s']:.2f} |")
    return "\n".join(rows) + f"\n\nState {r['state_mb']:.0f} MiB; median blocked time per checkpoint. Goal: {r['goal']}."


def _sharded_table(r: dict) -> str:
    rows = ["| checkpoints | rank 0 writes MiB | rank 1 writes MiB | rank 0 peak RSS added MiB | rank 0 blocked s | "
            "rank 1 blocked s | resume s |", "|---|---|---|---|---|---|---|"]
    for mode, x in r["results"].items():
        r0, r1 = x["ranks"]
        rows.append(f"| {mode} | {x['written_mb']['0']:.0f} | {x['written_mb']['1']:.0f} | "
                    f"{r0['peak_rss_added_mb']:.0f} | {r0['blocked_s']:.3f} | {r1['blocked_s']:.3f} | "
                    f"{max(r0['resume_s'], r1['resume_s']):.3f} |")
    return "\n".join(rows) + (f"\n\nFSDP2 on 2 gloo ranks, {r['params'] / 1e6:.1f}M parameters + Adam "
                              f"({r['state_mb']:.0f} MiB of state); async_checkpoint=True; blocked: the faster "
                              "of two saves; peak RSS added: ru_maxrss after the saves minus before.")


def _ingest_table(r: dict) -> str:
    rows = ["| input | rows/s per worker | vs torch DataLoader |", "|---|---|---|"]
    for name, x in r["results"].items():
        rows.append(f"| {name} | {x['rows_per_s']:,.0f} | **{x['ratio_vs_torch']:.2f}x** |")
    return "\n".join(rows) + f"\n\n{r['rows']} rows, batch {r['batch']}, 2 Ray workers, warm epoch."


def _resume_table(r: dict) -> str:
    rows = ["| resume at | step | resume s | restore s | skip + first batch s | replaying instead s |",
            "|---|---|---|---|---|---|"]
    for pct, x in r["results"].items():
        rows.append(f"| {pct} | {x['step']} | {x['resume_s']:.4f} | {x['restore_s']:.4f} | "
                    f"{x['skip_and_first_batch_s']:.4f} | {x['replay_s']:.3f} |")
    return "\n".join(rows) + (f"\n\n**resume@90% / resume@10%: {r['ratio']:.3f}x** (goal <= 1.2); "
                              f"{r['samples']} samples, {r['batches_per_epoch']} batches per epoch, median of "
                              f"{r['repeats']} interleaved resumes.")


def _sweep_table(r: dict) -> str:
    rows = ["| scheduler | wall s | epochs trained | stopped early | best val_loss | best lr |", "|---|---|---|---|---|---|"]
    for name in ("asha", "fifo"):
        x = r[name]
        rows.append(f"| {name.upper()} | {x['wall_s']:.1f} | {x['epochs_trained']} | {x['early_stopped']} | "
                    f"{x['best_val_loss']:.3g} | {x['best_lr']:g} |")
    return "\n".join(rows) + f"\n\n**ASHA / FIFO wall time: {r['wall_ratio']:.3f}x** ({r['trials']} trials x {r['epochs']} epochs)."


# name -> (script in benchmarks/, extra arguments, JSON -> Markdown).
BENCHMARKS: dict[str, tuple[str, list[str], Callable[[dict], str]]] = {
    "loop_overhead": ("loop_overhead.py", [], _loop_overhead_table),
    "ray_overhead": ("ray_overhead.py", ["--repeats", "4"], _ray_overhead_table),
    "data_ingest": ("data_ingest.py", [], _ingest_table),
    "checkpoint_blocking": ("checkpoint_blocking.py", [], _checkpoint_table),
    "sharded_checkpoint": ("sharded_checkpoint.py", [], _sharded_table),
    "resume_cost": ("resume_cost.py", [], _resume_table),
    "sweep_efficiency": ("sweep_efficiency.py", [], _sweep_table),
}


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    ram_gib = None
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        ram_gib = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    versions = {"python": platform.python_version()}
    for dist in ("torch", "ray", "lightning", "pytorch-lightning", "raytrainer"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": ram_gib, "platform": platform.platform(),
            "versions": versions}


def describe(m: dict, command: str, date: str) -> str:
    v = m["versions"]
    libs = ", ".join(f"{k} {val}" for k, val in v.items())
    return (f"Command: `{command}` — {date}  \n"
            f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, {m['platform']}  \n"
            f"Versions: {libs}")


def replace_section(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    block = f"{start}\n{body.strip()}\n{end}"
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip() + f"\n\n## {name}\n\n{block}\n"  # a new benchmark: a new section


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    p.add_argument("--no-write", action="store_true", help="print the tables; leave BENCHMARKS.md alone")
    p.add_argument("--json-dir", help="keep each benchmark's JSON here (default: a temp dir)")
    args = p.parse_args(argv)

    m = machine()
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    out_dir = args.json_dir or tempfile.mkdtemp(prefix="raytrainer-bench-")
    os.makedirs(out_dir, exist_ok=True)
    text = open(DOC).read() if os.path.exists(DOC) else "# Benchmarks\n"
    failed = []
    for name in args.only or BENCHMARKS:
        script, extra, to_markdown = BENCHMARKS[name]
        json_path = os.path.join(out_dir, f"{name}.json")
        cmd = [sys.executable, os.path.join(HERE, script), *extra, *(["--quick"] if args.quick else []),
               "--json", json_path]
        shown = " ".join(["python", f"benchmarks/{script}", *extra, *(["--quick"] if args.quick else [])])
        print(f"[run_all] {shown}", flush=True)
        if subprocess.call(cmd, cwd=ROOT) != 0:
            print(f"[run_all] {name} failed; its section is left as it was", file=sys.stderr)
            failed.append(name)
            continue
        with open(json_path) as f:
            result = json.load(f)
        result["machine"], result["date"] = m, date
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        body = describe(m, shown, date) + "\n\n" + to_markdown(result)
        text = replace_section(text, name, body)
    if not args.no_write:
        with open(DOC, "w") as f:
            f.write(text)
        print(f"[run_all] wrote {os.path.relpath(DOC, ROOT)}; JSON in {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
