import copy

import matplotlib
import pytest
import torch

from conftest import (ANSWER, QUESTION, assert_leaves_model_as_found, assert_same_state, first_view_positions, image_grid,
                      model_state)
from mech_vqa import VQAModel
from mech_vqa.build import tiny_llava
from mech_vqa.methods.relevancy import relevancy, relevancy_map, vision_layers_used
from mech_vqa.results import PatchMap, Result
from mech_vqa.results.attention import RelevancyMaps

matplotlib.use("Agg")


def reference_relevancy(vqa, inp, answer_index: int, row_normalize: bool = False):
    """Chefer's rule written out step by step on an eager deep copy: ``(R row [S], vision row [n_image])``.

    LLM attention probabilities come from ``output_attentions``; the vision tower's from plain
    hooks on its encoder layers (path written out for the tiny models' CLIP and SigLIP towers).
    """
    model = copy.deepcopy(vqa.model)
    model.set_attn_implementation("eager")
    for p in model.parameters():
        p.requires_grad_(False)
    vision_probs = []
    # no vision stage where the connector merges patches (Gemma-3's pooling, InternVL's pixel shuffle) or
    # where the ViT gives no attention probabilities (Qwen-VL)
    merged = vqa.adapter.patches_per_image_token > 1
    no_vision = merged or bool(vqa.adapter.vision_relevancy_refusal)
    handles = [] if no_vision else [layer.self_attn.register_forward_hook(lambda m, a, out: vision_probs.append(out[1]))
                                    for layer in model.model.vision_tower.encoder.layers]
    inputs = vqa.adapter.model_inputs(inp.model_inputs())
    inputs["pixel_values"] = inputs["pixel_values"].clone().requires_grad_(True)
    out = model(**inputs, output_attentions=True, use_cache=False)
    for h in handles:
        h.remove()
    seq_index = int(inp.answer_positions[answer_index])
    position, token = seq_index - 1, int(inp.input_ids[0, seq_index])
    logit = out.logits[0, position, token]
    attentions = list(out.attentions)
    grads = torch.autograd.grad(logit, attentions + vision_probs)
    llm_grads, vision_grads = grads[:len(attentions)], grads[len(attentions):]
    seq = inp.seq_len
    R = torch.eye(seq)
    for A, G in zip(attentions, llm_grads):  # layer order
        abar = (G[0] * A[0]).clamp(min=0).mean(0)
        R = R + abar @ R
    row = R[position]
    if row_normalize:
        off = row - torch.eye(seq)[position]
        row = off / off.sum() + torch.eye(seq)[position]
    if inp.pixel_values.dim() == 5 or no_vision:  # tiled (LLaVA-NeXT), merged patches or Qwen-VL: no vision stage
        return row.detach(), None
    image = (inp.input_ids[0] == model.config.image_token_id).nonzero().flatten()
    n_tokens = vision_probs[0].shape[-1]
    Rv = torch.eye(n_tokens)
    for A, G in zip(vision_probs, vision_grads):  # every layer feeds the projector (feature layer -1)
        abar = (G[0] * A[0]).clamp(min=0).mean(0)
        Rv = Rv + abar @ Rv
    cls = n_tokens - image.numel()  # CLIP's CLS (vision token 0) is dropped by LLaVA; SigLIP has none
    seed = torch.zeros(n_tokens)
    seed[cls:] = row[image]
    vision_row = seed @ Rv
    return row.detach(), vision_row[cls:].detach()


def grid(values, side=4):
    return values.view(side, side)  # the tiny models' image tokens are row-major on a 4x4 grid


@pytest.fixture
def any_prepared(any_vqa, image):
    return any_vqa.prepare(image, QUESTION, ANSWER)


