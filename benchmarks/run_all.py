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


# name -> (script in benchmarks/, extra arguments, JSON -> Markdown). The lead extends this list.
BENCHMARKS: dict[str, tuple[str, list[str], Callable[[dict], str]]] = {
    "loop_overhead": ("loop_overhead.py", [], _loop_overhead_table),
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
