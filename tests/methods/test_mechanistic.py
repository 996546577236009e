"""Mechanistic layer / head / position increases (Yu & Ananiadou 2024) against hand computations."""

import copy

import pytest
import torch

from conftest import (assert_same_state, first_view_positions, hook_snapshot, image_grid, model_state, post_norm_factor,
                      text_model)
from mech_vqa import VQAModel
from mech_vqa.hooks import TAP_ATTENTION
from mech_vqa.inputs import Target
from mech_vqa.methods.logprob import FrozenNormScorer
from mech_vqa.methods.mechanistic import (
    capture_target, explain, head_increase, head_positions, head_vectors, layer_and_head_increase, layer_increase,
    position_increase,
)
from mech_vqa.results import Result
from mech_vqa.results.mechanistic import Explanation

HEADS = [(1, 1), (0, 2)]  # GQA groups: head // 2 differs from head % 2


@pytest.fixture
def inp(any_vqa, image):
    return any_vqa.prepare(image, "What is the color of the dog?", "The dog is red.")


class HandScorer:
    """lp(v) written from the raw modules in float64, no chunking, no shared code."""

    def __init__(self, model, final_r, token_id):
        norm = text_model(model).norm
        # gain * frozen scale, elementwise, from the model's own norm at r (Llama: w; Gemma: 1 + w)
        self.gain_scale = norm(final_r[None])[0].double() / final_r.double()
        self.W_U = model.lm_head.weight.double()
        self.token_id = token_id

    def __call__(self, v):
        return float((self.W_U @ (self.gain_scale * v.double())).log_softmax(-1)[self.token_id])


