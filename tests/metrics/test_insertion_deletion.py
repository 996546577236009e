"""Deletion / insertion curves: exact endpoints, an oracle map beats a random one, batching does not
change a value, any map resolution, bad input."""

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
    saliency = torch.rand(3, 5)
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
