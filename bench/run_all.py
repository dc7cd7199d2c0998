"""Run every benchmark in bench/ one after another and print each one's figures.

    .venv/bin/python bench/run_all.py [--quick] [--only NAME ...] [--skip NAME ...]

Runs bench/bench_*.py and bench/chaos_report.py (in that order, each as its own process with
this interpreter), streaming their output, which is where the figures are printed; each also
writes its JSON under bench/results/. With --quick, every script that has a --quick flag gets
it, and bench_downloads.py gets --small. At the end: one line per script with its exit status,
wall time and the command that reproduces its figures. Exit status: 1 if any script failed
(a missed target in a script's own check counts as a failure of that script).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
QUICK_FLAG = {"bench_downloads.py": "--small"}


def scripts() -> list[Path]:
    found = sorted(HERE.glob("bench_*.py"))
    chaos = HERE / "chaos_report.py"
    return [*found, chaos] if chaos.exists() else found


def quick_flag(script: Path) -> str | None:
    if script.name in QUICK_FLAG:
        return QUICK_FLAG[script.name]
    help_text = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True,
                               timeout=120).stdout
    return "--quick" if "--quick" in help_text else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short variant of every benchmark that has one")
    parser.add_argument("--only", nargs="*", default=[], help="script names (e.g. bench_nodes) to run")
    parser.add_argument("--skip", nargs="*", default=[], help="script names to leave out")
    args = parser.parse_args()
    todo = [s for s in scripts() if (not args.only or s.stem in args.only) and s.stem not in args.skip]
    summary: list[tuple[str, int, float]] = []
    for script in todo:
        argv = [sys.executable, str(script.relative_to(REPO))]
        flag = quick_flag(script) if args.quick else None
        if flag:
            argv.append(flag)
        shown = " ".join(["python", *argv[1:]])
        print(f"\n=== {shown} ===", flush=True)
        start = time.monotonic()
        rc = subprocess.run(argv, cwd=REPO).returncode
        summary.append((shown, rc, time.monotonic() - start))
    print("\n=== summary ===")
    for shown, rc, seconds in summary:
        print(f"{'ok    ' if rc == 0 else f'exit {rc}':<7} {seconds:7.1f} s  {shown}")
    return 0 if all(rc == 0 for _, rc, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
