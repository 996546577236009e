import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from mech_vqa import AdapterError, get_adapter
from mech_vqa.build import llava_config, random_llava, tiny_llava, word_level_tokenizer


def test_dimensions_and_modules(tiny_vqa):
    a = tiny_vqa.adapter
    assert (a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.d_model) == (2, 4, 2, 16, 64)
    assert a.layer(1) is tiny_vqa.model.model.language_model.layers[1]
    assert a.o_proj(0) is tiny_vqa.model.model.language_model.layers[0].self_attn.o_proj
    assert a.final_norm is tiny_vqa.model.model.language_model.norm
    assert a.unembed is tiny_vqa.model.lm_head
    assert a.projector is tiny_vqa.model.model.multi_modal_projector
    assert a.W_O(0).shape == (4, 16, 64)
    norm = a.final_norm_params()
    assert norm["kind"] == "rms" and norm["weight"].shape == (64,) and norm["eps"] > 0
    assert a.patch_grid == (4, 4) and a.tokens_per_image() == 16


def test_w_o_reassembles_o_proj(tiny_vqa):
    a = tiny_vqa.adapter
    z = torch.randn(3, a.n_heads * a.head_dim)
    per_head = torch.einsum("bhd,hdm->bm", z.view(3, a.n_heads, a.head_dim), a.W_O(1))
    torch.testing.assert_close(per_head, a.o_proj(1)(z))


def test_geometry(prepared, tiny_vqa):
    g = prepared.geometry
    assert g.grid == (4, 4) and g.image_size == (32, 32)
    ids = prepared.input_ids[0]
    assert (ids[g.positions] == tiny_vqa.adapter.image_token_id).all()
    assert (ids == tiny_vqa.adapter.image_token_id).sum() == g.n_tokens == 16
    # row-major grid, 8-pixel boxes
    assert g.rowcol[5].tolist() == [1, 1]
    assert g.boxes[5].tolist() == [8.0, 8.0, 16.0, 16.0]
    grid = g.to_grid(torch.arange(16.0))
    assert grid[1, 2] == 6
    with pytest.raises(ValueError, match="one per image token"):
        g.to_grid(torch.zeros(5))


def test_unknown_model_class_is_one_clear_error():
    with pytest.raises(AdapterError, match="no mech_vqa adapter knows Linear"):
        get_adapter(nn.Linear(2, 2))


def test_layer_out_of_range(tiny_vqa):
    with pytest.raises(IndexError, match="layer 7 is out of range"):
        tiny_vqa.adapter.layer(7)
    with pytest.raises(IndexError, match="head 9 is out of range"):
        tiny_vqa.adapter.check_head(9)


def test_prompt_without_image_token(tiny_vqa):
    ids = torch.tensor([5, 6, 7])
    with pytest.raises(AdapterError, match="no image token"):
        tiny_vqa.adapter.image_geometry(ids)


def test_image_tokens_not_matching_features(tiny_vqa):
    image_id = tiny_vqa.adapter.image_token_id
    ids = torch.tensor([5] + [image_id] * 7 + [6])
    with pytest.raises(AdapterError, match="7 image tokens but each image gives 16"):
        tiny_vqa.adapter.image_geometry(ids)


def test_full_feature_strategy_skips_cls():
    tokenizer = word_level_tokenizer(["dog"])
    config = llava_config(tokenizer, image_size=32, patch_size=8)
    config.vision_feature_select_strategy = "full"
    adapter = get_adapter(random_llava(config))
    image_id = adapter.image_token_id
    geometry = adapter.image_geometry(torch.tensor([1] + [image_id] * 17 + [2]))
    assert geometry.positions.tolist() == list(range(2, 18))


def test_siglip_tower_has_no_class_token(tiny_qwen2_vqa, image):
    """LLaVA-Interleave's layout: SigLIP, the "full" strategy, and every image token a patch."""
    adapter = tiny_qwen2_vqa.adapter
    assert tiny_qwen2_vqa.model.config.vision_feature_select_strategy == "full"
    assert not adapter.has_cls_token and adapter.tokens_per_image() == 16
    inp = tiny_qwen2_vqa.prepare(image, "What is the color of the dog?", "The dog is red.")
    assert inp.geometry.positions.numel() == 16
    assert (inp.input_ids[0, inp.geometry.positions] == adapter.image_token_id).all()
    # SigLIP stretches the 48 x 40 image to 32 x 32 (no crop)
    assert inp.box_to_model([0, 0, 24, 20]) == [0.0, 0.0, 16.0, 16.0]


def test_from_pretrained_roundtrip(tmp_path, image):
    from mech_vqa import VQAModel

    model, processor = tiny_llava(seed=3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = VQAModel.from_pretrained(str(tmp_path))
    original = VQAModel(model, processor)
    inp = loaded.prepare(image, "What is the color of the dog?", "red")
    torch.testing.assert_close(loaded.logits(inp), original.logits(inp))


# ------------------------------------------------------------------------------ LLaVA-NeXT
NEXT_SIZES = [(70, 40), (40, 70), (50, 50), (200, 30)]  # (width, height): wide, tall, square, very wide


def _gradient_image(width, height):
    """R rises left to right, G top to bottom (255 * index / (side - 1)), B constant."""
    from PIL import Image

    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype("uint8"))


