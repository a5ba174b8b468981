"""Run the benchmarks of issue 9 (and issue 12's validate-scale) and print every figure beside its target.

    .venv/bin/python benchmarks/run.py            # all seven figures, full sizes
    .venv/bin/python benchmarks/run.py --quick    # small sizes: proves the scripts work
    .venv/bin/python benchmarks/run.py --only engine --only startup

Exit 0 when every figure was measured (a missed target is reported, not a failure); 1 when a figure
could not be measured (the reason is printed in its place).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# figure name (for --only) -> module under benchmarks/, in the order
FIGURES = {"engine": "engine", "failover": "failover", "detection": "detection", "fanout": "fanout",
           "evidence": "evidence_scale", "startup": "startup", "validate-scale": "validate_scale"}


def machine() -> str:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    memory_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal"))
    return f"nproc {os.cpu_count()}, memory {memory_kb / 1024 / 1024:.1f} GiB, load average {load}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this figure (repeatable): " + ", ".join(FIGURES))
    options = parser.parse_args(argv)
    unknown = [name for name in options.only if name not in FIGURES]
    if unknown:
        parser.error(f"--only takes one of {', '.join(FIGURES)}, not {', '.join(unknown)}")
    chosen = [name for name in FIGURES if not options.only or name in options.only]
    print(f"machine: {machine()}" + ("  (quick sizes)" if options.quick else ""), flush=True)
    unmeasured = []
    for name in chosen:
        started = time.monotonic()
        try:
            module = importlib.import_module(f"benchmarks.{FIGURES[name]}")
            print(f"\n{module.TITLE}", flush=True)
            figures = module.measure(options.quick)
        except Exception as exc:  # noqa: BLE001 - one figure's failure must not hide the others
            unmeasured.append(name)
            print(f"  NOT MEASURED: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(file=sys.stderr)
            continue
        for figure in figures:
            print(figure.line(), flush=True)
        print(f"  ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"\nmachine at the end: {machine()}")
    if unmeasured:
        print(f"not measured: {', '.join(unmeasured)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