@torch.no_grad()
def hand_attributions(vqa, inp, target, heads):
    """Capture the full raw tensors (eager pattern) and compute the formulas with loops."""
    model, a = vqa.model, vqa.adapter
    n_layers, n_heads, hd = a.n_layers, a.n_heads, a.head_dim
    group = n_heads // a.n_kv_heads
    with vqa.trace(["resid_pre", "attn_out", "mlp_out", "z", "v", "pattern", "resid_post"]) as c:
        vqa.forward(inp)
    t = target.position
    lp = HandScorer(model, c["resid_post", n_layers - 1][0, t], target.token_id)
    attn, mlp, head = torch.zeros(n_layers), torch.zeros(n_layers), torch.zeros(n_layers, n_heads)
    for layer in range(n_layers):
        x = c["resid_pre", layer][0, t].double()
        a_l, m_l = c["attn_out", layer][0, t].double(), c["mlp_out", layer][0, t].double()
        attn[layer] = lp(x + a_l) - lp(x)
        mlp[layer] = lp(x + a_l + m_l) - lp(x + a_l)
        weight = text_model(model).layers[layer].self_attn.o_proj.weight.double()  # [d, H*hd]
        # Gemma-3: the post-attention norm, its scale frozen at the forward's raw output (else ones)
        factor = post_norm_factor(vqa, layer, "attn", a.o_proj(layer)(c["z", layer][0, t].flatten()))
        for j in range(n_heads):
            h = factor * (weight[:, j * hd:(j + 1) * hd] @ c["z", layer][0, t, j].double())
            head[layer, j] = lp(x + h) - lp(x)
    positions = torch.zeros(len(heads), inp.seq_len)
    for i, (layer, j) in enumerate(heads):
        x = c["resid_pre", layer][0, t].double()
        w_o = text_model(model).layers[layer].self_attn.o_proj.weight.double()[:, j * hd:(j + 1) * hd]
        factor = post_norm_factor(vqa, layer, "attn", a.o_proj(layer)(c["z", layer][0, t].flatten()))
        for p in range(inp.seq_len):
            weight = c["pattern", layer][0, j, t, p].double()
            h = factor * weight * (w_o @ c["v", layer][0, p, j // group].double())
            positions[i, p] = lp(x + h) - lp(x)
    final = lp(c["resid_post", n_layers - 1][0, t])
    return attn, mlp, head, positions, final


@pytest.mark.parametrize("chunk_elements", [1 << 22, 64])  # 64: many tiny vocabulary chunks
def test_increases_equal_hand_computation(any_vqa, inp, chunk_elements):
    target = inp.target(2)  # teacher-forced answer token, not at the last position
    assert target.position < inp.seq_len - 2
    attn, mlp, head, positions, final = hand_attributions(any_vqa, inp, target, HEADS)
    result = explain(any_vqa, inp, target, heads=HEADS, chunk_elements=chunk_elements)
    tol = {"rtol": 1e-4, "atol": 2e-5}
    torch.testing.assert_close(result.layers.attention, attn, **tol)
    torch.testing.assert_close(result.layers.mlp, mlp, **tol)
    torch.testing.assert_close(result.heads.scores, head, **tol)
    torch.testing.assert_close(result.positions.scores, positions, **tol)
    assert result.layers.final_logprob == pytest.approx(final, abs=2e-5)
    # the frozen norm reproduces the model's own log-prob at the real last-layer output
    assert result.layers.model_logprob == pytest.approx(final, abs=2e-5)
    # image map: sum of the two heads' increases at the image positions, row-major on the grid
    rows, cols = image_grid(any_vqa, inp)
    expected_map = positions[:, first_view_positions(any_vqa, inp)].sum(0).view(rows, cols)
    torch.testing.assert_close(result.patch_map.scores, expected_map, **tol)
    assert result.target == target.to_dict()


@torch.no_grad()
def test_decompositions_sum(any_vqa, inp):
    a = any_vqa.adapter
    target = inp.target(1)
    capture = capture_target(any_vqa, inp, target)
    heads = head_vectors(capture)  # [1, L, H, d]
    # added into a given buffer: also one whose layer and head axes are not one view (laid out [B, H, L, d])
    buffer = torch.ones(1, a.n_heads, a.n_layers, a.d_model).transpose(1, 2)
    torch.testing.assert_close(head_vectors(capture, out=buffer), heads + 1, rtol=0, atol=1e-6)
    torch.testing.assert_close(buffer, heads + 1, rtol=0, atol=1e-6)
    for layer in range(a.n_layers):
        bias = a.b_O(layer) if a.b_O(layer) is not None else 0
        torch.testing.assert_close(heads[0, layer].sum(0) + bias, capture.attn_out[0, layer], rtol=1e-5, atol=1e-6)
    # sum over source positions of A[t, p] v[p] W_O[j] equals the head's output h_lj
    group = a.n_heads // a.n_kv_heads
    pairs = [(layer, j) for layer in range(a.n_layers) for j in range(a.n_heads)]
    result = head_positions(any_vqa, inp, pairs, target)
    for i, (layer, j) in enumerate(pairs):
        per_position = result.attention[i].unsqueeze(1) * capture.v[layer][0, :, j // group]  # [S, hd]
        factor = post_norm_factor(any_vqa, layer, "attn", a.o_proj(layer)(capture.z[0, layer].flatten())).float()
        summed = factor * (per_position.sum(0) @ a.W_O(layer)[j])
        torch.testing.assert_close(summed, heads[0, layer, j], rtol=1e-5, atol=1e-6)
        assert result.attention[i, target.position + 1:].abs().max() == 0  # causal
    # lp of the last layer's output through the frozen norm = the model's log-softmax at t
    logits = any_vqa.logits(inp)[0, target.position].float()
    expected = logits.log_softmax(-1)[target.token_id]
    scorer = FrozenNormScorer(a, capture.final, [target.token_id])
    assert float(scorer.log_prob(capture.final.unsqueeze(1))[0, 0]) == pytest.approx(float(expected), abs=1e-5)


def test_gemma3_image_position_targets_read_the_whole_image(tiny_gemma3_vqa, image):
    """Explained at an image position (the next patch's token as target), a Gemma-3 head's position-level
    attention is its eager row there, later patches of the image included, and the increases equal the
    hand computation from the eager pattern; a causal rebuild (image blocks dropped) fails both."""
    vqa = tiny_gemma3_vqa
    inp = vqa.prepare(image, "What is the dog?", "red")
    positions = inp.geometry.positions
    target = inp.target(position=int(positions[3]))
    _, _, head, hand_positions, _ = hand_attributions(vqa, inp, target, HEADS)
    result = explain(vqa, inp, target, heads=HEADS)
    tol = {"rtol": 1e-4, "atol": 2e-5}
    torch.testing.assert_close(result.heads.scores, head, **tol)
    torch.testing.assert_close(result.positions.scores, hand_positions, **tol)
    with torch.no_grad(), vqa.trace(["pattern"], layers=[0, 1]) as cache:
        vqa.forward(inp)
    eager = torch.stack([cache["pattern", layer][0, j, target.position] for layer, j in HEADS]).float()   # [2, S]
    assert float(eager[:, positions[4:]].sum(-1).min()) > 0                    # later patches are read
    torch.testing.assert_close(result.positions.attention, eager, rtol=1e-5, atol=1e-6)
    longer = vqa.prepare(image, "What is the color of the dog?", "The dog is red.")
    batch = vqa.batch([longer, inp])
    assert int(batch.offsets[1]) > 0                                           # left padding moves the image block
    batched = explain(vqa, batch, [longer.target(), target], heads=HEADS)[1]
    torch.testing.assert_close(batched.positions.scores, result.positions.scores, **tol)


def test_single_level_helpers_match_explain(tiny_vqa, prepared):
    full = explain(tiny_vqa, prepared, heads=2)
    torch.testing.assert_close(head_increase(tiny_vqa, prepared).scores, full.heads.scores)
    torch.testing.assert_close(layer_increase(tiny_vqa, prepared).attention, full.layers.attention)
    assert [tuple(h) for h in full.positions.heads] == full.heads.top_heads(2)
    assert full.heads.scores.flatten().topk(2).values.min() >= full.heads.scores.flatten().kthvalue(
        full.heads.scores.numel() - 1).values
    # "top" = the single best head, the paper's choice
    top = explain(tiny_vqa, prepared)
    assert [tuple(h) for h in top.positions.heads] == [full.heads.top_heads(1)[0]]


def test_batch_rows_equal_single_runs(tiny_vqa, image):
    items = [tiny_vqa.prepare(image, "What is the color of the dog?", "The dog is red."),
             tiny_vqa.prepare(image, "What is the shape of the big object?", "It is a circle.")]
    assert items[0].seq_len != items[1].seq_len  # rows really are padded
    targets = [items[0].target(2), items[1].target()]
    batch = tiny_vqa.batch(items)
    batched = explain(tiny_vqa, batch, targets, heads="top", neurons=[1], progress=False)
    assert isinstance(batched, list) and len(batched) == 2
    for item, target, got in zip(items, targets, batched):
        single = explain(tiny_vqa, item, target, heads="top", neurons=[1], progress=False)
        tol = {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(got.heads.scores, single.heads.scores, **tol)
        torch.testing.assert_close(got.layers.attention, single.layers.attention, **tol)
        torch.testing.assert_close(got.layers.mlp, single.layers.mlp, **tol)
        assert got.positions.heads == single.positions.heads
        assert got.positions.scores.shape == (1, item.seq_len)
        torch.testing.assert_close(got.positions.scores, single.positions.scores, **tol)
        torch.testing.assert_close(got.patch_map.scores, single.patch_map.scores, **tol)
        torch.testing.assert_close(got.neurons.scores, single.neurons.scores, **tol)
        assert got.target == target.to_dict()


# Measured max |half - float32| over every score: 4e-5 (fp16), 5e-4 (bf16); scores reach 0.2.
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-4), (torch.bfloat16, 2e-3)])
def test_half_precision(tiny_vqa, image, dtype, tol):
    half = VQAModel(copy.deepcopy(tiny_vqa.model).to(dtype), tiny_vqa.processor, name="tiny-half")
    inp = half.prepare(image, "What is the color of the dog?", "The dog is red.")
    result = explain(half, inp, heads=2, neurons=True, progress=False)
    reference = explain(tiny_vqa, inp, heads=result.positions.heads, neurons=True, progress=False)
    for part in ("layers.attention", "layers.mlp", "heads.scores", "positions.scores", "neurons.scores"):
        section, field = part.split(".")
        got, ref = (getattr(getattr(r, section), field) for r in (result, reference))
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        # half-precision activations, float32 scoring: close to the float32 model
        torch.testing.assert_close(got, ref, rtol=0, atol=tol)
    assert result.layers.final_logprob == pytest.approx(result.layers.model_logprob, abs=tol)


def test_clear_errors(tiny_vqa, prepared):
    t = prepared.target().position
    with pytest.raises(IndexError, match="outside the vocabulary"):
        explain(tiny_vqa, prepared, Target(tiny_vqa.adapter.vocab_size, t))
    with pytest.raises(IndexError, match="outside the vocabulary"):
        explain(tiny_vqa, prepared, Target(-1, t))
    with pytest.raises(ValueError, match="head set is empty"):
        explain(tiny_vqa, prepared, heads=[])
    with pytest.raises(ValueError, match="head set is empty"):
        explain(tiny_vqa, prepared, heads=0)
    with pytest.raises(ValueError, match="heads must be 'top'"):
        explain(tiny_vqa, prepared, heads="best")
    with pytest.raises(ValueError, match="top heads asked"):
        explain(tiny_vqa, prepared, heads=99)
    with pytest.raises(IndexError, match="head 4 is out of range"):
        explain(tiny_vqa, prepared, heads=[(0, 4)])
    with pytest.raises(IndexError, match="layer 7 is out of range"):
        head_positions(tiny_vqa, prepared, [(7, 0)])
    with pytest.raises(IndexError, match="outside the sequence"):
        explain(tiny_vqa, prepared, Target(3, prepared.seq_len + 5))
    with pytest.raises(ValueError, match="one target per row"):
        explain(tiny_vqa, tiny_vqa.batch([prepared, prepared]), [prepared.target()])


def test_one_forward_no_eager_and_model_left_as_found(tiny_vqa, prepared):
    tiny_vqa.logits(prepared)  # HF adds its own hooks on a model's first forward: snapshot after one
    before, hooks = model_state(tiny_vqa.model), hook_snapshot(tiny_vqa.model)
    seen = []
    handle = tiny_vqa.adapter.layer(0).register_forward_pre_hook(
        lambda module, args: seen.append(tiny_vqa.model.config.text_config._attn_implementation))
    try:
        explain(tiny_vqa, prepared, heads=2, neurons=True, progress=False)
    finally:
        handle.remove()
    # one forward, in sdpa attention through the capture's taps (never eager), put back afterwards
    assert before["text_attn"] == "sdpa" and seen == [TAP_ATTENTION]
    with pytest.raises(IndexError):
        explain(tiny_vqa, prepared, Target(10 ** 6, 3))
    assert_same_state(before, model_state(tiny_vqa.model))
    assert hook_snapshot(tiny_vqa.model) == hooks


def test_results_save_load_plot(tiny_vqa, prepared, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    result = explain(tiny_vqa, prepared, heads=2, neurons=True, k=3, progress=False, box=[0, 0, 16, 16])
    path = result.save(tmp_path / "explanation")
    loaded = Explanation.load(path)
    torch.testing.assert_close(loaded.heads.scores, result.heads.scores)
    torch.testing.assert_close(loaded.positions.scores, result.positions.scores)
    torch.testing.assert_close(loaded.patch_map.scores, result.patch_map.scores)
    torch.testing.assert_close(loaded.neurons.scores, result.neurons.scores)
    assert loaded.heads.target == result.heads.target and loaded.heads.prompt == prepared.prompt
    assert loaded.patch_map.box == [0, 0, 16, 16]
    part = Result.load(tmp_path / "explanation.layers")
    torch.testing.assert_close(part.mlp, result.layers.mlp)
    top = result.heads.topk(3)
    assert list(top["increase"]) == sorted(result.heads.scores.flatten().tolist(), reverse=True)[:3]
    assert len(result.to_dataframe()) == 2 * 2 + 2 * 4 + 2 * 3
    for part in (result.layers, result.heads, result.positions, result.neurons, result.patch_map, result):
        fig, _ = part.plot()
        assert fig is not None
    import matplotlib.pyplot as plt

    plt.close("all")


# Measured on the shipped organism (data/organism as of 11:26 on 2026-11-23: 8x8 grid, held-out
# accuracy 0.99): the top head's map peaks inside the answer box on 15/20 of these items (0.73 and
# 0.77 over 100 items of seeds 4242 and 99); chance (share of cells inside the box) is 0.13. 0.6 keeps
# three items of margin and is > 4x chance. The misses are colour questions whose top head (L0H2)
# reads text, not the image (all its positive increase sits on text positions); the sum of the top 3
# heads' maps hits 19/20. Re-measure when data/organism is retrained.
ORGANISM_POINTING_THRESHOLD = 0.6


def test_organism_top_head_points_into_the_box(organism_vqa):
    """The position-level map of the top head peaks inside the answer object's box on most items."""
    from mech_vqa.organism import generate_items

    hits, chance = [], []
    for item in generate_items(20, seed=4242, min_objects=2):
        inp = organism_vqa.prepare(item.image, item.question, item.answer)
        target = inp.target(-1)  # the answer word, teacher-forced
        assert target.token.lower() == item.answer_word
        result = explain(organism_vqa, inp, target, heads="top", box=list(item.box), progress=False)
        hits.append(result.patch_map.pointing_game())
        chance.append(float(result.patch_map.inside_box().float().mean()))
    # a constant map (pointing None: uninformative) is no hit; it counts against the method here
    rate, chance = sum(hit or 0.0 for hit in hits) / len(hits), sum(chance) / len(chance)
    assert rate >= ORGANISM_POINTING_THRESHOLD and rate > 3 * chance, (rate, chance)


class LayerNormAdapter:
    """The four things the scorer reads from an adapter, for a LayerNorm model with an unembedding bias."""

    def __init__(self, d=12, vocab=50):
        torch.manual_seed(1)
        self.norm = torch.nn.LayerNorm(d, eps=1e-5)
        torch.nn.init.normal_(self.norm.weight)
        torch.nn.init.normal_(self.norm.bias)
        self.unembed = torch.nn.Linear(d, vocab, bias=True)
        self.d_model, self.vocab_size, self.device = d, vocab, torch.device("cpu")

    def final_norm_params(self):
        return {"kind": "layer", "weight": self.norm.weight, "bias": self.norm.bias, "eps": self.norm.eps}


@torch.no_grad()
@pytest.mark.parametrize("route", ["direct", "linear"])
@pytest.mark.parametrize("chunk_elements", [1 << 20, 7])
def test_scorer_layer_norm_bias_and_linearity(chunk_elements, route, monkeypatch):
    from mech_vqa.backends import nnsight_ops

    if route == "linear":  # what larger models take: the basis through the unembedding
        monkeypatch.setattr(nnsight_ops, "DIRECT_SLACK", -(1 << 40))
    assert nnsight_ops.use_direct_route(2, 4, 3, 12, 50) == (route == "direct")
    a = LayerNormAdapter()
    final = torch.randn(2, a.d_model) * 3 + 1
    targets = [4, 41]
    scorer = FrozenNormScorer(a, final, targets, chunk_elements=chunk_elements)
    # at the real output the frozen norm is the real norm
    real = a.unembed(a.norm(final)).log_softmax(-1)[[0, 1], targets]
    torch.testing.assert_close(scorer.log_prob(final.unsqueeze(1))[:, 0], real, rtol=1e-5, atol=1e-5)
    # anywhere else: mean and scale frozen at the real output, by hand in float64
    vectors = torch.randn(2, 5, a.d_model)
    for b in range(2):
        r = final[b].double()
        mu, s = r.mean(), 1 / torch.sqrt(r.var(unbiased=False) + a.norm.eps)
        for n in range(5):
            normed = (vectors[b, n].double() - mu) * s * a.norm.weight.double() + a.norm.bias.double()
            logits = a.unembed.weight.double() @ normed + a.unembed.bias.double()
            expected = float(logits.log_softmax(-1)[targets[b]])
            assert float(scorer.log_prob(vectors)[b, n]) == pytest.approx(expected, abs=1e-5)
    # the low-rank and per-column paths equal dense scoring of the same vectors
    base, basis, coefficients = torch.randn(2, a.d_model), torch.randn(3, a.d_model), torch.randn(2, 4, 3)
    lp, lp_base = scorer.log_prob_in_basis(base, coefficients, basis)
    torch.testing.assert_close(lp, scorer.log_prob(base.unsqueeze(1) + coefficients @ basis), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp_base, scorer.log_prob(base.unsqueeze(1))[:, 0], rtol=1e-5, atol=1e-5)
    zero = scorer.log_prob_in_basis(base, torch.zeros(2, 1, 3), basis)  # no contribution: exactly no increase
    assert torch.equal(zero[0][:, 0], zero[1])
    directions, scale = torch.randn(a.d_model, 6), torch.randn(2, 6)
    lp, _ = scorer.log_prob_along_columns(base, scale, directions)
    dense = base.unsqueeze(1) + scale.unsqueeze(2) * directions.T.unsqueeze(0)
    torch.testing.assert_close(lp, scorer.log_prob(dense), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_scorer_survives_logit_range_beyond_float32_exp():
    """A later vocabulary chunk far above the running logsumexp (exp overflow) is redone exactly."""
    a = LayerNormAdapter()
    a.unembed.weight[30:] *= 400  # logits of tokens 30.. reach thousands
    final = torch.randn(1, a.d_model)
    vectors = torch.randn(1, 3, a.d_model)
    scorer = FrozenNormScorer(a, final, [35], chunk_elements=3 * 10)  # chunks of 10 tokens
    r = final[0].double()
    mu, s = r.mean(), 1 / torch.sqrt(r.var(unbiased=False) + a.norm.eps)
    normed = (vectors[0].double() - mu) * s * a.norm.weight.double() + a.norm.bias.double()
    logits = normed @ a.unembed.weight.double().T + a.unembed.bias.double()
    assert float(logits[:, 30:].max() - logits[:, :10].logsumexp(-1).max()) > 100
    expected = logits.log_softmax(-1)[:, 35]
    got = scorer.log_prob(vectors)[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-3)


def test_keys_and_values_are_kept_only_where_position_maps_need_them(tiny_vqa, prepared):
    full = capture_target(tiny_vqa, prepared)
    lean = capture_target(tiny_vqa, prepared, kv_layers=None)
    one = capture_target(tiny_vqa, prepared, kv_layers=[1])
    assert all(k is not None for k in full.k) and all(k is None for k in lean.k + lean.v)
    assert one.k[0] is None and torch.equal(one.k[1], full.k[1]) and torch.equal(one.v[1], full.v[1])
    # head level needs none of them: identical scores
    torch.testing.assert_close(layer_and_head_increase(lean)[1][0].scores, layer_and_head_increase(full)[1][0].scores,
                               rtol=0, atol=0)
    torch.testing.assert_close(position_increase(one, [(1, 2)])[0].scores, position_increase(full, [(1, 2)])[0].scores,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="layer 0's keys and values were not captured"):
        position_increase(one, [(0, 1)])


def test_explain_equals_the_llava_mechanism_notebooks_algorithm(tiny_mha_vqa, image):
    """benchmarks/reference_mechanism.py (the published algorithm: per-layer heads through the frozen
    norm and unembedding in one product, log-softmax, the top head's positions in one product) and
    explain give the same layer, head and position increases on the same prompt and target."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from reference_mechanism import ReferenceMechanism, check_same, prompt_and_target

    reference = ReferenceMechanism(tiny_mha_vqa)
    inp, target = prompt_and_target(tiny_mha_vqa, reference, image)
    diffs = check_same(tiny_mha_vqa, reference, inp, target)  # raises when they disagree
    assert max(diffs.values()) < 1e-5


def test_explain_returns_ordinary_tensors_though_it_scores_in_inference_mode(tiny_vqa, prepared):
    """explain runs its forward and scoring in the backend's read-only (inference) mode; what it
    returns must still take in-place edits and autograd like any tensor."""
    import dataclasses

    from mech_vqa.results.base import Result

    def tensors(value):
        if isinstance(value, Result):
            for field in dataclasses.fields(value):
                yield from tensors(getattr(value, field.name))
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from tensors(item)
        elif torch.is_tensor(value):
            yield value

    for neurons in (False, True):
        exp = explain(tiny_vqa, prepared, prepared.target(), neurons=neurons, progress=False)
        found = list(tensors(exp))
        assert len(found) >= 10
        assert not [t.shape for t in found if t.is_inference()]
        exp.heads.scores.add_(0.0)  # an in-place edit works


@torch.no_grad()
def test_weight_edits_between_calls_are_seen(tiny_vqa, image):
    """``explain`` keeps a small model's W_O stacked between calls: an in-place edit of o_proj (an ablation),
    a new tensor in its place or a move to another dtype is seen by the next call, as by a fresh model."""
    vqa = VQAModel(copy.deepcopy(tiny_vqa.model), tiny_vqa.processor, name="tiny-edited")
    inp = vqa.prepare(image, "What is the color of the dog?", "The dog is red.")
    before = explain(vqa, inp, heads=[(1, 0)], progress=False).heads.scores
    o_proj = vqa.adapter.o_proj(1)
    hd = vqa.adapter.head_dim
    o_proj.weight[:, :hd].zero_()  # head 0 of layer 1 now writes nothing
    edited = explain(vqa, inp, heads=[(1, 0)], progress=False).heads.scores
    assert edited[1, 0] == 0 and before[1, 0] != 0
    o_proj.weight = torch.nn.Parameter(o_proj.weight * 2)  # a new tensor in its place
    fresh = VQAModel(copy.deepcopy(vqa.model), vqa.processor, name="tiny-fresh")
    torch.testing.assert_close(explain(vqa, inp, heads=[(1, 0)], progress=False).heads.scores,
                               explain(fresh, inp, heads=[(1, 0)], progress=False).heads.scores, rtol=0, atol=0)
    vqa.model.half()  # .to() swaps every parameter's storage (rounded values), the Parameter objects stay
    halved = VQAModel(copy.deepcopy(vqa.model), vqa.processor, name="tiny-half")
    torch.testing.assert_close(explain(vqa, inp, heads=[(1, 0)], progress=False).heads.scores,
                               explain(halved, inp, heads=[(1, 0)], progress=False).heads.scores, rtol=0, atol=0)
