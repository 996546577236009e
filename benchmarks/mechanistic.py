"""Mechanistic attributions (issue 3): cost against a plain forward, and peak memory.

Targets on the mid-size random model (hidden 512, 8 layers, 8 heads / 4 kv heads, vocab 32000,
256 image tokens, ~290 tokens):

* head-level increases of all layers x heads for one target, forward included, <= 1.5x one plain forward;
* position-level map of one head: extra cost <= 0.2x a plain forward;
* peak memory <= 1.2x the plain forward's.

Against the llava-mechanism notebook's own algorithm, side by side: ``reference_mechanism.py``.

Times are interleaved medians (machine load hits every path alike). ``--threads N`` sets torch's
thread count: on a shared 2-core machine whose cores other processes keep busy, 2 OpenMP threads
spin-wait on each other and every op slows down many-fold (small ops most), so the script
prints the thread count and the ratios are best read at ``--threads 1`` there.

Peak memory is the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) above the resident set before the call, each path measured in its own
subprocess with glibc's mmap threshold pinned at 64 KiB so that every large tensor is mapped and
unmapped (freed memory leaves the resident set; the torch CPU allocator does not cache). Linux only.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, interleaved_medians, measured, midsize_input, midsize_vqa  # noqa: E402

from mech_vqa.methods.mechanistic import (  # noqa: E402
    capture_target, explain, layer_and_head_increase, position_increase,
)


EXPLAIN = "explain(heads='top') total"


# ------------------------------------------------------------------------------------ memory
def memory_child(name: str) -> None:
    """Run one path once after a warm-up and print its peak resident-set rise in bytes."""
    torch.manual_seed(0)
    vqa = midsize_vqa()
    inp = midsize_input(vqa)
    paths = {
        "forward": lambda: vqa.logits(inp),
        "heads": lambda: layer_and_head_increase(capture_target(vqa, inp, kv_layers=None)),
        "explain": lambda: explain(vqa, inp, heads="top", progress=False),
    }
    fn = paths[name]
    with torch.no_grad():
        fn()
        _, peak, result = measured(fn)
    del result
    print(f"PEAK {peak}")


def measure_memory(name: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [sys.executable, __file__, "--memory", name, "--threads", str(torch.get_num_threads())]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return int(re.search(r"PEAK (\d+)", out).group(1))


# -------------------------------------------------------------------------------------- main
def main() -> None:
    header("mechanistic attributions")
    vqa = midsize_vqa()
    inp = midsize_input(vqa)
    a = vqa.adapter
    target = inp.target()
    print(f"model: {vqa}\nsequence length {inp.seq_len}, vocab {a.vocab_size}, target {target}")

    capture = capture_target(vqa, inp)
    top = layer_and_head_increase(capture)[1][0].top_heads(1)

    with torch.no_grad():
        times = interleaved_medians({
            "plain forward": lambda: vqa.logits(inp),
            "forward, last logits only": lambda: vqa.forward(inp, logits_to_keep=1),
            "head-level, all L x H (incl. forward)": lambda: layer_and_head_increase(
                capture_target(vqa, inp, kv_layers=None)),
            "position-level, one head (extra)": lambda: position_increase(capture, top),
            EXPLAIN: lambda: explain(vqa, inp, heads="top", progress=False),
        }, repeats=7, warmup=1)
    forward = times["plain forward"]
    print("\nmedian times (interleaved, 7 rounds):")
    for name, value in times.items():
        print(f"  {name:42s} {value * 1e3:9.1f} ms  = {value / forward:5.2f}x plain forward")
    print(f"  head-level vs forward with last logits only: "
          f"{times['head-level, all L x H (incl. forward)'] / times['forward, last logits only']:.2f}x")
    print(f"  target head-level <= 1.5x: {times['head-level, all L x H (incl. forward)'] / forward:.2f}x; "
          f"position-level extra <= 0.2x: {times['position-level, one head (extra)'] / forward:.3f}x")

    # ---- memory, each path in its own process
    print("\npeak resident-set rise above the state before the call (own process each):")
    peaks = {name: measure_memory(name) for name in ("forward", "heads", "explain")}
    for name, value in peaks.items():
        print(f"  {name:8s} {value / 2**20:8.1f} MiB  = {value / peaks['forward']:.2f}x plain forward")


if __name__ == "__main__":
    if "--threads" in sys.argv:
        torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    if len(sys.argv) >= 3 and sys.argv[1] == "--memory":
        memory_child(sys.argv[2])
    else:
        main()