@pytest.mark.parametrize("row_normalize", [False, True])
def test_relevancy_equals_step_by_step_recomputation(any_vqa, any_prepared, row_normalize):
    tiled = int(any_prepared.geometry.view.max()) > 0  # LLaVA-NeXT: no vision stage through tiles
    if tiled:
        with pytest.raises(NotImplementedError, match="one image view"):
            relevancy(any_vqa, any_prepared, [0], vision=True, progress=False)
    if any_vqa.adapter.vision_relevancy_refusal:  # Qwen-VL: its ViT gives no attention probabilities
        with pytest.raises(NotImplementedError, match="return no attention probabilities"):
            relevancy(any_vqa, any_prepared, [0], vision=True, progress=False)
        tiled = True
    merged = any_vqa.adapter.patches_per_image_token > 1  # pooling / pixel shuffle: no vision token per image token
    if merged and not tiled:
        with pytest.raises(NotImplementedError, match="merges 4 patches into each image token"):
            relevancy(any_vqa, any_prepared, [0], vision=True, progress=False)
    tiled = tiled or merged
    result = relevancy(any_vqa, any_prepared, [0, 3], vision=not tiled, row_normalize=row_normalize, progress=False)
    assert isinstance(result, RelevancyMaps)
    for column, answer_index in enumerate([0, 3]):
        row, vision_row = reference_relevancy(any_vqa, any_prepared, answer_index, row_normalize)
        torch.testing.assert_close(result.rows[column], row, rtol=1e-5, atol=1e-7)
        image = first_view_positions(any_vqa, any_prepared)
        torch.testing.assert_close(result.llm[column], row[image].view(image_grid(any_vqa, any_prepared)),
                                   rtol=1e-5, atol=1e-7)
        if not tiled:
            torch.testing.assert_close(result.vision[column], grid(vision_row), rtol=1e-5, atol=1e-7)
    # the relevancy is not just the identity: gradients did reach the image tokens
    assert float(result.llm.abs().max()) > 0
    if not tiled:
        assert float((result.vision - result.llm).abs().max()) > 0


def test_no_temperature_dependence(tiny_vqa, prepared):
    plain = relevancy(tiny_vqa, prepared, [1, 2], vision=True, progress=False)
    config = tiny_vqa.model.generation_config
    saved = copy.deepcopy(config)
    try:
        config.do_sample, config.temperature, config.top_p = True, 0.3, 0.5
        hot = relevancy(tiny_vqa, prepared, [1, 2], vision=True, progress=False)
    finally:
        tiny_vqa.model.generation_config = saved
    torch.testing.assert_close(hot.rows, plain.rows, rtol=0, atol=0)
    torch.testing.assert_close(hot.vision, plain.vision, rtol=0, atol=0)


def test_later_token_carries_no_gradient_of_earlier(tiny_vqa, prepared):
    together = relevancy(tiny_vqa, prepared, [0, 1], vision=True, progress=False)
    alone = relevancy(tiny_vqa, prepared, [1], vision=True, progress=False)
    torch.testing.assert_close(together.rows[1], alone.rows[0], rtol=0, atol=1e-8)
    torch.testing.assert_close(together.vision[1], alone.vision[0], rtol=0, atol=1e-8)
    # and the two tokens' maps do differ, so the equality above is not vacuous
    assert not torch.allclose(together.rows[0], together.rows[1])


def test_same_maps_when_the_model_computes_every_logit(tiny_vqa, prepared, monkeypatch):
    import mech_vqa.methods.relevancy as module

    sliced = relevancy(tiny_vqa, prepared, [0, 4], progress=False)
    monkeypatch.setattr(module, "logits_at", lambda vqa, positions: ({}, None))  # a forward without logits_to_keep
    full = relevancy(tiny_vqa, prepared, [0, 4], progress=False)
    torch.testing.assert_close(full.rows, sliced.rows, rtol=1e-6, atol=1e-9)


def test_vision_feature_layer_counts_layers():
    model, processor = tiny_llava(seed=2, vision_layers=3)
    model.config.vision_feature_layer = -2
    assert vision_layers_used(VQAModel(model, processor).adapter) == 2
    model.config.vision_feature_layer = 1
    assert vision_layers_used(VQAModel(model, processor).adapter) == 1
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(NotImplementedError, match="single feature layer"):
        vision_layers_used(VQAModel(model, processor).adapter)


