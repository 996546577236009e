"""Mechanistic attributions (issue 3): cost against a plain forward and against the reference pipeline.

Targets on the mid-size random model (hidden 512, 8 layers, 8 heads / 4 kv heads, vocab 32000,
256 image tokens, ~290 tokens):

* head-level increases of all layers x heads for one target, forward included, <= 1.5x one plain forward;
* position-level map of one head: extra cost <= 0.2x a plain forward;
* peak memory <= 1.2x the plain forward's;
* >= 100x faster than the reference pipeline's shape (capture everything at every position and layer,
  then loop in Python over heads and positions scoring one vector at a time).

Times are interleaved medians (machine load hits every path alike). ``--threads N`` sets torch's
thread count: on a shared 2-core machine whose cores other processes keep busy, 2 OpenMP threads
spin-wait on each other and every op slows down many-fold (small ops most), so the script
prints the thread count and the ratios are best read at ``--threads 1`` there.

Peak memory is the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) above the resident set before the call, each path measured in its own
subprocess with glibc's mmap threshold pinned at 64 KiB so that every large tensor is mapped and
unmapped (freed memory leaves the resident set; the torch CPU allocator does not cache). Linux only.

The reference loop is timed on a subset of vectors and extrapolated linearly (every per-vector
scoring costs the same); its values are checked against ours on that subset.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, interleaved_medians, measured, midsize_input, midsize_vqa  # noqa: E402

from mech_vqa.capture import LAYER_NAMES  # noqa: E402
from mech_vqa.methods.mechanistic import (  # noqa: E402
    capture_target, explain, layer_and_head_increase, position_increase,
)


EXPLAIN = "explain(heads='top') total"


# --------------------------------------------------------------------------- reference pipeline
def reference_capture(vqa, inp):
    """The reference's capture: everything, at every position and layer (eager attention for patterns)."""
    with torch.no_grad(), vqa.trace(LAYER_NAMES) as cache:
        vqa.forward(inp)
    return cache


def reference_scorer(vqa, final):
    """One vector at a time: full logits through the frozen norm, log-softmax, pick the target."""
    norm = vqa.adapter.final_norm_params()
    scale = torch.rsqrt(final.float().pow(2).mean() + norm["eps"])
    W_U, gamma = vqa.adapter.unembed.weight, norm["weight"]

    @torch.no_grad()
    def lp(vector, token_id):
        return float((W_U @ (gamma * vector * scale)).float().log_softmax(-1)[token_id])

    return lp


def reference_heads(vqa, cache, target, lp, pairs):
    a = vqa.adapter
    t = target.position
    out = []
    for layer, head in pairs:
        x = cache["resid_pre", layer][0, t]
        h = cache["z", layer][0, t, head] @ a.W_O(layer)[head]
        out.append(lp(x + h, target.token_id) - lp(x, target.token_id))
    return out


def reference_positions(vqa, cache, target, lp, layer, head, positions):
    a = vqa.adapter
    t, group = target.position, a.n_heads // a.n_kv_heads
    x = cache["resid_pre", layer][0, t]
    base = lp(x, target.token_id)
    out = []
    for p in positions:
        h = cache["pattern", layer][0, head, t, p] * cache["v", layer][0, p, head // group] @ a.W_O(layer)[head]
        out.append(lp(x + h, target.token_id) - base)
    return out


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


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

    # ---- reference pipeline, on a subset, extrapolated
    print("\nreference pipeline (full capture, one vector per scoring call):")
    full = [timed(lambda: reference_capture(vqa, inp)) for _ in range(3)]
    capture_time = statistics.median(t for t, _ in full)
    cache = full[-1][1]
    lp = reference_scorer(vqa, cache["resid_post", a.n_layers - 1][0, target.position])
    all_pairs = [(layer, head) for layer in range(a.n_layers) for head in range(a.n_heads)]
    pairs = all_pairs[::4]
    head_time, ref_heads = timed(lambda: reference_heads(vqa, cache, target, lp, pairs))
    positions = list(range(0, inp.seq_len, 8))
    layer, head = top[0]
    pos_time, ref_pos = timed(lambda: reference_positions(vqa, cache, target, lp, layer, head, positions))
    per_head, per_position = head_time / len(pairs), pos_time / len(positions)
    reference_total = capture_time + per_head * len(all_pairs) + per_position * inp.seq_len
    ours = explain(vqa, inp, heads="top", progress=False)
    ours_heads = torch.tensor([float(ours.heads.scores[l, j]) for l, j in pairs])
    ours_pos = ours.positions.scores[0, positions]
    print(f"  full capture (eager) {capture_time * 1e3:.1f} ms; {per_head * 1e3:.2f} ms per head "
          f"({len(pairs)} of {len(all_pairs)} timed); {per_position * 1e3:.2f} ms per position "
          f"({len(positions)} of {inp.seq_len} timed)")
    print(f"  max |reference - ours|: heads {float((torch.tensor(ref_heads) - ours_heads).abs().max()):.2e}, "
          f"positions {float((torch.tensor(ref_pos) - ours_pos).abs().max()):.2e}")
    print(f"  same outputs as explain(heads='top') (all heads + one head's positions): reference "
          f"{reference_total:.2f} s (extrapolated) vs ours {times[EXPLAIN] * 1e3:.1f} ms "
          f"-> {reference_total / times[EXPLAIN]:.0f}x")
    every = capture_time + per_head * len(all_pairs) + per_position * inp.seq_len * len(all_pairs)
    all_time, _ = timed(lambda: position_increase(capture_target(vqa, inp), all_pairs))
    print(f"  position level of ALL {len(all_pairs)} heads: reference {every:.1f} s (extrapolated) vs ours "
          f"{all_time:.2f} s -> {every / all_time:.0f}x")

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
