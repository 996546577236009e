"""The method comparison: igos+ and igos++ are two methods, the fallback token is the answer's own word,
and every row carries tie-aware, flagged and knock-out scores."""

import json
import math

import pytest
import torch

from mech_vqa.compare import METHODS, Comparison, compare, select_targets
from mech_vqa.plotting import file_stem
from mech_vqa.methods.igos import igos
from mech_vqa.results import PatchMap
from mech_vqa.results.patch_map import UNINFORMATIVE

IGOS = {"mask_size": 4, "iterations": 2, "n_steps": 2, "l1": 0.0, "lr": 3.0}   # masks that move on a tiny model


def test_igos_plus_is_one_mask_and_igos_plusplus_two(tiny_vqa, prepared):
    result = compare(tiny_vqa, prepared, methods=["igos+", "igos++"], tokens=[3], progress=False,
                     options={"igos": IGOS}, faithfulness=False, head_claims=None)
    assert [row["method"] for row in result.table] == ["igos+", "igos++"]
    one, two = result.maps["igos+"], result.maps["igos++"]
    assert (one.method, one.info["masks"], two.method, two.info["masks"]) == ("igos+", 1, "igos++", 2)
    # the maps are the saliencies of one and of two optimised masks
    for patch_map, two_masks in ((one, False), (two, True)):
        run = igos(tiny_vqa, prepared, tokens=[3], progress=False, evaluate=False, seed=0, two_masks=two_masks, **IGOS)
        assert torch.equal(patch_map.scores, run.saliency)
        assert (run.mask_deletion is not None) == two_masks
    assert not torch.equal(one.scores, two.scores)
    with pytest.raises(ValueError, match="contradicts the method name"):
        compare(tiny_vqa, prepared, methods=["igos+"], tokens=[3], progress=False,
                options={"igos": {**IGOS, "two_masks": True}}, faithfulness=False, head_claims=None)
    assert {"igos+", "igos++"} <= set(METHODS)


def test_default_compare_on_each_family_beyond_llava_equals_each_method_alone(beyond_llava_vqa, wide_image):
    """The default methods on each family: every map is the one its method gives called on its own (token
    maps on the view's grid, iGOS on the pixels), the correlations are those maps' Spearman on the grid,
    and the head claims those of head_claims itself. InternVL runs as one tile (its tiles refuse pixel
    perturbation with one clear error, tested in test_adapters)."""
    from conftest import ANSWER, QUESTION, image_grid, one_view

    from mech_vqa.methods import PATCH_METHODS
    from mech_vqa.methods.causal import causal_map
    from mech_vqa.methods.head_claims import head_claims
    from mech_vqa.methods.logit_lens import logit_lens
    from mech_vqa.methods.mechanistic import explain
    from mech_vqa.methods.raw_attention import raw_attention_map
    from mech_vqa.methods.relevancy import relevancy_map
    from mech_vqa.methods.tam import tam_map
    from mech_vqa.metrics.correlation import spearman

    vqa = beyond_llava_vqa
    with one_view(vqa):
        inp = vqa.prepare(wide_image, QUESTION, ANSWER)
        result = compare(vqa, inp, tokens=[1], progress=False, options={"igos": IGOS}, knockout_fractions=(0.25,),
                         n_random=1, head_claims=2)
        target = inp.target(1)
        lens = logit_lens(vqa, inp, target.token_id, k=1)
        stage = int(lens.word_probs.mean(-1).argmax())
        alone = {"mechanistic": explain(vqa, inp, target, heads="top", progress=False).patch_map,
                 "logit_lens": lens.patch_map("input" if stage == 0 else stage - 1),
                 "raw_attention": raw_attention_map(vqa, inp, [target]),
                 "relevancy": relevancy_map(vqa, inp, [target], progress=False),
                 "causal": causal_map(vqa, inp, target),
                 "tam": tam_map(vqa, inp, [target])}
        for name, two_masks in (("igos+", False), ("igos++", True)):
            alone[name] = igos(vqa, inp, tokens=[1], progress=False, evaluate=False, seed=0, two_masks=two_masks,
                               **IGOS).to_patch_map()
        claims = head_claims(vqa, inp, target, n=2).to_record()
    assert list(result.maps) == [row["method"] for row in result.table] == list(PATCH_METHODS)
    grid = tuple(image_grid(vqa, inp))
    for name, patch_map in result.maps.items():
        if not name.startswith("igos"):                                # iGOS: its mask's own resolution
            assert tuple(patch_map.scores.shape) == grid, name
        torch.testing.assert_close(patch_map.scores, alone[name].scores, rtol=0, atol=0, msg=name)
    # not vacuous: every map but the causal one (at compare's alpha = 1e-5 a tiny model's explanation set
    # is often empty) is non-zero somewhere
    assert [name for name, m in result.maps.items() if float(m.scores.abs().max()) == 0] in ([], ["causal"])
    on_grid = {name: m.resample(grid, mode="area") if m.grid != grid else m.scores for name, m in alone.items()}
    for pair, value in result.correlations.items():
        a, b = pair.split("|")
        assert value == pytest.approx(spearman(on_grid[a], on_grid[b]), abs=1e-9, nan_ok=True), pair
    assert result.info["head_claims"] == [claims]
    for row in result.table:
        assert math.isfinite(row["insertion_auc_raw"]) and math.isfinite(row["deletion_auc_raw"])
        assert "drop_zero@25%" in row


