"""iGOS+ / iGOS++: scoring and baselines against raw recomputation, the regulariser and the update
against hand-written formulas, the batched run against the reference way, localisation of a
planted dependency and of the organism's answer object, state restoration, bad input."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ANSWER, QUESTION, assert_same_state, hook_snapshot, model_state

from mech_vqa.methods.igos import IGOSConfig, bilateral_tv, edge_weights, igos, optimise_mask, upsample
from mech_vqa.methods.scoring import (
    AnswerScorer,
    baseline_pixels,
    blur_kernel_size,
    gaussian_blur,
    input_baseline,
    preprocess_image,
)
from mech_vqa.metrics.insertion_deletion import from_raw, insertion_deletion_curves
from mech_vqa.results import PatchMap, Result
from mech_vqa.results.igos import IGOSResult

SMALL = dict(mask_size=4, iterations=2, n_steps=3, chunk_size=4)


# ----------------------------------------------------------------------------- scoring
def test_scorer_equals_full_forward_log_softmax(tiny_vqa, prepared):
    scorer = AnswerScorer(tiny_vqa, prepared, [1, 3])
    base = input_baseline(tiny_vqa, prepared, "noise")
    pixels = torch.cat([prepared.pixel_values, base, prepared.pixel_values * 0.5])
    with torch.no_grad():
        batched = scorer(pixels)
        reference = scorer.reference(pixels)
        expected = []
        for row in pixels.split(1):
            logits = tiny_vqa.model(**dict(prepared.model_inputs(), pixel_values=row), use_cache=False).logits[0]
            lp = logits.float().log_softmax(-1)
            pos = prepared.answer_positions[[1, 3]]
            expected.append(lp[pos - 1, prepared.input_ids[0, pos]])
    torch.testing.assert_close(batched, torch.stack(expected), rtol=0, atol=1e-5)
    torch.testing.assert_close(reference, torch.stack(expected), rtol=0, atol=1e-5)
    assert batched.dtype == torch.float32 and batched.shape == (3, 2)
    # the sequence is cut after the last scored predicting row: 'red' is predicted at its index - 1
    assert scorer.input_ids.shape[1] == int(prepared.answer_positions[3])


def test_scorer_in_bfloat16_scores_in_float32(prepared):
    from mech_vqa import VQAModel
    from mech_vqa.build import tiny_llava

    model, processor = tiny_llava(seed=0, kv_heads=2)
    vqa = VQAModel(model.to(torch.bfloat16), processor)
    inp = vqa.prepare(prepared.image, QUESTION, ANSWER)
    with torch.no_grad():
        out = AnswerScorer(vqa, inp)(inp.pixel_values)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_blur_baseline_is_the_processed_blurred_image(tiny_vqa, prepared, image):
    from scipy.ndimage import convolve1d

    k = blur_kernel_size(image.height, image.width)
    assert k % 2 == 1 and abs(k - max(image.size) / 3) <= 1
    offsets = np.arange(k) - k // 2
    kernel = np.exp(-offsets ** 2 / (2 * (k - 1) ** 2))
    kernel /= kernel.sum()
    raw = np.asarray(image, dtype=np.float64)
    by_hand = convolve1d(convolve1d(raw, kernel, axis=0, mode="mirror"), kernel, axis=1, mode="mirror")
    blurred = np.asarray(gaussian_blur(image), dtype=np.float64)
    assert np.abs(blurred - by_hand).max() <= 1.0           # rounding to uint8 only
    expected = preprocess_image(tiny_vqa.processor, gaussian_blur(image))
    torch.testing.assert_close(input_baseline(tiny_vqa, prepared, "blur"), expected)
    torch.testing.assert_close(preprocess_image(tiny_vqa.processor, image), prepared.pixel_values)
    black = input_baseline(tiny_vqa, prepared, "black")
    mean = torch.tensor(prepared.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(prepared.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(black, (-mean / std).expand_as(black), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- regulariser
def test_bilateral_tv_against_loops():
    torch.manual_seed(0)
    mask, image = torch.rand(3, 4), torch.rand(1, 3, 6, 8)
    sigma = 0.05
    up = F.interpolate(mask[None, None], size=(6, 8), mode="bilinear", align_corners=False)[0, 0]
    tv_y = sum((mask[r + 1, c] - mask[r, c]) ** 2 for r in range(2) for c in range(4)) / 8
    tv_x = sum((mask[r, c + 1] - mask[r, c]) ** 2 for r in range(3) for c in range(3)) / 9
    b_y = sum(math.exp(-float((image[0, :, r + 1, c] - image[0, :, r, c]).mean()) ** 2 / sigma)
              * (up[r + 1, c] - up[r, c]) ** 2 for r in range(5) for c in range(8)) / 40
    b_x = sum(math.exp(-float((image[0, :, r, c + 1] - image[0, :, r, c]).mean()) ** 2 / sigma)
              * (up[r, c + 1] - up[r, c]) ** 2 for r in range(6) for c in range(7)) / 42
    expected = 0.5 * (tv_y + tv_x + b_y + b_x)
    got = bilateral_tv(mask, edge_weights(image, sigma))
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    one_cell = bilateral_tv(torch.rand(1, 1), edge_weights(image, sigma))     # no neighbours, constant U(m)
    assert float(one_cell) == pytest.approx(0.0, abs=1e-12)


def test_first_two_updates_match_the_formula_for_a_linear_score():
    """For s(X) = <W, X> the integrals have closed forms, noise included (it adds a constant):
    d(D - Ins)/du = (N + 1)/N * sum_c W (I - B). Then theta_0 = 1 - lr g_0, m_1 = clip(theta_0),
    theta_1 = m_1 - lr g_1, m_2 = clip(theta_1 + 1/(1 + mu) (theta_1 - theta_0))."""
    torch.manual_seed(0)
    image, baseline, weight = torch.randn(1, 3, 12, 12), torch.randn(1, 3, 12, 12), torch.randn(3, 12, 12)
    cfg = IGOSConfig(mask_size=(3, 4), iterations=2, n_steps=5, l1=0.5, l2=0.3, l3=0.0, gamma=0.7,
                     momentum=2.0, lr=0.05, chunk_size=3)

    def score(pixels):
        return (pixels * weight).sum(dim=(1, 2, 3))

    n_steps = cfg.n_steps
    dense = (n_steps + 1) / n_steps * (weight * (image[0] - baseline[0])).sum(0)       # d(D - Ins)/du, [H, W]
    probe = torch.ones(3, 4, requires_grad=True)
    (upsample(probe, (12, 12)) * dense).sum().backward()
    ig_grad = probe.grad                                                               # U^T dense

    def reg_grad(m, i):
        return -cfg.l1 / m.numel() - 2 * cfg.l2 * math.exp(-cfg.gamma * i) * (1 - m)

    theta0 = 1 - cfg.lr * (ig_grad + reg_grad(torch.ones(3, 4), 0))
    m1 = theta0.clamp(0, 1)
    theta1 = m1 - cfg.lr * (ig_grad + reg_grad(m1, 1))
    m2 = (theta1 + 1 / (1 + cfg.momentum) * (theta1 - theta0)).clamp(0, 1)
    got = optimise_mask(score, image, baseline, cfg, progress=False)
    torch.testing.assert_close(got["mask"], m2, rtol=0, atol=1e-5)
    assert 0 < float(m2.mean()) < 1           # the test exercises unclamped cells


# -------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("two_masks", [False, True])
def test_batched_equals_reference_way_and_restores_the_model(tiny_vqa, prepared, two_masks):
    tiny_vqa.logits(prepared)                       # HF adds its own hooks on a first forward
    before, hooks = model_state(tiny_vqa.model), hook_snapshot(tiny_vqa.model)
    # l1 = 0 and a small lr keep the random model's small gradients from being clamped away
    kwargs = dict(tokens=[1, 3], seed=3, progress=False, two_masks=two_masks, step_fraction=0.25,
                  **{**SMALL, "n_steps": 2}, l1=0.0, lr=3.0)
    fast = igos(tiny_vqa, prepared, **kwargs)
    slow = igos(tiny_vqa, prepared, reference=True, **kwargs)
    assert_same_state(before, model_state(tiny_vqa.model))
    assert hooks == hook_snapshot(tiny_vqa.model)
    torch.testing.assert_close(fast.mask, slow.mask, rtol=0, atol=1e-5)
    assert fast.insertion_auc == pytest.approx(slow.insertion_auc, abs=1e-4)
    assert fast.deletion_auc == pytest.approx(slow.deletion_auc, abs=1e-4)
    assert not torch.equal(fast.mask, torch.ones(4, 4))          # the mask moved
    torch.testing.assert_close(fast.saliency, 1 - fast.mask)
    if two_masks:
        torch.testing.assert_close(fast.mask, fast.mask_deletion * fast.mask_insertion)
        assert fast.to_patch_map().info["variant"] == fast.to_patch_map().method == "igos++"
    other_seed = igos(tiny_vqa, prepared, **{**kwargs, "seed": 4})
    assert not torch.allclose(other_seed.mask, fast.mask)
    torch.testing.assert_close(igos(tiny_vqa, prepared, **kwargs).mask, fast.mask, rtol=0, atol=0)


def test_model_in_train_mode_with_grads_is_restored(tiny_mha_vqa, image):
    inp = tiny_mha_vqa.prepare(image, QUESTION, ANSWER)
    tiny_mha_vqa.logits(inp)
    model = tiny_mha_vqa.model
    model.train()
    model.lm_head.weight.requires_grad_(False)
    try:
        before, hooks = model_state(model), hook_snapshot(model)
        igos(tiny_mha_vqa, inp, tokens=[3], progress=False, **SMALL)
        assert_same_state(before, model_state(model))
        assert hooks == hook_snapshot(model)
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()
        model.lm_head.weight.requires_grad_(True)


# -------------------------------------------------------------------- localisation
def test_planted_region_is_found():
    """A black-box score that needs one region of the image: the saliency sits on it and the
    insertion AUC beats the deletion AUC."""
    torch.manual_seed(0)
    size, rows, cols = 32, slice(16, 32), slice(0, 12)
    image, baseline = torch.randn(1, 3, size, size), torch.zeros(1, 3, size, size)

    def log_prob(pixels):
        distance = ((pixels - image)[:, :, rows, cols] ** 2).mean(dim=(1, 2, 3))
        return F.logsigmoid(3.0 - 6.0 * distance)

    cfg = IGOSConfig(mask_size=8, iterations=5, n_steps=5, lr=1.0)   # lr suits this score's gradient scale
    saliency = 1 - optimise_mask(log_prob, image, baseline, cfg, progress=False)["mask"]
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[4:8, 0:3] = True
    assert saliency[inside].mean() > 3 * saliency[~inside].mean()
    top = saliency.flatten().topk(6).indices
    assert inside.flatten()[top].float().mean() >= 0.8
    curves = from_raw(insertion_deletion_curves(lambda x: log_prob(x).exp(), image, baseline, saliency, progress=False))
    assert curves.insertion_auc > curves.deletion_auc + 0.3


def test_organism_answer_object_is_found(organism_vqa):
    """On the organism the answer colour depends on one object (its box is known). Over the first
    three colour items the model answers correctly and whose answer word is visually relevant,
    the saliency falls on that object and insertion beats deletion."""
    from mech_vqa.organism import generate_items, predict_answer_words

    items = generate_items(30, seed=5, min_objects=2, max_objects=3, families=("color",))
    predicted = predict_answer_words(organism_vqa.model, organism_vqa.processor, items)
    shares, areas, insertion, deletion = [], [], [], []
    for item, word in zip(items, predicted):
        if word != item.answer_word:
            continue
        inp = organism_vqa.prepare(item.image, item.question, item.answer)
        # the paper's 32 x 32 mask; fewer iterations, integration points and curve steps for speed
        res = igos(organism_vqa, inp, iterations=3, n_steps=4, step_fraction=0.05, box=item.box, progress=False)
        if res.empty:
            continue
        assert res.selected_tokens == [item.answer_word], res.tokens
        patch_map = res.to_patch_map()
        shares.append(patch_map.in_box_share())
        areas.append(float(patch_map.inside_box().float().mean()))
        insertion.append(res.insertion_auc)
        deletion.append(res.deletion_auc)
        if len(shares) == 3:
            break
    assert len(shares) == 3, "fewer than three correctly answered colour items with a visually relevant answer word"
    assert np.mean(shares) > 2 * np.mean(areas), (shares, areas)
    assert np.mean(insertion) > np.mean(deletion), (insertion, deletion)


# ------------------------------------------------------------------ result and errors
def test_result_roundtrip_patch_map_and_plot(tiny_vqa, prepared, tmp_path):
    res = igos(tiny_vqa, prepared, tokens=[3], box=[0, 0, 16, 16], progress=False, **SMALL)
    loaded = Result.load(res.save(tmp_path / "igos"))
    assert isinstance(loaded, IGOSResult)
    torch.testing.assert_close(loaded.saliency, res.saliency)
    torch.testing.assert_close(loaded.insertion_curve, res.insertion_curve)
    assert loaded.targets == res.targets == [prepared.target(3).to_dict()]
    assert loaded.tokens[3]["selected"] and not math.isnan(loaded.tokens[3]["gap"])     # gaps of a manual S
    assert set(loaded.timings) >= {"selection", "optimisation", "metric", "total"}
    pm = res.to_patch_map()
    assert isinstance(pm, PatchMap) and pm.method == "igos+" and pm.grid == (4, 4)   # one mask
    assert pm.image_size == list(prepared.geometry.image_size) and pm.box == [0.0, 0.0, 16.0, 16.0]
    assert len(res.topk(3)) == 3 and "mask" in res.to_dataframe()
    fig, ax = res.plot()
    fig2, ax2 = res.plot_curves()
    assert len(ax2.lines) == 2 and len(res.history["deletion"]) == 2


def test_empty_selection_is_reported(tiny_vqa, prepared, tmp_path):
    res = igos(tiny_vqa, prepared, tau=100.0, progress=False, **SMALL)
    assert res.empty and "no visually relevant token" in res.message
    assert torch.equal(res.saliency, torch.zeros(4, 4)) and math.isnan(res.insertion_auc)
    assert res.to_patch_map().grid == (4, 4)
    assert Result.load(res.save(tmp_path / "empty")).empty


def test_bad_input_errors(tiny_vqa, prepared, image):
    with pytest.raises(ValueError, match="mask_size"):
        igos(tiny_vqa, prepared, mask_size=0, progress=False)
    with pytest.raises(ValueError, match="mask_size"):
        IGOSConfig(mask_size=(4, 0))
    with pytest.raises(ValueError, match="tau"):
        igos(tiny_vqa, prepared, tau=-1.0, progress=False)
    with pytest.raises(ValueError, match="does not tokenize"):
        igos(tiny_vqa, tiny_vqa.prepare(image, QUESTION, "The zebra is mauve"), progress=False)
    with pytest.raises(ValueError, match="no answer tokens"):
        igos(tiny_vqa, tiny_vqa.prepare(image, QUESTION, generate=False), progress=False)
    with pytest.raises(ValueError, match="non-empty string"):
        tiny_vqa.prepare(image, QUESTION, "   ")
    grey = image.convert("L")
    with pytest.raises(ValueError, match="convert\\('RGB'\\)"):
        baseline_pixels(tiny_vqa.processor, grey, "blur")
    with pytest.raises(ValueError, match="convert\\('RGB'\\)"):
        igos(tiny_vqa, dataclasses.replace(prepared, image=grey), progress=False)
    with pytest.raises(ValueError, match="unknown baseline"):
        igos(tiny_vqa, prepared, baseline="grey", progress=False)
    with pytest.raises(ValueError, match="iterations"):
        igos(tiny_vqa, prepared, iterations=0, progress=False)
    with pytest.raises(ValueError, match="step_fraction"):
        igos(tiny_vqa, prepared, step_fraction=1.5, progress=False)
    with pytest.raises(TypeError, match="unknown options"):
        igos(tiny_vqa, prepared, mask=8, progress=False)
