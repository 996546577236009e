"""The nnsight backend against the hooks backend (issue 14): ``explain`` on the mid-size model.

Target: nnsight backend, in process, ``explain(heads='top')`` <= 1.25x the hooks backend. Also
printed: one plain captured forward on each engine, and the same ``explain`` through nnsight's
offline simulation of a remote call (``remote="local"``: the trace is serialised and deserialised
as for NDIF; no target, it shows what the serialisation costs), and a head-ablation sweep (no
target: nnsight runs whole forwards where hooks resume from the ablated layer). The nnsight models share the hooks
model's weights, and the scores are checked equal before timing.

Times are interleaved medians (machine load hits every path alike); ``--threads N`` sets torch's
thread count (default 1: on a shared 2-core machine, 2 OpenMP threads spin-wait on each other).

    PYTHONPATH=. python benchmarks/nnsight_backend.py [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, interleaved_medians, midsize_input, midsize_vqa  # noqa: E402

from mech_vqa import VQAModel  # noqa: E402
from mech_vqa.methods.mechanistic import CAPTURED, explain  # noqa: E402

TARGET = 1.25


def main(repeats: int) -> None:
    header("nnsight backend vs hooks backend, mid-size model")
    hooks = midsize_vqa()
    inp = midsize_input(hooks)
    nns = VQAModel(hooks.model, hooks.processor, name=hooks.name, backend="nnsight")
    simulated = VQAModel(hooks.model, hooks.processor, name=hooks.name, backend="nnsight", remote="local")
    print(f"model: hidden {hooks.adapter.d_model}, {hooks.adapter.n_layers} layers, {hooks.adapter.n_heads} heads, "
          f"vocab {hooks.adapter.vocab_size}, {inp.seq_len} tokens; nnsight "
          f"{nns.backend.nnsight.__version__}")

    expected = explain(hooks, inp, progress=False)
    for vqa in (nns, simulated):
        got = explain(vqa, inp, progress=False)
        worst = max(float((got.heads.scores - expected.heads.scores).abs().max()),
                    float((got.layers.attention - expected.layers.attention).abs().max()),
                    float((got.positions.scores - expected.positions.scores).abs().max()))
        print(f"  {vqa.backend!r}: largest difference from hooks (head / layer / position scores) {worst:.2e}")
        assert worst <= 1e-5

    # What one remote call sends back: the scores computed inside the trace (see remote_bytes.py for
    # every method and the 7B shape).
    from mech_vqa.methods.logit_lens import logit_lens
    from mech_vqa.methods.mechanistic import head_increase

    for name, run in (("explain(heads='top')", lambda: explain(nns, inp, progress=False)),
                      ("head_increase", lambda: head_increase(nns, inp)),
                      ("logit_lens", lambda: logit_lens(nns, inp, k=5))):
        run()
        print(f"  saved by the trace, {name}: {nns.backend.last_saved_bytes:,d} B")

    def captured_forward(vqa):
        def run():
            with torch.no_grad(), vqa.trace(CAPTURED, positions=[[inp.seq_len - 1]]):
                vqa.forward(inp, logits_to_keep=1)
        return run

    times = interleaved_medians({
        "forward+capture hooks": captured_forward(hooks),
        "forward+capture nnsight": captured_forward(nns),
        "explain hooks": lambda: explain(hooks, inp, progress=False),
        "explain nnsight": lambda: explain(nns, inp, progress=False),
        "explain nnsight remote='local'": lambda: explain(simulated, inp, progress=False),
    }, repeats=repeats)
    for name, seconds in times.items():
        print(f"  {name:34s} {seconds * 1e3:8.1f} ms")
    capture_ratio = times["forward+capture nnsight"] / times["forward+capture hooks"]
    ratio = times["explain nnsight"] / times["explain hooks"]
    local_ratio = times["explain nnsight remote='local'"] / times["explain hooks"]
    print(f"forward+capture: nnsight / hooks = {capture_ratio:.2f}x")
    print(f"explain: nnsight / hooks = {ratio:.2f}x (target <= {TARGET}x) {'OK' if ratio <= TARGET else 'MISSED'}")
    print(f"explain: nnsight remote='local' / hooks = {local_ratio:.2f}x (no target)")

    # ablate: the hooks backend resumes from the ablated layer (ResidualCheckpoint); nnsight runs
    # whole forwards of the batch. The last two layers' heads, one batch of 16.
    from mech_vqa.methods.ablation import ablate, head_ablations

    last = hooks.adapter.n_layers
    ablations = head_ablations(hooks, layers=[last - 2, last - 1])
    sweep = {name: (lambda vqa=vqa: ablate(vqa, inp, ablations, batch_size=16, progress=False))
             for name, vqa in (("ablate hooks", hooks), ("ablate nnsight", nns))}
    deltas = [run().delta for run in sweep.values()]
    assert float((deltas[0] - deltas[1]).abs().max()) <= 1e-5
    times = interleaved_medians(sweep, repeats=3, warmup=0)
    for name, seconds in times.items():
        print(f"  {name:34s} {seconds * 1e3:8.1f} ms")
    print(f"ablate ({len(ablations)} heads, last two layers): nnsight / hooks = "
          f"{times['ablate nnsight'] / times['ablate hooks']:.2f}x (no target; whole forwards on nnsight)")


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1)
    main(int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 7)