@pytest.mark.parametrize("size", NEXT_SIZES + [(90, 90)])
def test_tiled_geometry_follows_the_models_own_packing(tiled_vqa, size):
    """Every image position holds what the model put there, rebuilt here from the tiles' projected features:
    the first view's patches row-major, then the canvas grid of the tiles cut to the image (HF's
    ``unpad_image``) and, for OneVision beyond ``anyres_max_N``, bilinearly downsampled, row-major."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    vqa = tiled_vqa
    inp = vqa.prepare(_gradient_image(*size), "What is the color of the dog?", "The dog is red.")
    geometry = inp.geometry
    g = geometry.grid[0]
    n_views = geometry.view_boxes.shape[0]
    across = geometry.view_boxes[1:, 0].unique().numel()  # tiles per canvas row
    down = (n_views - 1) // across
    strip_cls = 1 if vqa.model.config.vision_feature_select_strategy == "default" else 0
    with torch.no_grad(), vqa.trace(["resid_pre"], layers=[0]) as cache:
        vqa.forward(inp)
        tiles = inp.pixel_values[0, :n_views]
        hidden = vqa.model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-1][:, strip_cls:]
        projected = vqa.model.model.multi_modal_projector(hidden)                 # [views, g*g, d]
    embedded = cache["resid_pre", 0][0, geometry.positions]
    base = geometry.view == 0
    torch.testing.assert_close(embedded[base], projected[0], rtol=0, atol=0)
    assert torch.equal(geometry.rowcol[base], torch.stack([torch.arange(g * g) // g, torch.arange(g * g) % g], 1))
    canvas = projected[1:].view(down, across, g, g, -1).permute(4, 0, 2, 1, 3).reshape(-1, down * g, across * g)
    kept = unpad_image(canvas, inp.extra["image_sizes"][0])                      # [d, rows, cols]
    n_image_tokens = int((inp.input_ids[0] == vqa.adapter.image_token_id).sum())
    n_rows = n_image_tokens - geometry.positions.numel()                        # one newline per row
    n_cols = int((~base).sum()) // n_rows
    if (n_rows, n_cols) != tuple(kept.shape[1:]):
        kept = torch.nn.functional.interpolate(kept[None], [n_rows, n_cols], mode="bilinear")[0]
    torch.testing.assert_close(embedded[~base], kept.flatten(1).T, rtol=1e-6, atol=1e-6)
    # boxes of the high-resolution tokens: non-empty, inside the image, covering at least 3/4 of each side
    boxes = geometry.boxes[~base]
    height, width = geometry.image_size
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes.min() >= 0 and boxes[:, [0, 2]].max() <= width and boxes[:, [1, 3]].max() <= height
    assert boxes[:, 2].max() - boxes[:, 0].min() >= 0.75 * width
    assert boxes[:, 3].max() - boxes[:, 1].min() >= 0.75 * height


@pytest.mark.parametrize("size", NEXT_SIZES)
def test_tiled_view_boxes_show_what_the_processor_put_in_each_view(tiled_vqa, size):
    """De-normalised pixels of every view equal the original's gradient at the place view_boxes says."""
    vqa = tiled_vqa
    width, height = size
    inp = vqa.prepare(_gradient_image(width, height), "What is the color of the dog?", "The dog is red.")
    geometry = inp.geometry
    mean = torch.tensor(inp.image_mean).view(3, 1, 1)
    std = torch.tensor(inp.image_std).view(3, 1, 1)
    frame_h, frame_w = geometry.image_size
    sx, sy, _, _ = inp.pixel_transform
    checked = 0
    for view, (x0, y0, x1, y1) in enumerate(geometry.view_boxes.tolist()):
        pixels = inp.pixel_values[0, view] * std + mean                       # [3, T, T] in [0, 1]
        side = pixels.shape[-1]
        centres = (torch.arange(side) + 0.5) / side
        x_orig = (x0 + centres * (x1 - x0)) / sx                             # original-pixel coordinates
        y_orig = (y0 + centres * (y1 - y0)) / sy
        expect_r = ((x_orig - 0.5) / (width - 1)).view(1, -1).expand(side, -1)
        expect_g = ((y_orig - 0.5) / (height - 1)).view(-1, 1).expand(-1, side)
        # away from the image border (resampling blends in the edge / the padding there)
        inside = ((x_orig > 3 / sx * width / frame_w + 2).view(1, -1) & (x_orig < width - 3).view(1, -1)
                  & (y_orig > 3).view(-1, 1) & (y_orig < height - 3).view(-1, 1))
        if inside.any():
            assert float((pixels[0] - expect_r)[inside].abs().max()) < 0.05
            assert float((pixels[1] - expect_g)[inside].abs().max()) < 0.05
            checked += int(inside.sum())
    assert checked > 0


def test_tiled_masks_cover_every_view_and_the_metric_ends_at_the_baseline(tiled_vqa):
    from mech_vqa import igos
    from mech_vqa.adapters.base import mask_to_pixels
    from mech_vqa.methods.scoring import AnswerScorer, input_baseline
    from mech_vqa.metrics.insertion_deletion import insertion_deletion_curves, mean_probability

    vqa = tiled_vqa
    inp = vqa.prepare(_gradient_image(70, 40), "What is the color of the dog?", "The dog is red.")
    geometry = inp.geometry
    frame_w = geometry.image_size[1]
    # left half of the image kept: every view's pixels left of the image's middle get 1, right of it 0
    left = torch.zeros(1, 8, 8)
    left[..., :4] = 1
    up = mask_to_pixels(left, inp.pixel_values.shape[1:], "nearest", view_boxes=geometry.view_boxes,
                        frame_size=geometry.image_size)[0, :, 0]                   # [views, T, T]
    side = up.shape[-1]
    for view, (x0, _, x1, _) in enumerate(geometry.view_boxes.tolist()):
        x = x0 + (torch.arange(side) + 0.5) / side * (x1 - x0)
        if (x < frame_w / 2 - 1).any():
            assert torch.equal(up[view][:, x < frame_w / 2 - 1].unique(), torch.tensor([1.0]))
        if (x > frame_w / 2 + 1).any():
            assert torch.equal(up[view][:, x > frame_w / 2 + 1].unique(), torch.tensor([0.0]))
    # the deletion curve's last point (every cell replaced) is the baseline's score exactly
    scorer = AnswerScorer(vqa, inp, [3])
    base = input_baseline(vqa, inp)
    raw = insertion_deletion_curves(mean_probability(scorer, [0]), inp.pixel_values.float(), base, torch.rand(8, 8),
                                    step_fraction=0.25, progress=False, geometry=geometry)
    assert raw["deletion_raw"][-1] == pytest.approx(raw["score_baseline"], abs=1e-6)
    assert raw["insertion_raw"][-1] == pytest.approx(raw["score_image"], abs=1e-6)
    # iGOS batched equals the reference way on the tiled input
    fast = igos(vqa, inp, tokens=[3], seed=0, progress=False, iterations=2, n_steps=2, mask_size=4)
    slow = igos(vqa, inp, tokens=[3], seed=0, progress=False, iterations=2, n_steps=2, mask_size=4, reference=True)
    torch.testing.assert_close(fast.mask, slow.mask, rtol=0, atol=1e-4)
    assert fast.deletion_auc == pytest.approx(slow.deletion_auc, abs=1e-5)


def test_next_compare_and_batch(tiny_next_vqa, image):
    from mech_vqa import compare, explain

    vqa = tiny_next_vqa
    inp = vqa.prepare(image, "What is the color of the dog?", "The dog is red.")
    assert inp.box_to_model([0, 0, 24, 20]) == [0.0, 0.0, 16.0, 16.0]          # view 0 stretches 48 x 40 to 32 x 32
    result = compare(vqa, inp, tokens=[3], progress=False, box=[0, 0, 16, 16],
                     options={"igos": {"iterations": 1, "n_steps": 2}})
    assert {row["method"] for row in result.table} >= {"mechanistic", "raw_attention", "relevancy", "igos++"}
    assert all(m.scores.shape == (4, 4) for name, m in result.maps.items() if not name.startswith("igos"))  # base view
    assert result.maps["igos++"].scores.shape == (32, 32) and all(
        torch.isfinite(torch.tensor([row["insertion_auc_raw"], row["deletion_auc_raw"]])).all() for row in result.table)
    other = vqa.prepare(_gradient_image(70, 40), "What is the color of the dog?", "The dog is red.")
    batch = vqa.batch([inp, other])
    together = explain(vqa, batch, [inp.target(3), other.target(3)], progress=False)
    alone = explain(vqa, other, other.target(3), progress=False)
    torch.testing.assert_close(together[1].heads.scores, alone.heads.scores, rtol=1e-4, atol=1e-5)


