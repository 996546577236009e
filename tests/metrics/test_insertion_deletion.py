"""Deletion / insertion curves: exact endpoints, an oracle map beats a random one, batching does not
change a value, any map resolution, bad input."""

import math

import pytest
import torch
from conftest import assert_same_state, hook_snapshot, model_state

from mech_vqa.metrics import InsertionDeletion, cell_order, insertion_deletion, insertion_deletion_curves
from mech_vqa.metrics.insertion_deletion import from_raw, reveal_masks, step_counts, tie_orders
from mech_vqa.results import PatchMap, Result

SIZE = 32
REGION = (slice(4, 14), slice(18, 30))      # rows, cols of the pixels the planted score needs


def planted_prob(image):
    """Mean probability that depends only on how much of REGION still shows ``image``."""
    def prob(pixels):
        distance = ((pixels - image)[:, :, REGION[0], REGION[1]] ** 2).mean(dim=(1, 2, 3))
        return torch.sigmoid(2.0 - 8.0 * distance)
    return prob


def oracle_map(h, w):
    """Share of each cell's pixels inside REGION (the ground truth the oracle knows)."""
    inside = torch.zeros(SIZE, SIZE)
    inside[REGION] = 1
    return torch.nn.functional.adaptive_avg_pool2d(inside[None, None], (h, w))[0, 0]


def test_step_counts_and_order():
    assert step_counts(64, 0.02).tolist() == list(range(0, 65))          # round(1.28) = 1 cell per step
    assert step_counts(1024, 0.02).tolist()[:3] == [0, 20, 40] and step_counts(1024, 0.02)[-1] == 1024
    scores = torch.tensor([[0.1, 0.5], [0.5, -1.0]])
    assert cell_order(scores).tolist() == [1, 2, 0, 3]                    # ties in raster order
    masks = reveal_masks(scores, torch.tensor([0, 1, 3, 4]), (4, 6))
    assert masks.shape == (4, 4, 6) and masks[0].sum() == 0 and masks[-1].sum() == 24
    assert masks[1][:2, 3:].eq(1).all() and masks[1].sum() == 6           # cell (0, 1) = top right block


@pytest.mark.parametrize("shape", [(8, 8), (5, 3), (32, 32)])
def test_oracle_beats_random_and_endpoints_are_exact(shape):
    torch.manual_seed(0)
    image, baseline = torch.randn(1, 3, SIZE, SIZE), torch.zeros(1, 3, SIZE, SIZE)
    prob = planted_prob(image)
    raw_oracle = insertion_deletion_curves(prob, image, baseline, oracle_map(*shape), chunk_size=7, progress=False)
    oracle = from_raw(raw_oracle)
    random = from_raw(insertion_deletion_curves(prob, image, baseline, torch.rand(shape), chunk_size=7, progress=False))
    assert oracle.deletion_auc < random.deletion_auc - 0.05
    assert oracle.insertion_auc > random.insertion_auc + 0.05
    for curves in (oracle, random):
        # the endpoints are forwards of fully deleted / inserted composites, not substituted values
        assert curves.deletion[0] == pytest.approx(1, abs=1e-6) and curves.deletion[-1] == pytest.approx(0, abs=1e-6)
        assert curves.insertion[0] == pytest.approx(0, abs=1e-6) and curves.insertion[-1] == pytest.approx(1, abs=1e-6)
        assert curves.deletion_auc == pytest.approx(float(curves.deletion.mean()))
    # one point recomputed by hand: after removing the first c cells of each tie order, averaged
    k = 3
    count = step_counts(shape[0] * shape[1], 0.02)[k:k + 1]
    orders = tie_orders(oracle_map(*shape), 4, seed=0)
    assert raw_oracle["n_orders"] == len(orders) == 4                     # the oracle map has tied cells
    removed = torch.stack([reveal_masks(oracle_map(*shape), count, (SIZE, SIZE), order=o)[0] for o in orders])[:, None]
    by_hand = prob(image * (1 - removed) + baseline * removed).mean()
    assert float(raw_oracle["deletion_raw"][k]) == pytest.approx(float(by_hand), abs=1e-6)


