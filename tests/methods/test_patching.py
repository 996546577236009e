"""Activation patching: exact identities on tiny models, the organism's counterfactual pairs, clear errors."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import ANSWER, ORGANISM_READY, QUESTION, assert_same_state, hook_snapshot, model_state
from mech_vqa import VQAModel
from mech_vqa.methods.patching import (
    LayoutMismatch, PatchPair, Restoration, activation_patching, baseline_pair, changed_item, counterfactual_pair,
    group_restorations, head_restorations, image_restorations, mlp_restorations, pair_groups, patched_log_probs,
    residual_restorations, restore)
from mech_vqa.results import PatchingResult, PatchMap, Result

TOL = dict(rtol=0, atol=1e-5)


@pytest.fixture
def other_image():
    from PIL import Image

    rng = np.random.RandomState(1)
    return Image.fromarray((rng.rand(40, 48, 3) * 255).astype("uint8"))


@pytest.fixture
def pair(tiny_vqa, image, other_image):
    """The same question and answer over two different images (the same size, so the same layout)."""
    clean = tiny_vqa.prepare(image, QUESTION, ANSWER)
    corrupt = tiny_vqa.prepare(other_image, QUESTION, ANSWER)
    return PatchPair(clean, corrupt)


def _question_position(inp) -> int:
    return int(inp.question_positions[0])


@pytest.mark.parametrize("name", ["tiny_vqa", "tiny_mistral_vqa", "tiny_next_vqa"])
def test_whole_residual_restores_the_clean_logits(request, name, image, other_image):
    vqa = request.getfixturevalue(name)
    pair = PatchPair(vqa.prepare(image, QUESTION, ANSWER), vqa.prepare(other_image, QUESTION, ANSWER))
    everything = [Restoration("resid_pre", layer) for layer in range(vqa.adapter.n_layers)]
    out = patched_log_probs(vqa, pair, everything)
    assert not torch.allclose(out["clean"], out["corrupt"], **TOL)  # the images matter
    for row in out["patched"]:
        torch.testing.assert_close(row, out["clean"], **TOL)


def test_restoring_nothing_gives_the_corrupted_logits(tiny_vqa, pair):
    # the question's tokens enter layer 0 as the same embeddings in both runs: restoring them changes nothing
    same = Restoration("resid_pre", 0, _question_position(pair.clean))
    out = patched_log_probs(tiny_vqa, pair, [same])
    torch.testing.assert_close(out["patched"][0], out["corrupt"], **TOL)
    result = restore(tiny_vqa, pair, [same], metric="logprob")
    assert abs(float(result.fraction[0])) < 1e-4
    assert abs(float(result.patched[0]) - result.corrupt_score) < 1e-5


def test_batched_restorations_equal_one_at_a_time(tiny_vqa, pair):
    restorations = (residual_restorations(tiny_vqa, pair, positions=[0, 5, 12, pair.clean.seq_len - 3])
                    + head_restorations(tiny_vqa) + mlp_restorations(tiny_vqa)
                    + image_restorations(tiny_vqa, pair, 1))
    batched = restore(tiny_vqa, pair, restorations, metric="logprob", batch_size=16)
    single = restore(tiny_vqa, pair, restorations, metric="logprob", batch_size=1)
    torch.testing.assert_close(batched.patched, single.patched, **TOL)
    # and one restoration alone, by hand: a head's clean output written into the corrupted run
    layer, head = 1, 2
    with torch.no_grad(), tiny_vqa.trace(["z"], layers=[layer]) as cache:
        tiny_vqa.forward(pair.clean)
    from mech_vqa.interventions import Intervention

    edit = Intervention("z", layer, heads=head, mode="replace", value=cache["z", layer][0][:, head:head + 1])
    with torch.no_grad(), tiny_vqa.trace((), interventions=[edit]):
        logits = tiny_vqa.forward(pair.corrupt).logits[0].float()
    target = batched.targets[0]
    by_hand = logits[target["position"]].log_softmax(-1)[target["token_id"]]
    index = batched.names().index(f"L{layer}H{head}.z")
    assert abs(float(batched.patched[index]) - float(by_hand)) < 1e-5


def test_fraction_and_views(tiny_vqa, pair):
    result = activation_patching(tiny_vqa, pair, metric="logprob", image_layer=1)
    whole = [i for i, (s, p) in enumerate(zip(result.sites, result.positions)) if s == "resid_pre" and p == -1]
    torch.testing.assert_close(result.fraction[whole], torch.ones(len(whole)), rtol=0, atol=1e-4)
    layers, positions, grid = result.position_grid()
    assert layers == list(range(tiny_vqa.adapter.n_layers)) and positions == list(range(pair.clean.seq_len - 1))
    assert grid.shape == (len(layers), len(positions)) and not torch.isnan(grid).any()
    assert result.head_grid().shape == (tiny_vqa.adapter.n_layers, tiny_vqa.adapter.n_heads)
    assert not torch.isnan(result.head_grid()).any()
    patch_map = result.patch_map(1)
    assert isinstance(patch_map, PatchMap) and patch_map.grid == tuple(pair.clean.geometry.grid)
    # the map's cells are the image positions' rows of the result
    frame = result.to_dataframe()
    first = int(pair.clean.image_positions[0])
    value = frame[(frame.layer == 1) & (frame.position == first) & (frame.site == "resid_pre")].fraction.iloc[0]
    row, col = pair.clean.geometry.rowcol[0].tolist()
    assert abs(float(patch_map.scores[row, col]) - value) < 1e-6
    assert len(result.topk(5)) == 5


def test_group_restorations(tiny_vqa, pair):
    everything = list(range(pair.clean.seq_len))
    groups = {"all": everything, "one": [5], **pair_groups(pair)}
    result = restore(tiny_vqa, pair, group_restorations(tiny_vqa, groups) + [Restoration("resid_pre", 1, 5)],
                     metric="logprob")
    lines = result.group_lines()
    assert set(lines) == {"all", "one", "image", "question", "answer"}
    torch.testing.assert_close(lines["all"], torch.ones(tiny_vqa.adapter.n_layers), rtol=0, atol=1e-4)
    assert abs(float(lines["one"][1]) - float(result.fraction[-1])) < 1e-6  # a group of one = that position
    assert "L0.resid_pre@image" in result.names()
    with pytest.raises(ValueError, match="label"):
        Restoration("resid_pre", 0, group=(1, 2))


def test_result_save_load_plot(tiny_vqa, pair, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    result = activation_patching(tiny_vqa, pair, metric="logprob", positions=range(0, 20, 3), groups=True)
    path = result.save(tmp_path / "patching")
    loaded = Result.load(path)
    assert isinstance(loaded, PatchingResult)
    torch.testing.assert_close(loaded.patched, result.patched)
    assert loaded.names() == result.names()
    for view in ("positions", "heads", "mlp", "groups"):
        fig, ax = loaded.plot(view=view)
        assert ax is not None
        matplotlib.pyplot.close(fig)


def test_baseline_pair_and_logprob_target(tiny_vqa, prepared):
    pair = baseline_pair(tiny_vqa, prepared, "blur")
    assert pair.kind == "blur" and pair.corrupt_token_ids is None
    assert not torch.equal(pair.clean.pixel_values, pair.corrupt.pixel_values)
    assert torch.equal(pair.clean.input_ids, pair.corrupt.input_ids)
    result = restore(tiny_vqa, pair, mlp_restorations(tiny_vqa))
    assert result.info["metric"] == "logprob" and len(result.targets) == 1
    # the default target is the answer token the blur hurts most
    out = patched_log_probs(tiny_vqa, pair, mlp_restorations(tiny_vqa, [0]))
    ids = pair.clean.input_ids[0, pair.clean.answer_positions]
    drop = (out["clean"] - out["corrupt"]).gather(-1, ids[:, None])[:, 0]
    assert result.targets[0]["position"] == int(pair.clean.answer_positions[int(drop.argmax())]) - 1


def test_hooks_removed_and_model_as_found(tiny_vqa, pair):
    model = tiny_vqa.model
    before, hooks = model_state(model), hook_snapshot(model)
    restore(tiny_vqa, pair, head_restorations(tiny_vqa, [0]) + residual_restorations(tiny_vqa, pair, [1], [3]),
            metric="logprob")
    assert_same_state(before, model_state(model))
    assert hook_snapshot(model) == hooks
    broken = PatchPair(pair.clean, pair.corrupt)
    broken.corrupt = dataclasses.replace(pair.corrupt, pixel_values=pair.corrupt.pixel_values[:, :, :16, :16])
    with pytest.raises(Exception):  # noqa: B017 - any failure inside the forward
        restore(tiny_vqa, broken, mlp_restorations(tiny_vqa), metric="logprob")
    assert_same_state(before, model_state(model))
    assert hook_snapshot(model) == hooks


def test_bad_input_one_clear_error_each(tiny_vqa, image, other_image, pair):
    clean = tiny_vqa.prepare(image, QUESTION, ANSWER)
    with pytest.raises(LayoutMismatch, match="tokens"):
        PatchPair(clean, tiny_vqa.prepare(other_image, "What is the color of the big red dog?", ANSWER))
    with pytest.raises(LayoutMismatch, match="another answer"):
        PatchPair(clean, tiny_vqa.prepare(other_image, QUESTION, "The cat is red."))
    with pytest.raises(LayoutMismatch, match="tokens"):
        PatchPair(clean, clean, corrupt_token_ids=[1, 2])
    with pytest.raises(TypeError, match="PreparedInput"):
        PatchPair(clean, "an image")
    with pytest.raises(ValueError, match="unknown restoration site"):
        Restoration("attn_in", 0)
    with pytest.raises(ValueError, match="names one head"):
        Restoration("z", 0)
    with pytest.raises(ValueError, match="site 'z' only"):
        Restoration("mlp_out", 0, head=1)
    with pytest.raises(ValueError, match="no restorations"):
        restore(tiny_vqa, pair, [])
    with pytest.raises(ValueError, match="logit_diff"):
        restore(tiny_vqa, pair, mlp_restorations(tiny_vqa), metric="logit_diff")
    with pytest.raises(ValueError, match="unknown metric"):
        restore(tiny_vqa, pair, mlp_restorations(tiny_vqa), metric="prob")
    with pytest.raises(IndexError, match="out of range"):
        restore(tiny_vqa, pair, mlp_restorations(tiny_vqa), targets=[99])
    with pytest.raises(IndexError, match="outside the sequence"):
        restore(tiny_vqa, pair, [Restoration("resid_pre", 0, 999)])
    with pytest.raises(TypeError, match="PatchPair"):
        restore(tiny_vqa, (clean, clean), mlp_restorations(tiny_vqa))


def test_runs_on_nnsight_as_on_hooks(tiny_vqa, pair):
    pytest.importorskip("nnsight")
    wrapped = VQAModel(tiny_vqa.model, tiny_vqa.processor, name=tiny_vqa.name, backend="nnsight")
    restorations = (residual_restorations(tiny_vqa, pair, [0, 1], [2, pair.clean.seq_len - 2])
                    + head_restorations(tiny_vqa, [1]) + mlp_restorations(tiny_vqa))
    hooks = restore(tiny_vqa, pair, restorations, metric="logprob")
    other = restore(wrapped, pair, restorations, metric="logprob")
    assert other.info["backend"] == "nnsight"
    torch.testing.assert_close(other.patched, hooks.patched, **TOL)
    assert abs(other.clean_score - hooks.clean_score) < 1e-5 and abs(other.corrupt_score - hooks.corrupt_score) < 1e-5


# ---------------------------------------------------------------------------------------- organism
@pytest.fixture(scope="module")
def eval_items():
    from mech_vqa.organism.synthetic import load_eval_split

    return load_eval_split()


def test_changed_item_changes_exactly_the_intended_attribute(eval_items):
    from mech_vqa.organism.synthetic import COLORS

    item = eval_items[0]
    same = changed_item(item, item.target)  # nothing asked: the repaint reproduces the image bit for bit
    assert np.array_equal(np.asarray(same.image), np.asarray(item.image))
    for index in range(len(item.objects)):
        new_color = next(c for c in COLORS if c not in {o.color for o in item.objects})
        changed = changed_item(item, index, color=new_color)
        before, after = np.asarray(item.image), np.asarray(changed.image)
        differs = (before != after).any(-1)
        mask = item.objects[index].mask(before.shape[0])
        assert differs.any() and not differs[~mask].any()  # only that object's pixels
        assert changed.objects[index].color == new_color
        assert [dataclasses.replace(o, color=None) for o in changed.objects] == \
            [dataclasses.replace(o, color=None) for o in item.objects]
        assert [o.color for i, o in enumerate(changed.objects) if i != index] == \
            [o.color for i, o in enumerate(item.objects) if i != index]
        assert changed.question == item.question
        assert (changed.answer != item.answer) == (index == item.target and item.family == "color")


@pytest.mark.skipif(not ORGANISM_READY, reason="organism not trained")
def test_counterfactual_pairs(organism_vqa, eval_items):
    colour = next(it for it in eval_items if it.family == "color")
    pattern = next(it for it in eval_items if it.family == "pattern")
    target = counterfactual_pair(organism_vqa, colour, seed=3)
    again = counterfactual_pair(organism_vqa, colour, seed=3)
    assert target.info == {**again.info, "corrupt_image": target.info["corrupt_image"]}  # deterministic from the seed
    assert np.array_equal(np.asarray(target.info["corrupt_image"]), np.asarray(again.info["corrupt_image"]))
    assert target.info["object"] == colour.target and target.info["attribute"] == "color"
    assert target.info["new"] not in {o.color for o in colour.objects}
    differ = (target.clean.input_ids[0, target.clean.answer_positions] != target.corrupt_token_ids).nonzero()
    assert differ.numel() == 1  # the answer word only
    control = counterfactual_pair(organism_vqa, colour, change="distractor", seed=3)
    assert control.info["object"] != colour.target and control.corrupt_token_ids is None
    assert counterfactual_pair(organism_vqa, pattern).info["attribute"] == "pattern"
    with pytest.raises(ValueError, match="without a referent"):
        counterfactual_pair(organism_vqa, colour, attribute="pattern")
    with pytest.raises(ValueError, match="already has"):
        counterfactual_pair(organism_vqa, colour, value=colour.objects[colour.target].color)
    with pytest.raises(ValueError, match="change must be"):
        counterfactual_pair(organism_vqa, colour, change="background")


@pytest.mark.skipif(not ORGANISM_READY, reason="organism not trained")
def test_organism_restoration_finds_the_scaffold_head_and_the_object(organism_vqa, eval_items):
    """The organism is trained to route the answer through layer 2's head 0: restoring that head's clean
    output restores most of the answer, and the image positions that restore it at layer 1 lie in the box."""
    hits = []
    for item in [it for it in eval_items if it.family == "color"][:3]:
        pair = counterfactual_pair(organism_vqa, item, seed=0)
        restorations = head_restorations(organism_vqa) + image_restorations(organism_vqa, pair, 1)
        result = restore(organism_vqa, pair, restorations)
        heads = result.head_grid()
        assert float(heads[2, 0]) > 0.5
        assert float(heads[2, 0]) > float(heads.flatten().sort().values[-2]) + 0.3
        hits.append(result.patch_map(1).pointing_game())
    assert sum(hits) >= 2


@pytest.mark.skipif(not ORGANISM_READY, reason="organism not trained")
def test_patch_task_and_summary(organism_vqa, tmp_path):
    from pathlib import Path

    from mech_vqa.dataset import read_results_file, run_dataset
    from mech_vqa.summary import summary_tables

    data = Path(__file__).resolve().parents[2] / "data" / "eval" / "items.jsonl"
    counts = run_dataset(organism_vqa, data, tmp_path / "patch.jsonl", "patch", limit=2, progress=False)
    assert counts == {"done": 2, "skipped": 0, "errors": 0}
    _, rows = read_results_file(tmp_path / "patch.jsonl")
    row = rows[0]
    assert row["pair"]["kind"] == "counterfactual" and row["metric"] == "logit_diff"
    n_layers, n_heads = organism_vqa.adapter.n_layers, organism_vqa.adapter.n_heads
    assert set(row["group_fraction"]) == {"image", "object", "question", "answer"}
    assert np.array(row["head_fraction"]).shape == (n_layers, n_heads) and len(row["mlp_fraction"]) == n_layers
    assert row["pointing_game"] is not None
    tables = summary_tables(rows)
    assert list(tables["patch_layers"].layer) == list(range(n_layers))
    assert {"image", "object", "question", "answer", "mlp"} <= set(tables["patch_layers"].columns)
    assert len(tables["patch_heads"]) == min(10, n_layers * n_heads)
    from mech_vqa.summary import save_figures

    assert [p.name for p in save_figures(tables, tmp_path / "fig")] == ["patch_layers.png"]


def test_patch_task_without_a_scene_uses_the_blurred_image(tiny_vqa, image):
    from mech_vqa.tasks import task_patch

    row = task_patch(tiny_vqa, image=image, question=QUESTION, answer=ANSWER, box=[0, 0, 20, 20], row={})
    assert row["pair"]["kind"] == "blur" and row["metric"] == "logprob" and len(row["targets"]) == 1
    assert set(row["group_fraction"]) == {"image", "object", "question", "answer"}
    assert row["patch_layer"] == tiny_vqa.adapter.n_layers // 2 and "pointing_game" in row


# ------------------------------------------------------------------ where="answer": the answer-row path
def _answer_row_restorations(vqa, rows):
    """Restorations that touch only ``rows`` on the full path, and the same ones as the answer-row path
    takes them (heads / MLPs / whole layers there restore the answer rows only)."""
    layers = range(vqa.adapter.n_layers)
    heads = range(vqa.adapter.n_heads)
    answer = ([Restoration("resid_pre", layer) for layer in layers]
              + [Restoration("z", layer, head=head) for layer in layers for head in heads]
              + [Restoration("mlp_out", layer) for layer in layers]
              + [Restoration("resid_pre", layer, rows[-1]) for layer in layers])
    group = tuple(rows)
    full = ([Restoration("resid_pre", layer, group=group, label="answer") for layer in layers]
            + [Restoration("z", layer, head=head, group=group, label="answer") for layer in layers for head in heads]
            + [Restoration("mlp_out", layer, group=group, label="answer") for layer in layers]
            + [Restoration("resid_pre", layer, rows[-1]) for layer in layers])
    return answer, full


def test_answer_row_patching_equals_full_recomputation_of_answer_row_restorations(any_vqa, image, other_image):
    """where='answer' (the corrupted prefix's KV cache, answer rows recomputed) equals the full-sequence
    run of the same restorations restricted to the answer rows, on every layout, and batched equals
    one at a time."""
    pair = PatchPair(any_vqa.prepare(image, QUESTION, ANSWER), any_vqa.prepare(other_image, QUESTION, ANSWER))
    rows = (pair.clean.answer_positions - 1).tolist()
    answer, full = _answer_row_restorations(any_vqa, rows)
    fast = patched_log_probs(any_vqa, pair, answer, where="answer", batch_size=64)
    slow = patched_log_probs(any_vqa, pair, full)
    torch.testing.assert_close(fast["corrupt"], slow["corrupt"], **TOL)
    torch.testing.assert_close(fast["patched"], slow["patched"], **TOL)
    assert (fast["patched"] - fast["corrupt"]).abs().max() > 1e-3  # the restorations do change the answer
    one = patched_log_probs(any_vqa, pair, answer, where="answer", batch_size=1)
    torch.testing.assert_close(fast["patched"], one["patched"], **TOL)
    # through restore: one target's row, scores and fractions as on the full path
    target = [len(rows) - 1]
    result = restore(any_vqa, pair, answer, targets=target, metric="logprob", where="answer", batch_size=7)
    _, full_one = _answer_row_restorations(any_vqa, rows[-1:])
    reference = restore(any_vqa, pair, full_one, targets=target, metric="logprob")
    torch.testing.assert_close(result.patched, reference.patched, **TOL)
    assert result.info["where"] == "answer" and abs(result.corrupt_score - reference.corrupt_score) < 1e-5


def test_answer_row_patching_differs_from_full_sequence_restoration(tiny_vqa, pair):
    """The two paths mean different things: a layer-0 MLP restored everywhere also changes the earlier
    positions the answer reads from; at the answer rows only it does not."""
    restorations = mlp_restorations(tiny_vqa, layers=[0])
    fast = restore(tiny_vqa, pair, restorations, metric="logprob", where="answer")
    full = restore(tiny_vqa, pair, restorations, metric="logprob")
    assert abs(float(fast.patched[0]) - float(full.patched[0])) > 1e-4


def test_answer_row_patching_bad_input(tiny_vqa, pair):
    before = [Restoration("resid_pre", 1, _question_position(pair.clean))]
    with pytest.raises(ValueError, match=r"outside the answer rows .*where='full'"):
        restore(tiny_vqa, pair, before, metric="logprob", where="answer")
    with pytest.raises(ValueError, match="outside the answer rows"):
        activation_patching(tiny_vqa, pair, metric="logprob", where="answer", image_layer=1)
    with pytest.raises(ValueError, match="unknown where"):
        restore(tiny_vqa, pair, head_restorations(tiny_vqa), where="prefix")
    pytest.importorskip("nnsight")
    nns = VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="nnsight")
    with pytest.raises(ValueError, match=r"outside the answer rows .*where='full'"):   # the same check there
        restore(nns, pair, before, metric="logprob", where="answer")
    hooks, state = hook_snapshot(tiny_vqa.model), model_state(tiny_vqa.model)
    result = activation_patching(tiny_vqa, pair, metric="logprob", where="answer")
    assert hook_snapshot(tiny_vqa.model) == hooks
    assert_same_state(state, model_state(tiny_vqa.model))
    assert len(result.patched) == tiny_vqa.adapter.n_layers * (2 + tiny_vqa.adapter.n_heads)
