"""Logit lens of the visual tokens."""

import copy

import pytest
import torch

from conftest import assert_same_state, first_view_positions, hook_snapshot, image_grid, model_state, text_model
from mech_vqa import VQAModel
from mech_vqa.methods.logit_lens import logit_lens
from mech_vqa.results import PatchMap, Result


@pytest.fixture
def inp(any_vqa, image):
    return any_vqa.prepare(image, "What is the color of the dog?", "The dog is red.")


@torch.no_grad()
def test_last_layer_equals_model_logits(any_vqa, inp):
    lens = logit_lens(any_vqa, inp, word="red", k=4, chunk_elements=200)  # many small vocabulary chunks
    log_probs = any_vqa.logits(inp)[0, first_view_positions(any_vqa, inp)].float().log_softmax(-1)  # [n_img, V]
    top = log_probs.topk(4, dim=-1)
    assert torch.equal(lens.top_ids[-1], top.indices)
    torch.testing.assert_close(lens.top_probs[-1], top.values.exp(), rtol=1e-4, atol=1e-6)
    red = any_vqa.tokenizer.convert_tokens_to_ids("red")
    torch.testing.assert_close(lens.word_probs[-1], log_probs[:, red].exp(), rtol=1e-4, atol=1e-6)
    assert lens.top_tokens[-1][0] == any_vqa.to_str_tokens(top.indices[0])
    # the word map of the last layer, on the grid (row-major image tokens)
    rows, cols = image_grid(any_vqa, inp)
    word_map = lens.patch_map(layer=-1)
    assert isinstance(word_map, PatchMap)
    torch.testing.assert_close(word_map.scores, log_probs[:, red].exp().view(rows, cols), rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_every_stage_equals_hand_norm(any_vqa, inp):
    a, model = any_vqa.adapter, any_vqa.model
    with any_vqa.trace(["projector_out", "resid_pre", "resid_post"]) as c:
        any_vqa.forward(inp)
    # the projector rows of the whole-image view (first, or after the tiles for InternVL / Idefics3); after
    # layer l: what layer l + 1 reads (Qwen3-VL's DeepStack adds to a layer's output before that), and the
    # last layer's output
    image = first_view_positions(any_vqa, inp)
    whole = -1 if any_vqa.adapter.patch_grid is not None and image[-1] == (
        inp.input_ids[0] == a.image_token_id).nonzero().max() else 0
    stages = ([c["projector_out"][whole]] + [c["resid_pre", l][0, image] for l in range(1, a.n_layers)]
              + [c["resid_post", a.n_layers - 1][0, image]])
    lens = logit_lens(any_vqa, inp, word="dog", k=3)
    assert lens.top_ids.shape == (a.n_layers + 1, len(first_view_positions(any_vqa, inp)), 3)
    dog = any_vqa.tokenizer.convert_tokens_to_ids("dog")
    for stage, resid in enumerate(stages):
        probs = model.lm_head(text_model(model).norm(resid)).float().softmax(-1)  # the model's own norm
        torch.testing.assert_close(lens.word_probs[stage], probs[:, dog], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lens.top_probs[stage], probs.topk(3, dim=-1).values, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lens.patch_map("input").scores.flatten(), lens.word_probs[0])


# Measured max |half - float32| word probability: 9e-6 (fp16), 9e-5 (bf16); probabilities ~0.03.
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-5), (torch.bfloat16, 5e-4)])
def test_half_precision_is_finite(tiny_vqa, image, dtype, tol):
    half = VQAModel(copy.deepcopy(tiny_vqa.model).to(dtype), tiny_vqa.processor)
    inp = half.prepare(image, "What is the color of the dog?", "The dog is red.")
    lens = logit_lens(half, inp, word="red")
    assert lens.top_probs.dtype == torch.float32 and torch.isfinite(lens.top_probs).all()
    assert torch.isfinite(lens.word_probs).all()
    reference = logit_lens(tiny_vqa, inp, word="red")
    torch.testing.assert_close(lens.word_probs, reference.word_probs, rtol=0, atol=tol)


def test_errors_state_save_plot(tiny_vqa, prepared, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    tiny_vqa.logits(prepared)  # HF adds its own hooks on a model's first forward: snapshot after one
    before, hooks = model_state(tiny_vqa.model), hook_snapshot(tiny_vqa.model)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        logit_lens(tiny_vqa, prepared, word="zebra")
    with pytest.raises(ValueError, match="2 tokens"):
        logit_lens(tiny_vqa, prepared, word="red dog")
    with pytest.raises(IndexError, match="outside the vocabulary"):
        logit_lens(tiny_vqa, prepared, word=10 ** 6)
    lens = logit_lens(tiny_vqa, prepared, k=2)
    with pytest.raises(ValueError, match="without a word"):
        lens.patch_map()
    with pytest.raises(IndexError, match="out of range"):
        lens.stage(5)
    assert_same_state(before, model_state(tiny_vqa.model))
    assert hook_snapshot(tiny_vqa.model) == hooks
    lens = logit_lens(tiny_vqa, prepared, word="red", k=2)
    loaded = Result.load(lens.save(tmp_path / "lens"))
    torch.testing.assert_close(loaded.word_probs, lens.word_probs)
    assert loaded.top_tokens == lens.top_tokens
    n_img = len(prepared.image_positions)
    assert len(lens.to_dataframe()) == (tiny_vqa.adapter.n_layers + 1) * n_img * 2
    assert lens.topk(3)["prob"].is_monotonic_decreasing
    fig, _ = lens.plot(layer=0)
    fig2, _ = lens.patch_map(layer=1).plot()
    import matplotlib.pyplot as plt

    plt.close("all")
