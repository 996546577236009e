"""The nnsight backend against the hooks backend: same captures, same edits, same method results.

Every tiny layout, in process and through nnsight's offline simulation of a remote call
(``remote="local"``); each nnsight model shares the hooks fixture's weights, so any difference is
the engine's.
"""

import sys

import pytest
import torch

from conftest import FAMILIES, QUESTION, ANSWER, assert_leaves_model_as_found, assert_same_state, hook_snapshot, \
    model_state
from mech_vqa import VQAModel
from mech_vqa.backends import BackendNotSupported
from mech_vqa.capture import NAMES
from mech_vqa.interventions import Intervention

pytest.importorskip("nnsight")

from mech_vqa.backends import nnsight_backend  # noqa: E402 - after the skip

ENGINES = {"nnsight": False, "nnsight-remote-local": "local"}
_WRAPPED: dict = {}
TOL = dict(rtol=0, atol=1e-5)


@pytest.fixture(params=list(FAMILIES))
def family(request) -> VQAModel:
    return request.getfixturevalue(FAMILIES[request.param])


@pytest.fixture(params=list(ENGINES))
def pair(request, family):
    """``(hooks model, nnsight model)`` over the same weights."""
    key = (family.name, request.param)
    if key not in _WRAPPED:
        _WRAPPED[key] = VQAModel(family.model, family.processor, name=family.name, backend="nnsight",
                                 remote=ENGINES[request.param])
    return family, _WRAPPED[key]


@pytest.fixture
def inp(family, image):
    return family.prepare(image, QUESTION, ANSWER)


def _edits(vqa, inp):
    a, d = vqa.adapter, vqa.adapter.d_model
    generator = torch.Generator().manual_seed(0)
    last = a.n_layers - 1
    return [Intervention("z", 0, heads=[1], positions=[2, inp.seq_len - 2]),
            Intervention("attn_out", last, mode="mean", value=torch.randn(d, generator=generator)),
            Intervention("resid_pre", last, mode="replace", value=torch.randn(d, generator=generator),
                         positions=[inp.seq_len - 3]),
            Intervention("mlp_out", 0, positions=[inp.seq_len - 1]),
            Intervention("resid_post", 0, positions=[1]),
            Intervention("z", last, mode="replace", value=torch.ones(a.head_dim), heads=[0, a.n_heads - 1]),
            # every named head at every named position (not paired one to one)
            Intervention("z", 0, mode="mean", value=torch.full((a.head_dim,), 0.5), heads=[0, a.n_heads - 1],
                         positions=[1, inp.seq_len - 1])]


