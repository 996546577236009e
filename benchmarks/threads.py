"""How the CPU thread count behaves when another process is busy: the reason for ``--threads``' default.

Each setting runs in a fresh process (torch's thread pool is fixed per process): the organism,
``explain`` on the answer word of the first eval items, then ``compare`` (every method) on one
item, timed per item (median). "busy" starts one extra process spinning on a core for the whole
run, as a second job on the machine would. Prints one line per setting and the slowdown of 2
threads against 1. Not collected by pytest; run ``python benchmarks/threads.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
from PIL import Image
from mech_vqa import VQAModel, compare, explain
from mech_vqa.demo import default_item
from mech_vqa.organism import EVAL_DIR
vqa = VQAModel.organism()
rows = [json.loads(l) for l in (EVAL_DIR / "items.jsonl").read_text().splitlines()[:int(sys.argv[2])]]
items = []
for row in rows:
    image = Image.open(EVAL_DIR / row["image"]).convert("RGB")
    items.append(vqa.prepare(image, row["question"], row["answer"]))
explain(vqa, items[0], items[0].target(-1), progress=False)  # warm-up
times = []
for inp in items:
    start = time.perf_counter()
    explain(vqa, inp, inp.target(-1), progress=False)
    times.append(time.perf_counter() - start)
start = time.perf_counter()
compare(vqa, items[0], progress=False, options={"igos": {"iterations": 5}})
compare_s = time.perf_counter() - start
print(json.dumps({"explain_s": statistics.median(times), "compare_s": compare_s}))
"""


def run(threads: int, busy: bool, items: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(items)], env=env, capture_output=True,
                             text=True, timeout=900, check=True)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    items = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    print(f"cores usable: {len(os.sched_getaffinity(0))}; load average before: {os.getloadavg()[0]:.2f}")
    results = {}
    for busy in (False, True):
        for threads in (1, 2):
            start = time.perf_counter()
            results[threads, busy] = run(threads, busy, items)
            r = results[threads, busy]
            print(f"threads {threads}, {'one core busy' if busy else 'no extra load'}: explain item "
                  f"{r['explain_s']:.3f} s (median of {items}), compare item {r['compare_s']:.2f} s "
                  f"[{time.perf_counter() - start:.0f} s]", flush=True)
    for busy in (False, True):
        one, two = results[1, busy], results[2, busy]
        print(f"{'busy' if busy else 'idle'}: 2 threads / 1 thread = explain {two['explain_s'] / one['explain_s']:.2f}x, "
              f"compare {two['compare_s'] / one['compare_s']:.2f}x")


if __name__ == "__main__":
    main()
