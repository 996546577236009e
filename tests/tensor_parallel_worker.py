"""One rank of tests/test_tensor_parallel.py, run under ``torchrun --nproc_per_node 2`` (CPU, gloo).

Loads the tiny LLaVA saved in ``argv[1]`` with ``tp_plan="auto"`` (each rank: half the heads and MLP
neurons) and the same model unsharded (``tiny_llava(seed=0, kv_heads=2)``, the weights that were
saved), runs the methods on both and checks on this rank that the sharded model gives the unsharded
results to 1e-5, and that it is left with transformers' own hooks and forwards only. Writes what it
compared to ``argv[2]/rank<r>.json``; any mismatch raises (non-zero exit).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import ANSWER, QUESTION, hook_snapshot

TOL = {"rtol": 0, "atol": 1e-5}


def _close(name: str, got, expected, report: dict) -> None:
    got, expected = torch.as_tensor(got).float(), torch.as_tensor(expected).float()
    torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{name}: {m}")
    report[name] = float((got - expected).abs().max()) if got.numel() else 0.0


def _instance_forwards(model) -> dict:
    return {name: module.__dict__["forward"] for name, module in model.named_modules() if "forward" in module.__dict__}


def main(folder: str, out: str) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from mech_vqa import VQAModel
    from mech_vqa.backends import BackendNotSupported
    from mech_vqa.build import tiny_llava
    from mech_vqa.interventions import Intervention
    from mech_vqa.methods.ablation import ablate, head_ablations
    from mech_vqa.methods.knockout import knockout
    from mech_vqa.methods.logit_lens import logit_lens
    from mech_vqa.methods.mechanistic import explain
    from mech_vqa.methods.neurons import neuron_increase
    from mech_vqa.methods.raw_attention import raw_attention_map
    from mech_vqa.methods.relevancy import relevancy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, processor = tiny_llava(seed=0, kv_heads=2)
    sharded = AutoModelForImageTextToText.from_pretrained(folder, tp_plan="auto").eval()
    rank = dist.get_rank()
    assert sharded._tp_size == 2
    assert sharded.model.language_model.layers[0].self_attn.o_proj.weight.to_local().shape[1] == 32  # 2 of 4 heads
    ref, tp = VQAModel(model, processor, name="ref"), VQAModel(sharded, processor, name="tp")
    image = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))
    inp = ref.prepare(image, QUESTION, ANSWER)
    report: dict = {"rank": rank}

    tp.logits(inp)  # transformers adds its output hooks on the first forward: before the snapshot
    hooks_before, forwards_before = hook_snapshot(sharded), _instance_forwards(sharded)
    _close("logits", tp.logits(inp), ref.logits(inp), report)

    # every capture name, gathered whole (pattern: eager attention weights of each rank's heads)
    names = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern", "mlp_act"]
    with torch.no_grad(), ref.trace(names, positions=[3, 7]) as expected:
        ref.forward(inp)
    with torch.no_grad(), tp.trace(names, positions=[3, 7]) as got:
        tp.forward(inp)
    for key in expected.store:
        _close(f"capture {key}", got[key], expected[key], report)

    got, expected = explain(tp, inp, heads=2, progress=False), explain(ref, inp, heads=2, progress=False)
    for field in ("attention", "mlp", "base"):
        _close(f"explain layers.{field}", getattr(got.layers, field), getattr(expected.layers, field), report)
    _close("explain model_logprob", got.layers.model_logprob, expected.layers.model_logprob, report)
    _close("explain heads", got.heads.scores, expected.heads.scores, report)
    assert got.positions.heads == expected.positions.heads
    _close("explain positions", got.positions.scores, expected.positions.scores, report)
    _close("explain patch_map", got.patch_map.scores, expected.patch_map.scores, report)

    got, expected = logit_lens(tp, inp, word="red", k=3), logit_lens(ref, inp, word="red", k=3)
    assert torch.equal(got.top_ids, expected.top_ids)
    _close("logit_lens top_probs", got.top_probs, expected.top_probs, report)
    _close("logit_lens word_probs", got.word_probs, expected.word_probs, report)

    _close("raw_attention", raw_attention_map(tp, inp).scores, raw_attention_map(ref, inp).scores, report)

    got, expected = neuron_increase(tp, inp, k=3, progress=False), neuron_increase(ref, inp, k=3, progress=False)
    _close("neuron_increase", got.scores, expected.scores, report)
    # gradients through the sharded attention, each rank's heads gathered for the head mean
    _close("relevancy rows", relevancy(tp, inp, progress=False).rows, relevancy(ref, inp, progress=False).rows, report)

    # heads 1 and 2 of 4 live on different ranks (head j on rank j // 2): each rank edits its own
    value = torch.randn(2, 16)
    edits = [Intervention("z", 0, heads=[1, 2], mode="replace", value=value), Intervention("z", 1, heads=3)]
    clean = ref.logits(inp)
    with torch.no_grad(), ref.trace(["z"], interventions=edits) as expected:
        edited = ref.forward(inp).logits
    with torch.no_grad(), tp.trace(["z"], interventions=edits) as got:
        tp_edited = tp.forward(inp).logits
    assert (edited - clean).abs().max() > 1e-3  # the edits did change the run
    _close("intervention logits", tp_edited, edited, report)
    _close("intervention z", got["z", 0], expected["z", 0], report)

    last = ref.adapter.n_layers - 1
    got = ablate(tp, inp, head_ablations(tp, layers=[0, last]), batch_size=4, progress=False)
    expected = ablate(ref, inp, head_ablations(ref, layers=[0, last]), batch_size=4, progress=False)
    assert expected.delta.abs().max() > 1e-4
    _close("head ablation delta", got.delta, expected.delta, report)
    _close("head ablation clean", got.clean_logprob, expected.clean_logprob, report)
    assert torch.equal(got.ablated_argmax, expected.ablated_argmax)

    # per-head attention knockout: each rank's attention takes the mask rows of its own heads
    got, expected = knockout(tp, inp, heads=True, progress=False), knockout(ref, inp, heads=True, progress=False)
    _close("knockout per head", got.knocked_logprob, expected.knocked_logprob, report)

    # the same methods on the nnsight backend, whose own gathering makes the sharded activations whole
    nn = VQAModel(sharded, processor, name="tp-nnsight", backend="nnsight")
    _close("nnsight logits", nn.logits(inp), ref.logits(inp), report)
    got, expected = explain(nn, inp, heads=2, progress=False), explain(ref, inp, heads=2, progress=False)
    _close("nnsight explain heads", got.heads.scores, expected.heads.scores, report)
    _close("nnsight explain layers.attention", got.layers.attention, expected.layers.attention, report)
    assert got.positions.heads == expected.positions.heads
    _close("nnsight explain positions", got.positions.scores, expected.positions.scores, report)
    got, expected = logit_lens(nn, inp, word="red", k=3), logit_lens(ref, inp, word="red", k=3)
    assert torch.equal(got.top_ids, expected.top_ids)
    _close("nnsight logit_lens word_probs", got.word_probs, expected.word_probs, report)
    _close("nnsight raw_attention", raw_attention_map(nn, inp).scores, raw_attention_map(ref, inp).scores, report)
    _close("nnsight neuron_increase", neuron_increase(nn, inp, k=3, progress=False).scores,
           neuron_increase(ref, inp, k=3, progress=False).scores, report)
    _close("nnsight relevancy rows", relevancy(nn, inp, progress=False).rows,
           relevancy(ref, inp, progress=False).rows, report)
    with torch.no_grad(), nn.trace(["z"], interventions=edits):
        nn_edited = nn.forward(inp).logits
    _close("nnsight intervention logits", nn_edited, edited, report)
    got = ablate(nn, inp, head_ablations(nn, layers=[0, last]), batch_size=4, progress=False)
    expected = ablate(ref, inp, head_ablations(ref, layers=[0, last]), batch_size=4, progress=False)
    _close("nnsight head ablation delta", got.delta, expected.delta, report)
    _close("nnsight knockout per head", knockout(nn, inp, heads=True, progress=False).knocked_logprob,
           knockout(ref, inp, heads=True, progress=False).knocked_logprob, report)
    with pytest.raises(BackendNotSupported, match=r"tensor-parallel \(tp_size=2.*in process only.*remote='local'"):
        VQAModel(sharded, processor, backend="nnsight", remote="local")
    report["nnsight remote refused"] = 0.0

    assert hook_snapshot(sharded) == hooks_before, "a hook of ours was left on the sharded model"
    after = _instance_forwards(sharded)
    assert after.keys() == forwards_before.keys() and all(after[k] is forwards_before[k] for k in after), \
        "transformers' tensor-parallel forwards changed"
    report["hooks_left"] = 0
    Path(out, f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