def _assert_same_cache(reference, other):
    assert set(reference.keys()) == set(other.keys())
    for key in reference.keys():
        assert reference[key].shape == other[key].shape, key
        torch.testing.assert_close(other[key], reference[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")


@torch.no_grad()
@pytest.mark.parametrize("positions", ["all", "shared", "per-row"])
def test_captures_equal_hooks(pair, inp, positions):
    hooks, nns = pair
    names = [n for n in NAMES if n != "pattern"]  # pattern needs eager attention: tested on its own below
    chosen = {"all": None, "shared": [1, inp.seq_len - 1], "per-row": [[inp.seq_len - 2, 0]]}[positions]
    before, hook_ids = model_state(hooks.model), hook_snapshot(hooks.model)
    with hooks.trace(names, positions=chosen) as expected:
        reference = hooks.forward(inp)
    with nns.trace(names, positions=chosen) as cache:
        out = nns.forward(inp)
    torch.testing.assert_close(out.logits, reference.logits, **TOL)
    _assert_same_cache(expected, cache)
    assert_same_state(before, model_state(hooks.model))
    assert hook_snapshot(hooks.model) == hook_ids


@torch.no_grad()
def test_nested_traces_share_one_forward(pair, inp):
    hooks, nns = pair
    layers = [hooks.adapter.n_layers - 1]
    for vqa in (hooks, nns):
        with vqa.trace(["z", "resid_post"], positions=[[inp.seq_len - 1]]) as outer, \
                vqa.trace(["k", "v"], layers=layers, to_cpu=True) as inner:
            vqa.forward(inp, logits_to_keep=1)
        if vqa is hooks:
            expected = (outer, inner)
    _assert_same_cache(expected[0], outer)
    _assert_same_cache(expected[1], inner)


@torch.no_grad()
def test_interventions_equal_hooks(pair, inp):
    hooks, nns = pair
    edits = _edits(hooks, inp)
    clean = hooks.logits(inp)
    with hooks.trace(["z", "attn_out", "resid_pre", "resid_post"], interventions=edits) as expected:
        reference = hooks.forward(inp)
    with nns.trace(["z", "attn_out", "resid_pre", "resid_post"], interventions=edits) as cache:
        out = nns.forward(inp)
    assert (reference.logits - clean).abs().max() > 1e-3  # the edits did change the run
    torch.testing.assert_close(out.logits, reference.logits, **TOL)
    _assert_same_cache(expected, cache)  # captures see the edited values on both engines


def test_explain_equals_hooks(pair, inp):
    from mech_vqa.methods.mechanistic import explain

    hooks, nns = pair
    with hooks.keep_hooks():  # the hooks backend keeps its capture's hooks for the second call
        explain(hooks, inp, heads=2, progress=False)
        expected = explain(hooks, inp, heads=2, progress=False)
    with nns.keep_hooks():  # nothing to keep on nnsight
        got, _ = assert_leaves_model_as_found(nns, inp, lambda x: explain(nns, x, heads=2, progress=False))
    for field in ("attention", "mlp", "base"):
        torch.testing.assert_close(getattr(got.layers, field), getattr(expected.layers, field), **TOL)
    assert abs(got.layers.model_logprob - expected.layers.model_logprob) <= 1e-5
    torch.testing.assert_close(got.heads.scores, expected.heads.scores, **TOL)
    assert got.positions.heads == expected.positions.heads
    torch.testing.assert_close(got.positions.scores, expected.positions.scores, **TOL)
    torch.testing.assert_close(got.patch_map.scores, expected.patch_map.scores, **TOL)


@torch.no_grad()
def test_logit_lens_equals_hooks(pair, inp):
    from mech_vqa.methods.logit_lens import logit_lens

    hooks, nns = pair
    expected = logit_lens(hooks, inp, word="red", k=3)
    got = logit_lens(nns, inp, word="red", k=3)
    if nns.backend.lens_near_model:   # swept inside the trace (Gemma-3, Qwen3-VL's DeepStack too): only the maps come back
        stages, patches = got.top_ids.shape[:2]
        assert nns.backend.last_saved_bytes == stages * patches * (3 * (4 + 8) + 4)
    assert torch.equal(got.top_ids, expected.top_ids)
    torch.testing.assert_close(got.top_probs, expected.top_probs, **TOL)
    torch.testing.assert_close(got.word_probs, expected.word_probs, **TOL)


@torch.no_grad()
def test_pattern_in_eager_mode(tiny_vqa, image):
    inp = tiny_vqa.prepare(image, QUESTION, ANSWER)
    nns = VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="nnsight")
    before = model_state(tiny_vqa.model)
    for vqa in (tiny_vqa, nns):
        with vqa.trace(["pattern"], positions=[inp.seq_len - 1]) as cache:
            vqa.forward(inp)
        if vqa is tiny_vqa:
            expected = cache
    _assert_same_cache(expected, cache)
    assert_same_state(before, model_state(tiny_vqa.model))  # attention implementation put back


def test_gradient_through_captures(tiny_vqa, image):
    """detach=False keeps the in-process nnsight captures in the autograd graph, as hooks do."""
    inp = tiny_vqa.prepare(image, QUESTION, ANSWER)
    nns = VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="nnsight")
    grads = []
    for vqa in (tiny_vqa, nns):
        with vqa.trace(["resid_mid"], layers=[0], detach=False) as cache:
            out = vqa.forward(inp)
        (grad,) = torch.autograd.grad(out.logits[0, -1].logsumexp(-1), cache["resid_mid", 0])
        grads.append(grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], **TOL)


