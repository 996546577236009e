"""iGOS+ (authors' README configuration) batched against the same algorithm run the reference way.

Target (issue 5): >= 5x faster than one forward per interpolation point at batch size 1 with
full-vocabulary logits at every position, at equal deletion/insertion AUC (within 0.02).

Both runs are complete ``igos`` calls (token scoring, 5 iterations x 2 x 10 interpolation points,
then the 2 %-step deletion/insertion metric of the 32 x 32 mask) with the same seed, timed in
interleaved rounds so that machine load hits both alike. Models:

* ``organism``: the trained organism in data/organism when it exists, else the same
  architecture with random weights (8 x 8 patch grid, vocabulary 33, 85 tokens);
* ``midsize``: the shared mid-size random LLaVA (hidden 512, 8 layers, vocabulary 32000,
  16 x 16 patches, ~280 tokens). It is compute-bound on 2 CPU cores (~1 s per forward+backward
  row), so to stay within the time budget it runs 1 iteration of 2 x 4 points and a 10 %-step
  metric, once each way. With random weights the image barely moves the answer, so
  ``s(I) - s(B)`` is tiny and the normalised AUCs are ill-conditioned: compare the masks there.

On random weights no token passes the selection threshold reliably, so ``S`` is the answer word
given by hand; on the trained organism it is selected. Run: ``python benchmarks/igos.py``
(``--threads 1`` on a shared machine: with 2 OpenMP threads on an oversubscribed CPU every small
op waits on a descheduled thread, which slows the batch-size-1 reference far more than the batched
run, so the ratio then measures the machine's load rather than the implementation).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, midsize_input, midsize_vqa  # noqa: E402

from mech_vqa import VQAModel  # noqa: E402
from mech_vqa.methods.igos import igos  # noqa: E402
from mech_vqa.methods.token_selection import decode_tokens, is_content_text  # noqa: E402


def organism_case():
    from mech_vqa.organism import ORGANISM_DIR, build_organism, generate_items

    if (ORGANISM_DIR / "config.json").exists():
        vqa, label, tokens = VQAModel.organism(), "organism (trained)", None
    else:
        model, processor = build_organism(seed=0)
        vqa, label = VQAModel(model, processor, name="organism-architecture-random"), "organism architecture, random"
        tokens = "answer word"
    item = next(it for it in generate_items(20, seed=1) if it.family == "color")
    inp = vqa.prepare(item.image, item.question, item.answer)
    return vqa, inp, label, tokens


def time_pair(vqa, inp, tokens, repeats: int, **config):
    """Interleaved runs of the batched and the reference way; returns both results and the
    median seconds of each phase (``total``, ``optimisation``, ``metric``) per way."""
    runs = {"batched": False, "reference": True}
    times = {name: [] for name in runs}
    results = {}
    for _ in range(repeats):
        for name, reference in runs.items():
            start = time.perf_counter()
            results[name] = igos(vqa, inp, tokens=tokens, seed=0, progress=False, reference=reference, **config)
            times[name].append({**results[name].timings, "total": time.perf_counter() - start})
    return results, {name: {phase: statistics.median(run[phase] for run in values) for phase in values[0]}
                     for name, values in times.items()}


def report(label, vqa, inp, tokens, repeats, **config):
    if tokens == "answer word":  # the last content token of the answer ("green", "red"), by hand
        words = decode_tokens(vqa.tokenizer, inp.input_ids[0, inp.answer_positions].tolist())
        tokens = [max(i for i, w in enumerate(words) if is_content_text(w))]
    print(f"\n-- {label}: {vqa!r}")
    print(f"   sequence {inp.seq_len} tokens, answer {inp.answer!r}, config {config or 'defaults'}")
    results, times = time_pair(vqa, inp, tokens, repeats, **config)
    fast, slow = results["batched"], results["reference"]
    for name, res in results.items():
        t = times[name]
        print(f"   {name:>9}: medians of {repeats}: total {t['total']:6.2f} s, "
              f"optimisation {t['optimisation']:6.2f} s, metric {t['metric']:6.2f} s | S={res.selected_tokens} "
              f"deletion AUC {res.deletion_auc:.4f} insertion AUC {res.insertion_auc:.4f}")
    ratios = {phase: times["reference"][phase] / times["batched"][phase] for phase in ("optimisation", "metric")}
    ratio = times["reference"]["total"] / times["batched"]["total"]
    d_del = abs(fast.deletion_auc - slow.deletion_auc)
    d_ins = abs(fast.insertion_auc - slow.insertion_auc)
    raw_gap = max(float((fast.deletion_curve - slow.deletion_curve).abs().max()),
                  float((fast.insertion_curve - slow.insertion_curve).abs().max()))
    print(f"   max |mask difference| {float((fast.mask - slow.mask).abs().max()):.2e}, "
          f"|AUC difference| deletion {d_del:.2e} insertion {d_ins:.2e}, max |curve difference| {raw_gap:.2e}")
    print(f"   speed-up: optimisation {ratios['optimisation']:.2f}x, metric {ratios['metric']:.2f}x")
    print(f"RESULT igos_speedup[{label}]={ratio:.2f}x (target >= 5), auc_equal={max(d_del, d_ins) <= 0.02}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("organism", "midsize", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice). On a shared, oversubscribed CPU use 1: "
                             "OpenMP barriers then stall every small op and the timings mean little")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header("iGOS+ batched vs reference way")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.model in ("organism", "both"):
        vqa, inp, label, tokens = organism_case()
        report(label, vqa, inp, tokens, args.repeats)
    if args.model in ("midsize", "both"):
        vqa = midsize_vqa()
        report("midsize random", vqa, midsize_input(vqa), "answer word", 1, iterations=1, n_steps=4,
               step_fraction=0.1)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
