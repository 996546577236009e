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

from conftest import QUESTION, ANSWER, hook_snapshot, write_dataset
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
    from mech_vqa.methods.igos import igos
    from mech_vqa.methods.knockout import knockout
    from mech_vqa.methods.logit_lens import logit_lens
    from mech_vqa.methods.mechanistic import explain
    from mech_vqa.methods.neurons import neuron_increase
    from mech_vqa.methods.raw_attention import raw_attention_map
    from mech_vqa.methods.relevancy import relevancy
    from mech_vqa.methods.tam import tam_map

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
    # the rest of the methods: raw attention, relevancy (gradients through the offloaded layer), TAM, knockout
    # and iGOS+ with its insertion / deletion AUCs
    torch.testing.assert_close(raw_attention_map(vqa, inp).scores, raw_attention_map(tiny_vqa, inp).scores, **TOL)
    torch.testing.assert_close(relevancy(vqa, inp, progress=False).rows, relevancy(tiny_vqa, inp, progress=False).rows,
                               **TOL)
    torch.testing.assert_close(tam_map(vqa, inp).scores, tam_map(tiny_vqa, inp).scores, **TOL)
    torch.testing.assert_close(knockout(vqa, inp, progress=False).knocked_logprob,
                               knockout(tiny_vqa, inp, progress=False).knocked_logprob, **TOL)
    options = dict(tokens=[1, 3], seed=3, progress=False, mask_size=4, iterations=2, n_steps=2, chunk_size=4,
                   step_fraction=0.25, l1=0.0, lr=3.0)
    got, want = igos(vqa, inp, **options), igos(tiny_vqa, inp, **options)
    assert not torch.equal(want.mask, torch.ones_like(want.mask))   # the mask moved
    torch.testing.assert_close(got.mask, want.mask, **TOL)
    assert (got.insertion_auc, got.deletion_auc) == pytest.approx((want.insertion_auc, want.deletion_auc), abs=1e-5)

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


def _assert_same_value(got, want, where) -> None:
    """Equal, floats (nested in lists and dicts too) to 1e-5."""
    if isinstance(want, float):
        assert abs(got - want) <= 1e-5, where
    elif isinstance(want, (list, dict)):
        assert type(got) is type(want) and len(got) == len(want), where
        for key in (want if isinstance(want, dict) else range(len(want))):
            _assert_same_value(got[key], want[key], where)
    else:
        assert got == want, where


def test_cli_device_map_rows_equal_the_plain_run(tiny_vqa, tmp_path, capsys, monkeypatch):
    """``mech-vqa run explain --device-map``: 'auto' (all on the CPU here) and a JSON map that offloads the last
    layer to disk, on both backends, write the plain run's rows; a map that is not a JSON object is one clear
    error before any row."""
    import json

    from mech_vqa.cli import main
    from mech_vqa.dataset import read_results

    folder = tmp_path / "model"
    tiny_vqa.model.save_pretrained(folder)
    tiny_vqa.processor.save_pretrained(folder)
    write_dataset(tmp_path, 2)
    common = ["run", "explain", str(tmp_path / "data.jsonl"), "--model", str(folder), "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "plain.jsonl"), "--device", "cpu"]) == 0
    expected = read_results(tmp_path / "plain.jsonl")
    loaded, load = [], VQAModel.from_pretrained

    def recording(*args, **kwargs):   # keeps each model the CLI loads, to see where its layers went
        vqa = load(*args, **kwargs)
        loaded.append(vqa.model)
        return vqa

    monkeypatch.setattr(VQAModel, "from_pretrained", recording)

    last = tiny_vqa.adapter.n_layers - 1
    text = "model.language_model"
    offloaded = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", f"{text}.embed_tokens": "cpu",
                 **{f"{text}.layers.{i}": "cpu" for i in range(last)}, f"{text}.layers.{last}": "disk",
                 f"{text}.norm": "cpu", f"{text}.rotary_emb": "cpu", "lm_head": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(offloaded))   # a map in a file, or inline below
    runs = {"auto-hooks": ["--device-map", "auto"],
            "disk-hooks": ["--device-map", str(tmp_path / "map.json"), "--offload-folder", str(tmp_path / "offload")],
            "disk-nnsight": ["--device-map", json.dumps(offloaded), "--backend", "nnsight"]}   # safetensors: no folder
    for name, extra in runs.items():
        assert main(common + ["--out", str(tmp_path / f"{name}.jsonl"), *extra]) == 0, name
        got = read_results(tmp_path / f"{name}.jsonl")
        assert [r["id"] for r in got] == [r["id"] for r in expected]
        for row, want in zip(got, expected):
            assert row["status"] == "ok", (name, row.get("error"))
            for key, value in want.items():
                if key != "runtime_s":
                    _assert_same_value(row[key], value, (name, key))
    assert len(loaded) == len(runs)
    # the last layer really was offloaded: its module holds meta tensors, its weights in accelerate's hook
    for model in loaded[1:]:
        layer = model.model.language_model.layers[last]
        assert layer.self_attn.o_proj.weight.device.type == "meta" and hasattr(layer, "_hf_hook")

    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "x.jsonl"), "--device-map", "{model: cpu}"]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "y.jsonl"), "--device-map", '["cpu"]']) == 2
    assert "a JSON device map is an object of module name -> device" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "y.jsonl").exists()