def test_relevancy_equals_hooks(pair, inp):
    """Relevancy: each target's backward and Chefer's propagation inside one nnsight trace, into the vision
    tower too where the layout has that stage; only the rows saved (and, through remote="local", sent back)."""
    from mech_vqa.methods.relevancy import relevancy

    hooks, nns = pair
    row_normalize = bool(nns.backend.remote)   # both forms on every layout, each through one engine
    vision = (int(inp.geometry.view.max()) == 0 and not hooks.adapter.vision_relevancy_refusal
              and hooks.adapter.patches_per_image_token == 1)
    expected = relevancy(hooks, inp, [0, 3], row_normalize=row_normalize, vision=vision, progress=False)
    got, _ = assert_leaves_model_as_found(nns, inp, lambda x: relevancy(nns, x, [0, 3], row_normalize=row_normalize,
                                                                         vision=vision, progress=False))
    assert expected.llm.abs().max() > 0
    torch.testing.assert_close(got.rows, expected.rows, **TOL)
    torch.testing.assert_close(got.llm, expected.llm, **TOL)
    n_image = inp.geometry.positions.numel()
    assert nns.backend.last_saved_bytes == 2 * (inp.seq_len + (n_image if vision else 0)) * 4   # the rows only
    if vision:
        assert (expected.vision - expected.llm).abs().max() > 0
        torch.testing.assert_close(got.vision, expected.vision, **TOL)


SMALL_IGOS = dict(mask_size=4, iterations=2, n_steps=2, chunk_size=4, step_fraction=0.25, l1=0.0, lr=3.0)


def _igos_pair(hooks, nns, inp, **options):
    from mech_vqa.methods.igos import igos

    kwargs = dict(tokens=[1, 3], seed=3, progress=False, **SMALL_IGOS, **options)
    expected = igos(hooks, inp, **kwargs)
    got = igos(nns, inp, **kwargs)
    assert not torch.equal(expected.mask, torch.ones_like(expected.mask))   # the mask moved
    torch.testing.assert_close(got.mask, expected.mask, **TOL)
    for name, values in expected.history.items():
        assert got.history[name] == pytest.approx(values, abs=1e-5), name
    if options.get("evaluate", True):
        assert got.insertion_auc == pytest.approx(expected.insertion_auc, abs=1e-5)
        assert got.deletion_auc == pytest.approx(expected.deletion_auc, abs=1e-5)
    return got


def test_igos_equals_hooks(pair, inp):
    """iGOS+: the whole optimisation in one nnsight session (the masks' gradients from its traces), only the
    masks and the history coming back (Qwen-VL's flattened patches too: the mask reaches them by an index)."""
    hooks, nns = pair
    got = _igos_pair(hooks, nns, inp, evaluate=False)
    assert nns.backend.last_saved_bytes == 2 * got.mask.numel() * 4   # the session ran: mask and mask list only


@pytest.mark.parametrize("remote", [False, "local"])
def test_igos_plus_plus_equals_hooks(tiny_vqa, image, remote):
    inp = tiny_vqa.prepare(image, QUESTION, ANSWER)
    nns = VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="nnsight", remote=remote)
    assert_leaves_model_as_found(nns, inp, lambda x: _igos_pair(tiny_vqa, nns, x, two_masks=True))


