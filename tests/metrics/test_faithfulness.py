"""Patch faithfulness: batched knock-outs equal single interventions, every view is knocked out, and on
the organism the box's tokens matter more than random ones while a constant map claims nothing."""

import math

import pytest
import torch
from conftest import assert_same_state, hook_snapshot, model_state

from mech_vqa.methods.ablation import ablate, image_token_ablation
from mech_vqa.methods.scoring import AnswerScorer, input_baseline
from mech_vqa.metrics import PatchFaithfulness, patch_faithfulness
from mech_vqa.metrics.faithfulness import knockout_sizes, token_cells
from mech_vqa.metrics.insertion_deletion import _to_pixels
from mech_vqa.results import Result


def test_knockout_sizes():
    assert knockout_sizes(576, (0.02, 0.05, 0.1), 80) == ([12, 29, 58, 80], ["2%", "5%", "10%", "box"])
    assert knockout_sizes(16, (0.01,)) == ([1], ["1%"])                     # at least one cell
    with pytest.raises(ValueError, match="fractions"):
        knockout_sizes(16, (0,))


def test_batched_rows_equal_single_interventions(tiny_vqa, prepared, tmp_path):
    vqa, inp = tiny_vqa, prepared
    saliency = torch.arange(16.0).view(4, 4)                 # untied: its top-2 cells are (3, 3), (3, 2)
    vqa.logits(inp)
    before, hooks = model_state(vqa.model), hook_snapshot(vqa.model)
    result = patch_faithfulness(vqa, inp, {"ramp": saliency}, tokens=[1, 3], box=[0, 0, 16, 16],
                                fractions=(0.125,), n_random=3, chunk_size=5)
    assert_same_state(before, model_state(vqa.model))
    assert hooks == hook_snapshot(vqa.model)
    assert result.methods == ["ramp", "box"] and result.ks == [2, 4] and result.labels == ["12.5%", "box"]
    assert result.n_box == 4 and result.drops.shape == (2, 2, 2) and result.random.shape == (2, 2)
    # zero mode, top-2 of the ramp, by a plain ablation of those image tokens
    cells = token_cells(inp.geometry)
    top2 = inp.geometry.positions[(cells == 15) | (cells == 14)]
    single = ablate(vqa, inp, [image_token_ablation(vqa, inp, top2)], targets=[inp.target(1), inp.target(3)],
                    progress=False)
    assert float(result.drops[0, 0, 0]) == pytest.approx(-float(single.delta.mean()), abs=1e-4)
    # blur mode, the whole box, by one composite through the scorer
    scorer = AnswerScorer(vqa, inp, [1, 3])
    inside = torch.zeros(16, dtype=torch.bool)
    inside[[0, 1, 4, 5]] = True
    image, base = inp.pixel_values.float(), input_baseline(vqa, inp, "blur")
    mask = _to_pixels(inside.float().view(1, 4, 4), image.shape[1:], inp.geometry)
    with torch.no_grad():
        lp = scorer(torch.cat([image, image + mask * (base - image)])).mean(-1)
    assert result.clean_logprob == pytest.approx(float(lp[0]), abs=1e-6)
    assert float(result.drops[1, 1, 1]) == pytest.approx(float(lp[0] - lp[1]), abs=1e-5)
    # the verbs
    frame = result.to_dataframe()
    assert list(frame.method) == ["ramp", "box", "random"] and "excess_zero@box" in frame
    assert frame.loc[0, "excess_blur@box"] == pytest.approx(float(result.drops[0, 1, 1] - result.random[1, 1]))
    assert len(result.topk(1)) == 1
    loaded = Result.load(result.save(tmp_path / "faith"))
    assert isinstance(loaded, PatchFaithfulness) and torch.equal(loaded.drops, result.drops)
    fig, ax = result.plot()
    assert len(ax.lines) >= 2


def test_every_view_of_a_tiled_image_is_knocked_out(tiny_next_vqa, image):
    vqa = tiny_next_vqa
    inp = vqa.prepare(image, "What is the color of the dog?", "The dog is red.")
    cells = token_cells(inp.geometry)
    assert (inp.geometry.view[cells >= 0] > 0).any()          # high-resolution tokens map onto base cells too
    result = patch_faithfulness(vqa, inp, {"random": torch.rand(4, 4)}, tokens=[3], box=[0, 0, 16, 16],
                                fractions=(0.25,), n_random=2)
    assert torch.isfinite(result.drops).all() and torch.isfinite(result.random).all()


def test_bad_input(tiny_vqa, prepared):
    with pytest.raises(ValueError, match="modes"):
        patch_faithfulness(tiny_vqa, prepared, torch.rand(4, 4), tokens=[3], modes=("noise",))
    with pytest.raises(ValueError, match="no maps"):
        patch_faithfulness(tiny_vqa, prepared, {}, tokens=[3])
    with pytest.raises(ValueError, match="named 'box'"):
        patch_faithfulness(tiny_vqa, prepared, {"box": torch.rand(4, 4)}, tokens=[3], box=[0, 0, 16, 16])


def test_organism_box_tokens_matter_more_than_random_ones(organism_vqa, organism_eval_items):
    """Zeroing the answer object's tokens hurts the answer word more than zeroing as many random tokens,
    on every item of a small set; the box as a map beats a constant map (which names no cell)."""
    from mech_vqa.tasks import answer_target

    vqa = organism_vqa
    box_excess, constant_excess = [], []
    for row in organism_eval_items[:8]:
        inp = vqa.prepare(row["picture"], row["question"], row["answer"])
        index = answer_target(inp, row)
        result = patch_faithfulness(vqa, inp, {"constant": torch.ones(inp.geometry.grid)}, tokens=[index],
                                    box=inp.box_to_model(row["box"]), fractions=(0.05,), modes=("zero",))
        box = result.methods.index("box")
        # never less than random; on some items no less either: the vision tower has already spread the
        # object into other tokens, so zeroing its own tokens at the text model's input removes little
        assert float(result.drops[box, 0, -1]) > float(result.random[0, -1]) - 0.05, row["question"]
        box_excess.append(float(result.drops[box, 0, -1] - result.random[0, -1]))
        constant_excess.append(float(result.drops[0, 0, -1] - result.random[0, -1]))
    assert sum(box_excess) / len(box_excess) > 2.0                       # nats, over the set
    assert sum(v > 1.0 for v in box_excess) >= len(box_excess) // 2
    assert sum(box_excess) / len(box_excess) > sum(constant_excess) / len(constant_excess) + 2.0
    assert all(math.isfinite(v) for v in constant_excess)
