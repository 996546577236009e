"""Token Activation Map: a hand computation after the published code, the filter, errors, backends, compare."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from conftest import ANSWER, QUESTION, assert_leaves_model_as_found, first_view_positions, image_grid
from mech_vqa import VQAModel
from mech_vqa.methods.tam import rank_gaussian_filter, tam_map, token_activation_maps
from mech_vqa.results import PatchMap


def reference_rank_gaussian_filter(img, kernel_size=3):
    """xmed-lab/TAM tam.py ``rank_guassian_filter``, loop for loop."""
    filtered_img = np.zeros_like(img)
    pad_width = kernel_size // 2
    padded_img = np.pad(img, pad_width, mode="reflect")
    ax = np.array(range(kernel_size ** 2)) - kernel_size ** 2 // 2
    for i in range(pad_width, img.shape[0] + pad_width):
        for j in range(pad_width, img.shape[1] + pad_width):
            window = padded_img[i - pad_width:i + pad_width + 1, j - pad_width:j + pad_width + 1]
            sorted_window = np.sort(window.flatten())
            mean = sorted_window.mean()
            if mean > 0:
                sigma = sorted_window.std() / mean
                kernel = np.exp(-(ax ** 2) / (2 * sigma ** 2))
                kernel = kernel / np.sum(kernel)
                value = (sorted_window * kernel).sum()
            else:
                value = 0
            filtered_img[i - pad_width, j - pad_width] = value
    return filtered_img


def reference_tam(logits: np.ndarray, inp, answer_index: int, image=None, first_view=None, grid=None) -> np.ndarray:
    """TAM for one answer token the way the published code computes it (ECI with ``minimize_scalar``, joint
    min-max with the context's scores, the filter), with every token explained by its own id. ``image``:
    every image token's position (default the input's), ``first_view``: those of the map's grid, row-major
    (default all), ``grid``: its (rows, cols) (default the geometry's)."""
    ids = inp.input_ids[0].tolist()
    image = inp.image_positions.tolist() if image is None else list(image)
    question = inp.question_positions.tolist()
    answers = inp.answer_positions.tolist()
    cls = ids[answers[answer_index]]
    scores = np.clip(logits[:, cls], 0, None)
    img_scores = scores[image]
    # context tokens in order: question tokens (own position), earlier answer tokens (predicting position)
    txt_tokens = [ids[q] for q in question] + [ids[a] for a in answers[:answer_index]]
    txt_scores = np.concatenate([scores[question], scores[[a - 1 for a in answers[:answer_index + 1]]]])
    img_scores_list = [np.clip(logits[image, c], 0, None) for c in txt_tokens]
    keep = [i for i in range(len(txt_tokens)) if txt_tokens[i] != cls]
    if keep:
        w = txt_scores[keep]
        w = w / (w.sum() + 1e-8)
        interference = (np.stack([img_scores_list[i] for i in keep], 0) * w.reshape(-1, 1)).sum(0)
        scale = minimize_scalar(lambda x: np.sum((img_scores - interference * x) ** 2)).x
        img_scores = np.clip(img_scores - interference * scale, 0, None)
    txt_scores = txt_scores[:-1]  # the predicting position itself is left out
    both = np.concatenate([img_scores, txt_scores])
    spread = both.max() - both.min()  # a constant map: 0/0 in the code, all zeros here (module docstring)
    img_scores = (img_scores - both.min()) / spread if spread > 0 else np.zeros_like(img_scores)
    rows, cols = inp.geometry.grid if grid is None else grid
    if first_view is not None:
        img_scores = img_scores[[image.index(p) for p in first_view]]
    return reference_rank_gaussian_filter(img_scores.reshape(rows, cols), 3)


def test_tam_equals_a_hand_computation(tiny_vqa, prepared):
    with torch.no_grad():
        logits = tiny_vqa.model(**prepared.model_inputs()).logits[0].double().numpy()
    maps = token_activation_maps(tiny_vqa, prepared)
    assert len(maps) == prepared.answer_positions.numel()
    applied = 0
    for index, patch_map in enumerate(maps):
        expected = reference_tam(logits, prepared, index)
        np.testing.assert_allclose(patch_map.scores.numpy(), expected, rtol=0, atol=1e-5)
        assert patch_map.targets == [prepared.target(index).to_dict()]
        applied += patch_map.info["eci_scale"] != 0
    assert applied  # the interference removal did something on some token


def test_tam_on_each_family_beyond_llava_equals_a_hand_computation(beyond_llava_vqa, wide_image):
    """Image tokens read from the input ids (all of them for the normalisation; the first view's, row-major,
    for the map), the model's own logits: each answer token's map has the view's grid and equals the
    published computation; markers (row breaks, tile markers) never enter it."""
    vqa = beyond_llava_vqa
    inp = vqa.prepare(wide_image, QUESTION, ANSWER)
    with torch.no_grad():
        logits = vqa.model(**vqa.adapter.model_inputs(inp.model_inputs())).logits[0].double().numpy()
    every = (inp.input_ids[0] == vqa.adapter.image_token_id).nonzero().flatten().tolist()
    first, grid = first_view_positions(vqa, inp).tolist(), image_grid(vqa, inp)
    maps = token_activation_maps(vqa, inp)
    assert len(maps) == inp.answer_positions.numel()
    for index, patch_map in enumerate(maps):
        assert tuple(patch_map.scores.shape) == tuple(grid) == tuple(inp.geometry.grid)
        expected = reference_tam(logits, inp, index, image=every, first_view=first, grid=grid)
        np.testing.assert_allclose(patch_map.scores.numpy(), expected, rtol=0, atol=1e-5)
    assert sum(m.info["eci_scale"] != 0 and float(m.scores.max()) > 0 for m in maps) >= 2   # the parts did act
    mean = tam_map(vqa, inp, [1, 3])
    torch.testing.assert_close(mean.scores, (maps[1].scores + maps[3].scores) / 2, rtol=0, atol=0)


def test_rank_gaussian_filter_equals_the_published_loop():
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (4, 4), (1, 6)]:
        values = np.clip(rng.normal(size=shape), -0.5, None).astype(np.float64)
        values[0, 0] = 0
        got = rank_gaussian_filter(torch.from_numpy(values)).numpy()
        np.testing.assert_allclose(got, reference_rank_gaussian_filter(values), rtol=0, atol=1e-6)
    zeros = rank_gaussian_filter(torch.zeros(3, 3))
    assert torch.equal(zeros, torch.zeros(3, 3))  # mean 0: 0, as in the code
    flat = rank_gaussian_filter(torch.full((3, 3), 0.5))
    torch.testing.assert_close(flat, torch.full((3, 3), 0.5))  # sigma 0: the window's value (NaN in the code)
    with pytest.raises(ValueError, match="odd"):
        rank_gaussian_filter(torch.zeros(3, 3), 2)
    with pytest.raises(ValueError, match="rows, cols"):
        rank_gaussian_filter(torch.zeros(3))