def test_perturbation_metrics_equal_hooks(pair, inp):
    """Insertion / deletion, patch faithfulness (blur and zeroed image tokens) and the visually relevant
    tokens: forwards of perturbed images, in process and through the simulated remote call."""
    from mech_vqa.methods.scoring import AnswerScorer, input_baseline
    from mech_vqa.methods.token_selection import visually_relevant_tokens
    from mech_vqa.metrics.faithfulness import patch_faithfulness
    from mech_vqa.metrics.insertion_deletion import insertion_deletion

    hooks, nns = pair
    grid = inp.geometry.grid
    saliency = torch.arange(float(grid[0] * grid[1])).view(*grid)
    results = []
    for vqa in (hooks, nns):
        base = input_baseline(vqa, inp)
        with torch.no_grad():
            scores = AnswerScorer(vqa, inp, [1, 3])(torch.cat([inp.pixel_values, base]).float())
        results.append((
            scores,
            insertion_deletion(vqa, inp, saliency, tokens=[1, 3], step_fraction=0.25, progress=False),
            patch_faithfulness(vqa, inp, {"ramp": saliency}, tokens=[1, 3], box=[0, 0, 16, 16], fractions=(0.125,),
                               n_random=2, chunk_size=5),
            visually_relevant_tokens(vqa, inp, base, tau=0.0)))
    (scores, ins, faith, relevant), (scores_n, ins_n, faith_n, relevant_n) = results
    torch.testing.assert_close(scores_n, scores, **TOL)
    torch.testing.assert_close(torch.as_tensor(ins_n.deletion_raw), torch.as_tensor(ins.deletion_raw), **TOL)
    torch.testing.assert_close(torch.as_tensor(ins_n.insertion_raw), torch.as_tensor(ins.insertion_raw), **TOL)
    torch.testing.assert_close(faith_n.drops, faith.drops, **TOL, equal_nan=True)
    torch.testing.assert_close(faith_n.random, faith.random, **TOL)
    assert relevant_n.indices == relevant.indices


def test_methods_outside_trace_refuse_clearly(tiny_vqa, image):
    from mech_vqa.runner import ResidualCheckpoint

    inp = tiny_vqa.prepare(image, QUESTION, ANSWER)
    nns = VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="nnsight")
    hook_ids, before = hook_snapshot(tiny_vqa.model), model_state(tiny_vqa.model)
    with pytest.raises(BackendNotSupported, match="ablate / ResidualCheckpoint .* nnsight backend"):
        ResidualCheckpoint(nns, inp)  # ablate itself runs whole forwards there (test_ablate_equals_hooks)
    from mech_vqa.methods.scoring import AnswerScorer

    remote = VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="nnsight", remote="local")
    with pytest.raises(BackendNotSupported, match="AnswerScorer with gradients .* remote nnsight trace"):
        AnswerScorer(remote, inp, [1])(inp.pixel_values.float().requires_grad_(True))   # no graph comes back
    assert hook_snapshot(tiny_vqa.model) == hook_ids
    assert_same_state(before, model_state(tiny_vqa.model))


def test_nnsight_missing_or_out_of_range_is_one_clear_error(tiny_vqa, monkeypatch):
    with pytest.raises(ImportError, match=r"nnsight 0\.7\.2 is installed .* pip install 'nnsight>=0\.8\.1,<0\.9'"):
        nnsight_backend.check_nnsight_version("0.7.2")
    with pytest.raises(ImportError, match=r"nnsight 0\.9\.0 is installed"):
        nnsight_backend.check_nnsight_version("0.9.0")
    nnsight_backend.check_nnsight_version("0.8.1")
    monkeypatch.setitem(sys.modules, "nnsight", None)  # import nnsight -> ImportError
    with pytest.raises(ImportError, match=r"needs the nnsight package.*pip install 'nnsight>=0\.8\.1,<0\.9'"):
        VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="nnsight")


def test_unknown_backend_and_remote_value(tiny_vqa):
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="jax")
    with pytest.raises(ValueError, match="remote must be False .* or True"):
        VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="nnsight", remote="server")
    with pytest.raises(ValueError, match="the hooks backend takes no options"):
        VQAModel(tiny_vqa.model, tiny_vqa.processor, remote="local")