def test_paint_view_0_is_the_patch_grid_upsampled(prepared):
    geometry = prepared.geometry
    values = torch.rand(3, geometry.n_tokens)
    painted = geometry.paint(values, view=0)                                   # [3, H, W] one cell per pixel
    grid = geometry.to_grid(values)                                            # [3, rows, cols]
    upsampled = torch.nn.functional.interpolate(grid[None], size=tuple(geometry.image_size), mode="nearest")[0]
    assert torch.equal(painted, upsampled)
    with pytest.raises(ValueError, match="no image token belongs to view 1"):
        geometry.paint(values, view=1)


def test_next_high_resolution_maps_paint_each_pixel_with_its_token(tiny_next_vqa, tmp_path):
    from mech_vqa import Result, answer_attention, explain

    vqa = tiny_next_vqa
    inp = vqa.prepare(_gradient_image(70, 40), "What is the color of the dog?", "The dog is red.")
    geometry = inp.geometry
    result = explain(vqa, inp, inp.target(3), heads=[(1, 0)], view=1, progress=False)
    hires = geometry.view == 1
    token_scores = result.positions.scores[0, geometry.positions[hires]]
    boxes = geometry.boxes[hires]
    height, width = geometry.image_size
    assert result.patch_map.scores.shape == (height, width)
    for y in range(height):                                                    # brute force: the token whose box
        for x in range(width):                                                 # holds the pixel centre, else nearest
            cx, cy = x + 0.5, y + 0.5
            inside = (boxes[:, 0] <= cx) & (cx < boxes[:, 2]) & (boxes[:, 1] <= cy) & (cy < boxes[:, 3])
            if inside.any():
                assert result.patch_map.scores[y, x] == token_scores[inside][0]
    edge = ~((boxes[:, 1].min() <= torch.arange(height) + 0.5) & (torch.arange(height) + 0.5 < boxes[:, 3].max()))
    assert edge.any()  # the trimmed canvas leaves rows outside every box: they take the nearest row's values
    first, last = int(torch.nonzero(~edge)[0]), int(torch.nonzero(~edge)[-1])
    assert torch.equal(result.patch_map.scores[edge & (torch.arange(height) < first)],
                       result.patch_map.scores[first].expand(int((edge & (torch.arange(height) < first)).sum()), -1))
    assert torch.equal(result.patch_map.scores[last + 1:],
                       result.patch_map.scores[last].expand(height - last - 1, -1))
    # raw attention paints the same way, and the result keeps the boxes through save/load
    attention = answer_attention(vqa, inp)
    painted = attention.patch_map(view=1)
    assert painted.scores.shape == (height, width) and painted.info["view"] == 1
    assert attention.patch_map(view=0).scores.shape == geometry.grid
    assert torch.equal(Result.load(attention.save(tmp_path / "attention")).patch_map(view=1).scores, painted.scores)
    # relevancy's LLM stage: the painted map holds the relevancy row at the token under each pixel
    from mech_vqa import relevancy

    maps = relevancy(vqa, inp, [3], progress=False)
    relevant = maps.patch_map(view=1).scores
    hires_positions = geometry.positions[hires]
    centre_token = hires_positions[((boxes[:, 0] <= 16.5) & (16.5 < boxes[:, 2]) & (boxes[:, 1] <= 16.5)
                                    & (16.5 < boxes[:, 3]))][0]
    assert relevant[16, 16] == maps.rows[0, centre_token]
    with pytest.raises(ValueError, match="no vision-tower relevancy"):
        maps.patch_map(stage="vision", view=1)
    reloaded = Result.load(result.positions.save(tmp_path / "positions"))
    assert torch.equal(reloaded.patch_map(view=1).scores, result.patch_map.scores)


def test_tiled_geometry_errors(tiled_vqa, image):
    inp = tiled_vqa.prepare(image, "What is the color of the dog?", "The dog is red.")
    adapter, ids = tiled_vqa.adapter, inp.input_ids[0]
    with pytest.raises(AdapterError, match="needs image_sizes"):
        adapter.image_geometry(ids, inp.pixel_values)
    with pytest.raises(AdapterError, match="one image per prompt"):
        adapter.image_geometry(ids, inp.pixel_values, torch.tensor([[40, 48], [40, 48]]))
    with pytest.raises(AdapterError, match="image tokens but this 40 x 48 image gives"):
        adapter.image_geometry(ids[: int(inp.image_positions[5])], inp.pixel_values, inp.extra["image_sizes"])


def test_next_causal_map_of_the_tiles(tiny_next_vqa):
    from mech_vqa import causal_explanation

    vqa = tiny_next_vqa
    inp = vqa.prepare(_gradient_image(50, 50), "What is the color of the dog?", "The dog is red.")
    result = causal_explanation(vqa, inp, inp.target(3), alpha=0.5, threshold=0.0, n_samples=100_000, radius=10)
    geometry = inp.geometry
    base, tiles = result.patch_map(view=0).scores, result.patch_map(view=1).scores
    assert base.shape == geometry.grid and tiles.shape == tuple(geometry.image_size)
    explained = set(result.explanation.tolist())
    shown = {int(p) for p, v in zip(geometry.positions, geometry.view) if int(p) in explained}
    assert shown, "the explanation set has no image node; loosen alpha"
    hires_nodes = [p for p in shown if int(geometry.view[geometry.positions == p][0]) == 1]
    # each high-resolution node's attention shows at the centre of its box, and only there is it non-zero
    for position in hires_nodes:
        x0, y0, x1, y1 = geometry.boxes[geometry.positions == position][0].tolist()
        node = result.nodes.tolist().index(position)
        assert tiles[int((y0 + y1) / 2), int((x0 + x1) / 2)] == result.attention[node]
    assert bool((tiles != 0).any()) == bool(hires_nodes)


def test_tiled_compare_of_the_high_resolution_tokens(tiled_vqa):
    from mech_vqa import compare, logit_lens

    vqa = tiled_vqa
    inp = vqa.prepare(_gradient_image(50, 50), "What is the color of the dog?", "The dog is red.")
    height, width = inp.geometry.image_size
    result = compare(vqa, inp, tokens=[3], view=1, progress=False,
                     methods=["mechanistic", "logit_lens", "raw_attention", "relevancy", "causal"])
    assert all(m.scores.shape == (height, width) for m in result.maps.values())
    assert all(m.info.get("view") == 1 for name, m in result.maps.items() if name != "logit_lens")
    assert result.info["view"] == 1
    assert -1 <= result.correlations["mechanistic|raw_attention"] <= 1  # compared on the high-resolution grid
    # the logit lens of view 1 reads exactly the high-resolution positions
    lens = logit_lens(vqa, inp, "red", view=1)
    assert lens.info["positions"] == inp.geometry.positions[inp.geometry.view == 1].tolist()
    assert lens.patch_map().scores.shape == (height, width)