def test_method_filenames_are_safe_and_distinct():
    names = [file_stem(name) for name in METHODS]
    assert len(set(names)) == len(names) and "igos_plus" in names and "igos_plusplus" in names
    assert all(name.replace("_", "").replace("-", "").isalnum() for name in names)
    assert file_stem("a/b c") == "a_b_c"


def test_fallback_never_explains_a_question_word_on_the_shipped_items(organism_vqa, organism_eval_items):
    vqa = organism_vqa
    fallbacks = 0
    for row in organism_eval_items:
        inp = vqa.prepare(row["picture"], row["question"], row["answer"])
        targets, records, rule = select_targets(vqa, inp)
        if not rule.startswith("fallback"):
            continue
        fallbacks += 1
        chosen = [r for r in records if r["index"] == targets[0].position + 1 - inp.prompt_length][0]
        assert not chosen["in_question"] and chosen["token"].strip().lower() not in row["question"].lower().split()
        assert chosen["token"].strip().lower() == row["answer_word"], (row["question"], chosen["token"])
        assert rule == "fallback: the answer's own content word, largest gap"
    assert fallbacks > 0


def test_rows_carry_raw_flagged_tie_and_knockout_scores(tiny_vqa, prepared, monkeypatch, tmp_path):
    def constant(vqa, inp, targets, box, options):
        return PatchMap(scores=torch.ones(inp.geometry.grid), method="constant",
                        image_size=list(inp.geometry.image_size))

    monkeypatch.setitem(METHODS, "constant", constant)
    box = [0, 0, 16, 16]
    result = compare(tiny_vqa, prepared, methods=["raw_attention", "constant"], tokens=[3], box=box, progress=False,
                     knockout_fractions=(0.25,), n_random=2, head_claims=3)
    rows = {row["method"]: row for row in result.table}
    assert rows["constant"]["pointing_game"] is None and rows["constant"]["pointing_uninformative"] == UNINFORMATIVE
    assert rows["constant"]["pointing_peaks"] == 16 and rows["constant"]["tie_orders"] == 4
    assert rows["raw_attention"]["tie_orders"] == 1
    for row in rows.values():
        assert math.isfinite(row["insertion_auc_raw"]) and math.isfinite(row["deletion_auc_raw"])
        # the tiny model barely reads the image: flagged, normalised AUCs withheld, the reason kept
        if row["auc_flag"] is not None:
            assert row["insertion_auc"] is None and row["deletion_auc"] is None and "min_gap" in row["auc_flag"]
        assert {"drop_zero@25%", "drop_blur@box", "excess_zero@box", "random_zero@box"} <= set(row)
    assert math.isfinite(result.info["faithfulness"]["box"]["drop_zero@box"])
    claims = result.info["head_claims"][0]
    assert len(claims["heads"]) == 3 and claims["target"]["position"] == prepared.target(3).position
    frame = result.to_dataframe()
    assert frame["pointing_game"].isna().tolist() == [False, True]
    assert len(result.topk()) == 2                                   # ranked by raw AUCs when flagged
    loaded = Comparison.load(result.save(tmp_path / "cmp"))
    assert loaded.table == json.loads(json.dumps(result.table)) and loaded.info["head_claims"][0] == claims