@torch.no_grad()
def test_other_trace_methods_equal_hooks(pair, inp):
    """Raw attention, the causal map and FFN neurons also go through vqa.trace / vqa.forward only."""
    from mech_vqa.methods.causal import causal_map
    from mech_vqa.methods.neurons import neuron_increase
    from mech_vqa.methods.raw_attention import raw_attention_map

    hooks, nns = pair
    torch.testing.assert_close(raw_attention_map(nns, inp).scores, raw_attention_map(hooks, inp).scores, **TOL)
    torch.testing.assert_close(causal_map(nns, inp).scores, causal_map(hooks, inp).scores, **TOL)
    got, expected = neuron_increase(nns, inp, k=3, progress=False), neuron_increase(hooks, inp, k=3, progress=False)
    torch.testing.assert_close(got.scores, expected.scores, **TOL)
    torch.testing.assert_close(got.coefficients, expected.coefficients, **TOL)


def test_cli_backend_option(tiny_vqa, tmp_path, capsys):
    """``mech-vqa run explain --backend nnsight`` writes the hooks backend's rows, and so does ``run compare
    --backend nnsight --remote local``, whose relevancy and iGOS differentiate inside the remote trace / session."""
    import json

    import numpy as np
    from PIL import Image

    from mech_vqa.cli import main
    from mech_vqa.dataset import read_results

    tiny_vqa.model.save_pretrained(tmp_path / "model")
    tiny_vqa.processor.save_pretrained(tmp_path / "model")
    Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8")).save(tmp_path / "0.png")
    row = {"image": "0.png", "question": QUESTION, "answer": ANSWER, "box": [0, 0, 24, 20]}
    (tmp_path / "data.jsonl").write_text(json.dumps(row) + "\n")
    rows = {}
    for backend in ("hooks", "nnsight"):
        out = tmp_path / f"{backend}.jsonl"
        assert main(["run", "explain", str(tmp_path / "data.jsonl"), "--out", str(out), "--model",
                     str(tmp_path / "model"), "--device", "cpu", "--backend", backend, "--no-progress"]) == 0
        (rows[backend],) = read_results(out)
    assert rows["nnsight"]["status"] == "ok"
    _assert_same_row(rows["nnsight"], rows["hooks"])   # floats nested in top_heads too, to 1e-5
    # compare runs iGOS and relevancy too, which differentiate inside the remote trace / session
    compared = {}
    for backend, extra in (("hooks", []), ("nnsight", ["--remote", "local"])):
        out = tmp_path / f"compare-{backend}.jsonl"
        assert main(["run", "compare", str(tmp_path / "data.jsonl"), "--out", str(out), "--model",
                     str(tmp_path / "model"), "--device", "cpu", "--backend", backend, *extra, "--no-progress"]) == 0
        (compared[backend],) = read_results(out)
    assert compared["nnsight"]["status"] == "ok"
    assert {"relevancy", "igos+", "igos++"} <= set(compared["hooks"]["methods"])
    _assert_same_row(compared["nnsight"], compared["hooks"])


def _assert_same_row(got, expected, where="row"):
    """Every number of a result row equal to 1e-5 (NaN to NaN), every other value equal; timings skipped."""
    if isinstance(expected, dict):
        assert set(got) == set(expected), where
        for key, value in expected.items():
            if "runtime" not in key and key != "timings":
                _assert_same_row(got[key], value, f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for index, (a, b) in enumerate(zip(got, expected)):
            _assert_same_row(a, b, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-5, nan_ok=True), where
    else:
        assert got == expected, where


def _instance_slots(model) -> dict:
    return {name: {slot: module.__dict__.get(slot) for slot in ("forward", "__nnsight__") if slot in module.__dict__}
            for name, module in model.named_modules()}


def test_nnsight_leaves_no_controller_on_the_model(tiny_mha_vqa, image):
    """nnsight installs its controller as every module's instance ``forward`` for good; the backend
    puts it there only during its own forwards, so a class-level patch still reaches the hooks backend."""
    model = tiny_mha_vqa.model
    found = _instance_slots(model)
    nns = VQAModel(model, tiny_mha_vqa.processor, backend="nnsight")
    assert _instance_slots(model) == found
    inp = nns.prepare(image, QUESTION, ANSWER)
    with nns.trace(["z"]) as cache:
        nns.forward(inp)
    assert cache["z", 0].shape[-2:] == (nns.adapter.n_heads, nns.adapter.head_dim)
    with pytest.raises(IndexError, match="outside the sequence"), nns.trace(["resid_pre"], positions=[999]):
        nns.forward(inp)
    assert _instance_slots(model) == found


@pytest.mark.parametrize("name", ["gqa", "next"])
def test_batched_explain_equals_hooks(request, name, image):
    """Left-padded batches (per-row target positions) through one nnsight trace."""
    from PIL import Image

    from mech_vqa.methods.mechanistic import explain

    hooks = request.getfixturevalue(FAMILIES[name])
    nns = VQAModel(hooks.model, hooks.processor, name=hooks.name, backend="nnsight")
    items = [hooks.prepare(image, QUESTION, ANSWER), hooks.prepare(Image.new("RGB", (40, 32), "red"), "Color?", "Red.")]
    batch = hooks.batch(items)
    assert int(batch.offsets.max()) > 0  # rows really are padded differently
    expected, got = explain(hooks, batch, heads=1, progress=False), explain(nns, batch, heads=1, progress=False)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.heads.scores, e.heads.scores, **TOL)
        torch.testing.assert_close(g.layers.attention, e.layers.attention, **TOL)
        torch.testing.assert_close(g.positions.scores, e.positions.scores, **TOL)


