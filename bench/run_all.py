"""Run every benchmark under bench/ in turn and, optionally, record their tables in bench/README.md.

    .venv/bin/python bench/run_all.py                    # bench_*.py with their defaults
    .venv/bin/python bench/run_all.py --quick            # --quick where a bench has it
    .venv/bin/python bench/run_all.py --update-readme    # also replace the figures in bench/README.md
    .venv/bin/python bench/run_all.py ingest e2e         # only these

Each bench starts (and stops) what it needs itself. With ``--update-readme`` the output of each bench
that exited 0 replaces the block between ``<!-- figures:<name>:begin -->`` and
``<!-- figures:<name>:end -->`` in bench/README.md (``<name>``: ingest, e2e, enrich, plugin): its machine
lines, headings, tables and check lines, in a fenced block exactly as printed. Exit status: the number of
benches that failed (0: all passed).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

README = HERE / "README.md"
# Progress lines (one per run) are left out of the README; everything else is kept as printed.
SKIP = re.compile(r"^\s+round \d+ ")


def benches(selected: list[str]) -> list[Path]:
    found = sorted(HERE.glob("bench_*.py"))
    if selected:
        found = [p for p in found if p.stem.removeprefix("bench_") in selected]
    return found


def supports(path: Path, option: str) -> bool:
    try:
        text = subprocess.run(
            [sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60
        ).stdout
    except subprocess.TimeoutExpired:
        return False
    return option in text


def run(path: Path, quick: bool) -> tuple[int, str, float]:
    argv = [sys.executable, str(path)]
    if quick and supports(path, "--quick"):
        argv.append("--quick")
    print(f"== {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    lines = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line.rstrip("\n"))
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()  # each bench stops what it started on SIGTERM
        proc.wait(60)
        raise
    return code, "\n".join(lines), time.monotonic() - started


def figures(output: str) -> str:
    return "\n".join(line for line in output.splitlines() if not SKIP.match(line)).strip()


def update_readme(name: str, output: str, seconds: float, argv: str, machine: dict[str, Any]) -> bool:
    text = README.read_text()
    begin, end = f"<!-- figures:{name}:begin -->", f"<!-- figures:{name}:end -->"
    if begin not in text or end not in text:
        print(f"(bench/README.md has no {begin} ... {end} block: not updated)", file=sys.stderr)
        return False
    shown = figures(output)
    if "machine:" not in shown:  # the bench does not say where it ran: say it here
        shown = "\n".join(common.machine_lines(machine)) + "\n\n" + shown
    block = f"{begin}\n`{argv}` ({seconds:.0f} s):\n\n```\n{shown}\n```\n{end}"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    README.write_text(head + block + tail)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="benches to run (ingest, e2e, enrich, plugin); default: all")
    parser.add_argument("--quick", action="store_true", help="pass --quick to the benches that have it")
    parser.add_argument("--update-readme", action="store_true", help="record the figures in bench/README.md")
    args = parser.parse_args()
    failed = 0
    for path in benches(args.names):
        machine = common.machine_info()
        try:
            code, output, seconds = run(path, args.quick)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        name = path.stem.removeprefix("bench_")
        print(f"== {path.name}: exit {code} after {seconds:.0f} s", flush=True)
        if code != 0:
            failed += 1
        elif args.update_readme:
            shown = (
                f"python bench/{path.name}{' --quick' if args.quick and supports(path, '--quick') else ''}"
            )
            update_readme(name, output, seconds, shown, machine)
    return failed


if __name__ == "__main__":
    sys.exit(main())