def test_on_the_model_batched_equals_one_point_per_forward(tiny_vqa, prepared):
    saliency = torch.rand(3, 3)  # a map of the image's proportions, coarser than the 4 x 4 grid
    kwargs = dict(tokens=[1, 3], baseline="blur", step_fraction=0.34, progress=False)
    tiny_vqa.logits(prepared)                       # HF adds its own hooks on a first forward
    before, hooks = model_state(tiny_vqa.model), hook_snapshot(tiny_vqa.model)
    batched = insertion_deletion(tiny_vqa, prepared, saliency, chunk_size=5, **kwargs)
    single = insertion_deletion(tiny_vqa, prepared, saliency, chunk_size=1, **kwargs)
    assert_same_state(before, model_state(tiny_vqa.model))
    assert hooks == hook_snapshot(tiny_vqa.model)
    torch.testing.assert_close(batched.deletion_raw, single.deletion_raw, rtol=0, atol=1e-6)
    torch.testing.assert_close(batched.insertion_raw, single.insertion_raw, rtol=0, atol=1e-6)
    assert batched.deletion[-1] == pytest.approx(0, abs=1e-4) and batched.insertion[-1] == pytest.approx(1, abs=1e-4)
    assert batched.tokens == ["dog", "red"] and batched.fractions.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    # the raw score is the mean probability of S, recomputed from a plain forward
    with torch.no_grad():
        lp = tiny_vqa.forward(prepared).logits[0].float().log_softmax(-1)
    pos = prepared.answer_positions[[1, 3]]
    expected = lp[pos - 1, prepared.input_ids[0, pos]].exp().mean()
    assert batched.score_image == pytest.approx(float(expected), abs=1e-6)
    assert batched.deletion_raw[0] == pytest.approx(float(expected), abs=1e-6)


def test_patch_map_input_save_load_and_plot(tiny_vqa, prepared, tmp_path):
    pm = PatchMap(scores=torch.rand(4, 4), method="random")
    res = insertion_deletion(tiny_vqa, prepared, pm, tokens=[3], progress=False)
    assert res.method == "random" and res.map_shape == [4, 4]
    loaded = Result.load(res.save(tmp_path / "curves"))
    assert isinstance(loaded, InsertionDeletion)
    torch.testing.assert_close(loaded.insertion, res.insertion)
    assert len(res.topk(3)) == 3 and {"fraction", "deletion", "insertion"} <= set(res.to_dataframe())
    fig, ax = res.plot()
    assert len(ax.lines) == 2


def test_empty_selection_is_a_result_not_an_exception(tiny_vqa, prepared):
    res = insertion_deletion(tiny_vqa, prepared, torch.rand(4, 4), tau=50.0, progress=False)
    assert res.tokens == [] and "no visually relevant token" in res.info["message"]
    assert torch.isnan(torch.tensor(res.deletion_auc))


def test_bad_maps_and_steps(tiny_vqa, prepared):
    with pytest.raises(ValueError, match=r"\[h, w\]"):
        insertion_deletion(tiny_vqa, prepared, torch.rand(2, 3, 3), tokens=[3], progress=False)
    with pytest.raises(TypeError, match="PatchMap"):
        insertion_deletion(tiny_vqa, prepared, [[0.1, 0.2]], tokens=[3], progress=False)
    with pytest.raises(ValueError, match="NaN"):
        insertion_deletion(tiny_vqa, prepared, torch.tensor([[float("nan"), 1.0]]), tokens=[3], progress=False)
    with pytest.raises(ValueError, match="step_fraction"):
        insertion_deletion(tiny_vqa, prepared, torch.rand(2, 2), tokens=[3], step_fraction=0, progress=False)
    with pytest.raises(ValueError, match="same processor"):
        insertion_deletion(tiny_vqa, prepared, torch.rand(2, 2), tokens=[3], baseline=torch.zeros(1, 3, 8, 8),
                           progress=False)


