"""Bytes a remote (NDIF) call sends back, per method (issue 14): measured through nnsight's offline
simulation of a remote call (``remote="local"``) on the mid-size model, and for the LLaVA-1.5-7B shape
from the same formulas (checked against the measured mid-size figures first).

What is counted: the tensors the trace ``.save()``s (``vqa.backend.last_saved_bytes``), i.e. the
payload of the answer before nnsight's own framing and compression. Methods scored next to the model
(explain, head/layer increases, head positions, logit lens) return scores only; the others return
the activations they capture and the model output.

    PYTHONPATH=. python benchmarks/remote_bytes.py

Target (issue 14): head-level attribution on the 7B shape <= 64 KB per answer token.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, midsize_input, midsize_vqa  # noqa: E402

from mech_vqa import VQAModel  # noqa: E402

TARGET = 64 * 1024
F32, I64 = 4, 8


def near_model_bytes(layers: int, heads: int, seq: int, top_heads: int, stages: int = 0, patches: int = 0,
                     k: int = 0, word: bool = False) -> dict:
    """What the near-model reducers return, from shapes (see nnsight_ops.explain_scores / logit_lens_sweep)."""
    scores = (3 * layers + layers * heads + 1) * F32 + F32   # lp and the model's own log-prob
    positions = top_heads * 2 * I64 + 2 * top_heads * seq * F32  # chosen heads, increase and attention rows
    return {"head_increase": scores,
            "explain": scores + positions,
            "logit_lens": stages * patches * k * (F32 + I64) + (stages * patches * F32 if word else 0)}


def main() -> None:
    header("bytes sent back by a remote call, per method")
    hooks = midsize_vqa()
    inp = midsize_input(hooks)
    vqa = VQAModel(hooks.model, hooks.processor, name=hooks.name, backend="nnsight", remote="local")
    a = vqa.adapter
    print(f"mid-size model: hidden {a.d_model}, {a.n_layers} layers, {a.n_heads} heads, vocab {a.vocab_size}, "
          f"{inp.seq_len} tokens, {len(inp.geometry.positions)} image tokens; remote='local'")
    from mech_vqa.methods.causal import causal_map
    from mech_vqa.methods.logit_lens import logit_lens
    from mech_vqa.methods.mechanistic import explain, head_increase, head_positions, layer_increase
    from mech_vqa.methods.neurons import neuron_increase
    from mech_vqa.methods.raw_attention import raw_attention_map
    from mech_vqa.methods.igos import igos
    from mech_vqa.methods.relevancy import relevancy

    runs = {
        "head_increase": lambda: head_increase(vqa, inp),
        "layer_increase": lambda: layer_increase(vqa, inp),
        "explain(heads='top')": lambda: explain(vqa, inp, progress=False),
        "explain(heads=3)": lambda: explain(vqa, inp, heads=3, progress=False),
        "head_positions([(L-1, 0)])": lambda: head_positions(vqa, inp, [(a.n_layers - 1, 0)]),
        "logit_lens(word, k=5)": lambda: logit_lens(vqa, inp, word="red", k=5),
        "explain(neurons=True) (captures)": lambda: explain(vqa, inp, neurons=True, progress=False),
        "neuron_increase (captures)": lambda: neuron_increase(vqa, inp, k=5, progress=False),
        "raw_attention_map (captures)": lambda: raw_attention_map(vqa, inp),
        "causal_map (captures)": lambda: causal_map(vqa, inp),
        "relevancy (all answer tokens)": lambda: relevancy(vqa, inp, progress=False),
        # the whole optimisation in one session; what comes back does not depend on iterations / n_steps
        "igos (iGOS+, 32 x 32 mask)": lambda: igos(vqa, inp, tokens=[1, 2], evaluate=False, progress=False,
                                                   iterations=1, n_steps=2, chunk_size=4),
        "igos (iGOS++, 32 x 32 masks)": lambda: igos(vqa, inp, tokens=[1, 2], evaluate=False, progress=False,
                                                     iterations=1, n_steps=2, chunk_size=4, two_masks=True),
    }
    measured = {}
    for name, run in runs.items():
        run()
        measured[name] = vqa.backend.last_saved_bytes
        print(f"  {name:36s} {measured[name]:>10,d} B  ({measured[name] / 1024:8.1f} KiB)")

    patches = int((inp.geometry.view == 0).sum())
    formula = near_model_bytes(a.n_layers, a.n_heads, inp.seq_len, 1, a.n_layers + 1, patches, 5, True)
    assert formula["head_increase"] == measured["head_increase"], (formula, measured)
    assert formula["explain"] == measured["explain(heads='top')"], (formula, measured)
    assert formula["logit_lens"] == measured["logit_lens(word, k=5)"], (formula, measured)
    n_answer = int(inp.answer_positions.numel())
    assert measured["relevancy (all answer tokens)"] == n_answer * inp.seq_len * F32, measured
    print(f"  the shape formulas reproduce the measured head_increase / explain / logit_lens figures exactly; "
          f"relevancy returns one float32 row per answer token ({n_answer} x {inp.seq_len})")
    assert measured["igos (iGOS+, 32 x 32 mask)"] == 2 * 32 * 32 * F32, measured
    assert measured["igos (iGOS++, 32 x 32 masks)"] == 3 * 32 * 32 * F32, measured
    print("  igos returns the mask and the optimised mask(s), float32 32 x 32 each (plus the history's floats), "
          "whatever the model")

    # LLaVA-1.5-7B: 32 layers, 32 heads, 576 image tokens; ~600 tokens with a short question and answer
    seq = 600
    big = near_model_bytes(32, 32, seq, 1, 33, 576, 5, True)
    print(f"LLaVA-1.5-7B shape (32 layers x 32 heads, {seq} tokens, 576 image tokens), from shapes:")
    print(f"  head_increase (per answer token)    {big['head_increase']:>10,d} B  "
          f"(target <= {TARGET:,d} B) {'OK' if big['head_increase'] <= TARGET else 'MISSED'}")
    print(f"  explain(heads='top') (per token)    {big['explain']:>10,d} B")
    print(f"  logit_lens(word, k=5)               {big['logit_lens']:>10,d} B")
    print(f"  relevancy (per answer token)        {seq * F32:>10,d} B")
    kv = 32 * 2 * seq * 4096 * 2
    print(f"  (for comparison: keys and values of every layer in fp16, what a capture-and-score-on-the-client "
          f"explain would return: {kv:,d} B)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
