"""Qwen-VL adapters: dynamic-resolution geometry, the processor's patch flattening, M-RoPE, bad input.

The per-family identities (decompositions that sum, attention rows equal to eager weights, logit lens,
relevancy, batched equals single) run on the tiny Qwen-VL models through ``any_vqa`` in tests/methods.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ANSWER, FAMILIES, QUESTION, assert_same_state, hook_snapshot, model_state
from mech_vqa import AdapterError, compare, explain
from mech_vqa.adapters.qwen_vl import patchify

QWEN = [name for name in FAMILIES if name.startswith("qwen") and name.endswith("vl")]
SIZES = [(48, 40), (40, 72), (100, 30), (64, 64)]   # (width, height): wide, tall, very wide, square


@pytest.fixture(params=QWEN)
def qwen_vqa(request):
    return request.getfixturevalue(FAMILIES[request.param])


def gradient_image(width, height):
    """R rises left to right, G top to bottom (255 * index / (side - 1)), B constant."""
    from PIL import Image

    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype("uint8"))


def flat_inputs(vqa, inp) -> dict:
    return vqa.adapter.model_inputs(inp.model_inputs())


@pytest.mark.parametrize("size", SIZES)
def test_grid_follows_the_processor(qwen_vqa, size):
    """Token count and grid from image_grid_thw: ``(h / merge) x (w / merge)`` tokens, raster order, each
    ``patch * merge`` pixels of the resized image, which smart_resize keeps within the image's proportions."""
    from mech_vqa.adapters.qwen_vl import smart_resize

    vqa = qwen_vqa
    inp = vqa.prepare(gradient_image(*size), QUESTION, ANSWER)
    geometry, adapter = inp.geometry, vqa.adapter
    side = adapter.token_size
    image_processor = vqa.processor.image_processor
    resized = smart_resize(size[1], size[0], side, image_processor.size["shortest_edge"],
                           image_processor.size["longest_edge"])
    assert geometry.image_size == resized
    assert geometry.grid == (resized[0] // side, resized[1] // side)
    _, patch_rows, patch_cols = inp.extra["image_grid_thw"][0].tolist()
    assert (patch_rows // adapter.merge_size, patch_cols // adapter.merge_size) == geometry.grid
    ids = inp.input_ids[0]
    assert (ids == adapter.image_token_id).sum() == geometry.n_tokens == geometry.grid[0] * geometry.grid[1]
    assert torch.equal(geometry.positions, (ids == adapter.image_token_id).nonzero().flatten())
    rows, cols = geometry.grid
    assert torch.equal(geometry.rowcol, torch.stack([torch.arange(rows * cols) // cols,
                                                     torch.arange(rows * cols) % cols], 1))
    assert geometry.boxes[-1].tolist() == [float(cols * side - side), float(rows * side - side),
                                           float(cols * side), float(rows * side)]
    assert inp.box_to_model([0, 0, size[0], size[1]]) == [0.0, 0.0, float(resized[1]), float(resized[0])]


def test_patchify_is_the_processors_flattening(qwen_vqa):
    """On an image the processor does not resize (sides already multiples of 16 within the budget), its
    pixel_values equal patchify of the image normalised by hand; unpatchify inverts it."""
    vqa = qwen_vqa
    image = gradient_image(48, 32)
    inp = vqa.prepare(image, QUESTION, ANSWER)
    assert inp.geometry.image_size == (32, 48)
    processor = vqa.processor.image_processor
    mean, std = torch.tensor(processor.image_mean).view(3, 1, 1), torch.tensor(processor.image_std).view(3, 1, 1)
    by_hand = (torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255 - mean) / std
    layout = inp.geometry.patch_layout
    torch.testing.assert_close(patchify(by_hand, layout["patch"], layout["merge"], layout["temporal"]),
                               inp.pixel_values[0], rtol=0, atol=1e-5)
    assert torch.equal(inp.geometry.patchify(inp.geometry.unpatchify(inp.pixel_values[0])), inp.pixel_values[0])
    torch.testing.assert_close(torch.from_numpy(inp.display_image()).permute(2, 0, 1),
                               (by_hand * std + mean).clamp(0, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", SIZES[:3])
def test_boxes_map_back_to_the_pixels_that_fed_each_token(qwen_vqa, size):
    """Token i is merged from patches ``merge^2 i ..`` of pixel_values (what the merger joins); their
    de-normalised pixels show the gradient image's values at the token's box mapped back to the original."""
    vqa = qwen_vqa
    width, height = size
    inp = vqa.prepare(gradient_image(width, height), QUESTION, ANSWER)
    geometry, adapter = inp.geometry, vqa.adapter
    patch, merge = adapter.patch_size, adapter.merge_size
    mean = torch.tensor(inp.image_mean).view(3, 1, 1)
    std = torch.tensor(inp.image_std).view(3, 1, 1)
    sx, sy, _, _ = inp.pixel_transform
    patches = inp.pixel_values[0].view(-1, 3, adapter.temporal_patch_size, patch, patch)[:, :, 0]   # first frame
    checked = 0
    for token, (x0, y0, _, _) in enumerate(geometry.boxes.tolist()):
        for j in range(merge * merge):
            pixels = patches[token * merge * merge + j] * std + mean                          # [3, P, P]
            dy, dx = divmod(j, merge)
            x_orig = (x0 + dx * patch + torch.arange(patch) + 0.5) / sx                        # original pixels
            y_orig = (y0 + dy * patch + torch.arange(patch) + 0.5) / sy
            expect_r = ((x_orig - 0.5) / (width - 1)).view(1, -1).expand(patch, -1)
            expect_g = ((y_orig - 0.5) / (height - 1)).view(-1, 1).expand(-1, patch)
            inside = ((x_orig > 2).view(1, -1) & (x_orig < width - 2).view(1, -1)
                      & (y_orig > 2).view(-1, 1) & (y_orig < height - 2).view(-1, 1))
            if inside.any():
                assert float((pixels[0] - expect_r)[inside].abs().max()) < 0.05
                assert float((pixels[1] - expect_g)[inside].abs().max()) < 0.05
                checked += int(inside.sum())
    assert checked > 0.5 * geometry.image_size[0] * geometry.image_size[1]


@torch.no_grad()
@pytest.mark.parametrize("size", [(48, 40), (40, 72)])
def test_image_positions_hold_the_merged_features(qwen_vqa, size):
    """Every image position's embedding is the vision module's merged output for that token, and the
    captured ViT features (patch order) merged by the model's own merger rebuild them."""
    vqa = qwen_vqa
    inp = vqa.prepare(gradient_image(*size), QUESTION, ANSWER)
    inputs = flat_inputs(vqa, inp)
    with vqa.trace(["resid_pre", "projector_out", "vision_features"], layers=[0]) as cache:
        vqa.forward(inp)
    embedded = cache["resid_pre", 0][0, inp.geometry.positions]
    visual = vqa.model.model.visual
    merged = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    torch.testing.assert_close(embedded, merged, rtol=0, atol=0)
    torch.testing.assert_close(cache["projector_out"][0], embedded, rtol=0, atol=0)
    rebuilt = visual.merger(cache["vision_features"][0])
    torch.testing.assert_close(rebuilt, embedded, rtol=1e-5, atol=1e-6)
    # the text positions keep their token embeddings
    text = inp.question_positions
    torch.testing.assert_close(cache["resid_pre", 0][0, text], vqa.adapter.embed(inp.input_ids[0, text]))


@torch.no_grad()
def test_dropping_mrope_height_and_width_axes_breaks_the_attention_rows(qwen_vqa, image, monkeypatch):
    """Mutation: a library that rotated with 1-D positions (the temporal axis for all three, i.e. M-RoPE's
    height / width axes dropped) gives attention rows that differ from the model's eager weights, while the
    layer's own angles reproduce them."""
    import copy

    vqa = qwen_vqa
    inp = vqa.prepare(image, QUESTION, ANSWER)
    inputs = flat_inputs(vqa, inp)
    model = copy.deepcopy(vqa.model)
    model.set_attn_implementation("eager")
    eager = torch.stack([a[0] for a in model(**inputs, output_attentions=True, use_cache=False).attentions]).float()
    positions = inp.answer_positions - 1
    rows = _answer_rows(vqa, inp)
    torch.testing.assert_close(rows, eager[:, :, positions], rtol=1e-4, atol=1e-6)

    position_ids, _ = vqa.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                     image_grid_thw=inputs["image_grid_thw"])
    assert not torch.equal(position_ids[1], position_ids[0])          # the image really has 2-D positions
    hidden = torch.zeros(1, inp.seq_len, vqa.adapter.d_model)
    flat_cos, flat_sin = vqa.model.model.language_model.rotary_emb(hidden, position_ids[:1].expand(3, -1, -1))
    original = type(vqa.adapter).rotate_qk

    def flat(angles, rows):  # the 1-D angles at the rows the library asked for (all, chosen, or both)
        if rows == inp.seq_len:
            return angles
        if rows == positions.numel():
            return angles[:, positions]
        return torch.cat([angles, angles[:, positions]], dim=1)

    def rotate_without_height_width(self, layer, q, k, position_embeddings):
        rows = position_embeddings[0].shape[-2]
        return original(self, layer, q, k, (flat(flat_cos, rows), flat(flat_sin, rows)))

    monkeypatch.setattr(type(vqa.adapter), "rotate_qk", rotate_without_height_width)
    # the library rotates where the attention's own inputs are not tapped: in eager attention (and on nnsight)
    vqa.model.set_attn_implementation("eager")
    try:
        with pytest.raises(AssertionError):
            torch.testing.assert_close(_answer_rows(vqa, inp), eager[:, :, positions], rtol=1e-4, atol=1e-6)
    finally:
        vqa.model.set_attn_implementation("sdpa")


def _answer_rows(vqa, inp) -> torch.Tensor:
    """``[layers, heads, answer rows, seq]`` recomputed from captured rotated q / k (the library's way)."""
    from mech_vqa.capture import attention_rows

    positions = inp.answer_positions - 1
    with vqa.trace(["q", "k"], positions=positions) as cache:
        vqa.forward(inp)
    return torch.stack([attention_rows(vqa.adapter, layer, cache["q", layer], cache["k", layer], positions)[0]
                        for layer in range(vqa.adapter.n_layers)])


def test_masks_are_laid_on_the_image_then_flattened(qwen_vqa, image):
    """mask * image + (1 - mask) * baseline on the flattened patches equals blending the images first and
    flattening after, as the processor flattens: the perturbation methods' masks are the image's."""
    from mech_vqa.methods.scoring import input_baseline

    vqa = qwen_vqa
    inp = vqa.prepare(gradient_image(70, 40), QUESTION, ANSWER)
    geometry = inp.geometry
    masks = torch.rand(2, 5, 8)
    up = geometry.mask_to_pixels(masks, inp.pixel_values.shape[1:])                   # [2, n_patches, C T P P]
    assert up.shape == (2, *inp.pixel_values.shape[1:])
    base = input_baseline(vqa, inp)
    assert base.shape == inp.pixel_values.shape
    blended = inp.pixel_values * up + base * (1 - up)
    image_masks = F.interpolate(masks.unsqueeze(1), size=geometry.image_size, mode="bilinear", align_corners=False)
    by_image = (geometry.unpatchify(inp.pixel_values[0]) * image_masks
                + geometry.unpatchify(base[0]) * (1 - image_masks))                    # [2, 3, H, W]
    torch.testing.assert_close(blended, geometry.patchify(by_image), rtol=0, atol=1e-6)


def test_every_method_and_batched_equals_single(qwen_vqa, image):
    vqa = qwen_vqa
    inp = vqa.prepare(image, QUESTION, ANSWER)
    result = compare(vqa, inp, tokens=[3], progress=False, box=[0, 0, 16, 16],
                     options={"igos": {"iterations": 1, "n_steps": 2, "mask_size": 4}})
    assert {row["method"] for row in result.table} == {"mechanistic", "logit_lens", "raw_attention", "relevancy",
                                                      "causal", "igos+", "igos++", "tam"}
    assert all(m.scores.shape == inp.geometry.grid for name, m in result.maps.items() if not name.startswith("igos"))
    assert result.maps["igos++"].scores.shape == (4, 6)                  # square cells on the 32 x 48 image
    assert all(np.isfinite([row["insertion_auc_raw"], row["deletion_auc_raw"]]).all() for row in result.table)
    other = vqa.prepare(gradient_image(40, 72), "What is it?", "red")
    batch = vqa.batch([inp, other])
    together = explain(vqa, batch, [inp.target(3), other.target(0)], progress=False)
    alone = explain(vqa, other, other.target(0), progress=False)
    torch.testing.assert_close(together[1].heads.scores, alone.heads.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vqa.logits(batch)[1, batch.offsets[1]:], vqa.logits(other)[0], rtol=1e-4, atol=1e-5)


def test_ablations_on_qwen(qwen_vqa, image):
    from mech_vqa import ablate, block_ablations, head_ablations, image_token_ablation

    vqa = qwen_vqa
    inp = vqa.prepare(image, QUESTION, ANSWER)
    ablations = head_ablations(vqa, layers=[1]) + block_ablations(vqa, layers=[0])
    ablations.append(image_token_ablation(vqa, inp, inp.image_positions[:2]))
    result = ablate(vqa, inp, ablations, targets=[inp.target(3)])
    frame = result.to_dataframe()
    assert len(frame) == len(ablations) and np.isfinite(frame.select_dtypes("number").to_numpy()).all()


def test_cli_runs_compare_on_a_saved_qwen(qwen_vqa, tmp_path):
    from PIL import Image

    from mech_vqa.cli import main
    from mech_vqa.dataset import read_results

    qwen_vqa.model.save_pretrained(tmp_path / "model")
    qwen_vqa.processor.save_pretrained(tmp_path / "model")
    rows = []
    for i, (w, h) in enumerate([(48, 40), (40, 72)]):
        gradient_image(w, h).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": QUESTION, "answer": ANSWER, "box": [0, 0, w // 2, h // 2]})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "results.jsonl"
    assert main(["run", "explain", str(tmp_path / "data.jsonl"), "--out", str(out), "--model",
                 str(tmp_path / "model"), "--no-progress"]) == 0
    results = read_results(out)
    assert [r["status"] for r in results] == ["ok", "ok"] and all(0 <= r["in_box_share"] <= 1 for r in results)
    assert Image.open(tmp_path / "0.png").size == (48, 40)


# ------------------------------------------------------------------------------------------ bad input
def test_image_smaller_than_one_merged_token(qwen_vqa):
    from PIL import Image

    side = qwen_vqa.adapter.token_size
    with pytest.raises(AdapterError, match=f"smaller than one image token .*{side} x {side} px.*at least"):
        qwen_vqa.prepare(Image.new("RGB", (side - 1, 40)), QUESTION, ANSWER)
    with pytest.raises(AdapterError, match="aspect ratio above 200"):
        qwen_vqa.prepare(Image.new("RGB", (side * 201, side)), QUESTION, ANSWER)


def test_video_where_an_image_is_expected(qwen_vqa, image):
    adapter = qwen_vqa.adapter
    inp = qwen_vqa.prepare(image, QUESTION, ANSWER)
    ids = inp.input_ids[0].clone()
    ids[inp.question_positions[0]] = adapter.video_token_id
    with pytest.raises(AdapterError, match="video tokens: mech_vqa explains images"):
        adapter.image_geometry(ids, inp.pixel_values, inp.extra["image_grid_thw"])
    with pytest.raises(AdapterError, match="temporal patches: that is a video"):
        adapter.image_geometry(inp.input_ids[0], None, torch.tensor([[2, 4, 6]]))
    with pytest.raises(AdapterError, match="one image per prompt"):
        adapter.image_geometry(inp.input_ids[0], None, torch.tensor([[1, 4, 6], [1, 4, 6]]))
    video = dict(flat_inputs(qwen_vqa, inp), pixel_values_videos=inp.pixel_values[0],
                 video_grid_thw=torch.tensor([[1, 4, 6]]))
    with pytest.raises(AdapterError, match="hold a video"):
        qwen_vqa.forward(video)
    with pytest.raises(TypeError, match="must be a PIL.Image"):
        qwen_vqa.prepare([image, image], QUESTION, ANSWER)                  # frames of a clip


def test_grid_not_matching_the_prompts_image_tokens(qwen_vqa, image):
    vqa, adapter = qwen_vqa, qwen_vqa.adapter
    inp = vqa.prepare(image, QUESTION, ANSWER)
    n = inp.geometry.n_tokens
    with pytest.raises(AdapterError, match=f"the prompt has {n - 1} image tokens but image_grid_thw"):
        adapter.image_geometry(inp.input_ids[0, :int(inp.image_positions[-1])], inp.pixel_values,
                               inp.extra["image_grid_thw"])
    with pytest.raises(AdapterError, match=r"pixel_values hold 20 patches but image_grid_thw \[1, 4, 6\] says 24"):
        adapter.image_geometry(inp.input_ids[0], inp.pixel_values[:, :20], inp.extra["image_grid_thw"])
    # at run time: one clear error before any forward, and the model exactly as found
    broken = dataclasses.replace(inp, extra=dict(inp.extra, image_grid_thw=torch.tensor([[1, 4, 8]])))
    vqa.logits(inp)
    before, hooks = model_state(vqa.model), hook_snapshot(vqa.model)
    with pytest.raises(AdapterError, match=r"hold \[6\] image tokens but image_grid_thw \[\[1, 4, 8\]\] gives \[8\]"):
        explain(vqa, broken, broken.target(3), progress=False)
    with pytest.raises(AdapterError, match="image tokens but image_grid_thw"):
        compare(vqa, broken, tokens=[3], progress=False, methods=["raw_attention", "igos++"],
                options={"igos": {"iterations": 1, "n_steps": 2, "mask_size": 4}})
    assert_same_state(before, model_state(vqa.model))
    assert hook_snapshot(vqa.model) == hooks


# ------------------------------------------------------------------------------------------ DeepStack
@torch.no_grad()
def test_deepstack_is_a_term_of_the_residual_decomposition(tiny_qwen3vl_vqa):
    """Qwen3-VL: at the image positions, embedding + every block's attention (= its heads) and MLP output
    + the DeepStack term rebuild the residual exactly; the DeepStack term is the ViT's DeepStack features
    placed at the image positions; without it the decomposition does not sum (mutation)."""
    vqa, adapter = tiny_qwen3vl_vqa, tiny_qwen3vl_vqa.adapter
    assert adapter.deepstack_layers() == [0]
    inp = vqa.prepare(gradient_image(48, 40), QUESTION, ANSWER)
    positions = inp.geometry.positions
    names = ["resid_pre", "resid_post", "attn_out", "mlp_out", "z", "deepstack"]
    with vqa.trace(names, positions=positions) as cache:
        vqa.forward(inp)
    total = cache["resid_pre", 0].clone()
    for layer in range(adapter.n_layers):
        heads = torch.einsum("bphd,hdm->bpm", cache["z", layer], adapter.W_O(layer))
        torch.testing.assert_close(heads, cache["attn_out", layer], rtol=1e-5, atol=1e-6)
        total = total + heads + cache["mlp_out", layer] + cache["deepstack", layer]
        after = cache["resid_pre", layer + 1] if layer + 1 < adapter.n_layers else cache["resid_post", layer]
        torch.testing.assert_close(cache["resid_post", layer] + cache["deepstack", layer], after, rtol=0, atol=0)
    torch.testing.assert_close(total, cache["resid_post", adapter.n_layers - 1], rtol=1e-5, atol=1e-5)
    # the term is the ViT's DeepStack feature at each image position, and it is not negligible
    inputs = flat_inputs(vqa, inp)
    features = vqa.model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).deepstack_features
    torch.testing.assert_close(cache["deepstack", 0][0], features[0], rtol=0, atol=0)
    assert float(cache["deepstack", 1].abs().max()) == 0
    without = total - sum(cache["deepstack", layer] for layer in range(adapter.n_layers))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(without, cache["resid_post", adapter.n_layers - 1], rtol=1e-5, atol=1e-5)
    # at text positions nothing is added
    with vqa.trace(["deepstack"], positions=inp.question_positions) as text_cache:
        vqa.forward(inp)
    assert float(text_cache["deepstack", 0].abs().max()) == 0


@torch.no_grad()
def test_logit_lens_reads_the_residual_after_deepstack(tiny_qwen3vl_vqa, monkeypatch):
    """The stage after layer 0 is what layer 1 reads (layer 0's output + DeepStack); a lens that dropped
    the DeepStack term (mutation) reads layer 0's bare output instead and misses it."""
    from mech_vqa import logit_lens

    vqa = tiny_qwen3vl_vqa
    inp = vqa.prepare(gradient_image(48, 40), QUESTION, ANSWER)
    with vqa.trace(["resid_pre"], layers=[1]) as cache:
        vqa.forward(inp)
    reads = cache["resid_pre", 1][0, inp.geometry.positions]
    model = vqa.model
    dog = vqa.tokenizer.convert_tokens_to_ids("dog")
    expected = model.lm_head(model.model.language_model.norm(reads)).float().softmax(-1)[:, dog]
    torch.testing.assert_close(logit_lens(vqa, inp, "dog").word_probs[1], expected, rtol=1e-4, atol=1e-6)
    monkeypatch.setattr(type(vqa.adapter), "deepstack_layers", lambda self: [])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(logit_lens(vqa, inp, "dog").word_probs[1], expected, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_resumed_runs_add_deepstack(tiny_qwen3vl_vqa):
    """Ablation sweeps resume from a decoder layer (ResidualCheckpoint): on Qwen3-VL they must add DeepStack
    after the layers where the model does, or they differ from whole forwards (mutation: drop it)."""
    from mech_vqa import Intervention
    from mech_vqa.runner import FullForwardRuns, ResidualCheckpoint

    vqa = tiny_qwen3vl_vqa
    inp = vqa.prepare(gradient_image(48, 40), QUESTION, ANSWER)
    edits = [Intervention("mlp_out", 0)]
    positions = [inp.target(3).position, inp.target(0).position]
    full = FullForwardRuns(vqa, inp).run_from(0, 2, positions, edits)
    checkpoint = ResidualCheckpoint(vqa, inp)
    assert sorted(checkpoint.added) == [0]
    torch.testing.assert_close(checkpoint.run_from(0, 2, positions, edits), full, rtol=1e-5, atol=1e-5)
    checkpoint.added = {}
    with pytest.raises(AssertionError):
        torch.testing.assert_close(checkpoint.run_from(0, 2, positions, edits), full, rtol=1e-5, atol=1e-5)