def test_without_eci_and_filter_it_is_the_normalised_class_activation(tiny_vqa, prepared):
    with torch.no_grad():
        logits = tiny_vqa.model(**prepared.model_inputs()).logits[0].float()
    target = prepared.target(1)
    patch_map = token_activation_maps(tiny_vqa, prepared, [1], eci=False, denoise=False)[0]
    raw = logits[prepared.image_positions, target.token_id].clamp(min=0)
    context = torch.cat([prepared.question_positions, prepared.answer_positions[:1] - 1])
    both = torch.cat([raw, logits[context, target.token_id].clamp(min=0)])
    expected = ((raw - both.min()) / (both.max() - both.min())).view(*prepared.geometry.grid)
    torch.testing.assert_close(patch_map.scores, expected, rtol=0, atol=1e-6)


def test_tam_map_for_compare_and_model_left_as_found(tiny_vqa, prepared):
    from mech_vqa.compare import METHODS, compare
    from mech_vqa.methods import PATCH_METHODS

    assert "tam" in METHODS and "tam" in PATCH_METHODS
    mean, _ = assert_leaves_model_as_found(tiny_vqa, prepared, lambda inp: tam_map(tiny_vqa, inp, [0, 2]))
    each = token_activation_maps(tiny_vqa, prepared, [0, 2])
    torch.testing.assert_close(mean.scores, (each[0].scores + each[1].scores) / 2)
    comparison = compare(tiny_vqa, prepared, methods=["tam"], progress=False, box=[0, 0, 16, 16])
    assert isinstance(comparison.maps["tam"], PatchMap) and comparison.table[0]["method"] == "tam"


def test_tiled_model_maps_the_first_view(tiny_next_vqa, image):
    inp = tiny_next_vqa.prepare(image, QUESTION, ANSWER)
    patch_map = token_activation_maps(tiny_next_vqa, inp, [0])[0]
    assert patch_map.grid == tuple(inp.geometry.grid)
    tiles = token_activation_maps(tiny_next_vqa, inp, [0], view=1)[0]  # painted over the image's pixels
    assert tiles.grid == tuple(inp.geometry.image_size) and float(tiles.scores.max()) > 0


def test_bad_input_one_clear_error_each(tiny_vqa, prepared):
    from mech_vqa.inputs import Target

    with pytest.raises(TypeError, match="PreparedInput"):
        token_activation_maps(tiny_vqa, tiny_vqa.batch([prepared, prepared]))
    with pytest.raises(ValueError, match="answer tokens"):
        token_activation_maps(tiny_vqa, prepared, [Target(5, 3)])
    with pytest.raises(IndexError, match="out of range"):
        token_activation_maps(tiny_vqa, prepared, [99])


def test_runs_on_nnsight_as_on_hooks(tiny_vqa, prepared):
    pytest.importorskip("nnsight")
    wrapped = VQAModel(tiny_vqa.model, tiny_vqa.processor, name=tiny_vqa.name, backend="nnsight")
    for ours, theirs in zip(token_activation_maps(tiny_vqa, prepared), token_activation_maps(wrapped, prepared)):
        torch.testing.assert_close(theirs.scores, ours.scores, rtol=0, atol=1e-5)