# ------------------------------------------------------------------------------------------ ties
def _untied_map_with_order(order: torch.Tensor, shape) -> torch.Tensor:
    """A map without ties whose descending order is ``order``."""
    scores = torch.empty(order.numel())
    scores[order] = torch.arange(order.numel(), 0, -1).float()
    return scores.view(shape)


def test_constant_map_is_the_mean_of_its_random_orders_exactly():
    torch.manual_seed(0)
    image, baseline = torch.randn(1, 3, SIZE, SIZE), torch.zeros(1, 3, SIZE, SIZE)
    prob = planted_prob(image)
    constant = torch.zeros(6, 6)
    raw = insertion_deletion_curves(prob, image, baseline, constant, n_orders=5, seed=3, chunk_size=9, progress=False)
    orders = tie_orders(constant, 5, seed=3)
    assert raw["n_orders"] == 5 and len({tuple(o.tolist()) for o in orders}) == 5
    singles = [insertion_deletion_curves(prob, image, baseline, _untied_map_with_order(o, (6, 6)), progress=False)
               for o in orders]
    assert all(s["n_orders"] == 1 for s in singles)
    torch.testing.assert_close(raw["deletion_raw"], torch.stack([s["deletion_raw"] for s in singles]).mean(0),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(raw["insertion_raw"], torch.stack([s["insertion_raw"] for s in singles]).mean(0),
                               rtol=0, atol=1e-6)
    # the same seed gives the same curves; another seed other orders
    again = insertion_deletion_curves(prob, image, baseline, constant, n_orders=5, seed=3, chunk_size=9,
                                      progress=False)
    assert torch.equal(again["deletion_raw"], raw["deletion_raw"])
    assert not torch.equal(tie_orders(constant, 5, seed=4), orders)


def test_constant_map_scores_as_a_random_ordering_not_a_raster_scan():
    """REGION sits in the top rows: a raster scan of a constant map used to look like a good map."""
    torch.manual_seed(0)
    image, baseline = torch.randn(1, 3, SIZE, SIZE), torch.zeros(1, 3, SIZE, SIZE)
    prob = planted_prob(image)
    n = 48
    constant = from_raw(insertion_deletion_curves(prob, image, baseline, torch.ones(8, 8), n_orders=n, seed=1,
                                                  chunk_size=64, progress=False))
    randoms = [from_raw(insertion_deletion_curves(prob, image, baseline, torch.rand(8, 8), progress=False))
               for _ in range(n)]
    for name in ("insertion_auc", "deletion_auc"):
        values = torch.tensor([getattr(r, name) for r in randoms])
        # both are means of n random orderings: their difference has standard error ~ std * sqrt(2 / n)
        tolerance = 4 * float(values.std()) * (2 / n) ** 0.5
        assert abs(getattr(constant, name) - float(values.mean())) < tolerance, name
    # what a constant map scored when ties were revealed in raster order
    raster = from_raw(insertion_deletion_curves(prob, image, baseline, torch.arange(64, 0, -1).float().view(8, 8),
                                                progress=False))
    assert raster.insertion_auc - raster.deletion_auc > constant.insertion_auc - constant.deletion_auc + 0.2


def test_untied_maps_cost_nothing_extra_and_few_ties_little():
    torch.manual_seed(0)
    image, baseline = torch.randn(1, 3, SIZE, SIZE), torch.zeros(1, 3, SIZE, SIZE)
    prob = planted_prob(image)
    n_points = step_counts(64, 0.02).numel()
    untied = insertion_deletion_curves(prob, image, baseline, torch.rand(8, 8), n_orders=4, progress=False)
    assert untied["n_orders"] == 1 and untied["forwards"] == 2 * n_points
    few = torch.rand(8, 8)
    few[0, :2] = 5.0                                     # one pair of tied maxima
    some = insertion_deletion_curves(prob, image, baseline, few, n_orders=4, progress=False)
    assert some["n_orders"] == 4 and some["forwards"] == 2 * (n_points + 1)   # only the step that splits the pair


# --------------------------------------------------------------------------------- normalisation
def _raw(s_image, s_base, deletion, insertion):
    deletion, insertion = torch.tensor(deletion), torch.tensor(insertion)
    return {"fractions": torch.linspace(0, 1, len(deletion)), "score_image": s_image, "score_baseline": s_base,
            "deletion_raw": deletion, "insertion_raw": insertion}


def test_small_gap_is_flagged_and_raw_aucs_kept():
    flagged = from_raw(_raw(0.5, 0.4, [0.5, 0.2, 0.4], [0.4, 0.9, 0.5]))
    assert not flagged.kept and "min_gap" in flagged.flag and flagged.info["message"] == flagged.flag
    assert flagged.log_gap == pytest.approx(math.log(0.5 / 0.4))
    assert flagged.deletion_auc_raw == pytest.approx(1.1 / 3) and flagged.insertion_auc_raw == pytest.approx(0.6)
    assert flagged.insertion_auc == pytest.approx(((0.4 - 0.4) + (0.9 - 0.4) + (0.5 - 0.4)) / 0.1 / 3)   # 2.0: noise
    assert from_raw(_raw(0.5, 0.5, [0.5, 0.5], [0.5, 0.5])).flag.startswith("the image and the baseline")
    kept = from_raw(_raw(0.9, 0.05, [0.9, 0.01, 0.05], [0.05, 1.0, 0.9]))
    assert kept.kept and kept.flag is None
    low, high = kept.info["normalised_range"]
    assert low == pytest.approx(-0.05 / 0.85) and high == pytest.approx(0.95 / 0.85)
    assert low <= float(kept.deletion.min()) and float(kept.insertion.max()) <= high
    assert from_raw(_raw(0.9, 0.05, [0.9, 0.05], [0.05, 0.9]), min_gap=5.0).flag is not None
    with pytest.raises(ValueError, match="min_gap"):
        from_raw(_raw(0.9, 0.05, [0.9, 0.05], [0.05, 0.9]), min_gap=-1)


def test_normalised_aucs_of_kept_items_stay_in_the_documented_range_on_every_shipped_item(
        organism_vqa, organism_eval_items):
    """Every item of data/eval, the box as the map (coarse steps): kept items inside
    [-1 / (e^min_gap - 1), (1 - s(B)) / (s(I) - s(B))], flagged ones carry the reason."""
    from mech_vqa.compare import select_targets
    from mech_vqa.metrics import MIN_GAP

    vqa = organism_vqa
    lowest = -1 / (math.exp(MIN_GAP) - 1)
    kept = flagged = 0
    for row in organism_eval_items:
        inp = vqa.prepare(row["picture"], row["question"], row["answer"])
        targets, _, rule = select_targets(vqa, inp)
        box_map = PatchMap(scores=torch.zeros(inp.geometry.grid), image_size=list(inp.geometry.image_size),
                           box=inp.box_to_model(row["box"])).inside_box().float()
        curves = insertion_deletion(vqa, inp, box_map, tokens=[t.position + 1 - inp.prompt_length for t in targets],
                                    step_fraction=0.25, chunk_size=64, progress=False, n_orders=2)
        assert math.isfinite(curves.insertion_auc_raw) and math.isfinite(curves.deletion_auc_raw)
        if curves.kept:
            kept += 1
            low, high = curves.info["normalised_range"]
            assert low >= lowest - 1e-9
            for values in (curves.deletion, curves.insertion):
                assert low - 1e-5 <= float(values.min()) and float(values.max()) <= high + 1e-5, row["question"]
            for auc in (curves.deletion_auc, curves.insertion_auc):
                assert low - 1e-5 <= auc <= high + 1e-5
        else:
            flagged += 1
            assert "min_gap" in curves.flag or "same score" in curves.flag, curves.flag
            assert rule != "gap" or curves.log_gap < MIN_GAP     # the gap rule's tokens lose >= tau nats each
    assert kept + flagged == len(organism_eval_items) == 60 and kept > 0
