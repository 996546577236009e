"""Figures: what each plot claims is checked on the drawn artists (Agg backend, no model needed)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mech_vqa.compare import Comparison  # noqa: E402
from mech_vqa.plotting import MAX_ALPHA, file_stem, importance_rgba, no_evidence_reason  # noqa: E402
from mech_vqa.results import CausalExplanation, HeadIncrease, LogitLens, PatchMap  # noqa: E402
from mech_vqa.summary import save_figures  # noqa: E402

QA = {"question": "What is the color of the checkered object?", "answer": "yellow"}
TARGET = {"token_id": 22, "position": 83, "token": "yellow"}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _image():
    return torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0))


def _map(scores, **kwargs):
    fields = {"method": "mechanistic_head_positions", "image_size": [32, 32], "image": _image(), "targets": [TARGET],
              "box": [0, 0, 16, 16], "info": {**QA, "heads": [[2, 0]], "unit": "increase of log p('yellow') (nats)"}}
    return PatchMap(scores=scores, **{**fields, **kwargs})


def _colorbar_labels(fig) -> list[str]:
    return [axis.get_ylabel() for axis in fig.axes if axis.get_label() == "<colorbar>"]


def test_overlay_alpha_follows_positive_importance():
    scores = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    _, ax = _map(scores).plot(ax=plt.subplots()[1])
    rgba = np.asarray(ax.images[-1].get_array())
    assert rgba.shape == (2, 2, 4)
    assert rgba[0, 0, 3] == 0.0  # nothing claimed: the image shows through untouched
    np.testing.assert_allclose(rgba[..., 3], MAX_ALPHA * scores.numpy() / 4.0, rtol=1e-6)
    assert ax.images[0].get_array().shape[:2] == (32, 32)  # the image itself lies under the overlay


def test_signed_map_uses_magnitude_for_opacity_and_a_diverging_scale():
    scores = torch.tensor([[-2.0, 0.0], [1.0, 2.0]])
    rgba, norm, cmap = importance_rgba(scores, signed=True)
    np.testing.assert_allclose(rgba[..., 3], MAX_ALPHA * np.array([[1.0, 0.0], [0.5, 1.0]]), rtol=1e-6)
    assert (norm.vmin, norm.vmax) == (-2.0, 2.0) and cmap.name.startswith("RdBu")
    unsigned, *_ = importance_rgba(scores, signed=False)
    assert unsigned[0, 0, 3] == 0.0  # a negative cell claims nothing on an unsigned scale


@pytest.mark.parametrize("scores, reason", [(torch.zeros(4, 4), "constant"), (torch.full((4, 4), 0.3), "constant"),
                                            (-torch.rand(4, 4), "positive"),
                                            (torch.full((4, 4), float("nan")), "finite")])
def test_empty_or_constant_map_is_a_no_evidence_panel(scores, reason):
    fig, ax = _map(scores, info={**QA, "unit": "attention weight"}).plot(ax=plt.subplots()[1], signed=False)
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "no evidence" in texts and reason in texts
    assert len(ax.images) == 1  # the image only: no wash of colour that could be read as data
    assert no_evidence_reason(scores) is not None


def test_method_reason_is_shown_for_an_empty_causal_map():
    n = 4
    rowcol = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    causal = CausalExplanation(
        nodes=torch.tensor([1, 5]), kinds=["text", "target"], adjacency=torch.zeros(2, 2, dtype=bool),
        correlation=torch.eye(2), attention=torch.tensor([0.5, 0.5]), explanation=torch.tensor([1]),
        image_positions=torch.arange(2, 2 + n), image_rowcol=rowcol, image_view=torch.zeros(n, dtype=torch.long),
        image_boxes=torch.zeros(n, 4), grid=[2, 2], image_size=[32, 32], image=_image(), tokens=["the", "yellow"],
        layer=3, head=1, targets=[TARGET], info=dict(QA))
    patch_map = causal.patch_map()
    assert "no image patch" in patch_map.info["empty_reason"]
    _, ax = patch_map.plot(ax=plt.subplots()[1])
    assert "no image patch" in " ".join(t.get_text() for t in ax.texts)
    assert "L3H1" in ax.get_title() and "'yellow'" in ax.get_title()


def test_title_names_method_token_and_head_and_colorbar_has_the_unit():
    fig, ax = _map(torch.rand(4, 4)).plot()
    assert "mechanistic" in ax.get_title() and "'yellow'" in ax.get_title() and "L2H0" in ax.get_title()
    assert "nats" in _colorbar_labels(fig)[0]
    assert QA["question"] in fig._suptitle.get_text() and "A: yellow" in fig._suptitle.get_text()
    assert len([a for a in fig.axes if a.get_label() != "<colorbar>"]) == 2  # the image as it is, and the map
    fig, ax = _map(torch.rand(4, 4), method="relevancy_llm", info={"stage": "llm"}).plot()
    assert ax.get_title().startswith("relevancy") and "relevancy_llm" not in ax.get_title()
    assert _colorbar_labels(fig)[0]  # a unit even when the method gave none


def test_plot_draws_on_the_given_axis_and_returns_it():
    fig, given = plt.subplots()
    before = plt.get_fignums()
    out_fig, out_ax = _map(torch.rand(4, 4)).plot(ax=given)
    assert out_ax is given and out_fig is fig and plt.get_fignums() == before
    assert len(given.images) == 2


def test_file_stem_is_filesystem_safe_and_keeps_methods_apart():
    assert file_stem("igos+") == "igos_plus" and file_stem("igos++") == "igos_plusplus"
    assert file_stem("raw_attention") == "raw_attention" and file_stem("a/b c") == "a_b_c"


def test_head_plot_names_token_position_and_top_head_with_units():
    scores = torch.zeros(3, 4)
    scores[2, 1] = 1.5
    fig, ax = HeadIncrease(scores=scores, target=TARGET, info=dict(QA)).plot()
    title = ax.get_title()
    assert "'yellow'" in title and "position 83" in title and "L2H1" in title and QA["question"] in title
    assert ax.get_xlabel() == "head" and "layer" in ax.get_ylabel()
    assert "nats" in _colorbar_labels(fig)[0]


def _lens(word=True):
    stages, grid = 3, [2, 2]
    rowcol = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    words = [["red", "blue", "yellow", "yellow"], ["yellow"] * 4, ["of", "a", "b", "c"]]
    return LogitLens(top_ids=torch.arange(12).view(stages, 4, 1), top_probs=torch.full((stages, 4, 1), 0.5),
                     rowcol=rowcol, word_probs=torch.rand(stages, 4) if word else None,
                     top_tokens=[[[w] for w in stage] for stage in words], word="yellow" if word else None,
                     grid=grid, image_size=[32, 32], image=_image(), info=dict(QA),
                     boxes=torch.tensor([[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32], [16, 16, 32, 32]]))


def test_logit_lens_writes_each_patch_word_over_the_image_with_a_layer_strip():
    lens = _lens()
    fig, ax = lens.plot(layer=0)
    assert sorted(t.get_text() for t in ax.texts) == ["yellow"] * 4  # after layer 0 = stage 1
    assert ax.images[0].get_array().shape[:2] == (32, 32)  # the image under the words
    strip = [a for a in fig.axes if a is not ax and a.get_label() != "<colorbar>"]
    assert len(strip) == 3 and any("'yellow'" in a.get_title() for a in strip)
    assert "p('yellow')" in strip[0].get_ylabel()
    _, only = lens.plot(ax=plt.subplots()[1], layer="input")
    assert sorted(t.get_text() for t in only.texts) == ["blue", "red", "yellow", "yellow"]
    fig, ax = _lens(word=False).plot(layer=-1)
    assert "the last" in ax.get_title()


def test_comparison_figure_heads_with_question_answer_and_scores():
    maps = {"mechanistic": _map(torch.rand(4, 4)), "causal": _map(torch.zeros(4, 4), method="causal")}
    table = [{"method": "mechanistic", "insertion_auc": 0.9, "deletion_auc": 0.1, "pointing_game": True},
             {"method": "causal", "insertion_auc": 0.5, "deletion_auc": 0.4, "pointing_game": False}]
    comparison = Comparison(maps=maps, table=table, info={"answer": "yellow", "selection_rule": "gap", "tau": 1.0,
                                                         "targets": [TARGET], "baseline": "blur"})
    fig, axes = comparison.plot()
    headline = fig._suptitle.get_text()
    assert QA["question"] in headline and "A: yellow" in headline and "'yellow'" in headline
    assert len(axes) == 2 and "del 0.10↓" in axes[0].get_title() and "peak in box" in axes[0].get_title()
    assert "no evidence" in " ".join(t.get_text() for t in axes[1].texts)


def test_summary_methods_figure_says_which_way_is_better(tmp_path, monkeypatch):
    import pandas as pd

    assert save_figures({"overview": pd.DataFrame()}, tmp_path / "none") == []
    assert not (tmp_path / "none").exists()  # no empty figures folder
    frame = pd.DataFrame([{"method": m, "items": 3, "insertion_auc": 0.8, "deletion_auc": 0.2, "pointing_game": 1.0,
                           "in_box_share": 0.5} for m in ("mechanistic", "igos++")])
    captured = {}
    original = plt.Figure.savefig

    def keep(fig, path, **kwargs):
        captured[str(path)] = fig
        return original(fig, path, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    written = save_figures({"methods": frame}, tmp_path / "figs")
    assert [p.name for p in written] == ["methods.png"] and written[0].exists()
    ax = captured[str(written[0])].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "deletion AUC (lower is better)" in labels and "insertion AUC (higher is better)" in labels
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.x0 >= ax.get_window_extent().x1  # the legend sits outside the bars


def test_mean_of_tokens_maps_names_each_tokens_heads():
    from mech_vqa.compare import _mean_maps

    first = _map(torch.rand(4, 4))
    second = _map(torch.rand(4, 4), targets=[{"token_id": 5, "position": 84, "token": "dark"}],
                  info={**QA, "heads": [[1, 3]]})
    title = _mean_maps([first, second], "mechanistic").title()
    assert "L2H0" in title and "L1H3" in title and "'yellow' 'dark'" in title
