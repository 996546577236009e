"""The dataset summary: normalised means over kept items only, raw means over all, constant maps counted
apart, accuracy weighted by the pointing score, knock-out and head-claim tables; end to end on rows of
``mech-vqa run compare``."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from mech_vqa.dataset import read_results, run_dataset
from mech_vqa.summary import summarize, summary_tables


def _entry(ins, dele, flag=None, pointing=1.0, drop=1.0):
    return {"insertion_auc": None if flag else ins, "deletion_auc": None if flag else dele,
            "insertion_auc_raw": ins / 2,
            "deletion_auc_raw": dele / 2, "auc_flag": flag, "pointing_game": pointing, "in_box_share": 0.5,
            "runtime_s": 0.1, "drop_zero@box": drop, "random_zero@box": 0.25}


def _row(entries, correct=True, rule="gap", spearman=0.5, top="L2H0", delta=-2.0):
    return {"status": "ok", "correct": correct, "selection_rule": rule, "methods": entries,
            "correlations": {"a|b": 0.5}, "faithfulness": {"box": {"drop_zero@box": 3.0}},
            "head_claims": [{"spearman": spearman, "heads": [
                {"head": top, "increase": 1.5, "delta_logprob": delta, "flipped": delta < -1, "rank_needed": 1}]}]}


def test_means_counts_and_weights():
    flag = "the baseline keeps the answer: ... < min_gap = 1.0"
    rows = [_row({"a": _entry(0.8, 0.2, pointing=1.0), "b": _entry(0.6, 0.4, pointing=None)}, correct=True),
            _row({"a": _entry(0.6, 0.4, pointing=0.5), "b": _entry(0.5, 0.5, pointing=0.0)}, correct=False,
                 top="L2H2", delta=0.0, spearman=-0.5),
            _row({"a": _entry(5.0, -3.0, flag=flag, pointing=0.0), "b": _entry(4.0, 2.0, flag=flag)}, correct=True,
                 rule="fallback: the answer's own content word, largest gap")]
    tables = summary_tables(rows)
    overview = tables["overview"].iloc[0]
    assert (overview["compared"], overview["compared_with_S"], overview["auc_flagged_items"]) == (3, 2, 1)
    assert overview["head_claims_spearman"] == pytest.approx(0.5 / 3)
    methods = tables["methods"].set_index("method")
    assert methods.loc["a", "insertion_auc"] == pytest.approx(0.7)          # the flagged 5.0 is left out
    assert methods.loc["a", "insertion_auc_raw"] == pytest.approx((0.4 + 0.3 + 2.5) / 3)   # raw: every item
    assert (methods.loc["a", "auc_kept"], methods.loc["a", "auc_flagged"]) == (2, 1)
    assert methods.loc["a", "pointing_game"] == pytest.approx(0.5) and methods.loc["a", "pointing_uninformative"] == 0
    assert methods.loc["b", "pointing_game"] == pytest.approx(0.5) and methods.loc["b", "pointing_uninformative"] == 1
    # focus hit weighted by the pointing score: a's items (1.0, correct), (0.5, wrong), (0.0, correct)
    assert methods.loc["a", "acc_focus_hit"] == pytest.approx(1.0 / 1.5)
    assert methods.loc["a", "acc_focus_miss"] == pytest.approx((0.0 * 1 + 0.5 * 0 + 1.0 * 1) / 1.5)
    faith = tables["faithfulness"].set_index("method")
    assert faith.loc["random cells", "drop_zero@box"] == pytest.approx(0.25)
    assert faith.loc["box", "drop_zero@box"] == pytest.approx(3.0) and faith.loc["a", "drop_zero@box"] == 1.0
    heads = tables["head_claims"].set_index("top_head")
    assert heads.loc["L2H0", "items"] == 2 and heads.loc["L2H2", "mean_delta_when_zeroed"] == 0.0
    assert heads.loc["L2H0", "flip_rate"] == 1.0


def test_rows_written_before_the_flag_fall_back_to_the_selection_rule():
    old = {"insertion_auc": 3.0, "deletion_auc": 0.1, "pointing_game": True, "in_box_share": 0.5, "runtime_s": 0.1}
    rows = [_row({"a": {**old, "insertion_auc": 0.9}}),
            _row({"a": old}, rule="fallback: largest gap")]
    methods = summary_tables(rows)["methods"].set_index("method")
    assert methods.loc["a", "insertion_auc"] == pytest.approx(0.9) and methods.loc["a", "auc_flagged"] == 1


def test_run_compare_then_summary(tiny_vqa, tmp_path):
    rows = []
    for i in range(2):
        rng = np.random.RandomState(i)
        Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "What is the color of the dog?", "answer": "The dog is red.",
                     "answer_word": "red", "box": [0, 0, 16, 16]})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "r.jsonl"
    counts = run_dataset(tiny_vqa, tmp_path / "data.jsonl", out, "compare", progress=False,
                         methods=["raw_attention", "relevancy"])
    assert counts["errors"] == 0
    written = read_results(out)  # the rows, less the header line
    entry = written[0]["methods"]["raw_attention"]
    assert {"insertion_auc_raw", "auc_flag", "pointing_peaks", "drop_zero@box", "excess_blur@10%"} <= set(entry)
    assert written[0]["head_claims"][0]["heads"] and written[0]["faithfulness"]["box"]
    text = summarize(out)
    for table in ("## methods", "## faithfulness", "## head_claims", "pointing_uninformative", "auc_flagged"):
        assert table in text
    assert math.isfinite(summary_tables(written)["methods"]["insertion_auc_raw"].iloc[0])


def test_run_knockout_then_summary(organism_vqa, tmp_path):
    """``mech-vqa run knockout`` rows on the organism's eval items, then the knockout table and figure."""
    from mech_vqa.organism import EVAL_DIR
    from mech_vqa.summary import save_figures

    lines = (EVAL_DIR / "items.jsonl").read_text().splitlines()[:2]
    rows = [dict(json.loads(line), image=str(EVAL_DIR / json.loads(line)["image"])) for line in lines]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "k.jsonl"
    assert run_dataset(organism_vqa, tmp_path / "data.jsonl", out, "knockout", progress=False)["errors"] == 0
    written = read_results(out)
    study = written[0]["knockout"]
    assert study["pairs"] == ["image ↛ question", "image ↛ last", "question ↛ last"]
    assert np.array(study["relative_change"]).shape == (3, organism_vqa.adapter.n_layers)
    assert written[0]["strongest"]["image ↛ last"]["window"] == [2, 3]
    table = summary_tables(written)["knockout"]
    assert len(table) == 3 * organism_vqa.adapter.n_layers and (table["items"] == 2).all()
    # the columns recomputed from the two rows' own relative changes
    pair, window = study["pairs"].index("image ↛ last"), study["layers"].index(2)
    changes = [row["knockout"]["relative_change"][pair][window] for row in written]
    cell = table[(table["pair"] == "image ↛ last") & (table["layer"] == 2)].iloc[0]
    assert cell["mean_relative_change"] == pytest.approx(np.mean(changes))
    assert cell["median_relative_change"] == pytest.approx(np.median(changes))
    assert "## knockout" in summarize(out)
    assert [p.name for p in save_figures(summary_tables(written), tmp_path / "figures")] == ["knockout.png"]


def test_knockout_table_median_resists_one_outlier():
    """One wrongly answered item whose probability multiplies when edges are blocked swings the mean; the
    median does not move with it. A missing value (null) is left out of both."""
    def row(change):
        return {"knockout": {"pairs": ["image ↛ last"], "windows": [[1, 2]], "layers": [1],
                             "relative_change": [[change]]}}

    changes = [-0.9, -0.8, -0.5, 36.46, None]
    table = summary_tables([dict(row(c), status="ok") for c in changes])["knockout"]
    cell = table.iloc[0]
    assert cell["mean_relative_change"] == pytest.approx(np.mean([-0.9, -0.8, -0.5, 36.46]))
    assert cell["mean_relative_change"] > 8
    assert cell["median_relative_change"] == pytest.approx(-0.65)
    assert cell["items"] == 5
