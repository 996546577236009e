"""Compare every patch-importance method on the same answer tokens.

The tokens are chosen once — the visually relevant answer tokens ``S`` of Xing et al. 2025 (those
losing more than ``tau`` nats when the image is blurred) — and every method explains exactly those:

=================  ========================================================================
method             map (each a :class:`~mech_vqa.results.PatchMap`)
=================  ========================================================================
``mechanistic``    position-level log-prob increase of the top head (Yu & Ananiadou 2024)
``logit_lens``     probability of the answer word read from each image token, at the layer
                   where it is highest on average (Yu & Ananiadou 2024, visual embeddings)
``raw_attention``  attention of the predicting position to the image, mean over heads/layers
``relevancy``      Chefer et al. 2021 generic relevancy (LVLM-Interpret)
``causal``         CLEANN-style causal explanation set of the last layer's top head
``igos+``          iGOS+ perturbation saliency, one mask (Xing et al. 2025's default)
``igos++``         iGOS++ perturbation saliency, a deletion and an insertion mask (Khorram et al. 2021)
``tam``            Token Activation Map: the token's class activation on the image tokens, earlier
                   tokens' interference removed, rank-Gaussian filtered (Li et al., ICCV 2025)
=================  ========================================================================

Maps of several tokens are averaged. Each map is scored against the same baseline and tokens by:

* insertion / deletion AUC (:mod:`mech_vqa.metrics.insertion_deletion`): tied cells in random
  orders averaged (seeded); raw AUCs always; normalised AUCs only for items whose image-vs-baseline
  gap reaches ``min_gap`` nats (otherwise ``auc_flag`` says why and the normalised columns are None);
* the pointing game (expected hit over tied maxima; None for a constant map, with
  ``pointing_uninformative`` saying so) and the in-box share, when a box is given;
* patch faithfulness (:mod:`mech_vqa.metrics.faithfulness`): the answer's log-prob drop when the
  map's top-k cells are knocked out (zeroed embeddings, blurred pixels), beside k random cells and
  the box's cells (``drop_<mode>@<k>``; ``excess_<mode>@<k>`` = drop minus the random cells' drop);
* its runtime.

Maps are compared pairwise by Spearman correlation on the model's patch grid, and the heads the
mechanistic ranking names are tested by ablation (:func:`~mech_vqa.methods.head_claims.head_claims`,
``info["head_claims"]``).

When no answer token passes the selection threshold, the answer's own content word with the largest
gap is explained, never a word copied from the question
(:func:`~mech_vqa.methods.token_selection.fallback_token`); ``info["selection_rule"]`` names the rule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .inputs import PreparedInput, Target
from .metrics.correlation import spearman
from .metrics.faithfulness import KNOCKOUT_FRACTIONS
from .metrics.insertion_deletion import MIN_GAP
from .results import PatchMap, Result
from .results.base import load_bundle, save_bundle
from .methods import PATCH_METHODS

DEFAULT_METHODS = PATCH_METHODS


def _mean_maps(maps: list[PatchMap], method: str, info: dict | None = None) -> PatchMap:
    from .plotting import components_label

    first = maps[0]
    scores = torch.stack([m.scores for m in maps]).mean(0)
    targets = [t for m in maps for t in m.targets]
    info = {**first.info, **(info or {})}
    if len(maps) > 1:  # each token may use other heads / layers: the figure names them all
        info["components_per_token"] = [components_label(m.method, m.info) for m in maps]
    return PatchMap(scores=scores, method=method, image_size=first.image_size, image=first.image, targets=targets,
                    box=first.box, info=info)


def _mechanistic(vqa, inp, targets, box, options):
    from .methods.mechanistic import explain

    maps = [explain(vqa, inp, t, heads=options.get("heads", "top"), box=box, view=options.get("view", 0),
                    progress=False).patch_map for t in targets]
    return _mean_maps(maps, "mechanistic")


def _logit_lens(vqa, inp, targets, box, options):
    from .methods.logit_lens import logit_lens

    maps = []
    for t in targets:
        lens = logit_lens(vqa, inp, t.token_id, k=1, view=options.get("view", 0))
        stage = int(lens.word_probs.mean(-1).argmax())
        layer = "input" if stage == 0 else stage - 1
        patch = lens.patch_map(layer)
        maps.append(dataclasses.replace(patch, targets=[t.to_dict()], box=box, info={**patch.info, "layer": layer}))
    return _mean_maps(maps, "logit_lens")


def _raw_attention(vqa, inp, targets, box, options):
    from .methods.raw_attention import raw_attention_map

    return raw_attention_map(vqa, inp, targets, box=box, view=options.get("view", 0))


def _relevancy(vqa, inp, targets, box, options):
    from .methods.relevancy import relevancy_map

    return relevancy_map(vqa, inp, targets, progress=False, box=box, view=options.get("view", 0))


def _causal(vqa, inp, targets, box, options):
    from .methods.causal import causal_map

    maps = [causal_map(vqa, inp, t, box=box, view=options.get("view", 0)) for t in targets]
    return _mean_maps(maps, "causal")


def _igos(vqa, inp, targets, box, options, *, two_masks: bool):
    from .methods.igos import igos

    settings = dict(options.get("igos", {}))
    if settings.pop("two_masks", two_masks) != two_masks:
        raise ValueError("options {'igos': {'two_masks': ...}} contradicts the method name: 'igos+' is one mask, "
                         "'igos++' two; choose the method instead of the option")
    indices = [int(t.position) + 1 - inp.prompt_length for t in targets]
    result = igos(vqa, inp, tokens=indices, baseline=options.get("baseline", "blur"), progress=False,
                  evaluate=False, box=box, seed=options.get("seed", 0), two_masks=two_masks, **settings)
    return result.to_patch_map()


def _tam(vqa, inp, targets, box, options):
    from .methods.tam import tam_map

    return tam_map(vqa, inp, targets, box=box, view=options.get("view", 0), **options.get("tam", {}))


METHODS: dict[str, Callable] = {
    "mechanistic": _mechanistic, "logit_lens": _logit_lens, "raw_attention": _raw_attention,
    "relevancy": _relevancy, "causal": _causal, "igos+": functools.partial(_igos, two_masks=False),
    "igos++": functools.partial(_igos, two_masks=True), "tam": _tam,
}


def _score_line(row: dict) -> str:
    """``ins 0.98 ↑  del 0.06 ↓  box hit``: one method's scores for its panel title."""
    parts = []
    for key, name, arrow in (("insertion_auc", "ins", "↑"), ("deletion_auc", "del", "↓")):
        value = row.get(key)
        if value is not None and value == value:
            parts.append(f"{name} {value:.2f}{arrow}")
    pointing = row.get("pointing_game")  # the share of tied peak cells in the box; None: constant map
    if pointing is not None:
        parts.append({1.0: "peak in box", 0.0: "peak outside box"}.get(float(pointing),
                                                                      f"{pointing:.0%} of tied peaks in box"))
    return "  ".join(parts) or "not scored"


