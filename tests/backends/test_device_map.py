"""A model dispatched by accelerate (``device_map`` with layers offloaded to CPU memory and to disk)
gives the undispatched model's results on both backends; accelerate's hooks stay, none of ours does.

On a CPU-only machine the only dispatch accelerate can install hooks for is offloading: the
offloaded layers' weights live in the dispatch hook's ``weights_map`` and the modules hold meta
tensors between forwards, which is what a ``device_map="auto"`` load that spills onto CPU / disk
looks like. Tensors moving between GPUs is covered on a machine with GPUs (benchmarks/gpu.sh).
"""

import copy

import pytest
import torch

from conftest import QUESTION, ANSWER, hook_snapshot
from mech_vqa import VQAModel
from mech_vqa.interventions import Intervention

accelerate = pytest.importorskip("accelerate")

TOL = dict(rtol=0, atol=1e-5)


def _accelerate_hooks(model) -> dict:
    return {name: id(module._hf_hook) for name, module in model.named_modules() if hasattr(module, "_hf_hook")}


@pytest.fixture(scope="module")
def dispatched(tiny_vqa, tmp_path_factory):
    """tiny_vqa's weights, layer 0 offloaded to CPU memory and the last layer to disk."""
    model = copy.deepcopy(tiny_vqa.model)
    last = tiny_vqa.adapter.n_layers - 1
    text = "model.language_model"
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", f"{text}.embed_tokens": "cpu",
                  f"{text}.layers.0": "cpu", f"{text}.layers.{last}": "disk", f"{text}.norm": "cpu",
                  f"{text}.rotary_emb": "cpu", "lm_head": "cpu"}
    model = accelerate.dispatch_model(model, device_map=device_map, main_device="cpu",
                                      offload_dir=str(tmp_path_factory.mktemp("offload")))
    assert tiny_vqa.adapter.o_proj(0).weight.device.type == "cpu"
    assert model.model.language_model.layers[last].self_attn.o_proj.weight.device.type == "meta"  # offloaded
    return VQAModel(model, tiny_vqa.processor, name=tiny_vqa.name)


@pytest.mark.parametrize("backend", ["hooks", "nnsight"])
def test_dispatched_model_gives_the_same_results(tiny_vqa, dispatched, image, backend):
    from mech_vqa.methods.ablation import ablate, head_ablations
    from mech_vqa.methods.causal import causal_map
    from mech_vqa.methods.logit_lens import logit_lens
    from mech_vqa.methods.mechanistic import explain
    from mech_vqa.methods.neurons import neuron_increase

    vqa = dispatched if backend == "hooks" else VQAModel(dispatched.model, dispatched.processor, backend="nnsight")
    inp = tiny_vqa.prepare(image, QUESTION, ANSWER)
    vqa.logits(inp)  # HF adds its own output hooks on a first forward
    accelerate_hooks, torch_hooks = _accelerate_hooks(vqa.model), hook_snapshot(vqa.model)
    assert accelerate_hooks

    last = tiny_vqa.adapter.n_layers - 1
    edits = [Intervention("z", last, heads=[1]), Intervention("resid_pre", 0, positions=[2])]
    for model in (tiny_vqa, vqa):
        with torch.no_grad(), model.trace(["z", "resid_post", "k"], interventions=edits) as cache:
            logits = model.forward(inp).logits
        if model is tiny_vqa:
            expected, expected_logits = cache, logits
    torch.testing.assert_close(logits, expected_logits, **TOL)
    for key in expected.keys():
        torch.testing.assert_close(cache[key], expected[key], **TOL)

    got, want = explain(vqa, inp, heads=2, progress=False), explain(tiny_vqa, inp, heads=2, progress=False)
    torch.testing.assert_close(got.heads.scores, want.heads.scores, **TOL)   # W_O of the offloaded layer read
    torch.testing.assert_close(got.positions.scores, want.positions.scores, **TOL)
    torch.testing.assert_close(logit_lens(vqa, inp, word="red").word_probs,
                               logit_lens(tiny_vqa, inp, word="red").word_probs, **TOL)
    torch.testing.assert_close(neuron_increase(vqa, inp, k=3, progress=False).scores,
                               neuron_increase(tiny_vqa, inp, k=3, progress=False).scores, **TOL)
    torch.testing.assert_close(causal_map(vqa, inp).scores, causal_map(tiny_vqa, inp).scores, **TOL)
    ablations = head_ablations(tiny_vqa, layers=[0, last])
    torch.testing.assert_close(ablate(vqa, inp, ablations, progress=False).delta,
                               ablate(tiny_vqa, inp, ablations, progress=False).delta, **TOL)

    assert _accelerate_hooks(vqa.model) == accelerate_hooks      # accelerate's hooks untouched
    assert hook_snapshot(vqa.model) == torch_hooks                # none of ours left


def test_tensor_parallel_model_on_remote_nnsight_is_one_clear_error(tiny_vqa, monkeypatch):
    """transformers marks a model loaded with ``tp_plan`` by ``_tp_size``; the nnsight backend runs it in process
    (tests/test_tensor_parallel.py, 2 gloo ranks) but refuses it remotely before any forward, naming the fix."""
    from mech_vqa.backends import BackendNotSupported

    monkeypatch.setattr(tiny_vqa.model, "_tp_size", 2, raising=False)
    for remote in ("local", True):
        with pytest.raises(BackendNotSupported, match=r"tensor-parallel \(tp_size=2.*in process only.*remote=False"):
            VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="nnsight", remote=remote)


def test_tensor_parallel_mark_without_shards_is_one_clear_error(tiny_vqa, monkeypatch):
    from mech_vqa.tensor_parallel import TensorParallelError

    monkeypatch.setattr(tiny_vqa.model, "_tp_size", 2, raising=False)
    with pytest.raises(TensorParallelError, match=r"tp_size=2\) but holds no sharded \(DTensor\) parameter"):
        VQAModel(tiny_vqa.model, tiny_vqa.processor)


def test_offloaded_readout_is_one_clear_error(tiny_vqa, tmp_path):
    from mech_vqa.backends import BackendNotSupported

    model = copy.deepcopy(tiny_vqa.model)
    text = "model.language_model"
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", text: "cpu", "lm_head": "disk"}
    model = accelerate.dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path))
    assert model.lm_head.weight.device.type == "meta"
    with pytest.raises(BackendNotSupported, match=r"the unembedding \(Linear\) is offloaded by accelerate"):
        VQAModel(model, tiny_vqa.processor)