def test_gemma_norms_are_read_as_the_gain_they_apply(image):
    """LLaVA-Gemma: the final norm scales by 1 + weight; the frozen-norm scores and the logit lens must
    reproduce the model's own log-probs (they did not when the weight was read as the gain)."""
    from mech_vqa import VQAModel, explain, logit_lens

    model, processor = tiny_llava(seed=7, kv_heads=2, text_model="gemma")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:  # Gemma initialises its norm weights at 0 (gain 1): make them matter
                parameter.normal_(0, 0.5)
    vqa = VQAModel(model, processor, name="tiny-gemma")
    params = vqa.adapter.final_norm_params()
    torch.testing.assert_close(params["weight"], 1 + vqa.adapter.final_norm.weight.float())
    inp = vqa.prepare(image, "What is the color of the dog?", "The dog is red.")
    result = explain(vqa, inp, inp.target(2), progress=False)
    assert result.layers.final_logprob == pytest.approx(result.layers.model_logprob, abs=2e-5)
    lens = logit_lens(vqa, inp, "red", k=2)
    red = vqa.tokenizer.convert_tokens_to_ids("red")
    probs = vqa.logits(inp)[0, inp.image_positions].float().softmax(-1)[:, red]
    torch.testing.assert_close(lens.word_probs[-1], probs, rtol=1e-4, atol=1e-6)
    # a Llama norm keeps its weight as it is (its own storage, no copy; read as data, detached)
    llama, _ = tiny_llava(seed=0)
    norm = get_adapter(llama).final_norm
    gain = get_adapter(llama).final_norm_params()["weight"]
    assert gain.data_ptr() == norm.weight.data_ptr() and gain.shape == norm.weight.shape and not gain.requires_grad


def test_fused_projections_are_one_clear_error_at_load():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Phi3Config

    tokenizer = word_level_tokenizer(["dog"])
    base = llava_config(tokenizer)
    text = Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=base.vision_config,
                                                      image_token_id=base.image_token_id))
    with pytest.raises(AdapterError, match=r"Phi3Config\) has no self_attn.q_proj, self_attn.k_proj, self_attn.v_proj"):
        get_adapter(model)


def test_post_normalised_blocks_are_one_clear_error_at_load():
    """Gemma-2's layers normalise block outputs before the residual add and soft-cap scores: the
    decompositions would be silently wrong, so the adapter refuses the model."""
    from transformers import Gemma2Config, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = word_level_tokenizer(["dog"])
    base = llava_config(tokenizer)
    text = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=base.vision_config,
                                                      image_token_id=base.image_token_id))
    with pytest.raises(AdapterError, match="pre_feedforward_layernorm, post_feedforward_layernorm, attn_logit_softcapping"):
        get_adapter(model)