@dataclasses.dataclass
class Comparison(Result):
    """Every method's map on the same tokens, with one row of scores per method.

    Attributes:
        maps: name -> :class:`PatchMap`.
        table: one dict per method: insertion_auc / deletion_auc (normalised; None when the item is
            flagged, ``auc_flag`` says why), insertion_auc_raw / deletion_auc_raw, log_gap,
            tie_orders, pointing_game (None for a constant map), pointing_peaks,
            pointing_uninformative, in_box_share (with a box), the patch-faithfulness columns
            ``drop_<mode>@<k>`` / ``excess_<mode>@<k>`` / ``random_<mode>@<k>``, runtime_s.
        correlations: ``"a|b"`` -> Spearman correlation of the two maps on the patch grid.
        selection: the token selection records (answer tokens, log-prob gaps, selected, in_question).
        info: metadata (model, prompt, answer, selection rule, ``faithfulness`` settings and
            ``head_claims``: one :meth:`HeadClaims.to_record` per explained token).
    """

    maps: dict = dataclasses.field(default_factory=dict)
    table: list = dataclasses.field(default_factory=list)
    correlations: dict = dataclasses.field(default_factory=dict)
    selection: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.table)

    def topk(self, k: int = 10):
        """Methods ranked by insertion AUC minus deletion AUC, best first (normalised AUCs; the raw ones
        when the item is flagged: the ranking is the same within an item, both share s(I) and s(B))."""
        frame = self.to_dataframe()
        normalised = frame["insertion_auc"].astype(float) - frame["deletion_auc"].astype(float)
        raw = frame["insertion_auc_raw"].astype(float) - frame["deletion_auc_raw"].astype(float)
        frame = frame.assign(ins_minus_del=normalised.where(normalised.notna(), raw))
        return frame.sort_values("ins_minus_del", ascending=False).head(k).reset_index(drop=True)

    def correlation_matrix(self):
        import pandas as pd

        names = list(self.maps)
        frame = pd.DataFrame(1.0, index=names, columns=names)
        for pair, value in self.correlations.items():
            a, b = pair.split("|")
            frame.loc[a, b] = frame.loc[b, a] = value
        return frame

    def plot(self, ax=None, **kwargs):
        """The image as it is, then one panel per method; returns ``(fig, axes)`` (the methods' axes).

        Each panel: the map over the image (opacity = importance, its own colour bar and unit),
        which heads / layers it was read from, and its scores (insertion AUC: higher is better;
        deletion AUC: lower is better; pointing game hit or miss). The question, the answer and the
        explained tokens head the figure. ``ax``: a sequence of axes, one per method (no image panel).
        """
        import matplotlib.pyplot as plt

        from .plotting import show_image

        names = list(self.maps)
        if ax is None:
            panels = len(names) + 1
            cols = min(panels, 4)
            rows = -(-panels // cols)
            fig, grid = plt.subplots(rows, cols, figsize=(4.1 * cols, 3.9 * rows + 1.0), squeeze=False)
            flat = list(grid.flat)
            for extra in flat[panels:]:
                extra.set_visible(False)
            first = next(iter(self.maps.values()), None)
            if first is not None:
                show_image(first.image, first.image_size, ax=flat[0], box=first.box,
                           title="image as the model saw it" + ("\n(box: answer region)" if first.box else ""))
            axes = flat[1:panels]
            fig.suptitle(self._headline(), fontsize=10)
        else:
            axes = list(ax) if hasattr(ax, "__len__") else [ax]
            fig = axes[0].figure
        rows = {row["method"]: row for row in self.table}
        for axis, name in zip(axes, names):
            patch_map = self.maps[name]
            title = patch_map.title(label=name) + "\n" + _score_line(rows.get(name, {}))
            patch_map.plot(ax=axis, title=title)
        if ax is None:
            fig.tight_layout()
        return fig, axes

    def _headline(self) -> str:
        """Question, answer, explained tokens and why they were chosen."""
        from .plotting import question_answer, tokens_label

        first = next(iter(self.maps.values()), None)
        question = self.info.get("question") or (first.info.get("question") if first is not None else None)
        qa = question_answer({"question": question, "answer": self.info.get("answer")}, width=140)
        rule = str(self.info.get("selection_rule", ""))
        baseline = self.info.get("baseline", "blur")
        on = "the blurred image" if baseline == "blur" else f"the {baseline!r} baseline"
        why = {"gap": f"log p falls by more than {self.info.get('tau', 1.0)} nats on {on}",
               "manual": "chosen by hand",
               "single-token ratio": f"p at least halves on {on}"}.get(
            rule, "no token passed the threshold: the largest log-p gap" if rule.startswith("fallback") else rule)
        explained = f"explained answer token(s): {tokens_label(self.info.get('targets', []))} ({why})"
        return "\n".join(part for part in (qa, explained) if part)


    def save(self, path) -> Path:
        """``<path>.json`` (table, correlations, selection) plus one saved PatchMap per method."""
        meta = {"methods": list(self.maps), "table": self.table, "correlations": self.correlations,
                "selection": self.selection, "info": self.info}
        return save_bundle(path, "Comparison", {f"map{i}": m for i, m in enumerate(self.maps.values())}, meta)

    @classmethod
    def load(cls, path) -> Comparison:
        parts, meta = load_bundle(path, "Comparison")
        maps = {name: parts[f"map{i}"] for i, name in enumerate(meta["methods"])}
        return cls(maps=maps, table=meta["table"], correlations=meta["correlations"],
                   selection=meta["selection"], info=meta["info"])


def _common_grid(geometry, view: int) -> tuple[int, int]:
    """The grid the maps are compared on: the view's own token grid (rows x cols of its tokens)."""
    if view == 0:
        return tuple(geometry.grid)
    rowcol = geometry.rowcol[geometry.view == view]
    if rowcol.numel() == 0:
        raise ValueError(f"no image token belongs to view {view} (views: {sorted(set(geometry.view.tolist()))})")
    return int(rowcol[:, 0].unique().numel()), int(rowcol[:, 1].unique().numel())


def select_targets(vqa, inp: PreparedInput, *, tokens=None, baseline="blur", tau: float = 1.0):
    """``(targets, selection records, rule)``: the visually relevant answer tokens, or a fallback.

    When no token passes the threshold, the answer's own content word (not copied from the
    question) with the largest log-prob gap is used, and the rule says ``fallback: ...``
    (:func:`~mech_vqa.methods.token_selection.fallback_token`). Each record carries ``in_question``.
    """
    from .methods.scoring import input_baseline
    from .methods.token_selection import (copied_from_question, fallback_token, manual_selection,
                                          visually_relevant_tokens)

    if tokens is not None:
        selection = manual_selection(vqa, inp, list(tokens))
        rule = "manual"
    else:
        selection = visually_relevant_tokens(vqa, inp, input_baseline(vqa, inp, baseline), tau=tau)
        rule = selection.rule
    copied = copied_from_question(vqa.tokenizer, selection.token_ids.tolist(), inp.question)
    indices = selection.indices
    if not indices:
        index, rule = fallback_token(selection, copied)
        indices = [index]
    records = [{**record, "in_question": bool(flag)} for record, flag in zip(selection.records(), copied)]
    return [inp.target(i) for i in indices], records, rule


def _auc_columns(curves) -> dict:
    kept = curves.kept
    return {"insertion_auc": float(curves.insertion_auc) if kept else None,
            "deletion_auc": float(curves.deletion_auc) if kept else None,
            "insertion_auc_raw": float(curves.insertion_auc_raw), "deletion_auc_raw": float(curves.deletion_auc_raw),
            "log_gap": float(curves.log_gap) if math.isfinite(curves.log_gap) else None,
            "auc_flag": curves.flag, "tie_orders": int(curves.n_orders)}


def _pointing_columns(patch_map: PatchMap, box) -> dict:
    pointing = patch_map.pointing(box)
    return {"pointing_game": pointing["pointing_game"], "pointing_peaks": pointing["peaks"],
            "pointing_uninformative": pointing["reason"], "in_box_share": patch_map.in_box_share(box)}


def compare(vqa, inp: PreparedInput, *, methods=None, tokens=None, box=None, baseline="blur", tau: float = 1.0,
            step_fraction: float = 0.02, progress: bool = True, options: dict | None = None,
            view: int = 0, n_orders: int = 4, seed: int = 0, min_gap: float = MIN_GAP,
            faithfulness: bool = True, knockout_fractions=KNOCKOUT_FRACTIONS, n_random: int = 4,
            head_claims: int | None = 10) -> Comparison:
    """Every method's map on the same answer tokens, scored (see the module docstring).

    Args:
        methods: names from :data:`METHODS` (default all).
        tokens: answer-token indices to explain (default: the visually relevant ones).
        box: ground-truth box in the preprocessed image's pixels (``inp.box_to_model`` maps one).
        options: per-method options, e.g. ``{"igos": {"mask_size": 8, "iterations": 5}}``.
        view: which image tokens the token-based maps show: 0 = the whole-image view's grid; 1 =
            LLaVA-NeXT / OneVision's high-resolution tokens painted over the image (iGOS's mask
            covers the image either way).
        n_orders, seed: random orders of tied cells averaged by insertion / deletion and by the
            knock-outs (seeded).
        min_gap: nats of ``log s(I) - log s(B)`` below which normalised AUCs are withheld (flagged).
        faithfulness: also knock out each map's top-k cells (``knockout_fractions`` of the grid and
            the box's size; ``n_random`` random draws per k).
        head_claims: test the top ``head_claims`` heads of the mechanistic ranking by zeroing each
            (0 or None: skip).
    """
    from tqdm.auto import tqdm

    from .metrics.faithfulness import patch_faithfulness
    from .metrics.insertion_deletion import insertion_deletion

    methods = list(methods or DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    if box is not None:
        from .inputs import check_box

        box = check_box(box, inp.geometry.image_size)
    options = dict(options or {}, baseline=baseline, view=view)
    targets, selection, rule = select_targets(vqa, inp, tokens=tokens, baseline=baseline, tau=tau)
    indices = [t.position + 1 - inp.prompt_length for t in targets]
    maps, table = {}, []
    for name in tqdm(methods, desc="methods", disable=not progress):
        start = time.perf_counter()
        patch_map = METHODS[name](vqa, inp, targets, box, options)
        runtime = time.perf_counter() - start
        maps[name] = dataclasses.replace(patch_map, method=name) if patch_map.method != name else patch_map
        curves = insertion_deletion(vqa, inp, patch_map, tokens=indices, baseline=baseline,
                                    step_fraction=step_fraction, progress=False, n_orders=n_orders, seed=seed,
                                    min_gap=min_gap)
        row = {"method": name, **_auc_columns(curves), "runtime_s": runtime}
        if box is not None:
            row.update(_pointing_columns(patch_map, box))
        table.append(row)
    info = {"model": vqa.name, "prompt": inp.prompt, "answer": inp.answer, "selection_rule": rule,
            "targets": [t.to_dict() for t in targets], "tau": tau, "view": view, "min_gap": min_gap,
            "tie_orders": n_orders, "seed": seed, "baseline": baseline if isinstance(baseline, str) else "tensor"}
    if faithfulness:
        knocked = patch_faithfulness(vqa, inp, maps, tokens=indices, box=box, fractions=knockout_fractions,
                                     n_random=n_random, n_orders=n_orders, seed=seed, baseline=baseline)
        references = knocked.reference_columns()
        for row in table:
            row.update({**knocked.columns(row["method"]), **references})
        info["faithfulness"] = {"ks": knocked.ks, "labels": knocked.labels, "modes": knocked.modes,
                                "clean_logprob": knocked.clean_logprob, "n_box": knocked.n_box,
                                "box": knocked.columns("box") if "box" in knocked.methods else None,
                                **{k: v for k, v in knocked.info.items() if k != "box"}}
    if head_claims:
        from .methods.head_claims import head_claims as test_heads

        info["head_claims"] = [test_heads(vqa, inp, target, n=head_claims).to_record() for target in targets]
    grid = _common_grid(inp.geometry, view)
    on_grid = {name: m.resample(grid, mode="area") if m.grid != tuple(grid) else m.scores for name, m in maps.items()}
    names = list(maps)
    correlations = {f"{a}|{b}": spearman(on_grid[a], on_grid[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    return Comparison(maps=maps, table=table, correlations=correlations, selection=selection, info=info)


__all__ = ["Comparison", "DEFAULT_METHODS", "METHODS", "Target", "compare", "select_targets",
           "spearman"]
