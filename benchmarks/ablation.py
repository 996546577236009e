"""Head sweep: every head ablated for one answer, batched and resumed, against one full forward per head.

Target (issue 7): >= 5x faster than one full forward per head on the mid-size model. The naive
loop runs a subset of heads and is extrapolated linearly to all of them (each of its forwards costs
the same); both paths are checked to give the same log-prob changes on that subset.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, midsize_input, midsize_vqa  # noqa: E402

from mech_vqa.methods.ablation import ablate, head_ablations  # noqa: E402


def naive_sweep(vqa, inp, ablations):
    positions = inp.answer_positions - 1
    tokens = inp.input_ids[0, inp.answer_positions]
    out = []
    for ablation in ablations:
        with torch.no_grad(), vqa.trace([], interventions=ablation.interventions):
            logits = vqa.forward(inp).logits[0, positions].float().log_softmax(-1)
        out.append(logits.gather(-1, tokens[:, None])[:, 0])
    return torch.stack(out)


def main() -> None:
    header("head ablation sweep")
    vqa = midsize_vqa()
    inp = midsize_input(vqa)
    ablations = head_ablations(vqa)
    print(f"model: {vqa}\nsequence length {inp.seq_len}, {len(ablations)} head ablations, "
          f"{inp.answer_positions.numel()} answer tokens")
    ablate(vqa, inp, ablations[:4], progress=False)  # warm-up

    start = time.perf_counter()
    result = ablate(vqa, inp, ablations, batch_size=16, progress=False)
    batched = time.perf_counter() - start

    subset = ablations[:: max(1, len(ablations) // 8)]
    start = time.perf_counter()
    naive = naive_sweep(vqa, inp, subset)
    naive_total = (time.perf_counter() - start) / len(subset) * len(ablations)
    index = [ablations.index(a) for a in subset]
    error = (naive - result.clean_logprob - result.delta[index]).abs().max().item()

    print(f"batched sweep (all {len(ablations)} heads): {batched:.2f} s")
    print(f"one forward per head (timed {len(subset)}, extrapolated): {naive_total:.2f} s")
    print(f"max |difference| between the two on the timed heads: {error:.2e}")
    print(f"RESULT ablation_sweep_speedup={naive_total / batched:.1f}x (target >= 5)")


if __name__ == "__main__":
    main()
