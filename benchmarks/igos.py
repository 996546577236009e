"""iGOS+ (authors' README configuration) batched against the same algorithm run the reference way.

Target (issue 5): >= 5x faster than one forward per interpolation point at batch size 1 with
full-vocabulary logits at every position, at equal deletion/insertion AUC (within 0.02).

Both runs are complete ``igos`` calls (token scoring, 5 iterations x 2 x 10 interpolation points,
then the 2 %-step deletion/insertion metric of the 32 x 32 mask) with the same seed, timed in
interleaved rounds so that machine load hits both alike. Models:

* ``organism``: the trained organism in data/organism when it exists, else the same
  architecture with random weights (8 x 8 patch grid, vocabulary 33, 85 tokens);
* ``midsize``: the shared mid-size random LLaVA (hidden 512, 8 layers, vocabulary 32000,
  16 x 16 patches, ~290 tokens); 2 iterations there to stay within the time budget.

On random weights no token passes the selection threshold reliably, so ``S`` is the answer word
given by hand; on the trained organism it is selected. Run: ``python benchmarks/igos.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, midsize_input, midsize_vqa  # noqa: E402

from mech_vqa import VQAModel  # noqa: E402
from mech_vqa.methods.igos import igos  # noqa: E402


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
    """Interleaved medians of the batched and the reference run; returns both results and times."""
    runs = {"batched": False, "reference": True}
    times = {name: [] for name in runs}
    results = {}
    for _ in range(repeats):
        for name, reference in runs.items():
            start = time.perf_counter()
            results[name] = igos(vqa, inp, tokens=tokens, seed=0, progress=False, reference=reference, **config)
            times[name].append(time.perf_counter() - start)
    return results, {name: statistics.median(values) for name, values in times.items()}


def report(label, vqa, inp, tokens, repeats, **config):
    if tokens == "answer word":
        tokens = [inp.answer_positions.numel() - 1]
    print(f"\n-- {label}: {vqa!r}")
    print(f"   sequence {inp.seq_len} tokens, answer {inp.answer!r}, config {config or 'defaults'}")
    results, times = time_pair(vqa, inp, tokens, repeats, **config)
    fast, slow = results["batched"], results["reference"]
    for name, res in results.items():
        t = res.timings
        print(f"   {name:>9}: total {times[name]:7.2f} s (median of {repeats})  [last run: optimisation "
              f"{t['optimisation']:.2f} s, metric {t['metric']:.2f} s]  S={res.selected_tokens}  "
              f"deletion AUC {res.deletion_auc:.4f}  insertion AUC {res.insertion_auc:.4f}")
    ratio = times["reference"] / times["batched"]
    d_del = abs(fast.deletion_auc - slow.deletion_auc)
    d_ins = abs(fast.insertion_auc - slow.insertion_auc)
    print(f"   max |mask difference| {float((fast.mask - slow.mask).abs().max()):.2e}, "
          f"|AUC difference| deletion {d_del:.2e} insertion {d_ins:.2e}")
    print(f"RESULT igos_speedup[{label}]={ratio:.2f}x (target >= 5), auc_equal={max(d_del, d_ins) <= 0.02}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("organism", "midsize", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    header("iGOS+ batched vs reference way")
    if args.model in ("organism", "both"):
        vqa, inp, label, tokens = organism_case()
        report(label, vqa, inp, tokens, args.repeats)
    if args.model in ("midsize", "both"):
        vqa = midsize_vqa()
        report("midsize random", vqa, midsize_input(vqa), "answer word", max(1, args.repeats - 2), iterations=2)


if __name__ == "__main__":
    main()
