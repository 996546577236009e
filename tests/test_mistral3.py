"""Mistral-3 (Pixtral tower, patch merger, [IMG_BREAK] / [IMG_END] row markers): geometry identities on the
tiny model, its methods, its refusals, and real-scale token counts on a meta-device Mistral-Small-3.1."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import ANSWER, QUESTION

from mech_vqa import AdapterError

SIZES = [(70, 40), (40, 70), (50, 50), (200, 30), (20, 20)]   # (width, height): wide, tall, square, very wide, small


def _gradient_image(width, height):
    """R rises left to right, G top to bottom (255 * index / (side - 1)), B constant."""
    from PIL import Image

    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype("uint8"))


def _merged_features(vqa, inp):
    """``(embedded [S, d], projector rows [n, d], merger input [n, m^2, d_v], normed tower patches [h, w, d_v])``
    from one forward: what the model put at each position, what its projector made, and the patches its
    merger folded (its merging layer's input, channel-major), next to the tower's own normed patch grid."""
    projector = vqa.model.model.multi_modal_projector
    folded, rope = [], []
    handles = [projector.patch_merger.merging_layer.register_forward_pre_hook(lambda m, args: folded.append(args[0])),
               vqa.model.model.vision_tower.patch_positional_embedding.register_forward_pre_hook(
                   lambda m, args: rope.append(args[1]))]
    try:
        with torch.no_grad(), vqa.trace(["resid_pre", "projector_out"], layers=[0]) as cache:
            vqa.forward(inp)
            tower = vqa.model.model.vision_tower(inp.pixel_values, image_sizes=inp.extra["image_sizes"])
            patches = projector.norm(tower.last_hidden_state[0])
    finally:
        for handle in handles:
            handle.remove()
    height, width = (int(v) for v in inp.extra["image_sizes"][0])
    patch, m = vqa.adapter.patch_size, vqa.adapter.merge_size
    grid = patches.view(height // patch, width // patch, -1)
    # the tower's 2D RoPE positions are each patch's (row, col) on the raster grid the boxes are drawn on
    raster = torch.stack(torch.meshgrid(torch.arange(height // patch), torch.arange(width // patch), indexing="ij"), -1)
    assert torch.equal(rope[0].cpu(), raster.view(-1, 2))
    merged = folded[0].unflatten(-1, (-1, m * m)).transpose(1, 2)                 # [n, m^2, d_v]
    return cache["resid_pre", 0][0], cache["projector_out"][0], merged, grid


def _boxes_hold_their_patches(vqa, geometry, merged, grid) -> bool:
    """Whether each token's merger input is exactly the tower patches whose pixel centres lie in its box."""
    patch = vqa.adapter.patch_size
    rows, cols = grid.shape[:2]
    centres_x, centres_y = (torch.arange(cols) + 0.5) * patch, (torch.arange(rows) + 0.5) * patch
    for token, (x0, y0, x1, y1) in enumerate(geometry.boxes.tolist()):
        inside = grid[(centres_y > y0) & (centres_y < y1)][:, (centres_x > x0) & (centres_x < x1)].flatten(0, 1)
        if inside.shape[0] != vqa.adapter.patches_per_image_token:
            return False
        distance = torch.cdist(merged[token], inside)
        if float(distance.min(1).values.max()) > 1e-5 or float(distance.min(0).values.max()) > 1e-5:
            return False
    return True


@pytest.mark.parametrize("size", SIZES)
def test_mistral3_positions_hold_the_merged_patches_inside_each_box_and_markers_are_not_patches(tiny_mistral3_vqa,
                                                                                                size):
    """The projector's rows are what the model put at the image positions (in order); each token's merger
    input is exactly the 2 x 2 tower patches inside its box; the [IMG_BREAK] / [IMG_END] markers close the
    rows, are geometry.markers, hold their word embeddings and are never painted."""
    vqa = tiny_mistral3_vqa
    width, height = size
    inp = vqa.prepare(_gradient_image(width, height), QUESTION, ANSWER)
    geometry, ids = inp.geometry, inp.input_ids[0]
    rows, cols = geometry.grid
    resized = tuple(int(v) for v in inp.extra["image_sizes"][0])
    assert geometry.image_size == resized == tuple(inp.pixel_values.shape[-2:]) == (rows * 8, cols * 8)
    assert max(resized) <= 64 + 7 and geometry.n_tokens == rows * cols
    tokens = vqa.processor.tokenizer.convert_ids_to_tokens(ids[geometry.markers])
    assert tokens == ["[IMG_BREAK]"] * (rows - 1) + ["[IMG_END]"]
    assert not set(geometry.markers.tolist()) & set(geometry.positions.tolist())
    span = torch.arange(int(geometry.positions[0]), int(geometry.markers[-1]) + 1)
    assert sorted(geometry.positions.tolist() + geometry.markers.tolist()) == span.tolist()
    embedded, projected, merged, grid = _merged_features(vqa, inp)
    torch.testing.assert_close(embedded[geometry.positions], projected, rtol=0, atol=0)
    words = vqa.model.model.language_model.embed_tokens(ids[geometry.markers])
    torch.testing.assert_close(embedded[geometry.markers], words, rtol=0, atol=0)   # a marker is never a patch
    assert _boxes_hold_their_patches(vqa, geometry, merged, grid)
    # a painted map covers the resized image with image tokens' values only, row-major
    painted = geometry.paint(torch.arange(float(geometry.n_tokens)), view=0)
    assert painted.shape == resized
    assert torch.equal(painted[::8, ::8].flatten(), torch.arange(float(geometry.n_tokens)))


def test_mistral3_a_painted_row_break_or_a_transposed_grid_fails_the_identities(tiny_mistral3_vqa):
    """Mutations the identities above must catch: image positions read as one contiguous run (an
    [IMG_BREAK] painted as a patch, the last token lost), and boxes laid out column-major."""
    vqa = tiny_mistral3_vqa
    inp = vqa.prepare(_gradient_image(70, 40), QUESTION, ANSWER)
    geometry = inp.geometry
    embedded, projected, merged, grid = _merged_features(vqa, inp)
    start = int(geometry.positions[0])
    painted_break = torch.arange(start, start + geometry.n_tokens)
    assert not torch.equal(embedded[painted_break], projected)
    rows, cols = geometry.grid
    index = torch.arange(rows * cols)
    column_major = torch.stack([index % rows, index // rows], 1)                    # (row, col) transposed order
    boxes = torch.cat([column_major.flip(1) * 8, (column_major.flip(1) + 1) * 8], 1).float()
    assert not _boxes_hold_their_patches(vqa, dataclasses.replace(geometry, boxes=boxes), merged, grid)


@pytest.mark.parametrize("size", SIZES)
def test_mistral3_boxes_map_back_to_the_original_pixels(tiny_mistral3_vqa, size):
    """The de-normalised pixels in each token's box equal the original gradient at that box mapped back
    through ``pixel_transform`` (the processor's resize is a stretch: no crop, no padding)."""
    width, height = size
    inp = tiny_mistral3_vqa.prepare(_gradient_image(width, height), QUESTION, ANSWER)
    mean, std = torch.tensor(inp.image_mean).view(3, 1, 1), torch.tensor(inp.image_std).view(3, 1, 1)
    pixels = inp.pixel_values[0] * std + mean
    sx, sy, dx, dy = inp.pixel_transform
    out_h, out_w = inp.geometry.image_size
    assert (dx, dy) == (0.0, 0.0) and (sx, sy) == (out_w / width, out_h / height)
    for x0, y0, x1, y1 in inp.geometry.boxes.long().tolist():
        cx, cy = ((x0 + x1) / 2 + dx) / sx, ((y0 + y1) / 2 + dy) / sy              # original pixels
        red, green = pixels[0, y0:y1, x0:x1].mean(), pixels[1, y0:y1, x0:x1].mean()
        assert float(red) == pytest.approx((cx - 0.5) / (width - 1), abs=0.04)
        assert float(green) == pytest.approx((cy - 0.5) / (height - 1), abs=0.04)
    assert inp.box_to_model([0, 0, width, height]) == [0.0, 0.0, float(out_w), float(out_h)]


def test_mistral3_masks_blend_pixels_as_the_processor_makes_them(tiny_mistral3_vqa):
    """iGOS / insertion-deletion masks are laid over pixel_values as they are (one image, the frame): a mask
    that is 1 on some grid cells and 0 elsewhere, blended with the processor's baseline pixels, keeps the
    image's pixels exactly inside those cells' tokens' boxes and the baseline's everywhere else."""
    from mech_vqa.methods.scoring import input_baseline

    vqa = tiny_mistral3_vqa
    inp = vqa.prepare(_gradient_image(70, 40), QUESTION, ANSWER)
    geometry = inp.geometry
    rows, cols = geometry.grid
    mask = torch.zeros(1, rows, cols)
    mask[0, 1:3, 2:5] = 1
    upsampled = geometry.mask_to_pixels(mask, inp.pixel_values.shape[1:], mode="nearest")
    assert upsampled.shape == (1, 1, *geometry.image_size)
    baseline = input_baseline(vqa, inp, "black")
    assert baseline.shape == inp.pixel_values.shape
    blended = upsampled * inp.pixel_values + (1 - upsampled) * baseline
    keep = torch.zeros(geometry.image_size, dtype=torch.bool)
    chosen = mask[0, geometry.rowcol[:, 0], geometry.rowcol[:, 1]] > 0
    for x0, y0, x1, y1 in geometry.boxes[chosen].long().tolist():
        keep[y0:y1, x0:x1] = True
    assert int(keep.sum()) == 6 * 8 * 8
    torch.testing.assert_close(blended[0][:, keep], inp.pixel_values[0][:, keep], rtol=0, atol=0)
    torch.testing.assert_close(blended[0][:, ~keep], baseline[0][:, ~keep], rtol=0, atol=0)
    assert not torch.equal(baseline[0][:, keep], inp.pixel_values[0][:, keep])


def test_mistral3_methods_and_the_vision_relevancy_refusal(tiny_mistral3_vqa):
    """Token-level and pixel-perturbation methods run; vision-stage relevancy is one clear error naming the
    patch merger, and the LLM stage runs."""
    from mech_vqa import compare
    from mech_vqa.methods.relevancy import relevancy

    vqa = tiny_mistral3_vqa
    inp = vqa.prepare(_gradient_image(70, 40), QUESTION, ANSWER)
    with pytest.raises(NotImplementedError, match="merges 4 patches into each image token"):
        relevancy(vqa, inp, [0], vision=True, progress=False)
    llm = relevancy(vqa, inp, [0], vision=False, progress=False)
    assert llm.llm.shape[-2:] == inp.geometry.grid
    frame = compare(vqa, inp, progress=False, methods=["mechanistic", "igos+"],
                    options={"igos+": {"iterations": 2}}, head_claims=None).to_dataframe()
    assert list(frame["method"]) == ["mechanistic", "igos+"]


def test_mistral3_batch_of_different_image_sizes_equals_rows_alone(tiny_mistral3_vqa):
    """Rows with 16 and 49 image tokens: pixels zero-padded to the largest image, each cropped back by the
    model to its image_sizes, give what each row gives alone."""
    from mech_vqa import explain

    vqa = tiny_mistral3_vqa
    wide = vqa.prepare(_gradient_image(200, 30), "What is the dog?", "red")
    square = vqa.prepare(_gradient_image(50, 50), QUESTION, ANSWER)
    assert (wide.geometry.n_tokens, square.geometry.n_tokens) == (16, 49)
    together = explain(vqa, vqa.batch([wide, square]), heads=[(1, 1)])
    for row, inp in enumerate([wide, square]):
        alone = explain(vqa, inp, heads=[(1, 1)])
        torch.testing.assert_close(together[row].positions.scores, alone.positions.scores, rtol=1e-4, atol=2e-5)


def test_mistral3_inputs_that_do_not_match_are_one_clear_error(tiny_mistral3_vqa):
    vqa = tiny_mistral3_vqa
    adapter = vqa.adapter
    inp = vqa.prepare(_gradient_image(70, 40), QUESTION, ANSWER)
    ids, sizes = inp.input_ids[0], inp.extra["image_sizes"]
    with pytest.raises(AdapterError, match="needs image_sizes"):
        adapter.image_geometry(ids)
    assert torch.equal(adapter.image_geometry(ids, inp.pixel_values).positions, inp.geometry.positions)
    with pytest.raises(AdapterError, match="one image per prompt"):
        adapter.image_geometry(ids, inp.pixel_values, sizes.repeat(2, 1))
    with pytest.raises(AdapterError, match="not a whole number of 8 px image tokens"):
        adapter.image_geometry(ids, inp.pixel_values, torch.tensor([[36, 64]]))
    with pytest.raises(AdapterError, match="gives 4 x 8 = 32"):
        adapter.image_geometry(ids, inp.pixel_values, torch.tensor([[32, 64]]))
    swapped = ids.clone()   # an [IMG_BREAK] and the [IMG] after it trade places
    first_break = int(inp.geometry.markers[0])
    swapped[first_break], swapped[first_break + 1] = ids[first_break + 1], ids[first_break]
    with pytest.raises(AdapterError, match="not laid out as the processor lays them"):
        adapter.image_geometry(swapped, inp.pixel_values, sizes)
    wrong_end = ids.clone()  # right places, wrong marker: the last row closed by a break
    wrong_end[inp.geometry.markers[-1]] = ids[first_break]
    with pytest.raises(AdapterError, match=r"not \[IMG_BREAK\]"):
        adapter.image_geometry(wrong_end, inp.pixel_values, sizes)
    with pytest.raises(AdapterError, match="depends on their size"):
        adapter.tokens_per_image()


def test_mistral3_processor_reloads_without_torchvision(tiny_mistral3_vqa, tmp_path):
    """The saved model and processor load back through VQAModel.from_pretrained (transformers' own
    PixtralProcessor with its PIL image processor) and give the same geometry and logits."""
    from mech_vqa import VQAModel

    vqa = tiny_mistral3_vqa
    vqa.model.save_pretrained(tmp_path)
    vqa.processor.save_pretrained(tmp_path)
    loaded = VQAModel.from_pretrained(str(tmp_path))
    assert type(loaded.processor).__name__ == "PixtralProcessor"
    inp = vqa.prepare(_gradient_image(70, 40), QUESTION, ANSWER)
    again = loaded.prepare(_gradient_image(70, 40), QUESTION, ANSWER)
    assert torch.equal(again.input_ids, inp.input_ids) and torch.equal(again.pixel_values, inp.pixel_values)
    assert torch.equal(again.geometry.markers, inp.geometry.markers)
    torch.testing.assert_close(loaded.logits(again), vqa.logits(inp), rtol=0, atol=0)


# (width, height): the tiled LLaVA tests' sizes (test_adapters' NEXT_SIZES and (90, 90)) and the (1000, 600) the
# InternVL / SmolVLM real-scale checks add, as the other families' real-scale checks use; then photo-sized ones
# beyond the 1540 px longest edge or far from square (the sizes of the Qwen-VL real-scale check)
SCALE_SIZES = [(70, 40), (40, 70), (50, 50), (200, 30), (90, 90), (1000, 600),
               (640, 480), (480, 640), (1000, 300), (1920, 1080), (300, 2000), (512, 512)]


def test_mistral_small_3_1_geometry_at_real_scale():
    """A meta-device Mistral-Small-3.1-24B (mistralai/Mistral-Small-3.1-24B-Instruct-2503's config.json sizes:
    Pixtral 1540 px, 14 px patches, merge 2; Mistral text 40 layers, 32 heads, 8 kv heads, head_dim 128) and a
    PixtralProcessor at its preprocessor settings (longest_edge 1540): for every size the adapter's tokens
    agree with the prompt, the processor's own count (_get_num_multimodal_tokens: tokens plus one marker per
    row), the resize rule, and the projector's output on the meta device."""
    from PIL import Image
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig
    from transformers.models.pixtral.image_processing_pil_pixtral import get_resize_output_image_size

    from mech_vqa import VQAModel
    from mech_vqa.build import MISTRAL3_SPECIAL, TINY_WORDS, pixtral_processor, word_level_tokenizer

    tokenizer = word_level_tokenizer(TINY_WORDS, extra_special=MISTRAL3_SPECIAL)
    text = MistralConfig(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=131072, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None)
    vision = PixtralVisionConfig(image_size=1540, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                 num_hidden_layers=24, num_attention_heads=16, head_dim=64)
    config = Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=2,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
                            multimodal_projector_bias=False, projector_hidden_act="gelu", vision_feature_layer=-1)
    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(config)
    processor = pixtral_processor(tokenizer, patch_size=14, spatial_merge_size=2, longest_edge=1540)
    vqa = VQAModel(model.eval(), processor, name="mistral-small-3.1-meta")
    adapter = vqa.adapter
    assert (adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, adapter.head_dim, adapter.d_model) == (
        40, 32, 8, 128, 5120)
    assert adapter.token_size == 28 and adapter.patches_per_image_token == 4 and adapter.sliding_window(0) is None
    for width, height in SCALE_SIZES:
        inp = vqa.prepare(Image.new("RGB", (width, height), (90, 120, 200)), QUESTION, "red")
        geometry = inp.geometry
        resized = get_resize_output_image_size(np.zeros((height, width, 3)), size=(1540, 1540), patch_size=(28, 28))
        assert geometry.image_size == tuple(resized) == tuple(inp.pixel_values.shape[-2:]) and max(resized) <= 1540
        rows, cols = geometry.grid
        counted = processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0]
        n_prompt = int((inp.input_ids[0] == adapter.image_token_id).sum())
        assert geometry.n_tokens == n_prompt == rows * cols and counted == rows * (cols + 1)
        assert geometry.markers.numel() == rows
        projected = model.model.multi_modal_projector(
            torch.zeros(rows * cols * 4, 1024, device="meta"), inp.extra["image_sizes"])
        assert tuple(projected.shape) == (rows * cols, 5120)
        # the boxes tile the resized image exactly once, 28 px each
        assert float(((geometry.boxes[:, 2:] - geometry.boxes[:, :2]) == 28).all())
        assert float(geometry.boxes[:, 2].max()) == resized[1] and float(geometry.boxes[:, 3].max()) == resized[0]
        # proportions survive within a token per side
        assert abs(resized[1] / resized[0] - width / height) <= 28 / min(resized) * (width / height) * 2