def test_bf16_model_gives_float32_maps_close_to_fp32(tiny_vqa, prepared):
    model = copy.deepcopy(tiny_vqa.model).to(torch.bfloat16)
    half = VQAModel(model, tiny_vqa.processor)
    result = relevancy(half, prepared, [3], progress=False)
    full = relevancy(tiny_vqa, prepared, [3], progress=False)
    assert result.rows.dtype == torch.float32 and result.llm.dtype == torch.float32
    assert torch.isfinite(result.rows).all()
    # bf16 has ~3 significant digits: the maps agree in shape, not to the last bit
    cosine = torch.nn.functional.cosine_similarity(result.llm.flatten(), full.llm.flatten(), dim=0)
    assert float(cosine) > 0.95


def test_state_restored_and_hooks_removed(tiny_vqa, prepared):
    model = tiny_vqa.model
    _, before = assert_leaves_model_as_found(tiny_vqa, prepared,
                                             lambda inp: relevancy(tiny_vqa, inp, vision=True, progress=False))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(IndexError, match="the answer has 5 tokens"):
        relevancy(tiny_vqa, prepared, [5], progress=False)
    with pytest.raises(ValueError, match="stage must be"):
        relevancy_map(tiny_vqa, prepared, stage="vit")
    assert_same_state(before, model_state(model))


def test_patch_map_save_load_plot(tiny_vqa, prepared, tmp_path):
    result = relevancy(tiny_vqa, prepared, vision=True, progress=False, box=[8, 8, 24, 24])
    llm = result.patch_map([2])
    assert isinstance(llm, PatchMap) and llm.method == "relevancy_llm" and llm.box == [8.0, 8.0, 24.0, 24.0]
    torch.testing.assert_close(llm.scores, result.llm[2])
    torch.testing.assert_close(result.patch_map(stage="vision").scores, result.vision.mean(0))
    single = relevancy_map(tiny_vqa, prepared, 2, progress=False)
    torch.testing.assert_close(single.scores, result.llm[2])
    loaded = Result.load(result.save(tmp_path / "relevancy"))
    torch.testing.assert_close(loaded.vision, result.vision)
    fig, axes = result.plot(stage="vision")
    assert len(axes) == 5
    assert result.topk(4).shape[0] == 4
    no_vision = relevancy(tiny_vqa, prepared, [0], progress=False)
    with pytest.raises(ValueError, match="vision=True"):
        no_vision.patch_map(stage="vision")


def _answer_word_index(inp, word: str) -> int:
    tokens = [inp.str_tokens[i] for i in inp.answer_positions.tolist()]
    return max(i for i, t in enumerate(tokens) if t == word)


def test_organism_relevancy_localisation(organism_vqa):
    """Relevancy of the answer word, on every question of a small set, against the answer box."""
    from mech_vqa.organism import generate_items

    items = generate_items(10, seed=11)
    llm, vision, hits, uniform = [], [], [], []
    for item in items:
        inp = organism_vqa.prepare(item.image, item.question, item.answer)
        result = relevancy(organism_vqa, inp, _answer_word_index(inp, item.answer_word), vision=True,
                           progress=False, box=item.box)
        llm_map = result.patch_map()
        llm.append(llm_map.in_box_share())
        hits.append(llm_map.pointing_game())
        vision.append(result.patch_map(stage="vision").in_box_share())
        uniform.append(float(llm_map.inside_box().float().mean()))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"relevancy: LLM in-box share {mean(llm):.3f}, pointing game {mean(hits):.2f}, vision-stage in-box "
          f"share {mean(vision):.3f}, uniform share {mean(uniform):.3f}")
    assert mean(llm) > mean(uniform)
    assert mean(hits) > 2 * mean(uniform)  # the peak cell lands on the object far above chance