# ------------------------------------------------------------------------------ Gemma-3
@pytest.mark.parametrize("size", NEXT_SIZES)
def test_gemma3_positions_hold_the_pooled_patches_inside_each_box(tiny_gemma3_vqa, size):
    """Each image position holds the projection of the mean of the SigLIP patches whose pixels lie in
    its box (rebuilt here from the boxes and the tower's own output, not from the projector's pooling),
    row-major between <start_of_image> and <end_of_image>, which are never image positions."""
    vqa = tiny_gemma3_vqa
    inp = vqa.prepare(_gradient_image(*size), "What is the color of the dog?", "The dog is red.")
    geometry, config = inp.geometry, vqa.model.config
    tokenizer = vqa.processor.tokenizer
    ids = inp.input_ids[0]
    assert geometry.grid == (4, 4) and geometry.image_size == (32, 32) and geometry.n_tokens == 16
    boi, eoi = tokenizer.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>"])
    assert ids[geometry.positions[0] - 1] == boi and ids[geometry.positions[-1] + 1] == eoi
    assert torch.equal(geometry.positions, torch.arange(int(geometry.positions[0]), int(geometry.positions[0]) + 16))
    assert not set(geometry.positions.tolist()) & set((ids == boi).nonzero().flatten().tolist() +
                                                      (ids == eoi).nonzero().flatten().tolist())
    patch = config.vision_config.patch_size
    side = config.vision_config.image_size // patch
    with torch.no_grad(), vqa.trace(["resid_pre"], layers=[0]) as cache:
        vqa.forward(inp)
        patches = vqa.model.model.vision_tower(inp.pixel_values).last_hidden_state[0]    # [side*side, d_v]
    centres_x = (torch.arange(side * side) % side + 0.5) * patch
    centres_y = (torch.arange(side * side) // side + 0.5) * patch
    projector = vqa.model.model.multi_modal_projector
    embedded = cache["resid_pre", 0][0, geometry.positions]
    for token, (x0, y0, x1, y1) in enumerate(geometry.boxes.tolist()):
        inside = (centres_x > x0) & (centres_x < x1) & (centres_y > y0) & (centres_y < y1)
        assert int(inside.sum()) == vqa.adapter.patches_per_image_token == 4
        pooled = patches[inside].mean(0)
        expected = projector.mm_soft_emb_norm(pooled) @ projector.mm_input_projection_weight
        torch.testing.assert_close(embedded[token], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", NEXT_SIZES)
def test_gemma3_boxes_map_back_to_the_original_pixels(tiny_gemma3_vqa, size):
    """The de-normalised pixels in each token's box equal the original gradient at that box mapped back
    through ``pixel_transform`` (the processor stretches the image, no crop)."""
    width, height = size
    inp = tiny_gemma3_vqa.prepare(_gradient_image(width, height), "What is the color of the dog?", "The dog is red.")
    pixels = inp.pixel_values[0] * torch.tensor(inp.image_std).view(3, 1, 1) + torch.tensor(inp.image_mean).view(3, 1, 1)
    sx, sy, dx, dy = inp.pixel_transform
    assert (dx, dy) == (0.0, 0.0)
    for x0, y0, x1, y1 in inp.geometry.boxes.long().tolist():
        cx, cy = ((x0 + x1) / 2 + dx) / sx, ((y0 + y1) / 2 + dy) / sy              # original pixels
        red, green = pixels[0, y0:y1, x0:x1].mean(), pixels[1, y0:y1, x0:x1].mean()
        assert float(red) == pytest.approx((cx - 0.5) / (width - 1), abs=0.04)
        assert float(green) == pytest.approx((cy - 0.5) / (height - 1), abs=0.04)


@torch.no_grad()
def test_gemma3_heads_and_neurons_sum_to_the_post_normed_block_outputs(tiny_gemma3_vqa):
    """The sandwich norms made linear: with each post-norm's scale frozen at the forward's value, the heads'
    terms sum to what the attention block adds to the residual stream, the neurons' to the MLP's; the
    frozen scale is the one the forward used (not 1: undoing the freeze breaks the sum)."""
    from mech_vqa.methods.mechanistic import capture_target, head_vectors

    vqa, a = tiny_gemma3_vqa, tiny_gemma3_vqa.adapter
    inp = vqa.prepare(_gradient_image(50, 50), "What is the color of the dog?", "The dog is red.")
    capture = capture_target(vqa, inp, inp.target(1))
    heads = head_vectors(capture)[0]                                               # [L, H, d]
    for layer in range(a.n_layers):
        torch.testing.assert_close(heads[layer].sum(0), capture.attn_out[0, layer], rtol=1e-5, atol=1e-6)
        scale, gain = capture.frozen_output_norm(layer, "mlp")
        neurons = capture.mlp_act[0, layer].float() * a.W_down(layer).float() * (scale[0] * gain).unsqueeze(1)
        torch.testing.assert_close(neurons.sum(1), capture.mlp_out[0, layer], rtol=1e-5, atol=1e-6)
        raw = torch.einsum("hd,hdm->m", capture.z[0, layer], a.W_O(layer))
        assert not torch.allclose(raw, capture.attn_out[0, layer], atol=1e-3)        # the norm does matter
    assert a.resid_mid_module(0) is vqa.model.model.language_model.layers[0].pre_feedforward_layernorm


def test_gemma3_layout_and_attention(tiny_gemma3_vqa):
    a = tiny_gemma3_vqa.adapter
    text = tiny_gemma3_vqa.model.config.text_config
    assert [a.sliding_window(i) for i in range(a.n_layers)] == [8, None]
    assert a.attention_scaling(0) == text.query_pre_attn_scalar ** -0.5
    assert a.final_norm_params()["weight"].shape == (a.d_model,)
    # the bidirectional blocks are the image tokens, one block per image, -1 elsewhere
    inp = tiny_gemma3_vqa.prepare(_gradient_image(40, 30), "What is the color of the dog?")
    blocks = a.attention_blocks(inp.input_ids[0])
    assert set(blocks[inp.geometry.positions].tolist()) == {0}
    assert (blocks[~torch.isin(torch.arange(inp.seq_len), inp.geometry.positions)] == -1).all()
    assert torch.equal(blocks >= 0, inp.extra["token_type_ids"][0] == 1)


def test_gemma3_scorer_follows_the_forward_on_soft_capping(image):
    """transformers' Gemma3ForConditionalGeneration returns lm_head's logits uncapped whatever
    final_logit_softcapping says: the frozen-norm scorer reproduces the model's own log-probability;
    an adapter whose model caps gets capped logits, exactly."""
    from mech_vqa import VQAModel
    from mech_vqa.build import tiny_gemma3
    from mech_vqa.methods.logprob import FrozenNormScorer

    model, processor = tiny_gemma3(seed=9, final_logit_softcapping=0.02)
    vqa = VQAModel(model, processor)
    inp = vqa.prepare(image, "What is the color of the dog?", "The dog is red.")
    target = inp.target(1)
    with torch.no_grad(), vqa.trace(["resid_post"], layers=[-1]) as cache:
        logits = vqa.forward(inp).logits[0, target.position].float()
    final = cache["resid_post", vqa.adapter.n_layers - 1][:, target.position]
    scorer = FrozenNormScorer(vqa.adapter, final, [target.token_id])
    own = float(logits.log_softmax(-1)[target.token_id])
    assert float(scorer.log_prob(final[:, None])[0, 0]) == pytest.approx(own, abs=1e-5)
    capped = float((0.02 * torch.tanh(logits / 0.02)).log_softmax(-1)[target.token_id])
    assert abs(capped - own) > 1e-2
    vqa.adapter.logit_softcap = lambda: 0.02  # a model that caps (Gemma-2-like): every chunk capped
    for chunk in (1 << 20, 8):
        scorer = FrozenNormScorer(vqa.adapter, final, [target.token_id], chunk_elements=chunk)
        assert float(scorer.log_prob(final[:, None])[0, 0]) == pytest.approx(capped, abs=1e-5)


def test_gemma3_refusals_are_one_clear_error(tiny_gemma3_vqa):
    a = tiny_gemma3_vqa.adapter
    ids = torch.tensor([1, 2, a.image_token_id] + [a.image_token_id] * 15)
    with pytest.raises(AdapterError, match="pan-and-scan"):
        a.image_geometry(ids, torch.zeros(2, 3, 32, 32))


def test_gemma3_4b_geometry_at_real_scale():
    """A meta-device Gemma-3-4B (google/gemma-3-4b-it's config.json values) and a Gemma3Processor at its
    preprocessor_config.json sizes: 896 px, 256 pooled tokens of 56 px, for every tiled-test image size."""
    from PIL import Image
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    from mech_vqa.build import GEMMA3_SPECIAL, TINY_WORDS, gemma3_processor

    tokenizer = word_level_tokenizer((*TINY_WORDS, "model"), extra_special=GEMMA3_SPECIAL)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA3_SPECIAL.items()}
    text = Gemma3TextConfig(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                            vocab_size=262208)
    vision = SiglipVisionConfig(image_size=896, patch_size=14, hidden_size=1152, intermediate_size=4304,
                                num_hidden_layers=27, num_attention_heads=16, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256,
                          image_token_index=ids["image_token"], boi_token_index=ids["boi_token"],
                          eoi_token_index=ids["eoi_token"])
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    adapter = get_adapter(model)
    assert (adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, adapter.head_dim) == (34, 8, 4, 256)
    assert [adapter.sliding_window(i) for i in range(6)] == [1024] * 5 + [None]   # 5 local : 1 global
    assert adapter.patches_per_image_token == 16 and adapter.patch_size == 56
    pooled = model.model.multi_modal_projector(torch.zeros(1, 64 * 64, 1152, device="meta"))
    processor = gemma3_processor(tokenizer, 896, 256)
    for width, height in NEXT_SIZES + [(90, 90)]:
        enc = processor(images=Image.new("RGB", (width, height)), text="user : <start_of_image> dog", return_tensors="pt")
        assert enc["pixel_values"].shape == (1, 3, 896, 896)
        geometry = adapter.image_geometry(enc["input_ids"][0], enc["pixel_values"])
        assert geometry.n_tokens == int((enc["input_ids"] == ids["image_token"]).sum()) == pooled.shape[1] == 256
        assert geometry.grid == (16, 16) and geometry.image_size == (896, 896)
        assert geometry.boxes[17].tolist() == [56.0, 56.0, 112.0, 112.0]


def test_gemma3_batch_equals_rows_alone_on_both_backends(tiny_gemma3_vqa, image):
    """Left padding carries token_type_ids along (image blocks stay where the ids are), on the hooks
    backend and through one nnsight trace (post-norms, QK-norm and image blocks followed there too)."""
    from mech_vqa import VQAModel, explain

    vqa = tiny_gemma3_vqa
    long = vqa.prepare(image, "What is the color of the dog?", "The dog is red.")
    short = vqa.prepare(_gradient_image(40, 30), "What is the dog?", "red")
    together = explain(vqa, vqa.batch([long, short]), heads=[(1, 1), (0, 2)])
    for row, inp in enumerate([long, short]):
        alone = explain(vqa, inp, heads=[(1, 1), (0, 2)])
        torch.testing.assert_close(together[row].heads.scores, alone.heads.scores, rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(together[row].positions.scores, alone.positions.scores, rtol=1e-4, atol=2e-5)
    pytest.importorskip("nnsight")
    nns = VQAModel(vqa.model, vqa.processor, name=vqa.name, backend="nnsight")
    for got, expected in zip(explain(nns, nns.batch([long, short]), heads=[(1, 1), (0, 2)]), together):
        torch.testing.assert_close(got.heads.scores, expected.heads.scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.positions.scores, expected.positions.scores, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ InternVL
def _internvl_features(vqa, inp):
    """``(embedded [n, d], projector rows [n, d], shuffled features [n, 4, d_v], tower patches [V, 64, d_v])``
    from one forward: what the model put at the image positions, what its projector made, the patches its
    pixel shuffle folded into each token, and each view's own patches (class token dropped)."""
    geometry = inp.geometry
    with torch.no_grad(), vqa.trace(["resid_pre", "vision_features", "projector_out"], layers=[0]) as cache:
        vqa.forward(inp)
        patches = vqa.model.model.vision_tower(inp.pixel_values).last_hidden_state[:, 1:]   # [V, 64, d_v]
    folded = cache["vision_features"].flatten(0, 1).unflatten(-1, (4, -1))          # [n, 4, d_v]
    return cache["resid_pre", 0][0, geometry.positions], cache["projector_out"].flatten(0, 1), folded, patches


def _internvl_boxes_hold_their_patches(vqa, geometry, folded, patches) -> bool:
    """Whether each token is labelled with the view it came from (tiles then the thumbnail, in prompt
    order) and its shuffled features are exactly the patches whose pixels lie in its box, read in the
    frame ``view_boxes`` gives that view."""
    n_views = patches.shape[0]
    source = torch.arange(n_views).repeat_interleave(16)
    if not torch.equal(geometry.view, (source != n_views - 1).long() if n_views > 1 else torch.zeros(16).long()):
        return False
    return _boxes_hold_their_tile_patches(geometry, source, folded, patches, vqa.adapter.patches_per_image_token)


def _boxes_hold_their_tile_patches(geometry, source, folded, patches, per_token: int) -> bool:
    """Whether each image token's folded features ``folded[token]`` ``[per_token, d_v]`` are exactly the vision
    patches of its view ``source[token]`` (``patches`` ``[V, 64, d_v]``, 8 x 8 patches of 4 px on a 32 px tile)
    whose centres lie in the token's box, the view shown at the frame ``geometry.view_boxes`` gives it."""
    frames = torch.tensor([[0.0, 0.0, 32.0, 32.0]]) if geometry.view_boxes is None else geometry.view_boxes
    centres = (torch.arange(8) + 0.5) * 4                                          # tile pixels
    for token in range(geometry.n_tokens):
        x0, y0, x1, y1 = frames[source[token]].tolist()
        sx, sy = (x1 - x0) / 32, (y1 - y0) / 32
        bx0, by0, bx1, by1 = geometry.boxes[token].tolist()
        cols = ((x0 + centres * sx > bx0) & (x0 + centres * sx < bx1)).nonzero().flatten()
        rows = ((y0 + centres * sy > by0) & (y0 + centres * sy < by1)).nonzero().flatten()
        inside = (rows[:, None] * 8 + cols[None, :]).flatten()
        if inside.numel() != per_token:
            return False
        distance = torch.cdist(folded[token], patches[source[token], inside])           # [4, 4]
        if float(distance.min(1).values.max()) > 1e-5 or float(distance.min(0).values.max()) > 1e-5:
            return False
    return True


def _internvl_views_show_their_boxes(inp, view_boxes, size) -> bool:
    """Whether the de-normalised pixels of every view equal the original gradient where ``view_boxes``
    (frame pixels, mapped back by pixel_transform) says that view looks."""
    width, height = size
    sx, sy, _, _ = inp.pixel_transform
    mean, std = torch.tensor(inp.image_mean).view(3, 1, 1), torch.tensor(inp.image_std).view(3, 1, 1)
    for view, (x0, y0, x1, y1) in enumerate(view_boxes.tolist()):
        pixels = inp.pixel_values[view] * std + mean
        centres = (torch.arange(32) + 0.5) / 32
        x_orig, y_orig = (x0 + centres * (x1 - x0)) / sx, (y0 + centres * (y1 - y0)) / sy
        expect_r = ((x_orig - 0.5) / (width - 1)).view(1, -1).expand(32, -1)
        expect_g = ((y_orig - 0.5) / (height - 1)).view(-1, 1).expand(-1, 32)
        inside = (((x_orig > 3) & (x_orig < width - 3)).view(1, -1) & ((y_orig > 3) & (y_orig < height - 3)).view(-1, 1))
        if float((pixels[0] - expect_r)[inside].abs().max()) >= 0.05:
            return False
        if float((pixels[1] - expect_g)[inside].abs().max()) >= 0.05:
            return False
    return True


@pytest.mark.parametrize("size", NEXT_SIZES + [(20, 20)])
def test_internvl_positions_hold_the_patches_inside_each_box(tiny_internvl_vqa, size):
    """Each image position holds the projection of exactly the vision patches (class token dropped) whose
    pixels lie in its box, in the view it belongs to: the projector's input row is those patches'
    features in some order (the pixel shuffle's channel order, not assumed here)."""
    vqa = tiny_internvl_vqa
    inp = vqa.prepare(_gradient_image(*size), "What is the color of the dog?", "The dog is red.")
    geometry = inp.geometry
    n_views = inp.pixel_values.shape[0]
    ids = inp.input_ids[0]
    assert geometry.n_tokens == int((ids == vqa.adapter.image_token_id).sum()) == 16 * n_views
    start, end = vqa.processor.tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
    assert ids[geometry.positions.min() - 1] == start and ids[geometry.positions.max() + 1] == end
    embedded, projected, folded, patches = _internvl_features(vqa, inp)
    torch.testing.assert_close(embedded, projected, rtol=0, atol=0)
    assert _internvl_boxes_hold_their_patches(vqa, geometry, folded, patches)


@pytest.mark.parametrize("size", NEXT_SIZES)
def test_internvl_view_boxes_show_what_the_processor_put_in_each_view(tiny_internvl_vqa, size):
    """De-normalised pixels of every view (tiles, then the thumbnail) equal the original's gradient where
    view_boxes (frame pixels, mapped back by pixel_transform) says that view looks."""
    vqa = tiny_internvl_vqa
    inp = vqa.prepare(_gradient_image(*size), "What is the color of the dog?", "The dog is red.")
    assert inp.geometry.view_boxes is not None and inp.geometry.view_boxes.shape[0] == inp.pixel_values.shape[0]
    assert _internvl_views_show_their_boxes(inp, inp.geometry.view_boxes, size)
    # the displayed image is the thumbnail (the whole image), not the first tile
    mean, std = torch.tensor(inp.image_mean).view(3, 1, 1), torch.tensor(inp.image_std).view(3, 1, 1)
    shown = torch.from_numpy(inp.display_image()).permute(2, 0, 1)
    torch.testing.assert_close(shown, (inp.pixel_values[-1] * std + mean).clamp(0, 1))


def test_internvl_tiles_out_of_order_a_thumbnail_first_or_a_transposed_grid_fail_the_identities(tiny_internvl_vqa,
                                                                                                 monkeypatch):
    """Mutations the identities above must catch, each built with the adapter's own layout code: the
    2 x 2 tiles laid out column-major, the thumbnail taken as the first view, and each view's token grid
    transposed (the pixel shuffle's patches read as (col, row))."""
    vqa, adapter = tiny_internvl_vqa, tiny_internvl_vqa.adapter
    size = (50, 50)
    inp = vqa.prepare(_gradient_image(*size), "What is the color of the dog?", "The dog is red.")
    geometry = inp.geometry
    assert inp.pixel_values.shape[0] == 5                                          # 2 x 2 tiles + thumbnail
    _, _, folded, patches = _internvl_features(vqa, inp)
    assert _internvl_boxes_hold_their_patches(vqa, geometry, folded, patches)
    assert _internvl_views_show_their_boxes(inp, geometry.view_boxes, size)
    column_major = dataclasses.replace(geometry, **adapter._tiled_layout([(0, 0), (1, 0), (0, 1), (1, 1)], 2, 2))
    assert not _internvl_views_show_their_boxes(inp, column_major.view_boxes, size)
    thumbnail_first = dataclasses.replace(
        geometry, boxes=geometry.boxes.roll(16, 0), rowcol=geometry.rowcol.roll(16, 0), view=geometry.view.roll(16, 0),
        view_boxes=geometry.view_boxes.roll(1, 0))
    assert not _internvl_boxes_hold_their_patches(vqa, thumbnail_first, folded, patches)
    assert not _internvl_views_show_their_boxes(inp, thumbnail_first.view_boxes, size)
    shuffled = adapter._shuffled_patches()
    monkeypatch.setattr(adapter, "_shuffled_patches", lambda: shuffled.flip(-1))
    transposed = dataclasses.replace(geometry, **adapter._tiled_layout([(0, 0), (0, 1), (1, 0), (1, 1)], 2, 2))
    assert torch.equal(transposed.view_boxes, geometry.view_boxes)                 # the tiles themselves are right
    assert not _internvl_boxes_hold_their_patches(vqa, transposed, folded, patches)


def test_internvl_without_the_original_size_is_one_clear_error(tiny_internvl_vqa):
    vqa = tiny_internvl_vqa
    inp = vqa.prepare(_gradient_image(70, 40), "What is the color of the dog?", "The dog is red.")
    with pytest.raises(AdapterError, match="need the original image size"):
        vqa.adapter.image_geometry(inp.input_ids[0], inp.pixel_values)


def test_internvl3_8b_geometry_at_real_scale():
    """A meta-device InternVL3-8B (OpenGVLab/InternVL3-8B-hf's config.json values) and a processor at its
    preprocessor_config.json settings (448 px tiles, 1..12 of them, thumbnail): token counts agree with
    the processor's, 256 per view, for every tiled-test image size."""
    from PIL import Image
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    from mech_vqa.build import INTERNVL_SPECIAL, TINY_WORDS, internvl_processor

    tokenizer = word_level_tokenizer(TINY_WORDS, extra_special=INTERNVL_SPECIAL)
    text = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=151674)
    vision = InternVLVisionConfig(image_size=[448, 448], patch_size=[14, 14], hidden_size=1024, intermediate_size=4096,
                                  num_hidden_layers=24, num_attention_heads=16)
    config = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5,
                            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    adapter = get_adapter(model)
    assert (adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, adapter.head_dim) == (28, 28, 4, 128)
    assert adapter.patch_grid == (16, 16) and adapter.patch_size == 28 and adapter.patches_per_image_token == 4
    processor = internvl_processor(tokenizer, 448, 256, max_tiles=12)
    for width, height in NEXT_SIZES + [(90, 90), (1000, 600)]:
        image = Image.new("RGB", (width, height))
        enc = processor(images=image, text="user : <IMG_CONTEXT> dog", return_tensors="pt")
        n_views = enc["pixel_values"].shape[0]
        features = model.model.get_image_features(enc["pixel_values"].to("meta")).pooler_output
        geometry = adapter.image_geometry(enc["input_ids"][0], enc["pixel_values"], torch.tensor([[height, width]]))
        assert geometry.n_tokens == int((enc["input_ids"] == config.image_token_id).sum()) == features.shape[0] * 256
        assert features.shape[:2] == (n_views, 256) and geometry.grid == (16, 16)
        if n_views > 1:  # the tiles cover the frame exactly once
            tiles = geometry.view_boxes[:-1]
            area = ((tiles[:, 2] - tiles[:, 0]) * (tiles[:, 3] - tiles[:, 1])).sum()
            assert float(area) == pytest.approx(448 * 448)


def test_internvl_methods_on_tiles_and_on_one_tile(tiny_internvl_vqa):
    """Token-level methods run on every tile; pixel-perturbation methods refuse tiles riding along the
    batch axis with one clear error naming the fix, and run once the image is one tile."""
    from mech_vqa import compare, explain

    vqa = tiny_internvl_vqa
    tiled = vqa.prepare(_gradient_image(70, 40), "What is the color of the dog?", "The dog is red.")
    result = explain(vqa, tiled, heads=[(1, 1)])
    assert result.positions.scores.shape[-1] == tiled.seq_len
    with pytest.raises(NotImplementedError, match="max_patches = 1"):
        compare(vqa, tiled, progress=False, methods=["mechanistic"])
    processor = vqa.processor.image_processor
    saved = processor.max_patches
    try:  # the baselines go through the same processor: one tile while the comparison runs
        processor.max_patches = 1
        single = vqa.prepare(_gradient_image(70, 40), "What is the color of the dog?", "The dog is red.")
        assert single.pixel_values.shape[0] == 1 and single.geometry.view_boxes is None
        frame = compare(vqa, single, progress=False, methods=["mechanistic", "igos+"],
                        options={"igos+": {"iterations": 2}}, head_claims=None).to_dataframe()
    finally:
        processor.max_patches = saved
    assert list(frame["method"]) == ["mechanistic", "igos+"]


# ------------------------------------------------------------------------------ Idefics3 / SmolVLM
@pytest.mark.parametrize("size", NEXT_SIZES + [(20, 20)])
def test_idefics3_positions_hold_the_patches_inside_each_box_and_markers_are_not_patches(tiny_idefics3_vqa, size):
    """Each image position holds the projection of exactly the patches in its box, in its view; the tile
    grid follows the <row_i_col_j> markers, which (with <fake_token_around_image> and <global-img>) are
    geometry.markers and hold their word embeddings, never a patch; painting covers image tokens only."""
    vqa = tiny_idefics3_vqa
    inp = vqa.prepare(_gradient_image(*size), "What is the color of the dog?", "The dog is red.")
    geometry, tokenizer = inp.geometry, vqa.processor.tokenizer
    ids = inp.input_ids[0]
    n_views = inp.pixel_values.shape[1]
    assert geometry.n_tokens == 16 * n_views
    tokens = tokenizer.convert_ids_to_tokens(ids[geometry.markers])
    assert all(t.startswith("<row_") or t in ("<fake_token_around_image>", "<global-img>") for t in tokens)
    assert sum(t.startswith("<row_") for t in tokens) == (n_views - 1 if n_views > 1 else 0)
    assert not set(geometry.markers.tolist()) & set(geometry.positions.tolist())
    folded = []
    handle = vqa.model.model.connector.modality_projection.register_forward_pre_hook(
        lambda m, args: folded.append(args[0]))
    try:
        with torch.no_grad(), vqa.trace(["resid_pre", "projector_out"], layers=[0]) as cache:
            vqa.forward(inp)
            patches = vqa.model.model.vision_model(inp.pixel_values[0]).last_hidden_state         # [V, 64, d_v]
    finally:
        handle.remove()
    embedded = cache["resid_pre", 0][0]
    torch.testing.assert_close(embedded[geometry.positions], cache["projector_out"].flatten(0, 1), rtol=0, atol=0)
    words = vqa.model.model.text_model.embed_tokens(ids[geometry.markers])
    torch.testing.assert_close(embedded[geometry.markers], words, rtol=0, atol=0)   # a marker is never a patch
    folded = folded[0].flatten(0, 1).unflatten(-1, (4, -1))                          # [n, 4, d_v]
    assert _boxes_hold_their_tile_patches(geometry, torch.arange(n_views).repeat_interleave(16), folded, patches, 4)
    # a painted map covers the frame with image tokens' values only
    painted = geometry.paint(torch.arange(float(geometry.n_tokens)), view=0 if n_views == 1 else 1)
    assert painted.shape == (32, 32) and set(painted.unique().long().tolist()) <= set(range(geometry.n_tokens))


@pytest.mark.parametrize("size", NEXT_SIZES)
def test_idefics3_view_boxes_show_what_the_processor_put_in_each_view(tiny_idefics3_vqa, size):
    vqa = tiny_idefics3_vqa
    width, height = size
    inp = vqa.prepare(_gradient_image(width, height), "What is the color of the dog?", "The dog is red.")
    sx, sy, _, _ = inp.pixel_transform
    mean, std = torch.tensor(inp.image_mean).view(3, 1, 1), torch.tensor(inp.image_std).view(3, 1, 1)
    for view, (x0, y0, x1, y1) in enumerate(inp.geometry.view_boxes.tolist()):
        pixels = inp.pixel_values[0, view] * std + mean
        centres = (torch.arange(32) + 0.5) / 32
        x_orig, y_orig = (x0 + centres * (x1 - x0)) / sx, (y0 + centres * (y1 - y0)) / sy
        expect_r = ((x_orig - 0.5) / (width - 1)).view(1, -1).expand(32, -1)
        expect_g = ((y_orig - 0.5) / (height - 1)).view(-1, 1).expand(-1, 32)
        inside = (((x_orig > 3) & (x_orig < width - 3)).view(1, -1) & ((y_orig > 3) & (y_orig < height - 3)).view(-1, 1))
        assert float((pixels[0] - expect_r)[inside].abs().max()) < 0.06
        assert float((pixels[1] - expect_g)[inside].abs().max()) < 0.06
    shown = torch.from_numpy(inp.display_image()).permute(2, 0, 1)
    torch.testing.assert_close(shown, (inp.pixel_values[0, -1] * std + mean).clamp(0, 1))   # the global image


def test_idefics3_without_the_processor_is_one_clear_error(tiny_idefics3_vqa):
    vqa = tiny_idefics3_vqa
    inp = vqa.prepare(_gradient_image(70, 40), "What is the color of the dog?", "The dog is red.")
    with pytest.raises(AdapterError, match="bind_processor"):
        get_adapter(vqa.model).image_geometry(inp.input_ids[0], inp.pixel_values)


def test_idefics3_batch_of_different_tile_counts_equals_rows_alone(tiny_idefics3_vqa):
    """Rows with 5 and 3 views: pixels and pixel_attention_mask padded with empty views the model drops."""
    from mech_vqa import explain

    vqa = tiny_idefics3_vqa
    wide = vqa.prepare(_gradient_image(200, 30), "What is the dog?", "red")
    square = vqa.prepare(_gradient_image(50, 50), "What is the color of the dog?", "The dog is red.")
    assert (wide.pixel_values.shape[1], square.pixel_values.shape[1]) == (3, 5)
    together = explain(vqa, vqa.batch([wide, square]), heads=[(1, 1)])
    for row, inp in enumerate([wide, square]):
        alone = explain(vqa, inp, heads=[(1, 1)])
        torch.testing.assert_close(together[row].positions.scores, alone.positions.scores, rtol=1e-4, atol=2e-5)


def test_smolvlm2_geometry_at_real_scale():
    """A meta-device SmolVLM (SmolVLM2-2.2B-Instruct's sizes as published in its config.json: SigLIP 384 px,
    14 px patches, pixel shuffle 3 -> 81 tokens per view; 1536 px longest edge) and an Idefics3 processor at
    those settings (SmolVLM's own needs num2words and a video processor; its image prompt is the same):
    token counts agree with the processor's and with the connector's output, for every tiled-test size."""
    from PIL import Image
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMVisionConfig

    from mech_vqa.build import IDEFICS3_SPECIAL, TINY_WORDS, idefics3_processor

    tokenizer = word_level_tokenizer(TINY_WORDS, extra_special=IDEFICS3_SPECIAL)
    text = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=49280)
    vision = SmolVLMVisionConfig(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                                 num_hidden_layers=27, num_attention_heads=16)
    config = SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=3,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    with torch.device("meta"):
        model = SmolVLMForConditionalGeneration(config)
    adapter = get_adapter(model)
    processor = idefics3_processor(tokenizer, 384, 81, 1536)
    adapter.bind_processor(processor)
    assert adapter.patch_grid == (9, 9) and adapter.patches_per_image_token == 9
    for width, height in NEXT_SIZES + [(90, 90), (1000, 600)]:
        enc = processor(images=Image.new("RGB", (width, height)), text="user : <image> dog", return_tensors="pt")
        n_views = enc["pixel_values"].shape[1]
        features = model.model.connector(torch.zeros(n_views, 27 * 27, 1152, device="meta"))
        geometry = adapter.image_geometry(enc["input_ids"][0], enc["pixel_values"])
        assert geometry.n_tokens == int((enc["input_ids"] == config.image_token_id).sum()) == features.shape[0] * 81
        assert features.shape[1] == 81 and geometry.grid == (9, 9)
        assert geometry.markers.numel() >= 3 and not set(geometry.markers.tolist()) & set(geometry.positions.tolist())
        if n_views > 1:
            tiles = geometry.view_boxes[:-1]
            assert float(((tiles[:, 2] - tiles[:, 0]) * (tiles[:, 3] - tiles[:, 1])).sum()) == pytest.approx(384 ** 2)
