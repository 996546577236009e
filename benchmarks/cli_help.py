"""Time ``mech-vqa --help`` and each subcommand's help, each in a fresh process (target: < 1 s).

Heavy imports (torch, transformers, matplotlib) happen inside the command handlers, so the help
pays only for Python's start and argparse. Prints the median of 5 runs per command and whether
torch was imported. Not collected by pytest; run ``python benchmarks/cli_help.py``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [[], ["demo"], ["run"], ["summary"], ["eval"]]


def main() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    probe = ("import sys, contextlib, io\nfrom mech_vqa.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    try: main(['run', '--help'])\n    except SystemExit: pass\n"
             "print('torch imported:', 'torch' in sys.modules)")
    print(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip())
    worst = 0.0
    for command in COMMANDS:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mech_vqa.cli", *command, "--help"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        worst = max(worst, statistics.median(times))
        print(f"mech-vqa {' '.join(command + ['--help']):<16} {statistics.median(times):.3f} s (median of 5)")
    print(f"slowest: {worst:.3f} s; target < 1 s: {'met' if worst < 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