def test_pattern_from_a_model_that_cannot_give_it(tiny_vqa, image, monkeypatch):
    from mech_vqa.capture import CaptureError

    inp = tiny_vqa.prepare(image, QUESTION, ANSWER)
    attn = tiny_vqa.adapter.attn(0)
    original = type(attn).forward

    def no_weights(self, *args, **kwargs):
        out, _ = original(self, *args, **kwargs)
        return out, None

    monkeypatch.setattr(type(attn), "forward", no_weights)  # before wrapping: nnsight keeps the forward it finds
    nns = VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="nnsight")
    with pytest.raises(CaptureError, match="layer 0 returned no attention weights"), nns.trace(["pattern"]):
        nns.forward(inp)


@torch.no_grad()
def test_ablate_equals_hooks(pair, inp):
    """Head, block and image-token sweeps: whole forwards through nnsight vs the hooks backend's resumed layers."""
    from mech_vqa.methods.ablation import ablate, block_ablations, head_ablations, image_token_ablation

    hooks, nns = pair
    last = hooks.adapter.n_layers - 1
    image_positions = inp.geometry.positions[:3]
    ablations = (head_ablations(hooks, layers=[0, last]) + block_ablations(hooks, layers=[last])
                 + [image_token_ablation(hooks, inp, image_positions)])
    expected = ablate(hooks, inp, ablations, batch_size=4, progress=False)
    got = ablate(nns, inp, ablations, batch_size=4, progress=False)
    assert expected.delta.abs().max() > 1e-4
    torch.testing.assert_close(got.delta, expected.delta, **TOL)
    torch.testing.assert_close(got.clean_logprob, expected.clean_logprob, **TOL)
    assert torch.equal(got.ablated_argmax, expected.ablated_argmax)


def test_scores_come_back_not_activations(tiny_vqa, image):
    """Through the simulated remote call, head-level attribution returns O(layers x heads) numbers and
    explain adds only the top heads' rows; the logit lens returns its top-k and word maps."""
    from mech_vqa.methods.logit_lens import logit_lens
    from mech_vqa.methods.mechanistic import explain, head_increase

    inp = tiny_vqa.prepare(image, QUESTION, ANSWER)
    nns = VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="nnsight", remote="local")
    n_layers, n_heads = nns.adapter.n_layers, nns.adapter.n_heads
    head_increase(nns, inp)
    scores = (3 * n_layers + n_layers * n_heads + 1 + 1) * 4   # lp of every vector, the model's own log-prob
    assert nns.backend.last_saved_bytes == scores
    explain(nns, inp, heads=2, progress=False)
    assert nns.backend.last_saved_bytes == scores + 2 * 2 * 8 + 2 * 2 * inp.seq_len * 4
    lens = logit_lens(nns, inp, word="red", k=3)
    stages, patches = lens.top_ids.shape[:2]
    assert nns.backend.last_saved_bytes == stages * patches * (3 * (4 + 8) + 4)


