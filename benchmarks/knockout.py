"""Attention knockout study and the answer-row ablation path on the mid-size model (issue 17).

Targets:
- a full knockout study (every window, the three group pairs image -> question, image -> last,
  question -> last) costs on average <= 0.6 of a plain forward per knocked-out window;
- the answer-row head-ablation sweep of all heads (``ablate(where="answer")``) is >= 20x faster
  than the full-sequence sweep (``where="full"``).

Both are checked against a reference on the way: the study's numbers against one whole forward per
knockout with the eager attention mask blocked by hand (a subset, also timed and extrapolated),
the answer-row sweep against the full-sequence sweep of the same ablations restricted to the
answer rows. Paths are timed in interleaved rounds so that machine load hits them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, interleaved_medians, midsize_input, midsize_vqa  # noqa: E402

from mech_vqa.hooks import HookSet, preserved_state  # noqa: E402
from mech_vqa.methods.ablation import ablate, head_ablations  # noqa: E402
from mech_vqa.methods.knockout import group_positions, knockout  # noqa: E402


def knocked_by_hand(vqa, inp, source, target, layers, targets):
    """One whole eager forward with the blocked entries of the attention mask at the dtype's minimum
    (the authors' way); summed target log-prob."""
    hooks = HookSet()
    rows, cols = torch.tensor(target)[:, None], torch.tensor(source)[None, :]

    def block(module, args, kwargs):
        mask = kwargs["attention_mask"].clone()
        mask[:, :, rows, cols] = torch.finfo(mask.dtype).min
        return args, {**kwargs, "attention_mask": mask}

    with torch.no_grad(), preserved_state(vqa.model, eager=True):
        try:
            for layer in layers:
                hooks.pre(vqa.adapter.attn(layer), block)
            logits = vqa.forward(inp).logits[0].float()
        finally:
            hooks.remove()
    positions = torch.tensor([t.position for t in targets])
    ids = torch.tensor([t.token_id for t in targets])
    return logits[positions].log_softmax(-1).gather(-1, ids[:, None]).sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds for the knockout study")
    parser.add_argument("--sweep-repeats", type=int, default=5,
                        help="interleaved rounds for the head sweeps (the full-sequence one takes ~32 forwards)")
    parser.add_argument("--only", choices=("study", "sweep"), help="run one of the two benchmarks")
    parser.add_argument("--targets", choices=("one", "all", "both"), default="both",
                        help="the head sweep's targets: the last answer token, every answer token, or both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header("attention knockout and answer-row ablation")
    vqa = midsize_vqa()
    inp = midsize_input(vqa)
    targets = [inp.target(0)]
    print(f"model: {vqa}\nsequence length {inp.seq_len}, question tokens {inp.question_positions.numel()}, "
          f"answer tokens {inp.answer_positions.numel()}")

    if args.only != "sweep":
        knockout_study(vqa, inp, targets, args.repeats)
    if args.only != "study":
        answer_row_sweep(vqa, inp, args.sweep_repeats, args.targets)


def knockout_study(vqa, inp, targets, repeats: int) -> None:
    study = knockout(vqa, inp, progress=False)
    n_knockouts = study.relative_change.numel()

    def plain():
        with torch.no_grad():
            vqa.forward(inp)

    times = interleaved_medians({"study": lambda: knockout(vqa, inp, progress=False), "forward": plain},
                                repeats=repeats, warmup=1)
    per_window = times["study"] / n_knockouts / times["forward"]
    # the reference: one eager forward per knockout, a subset timed and extrapolated
    subset = [(p, w) for p in range(len(study.pairs)) for w in range(0, len(study.windows), 3)]
    start = time.perf_counter()
    error = 0.0
    for p, w in subset:
        source, target = study.pairs[p]
        expected = knocked_by_hand(vqa, inp, group_positions(inp, source, targets),
                                   group_positions(inp, target, targets), range(*study.windows[w]), targets)
        error = max(error, abs(float(expected - study.knocked_logprob[p, w])))
    reference = (time.perf_counter() - start) / len(subset) * n_knockouts
    print(f"knockout study: {len(study.pairs)} pairs x {len(study.windows)} windows of {study.info['window']} layers "
          f"= {n_knockouts} knockouts in {study.info['runs']} batched runs: {times['study']:.3f} s; "
          f"plain forward {times['forward']:.3f} s")
    print(f"one eager forward per knockout, blocked by hand (timed {len(subset)}, extrapolated): {reference:.2f} s; "
          f"max |difference| {error:.1e}")
    print(f"RESULT knockout_cost_per_window={per_window:.3f} of a plain forward (target <= 0.6); "
          f"{reference / times['study']:.1f}x faster than one forward per knockout")



def plain_forward(vqa, inp) -> None:
    with torch.no_grad():
        vqa.forward(inp)


def answer_row_sweep(vqa, inp, repeats: int, which: str = "both") -> None:
    """``ablate`` over every head, answer rows only vs full sequence: with the answer's last token as
    the one target (the ``ablate`` task measures one token, the answer word) and with every answer
    token as targets (``ablate``'s default). Whole calls, the clean run included in both."""
    ablations = head_ablations(vqa)
    settings = {"one": ("one target (the last answer token)", [inp.answer_targets()[-1]]),
                "all": (f"all {inp.answer_positions.numel()} answer tokens", inp.answer_targets())}
    for key in (("one", "all") if which == "both" else (which,)):
        label, targets = settings[key]
        rows = [t.position for t in targets]
        restricted = [dataclasses.replace(a, interventions=tuple(dataclasses.replace(e, positions=rows)
                                                                 for e in a.interventions)) for a in ablations]
        fast = ablate(vqa, inp, ablations, targets=targets, batch_size=64, progress=False, where="answer")
        check = ablate(vqa, inp, restricted, targets=targets, batch_size=16, progress=False)
        error = (fast.delta - check.delta).abs().max().item()
        times = interleaved_medians({
            "answer": lambda: ablate(vqa, inp, ablations, targets=targets, batch_size=64, progress=False,
                                     where="answer"),
            "full": lambda: ablate(vqa, inp, ablations, targets=targets, batch_size=16, progress=False),
            "forward": lambda: plain_forward(vqa, inp),
        }, repeats=repeats, warmup=0)
        print(f"head sweep, all {len(ablations)} heads, {label}: answer-row path {times['answer']:.3f} s "
              f"({times['answer'] / times['forward']:.2f} plain forwards), full-sequence path {times['full']:.3f} s "
              f"({times['full'] / times['forward']:.1f} forwards; forward {times['forward']:.3f} s); answer-row vs "
              f"the full path restricted to the answer rows: max |difference| {error:.1e}")
        print(f"RESULT answer_row_sweep_speedup[{label}]={times['full'] / times['answer']:.1f}x (target >= 20)")


if __name__ == "__main__":
    main()