def test_explicit_heads_scored_next_to_the_model(tiny_mistral_vqa, image):
    """Explicit (layer, head) pairs on a sliding-window layout, through the simulated remote call."""
    from mech_vqa.methods.mechanistic import explain

    hooks = tiny_mistral_vqa
    inp = hooks.prepare(image, QUESTION, ANSWER)
    nns = VQAModel(hooks.model, hooks.processor, backend="nnsight", remote="local")
    pairs = [(hooks.adapter.n_layers - 1, hooks.adapter.n_heads - 1), (0, 0)]
    expected, got = explain(hooks, inp, heads=pairs, progress=False), explain(nns, inp, heads=pairs, progress=False)
    assert got.positions.heads == expected.positions.heads == [list(p) for p in pairs]
    torch.testing.assert_close(got.positions.scores, expected.positions.scores, **TOL)
    torch.testing.assert_close(got.positions.attention, expected.positions.attention, **TOL)


@torch.no_grad()
def test_knockout_and_answer_rows_equal_hooks(pair, inp):
    """Attention knockout and the answer-row path (ablate / restore with where="answer"): the hooks backend's
    answer-row runner against whole nnsight forwards whose layers receive the blocked masks and the
    interventions cut to the answer rows, in process and through the simulated remote call."""
    from mech_vqa.methods.ablation import ablate, block_ablations, head_ablations
    from mech_vqa.methods.knockout import knockout
    from mech_vqa.runner import FullForwardAnswerRows

    hooks, nns = pair
    last = hooks.adapter.n_layers - 1
    windows = [(0, 1), (0, last + 1)]
    expected = knockout(hooks, inp, windows=windows, heads=nns.backend.remote == "local", progress=False)
    got, _ = assert_leaves_model_as_found(nns, inp, lambda x: knockout(nns, x, windows=windows,
                                                                       heads=expected.per_head, progress=False))
    assert expected.relative_change.abs().max() > 1e-4   # the knockouts did change the answer
    torch.testing.assert_close(got.knocked_logprob, expected.knocked_logprob, **TOL)
    torch.testing.assert_close(got.clean_logprob, expected.clean_logprob, **TOL)
    ablations = head_ablations(hooks, layers=[0, last]) + block_ablations(hooks, layers=[last])
    expected = ablate(hooks, inp, ablations, batch_size=4, progress=False, where="answer")
    got = ablate(nns, inp, ablations, batch_size=4, progress=False, where="answer")
    assert expected.delta.abs().max() > 1e-4
    torch.testing.assert_close(got.delta, expected.delta, **TOL)
    assert torch.equal(got.ablated_argmax, expected.ablated_argmax)
    assert isinstance(FullForwardAnswerRows(nns, inp), FullForwardAnswerRows)


@pytest.mark.parametrize("remote", [False, "local"])
def test_answer_row_patching_equals_hooks(tiny_vqa, image, remote):
    from PIL import Image

    from mech_vqa.methods.patching import PatchPair, head_restorations, mlp_restorations, restore

    pair = PatchPair(tiny_vqa.prepare(image, QUESTION, ANSWER),
                     tiny_vqa.prepare(Image.new("RGB", image.size, "red"), QUESTION, ANSWER))
    nns = VQAModel(tiny_vqa.model, tiny_vqa.processor, name=tiny_vqa.name, backend="nnsight", remote=remote)
    restorations = head_restorations(tiny_vqa) + mlp_restorations(tiny_vqa)
    expected = restore(tiny_vqa, pair, restorations, metric="logprob", where="answer")
    got = restore(nns, pair, restorations, metric="logprob", where="answer")
    assert (expected.patched - expected.patched[0]).abs().max() > 1e-4
    torch.testing.assert_close(got.patched, expected.patched, **TOL)
