"""Activation patching with clean / corrupted pairs (causal tracing for VLMs).

Basu et al. 2024, "Understanding Information Storage and Transfer in Multi-modal Large Language
Models" (arXiv 2406.04236); Golovanevsky et al., NAACL 2025, "What Do VLMs NOTICE? A Mechanistic
Interpretability Pipeline for Gaussian-Noise-free Text-Image Corruption and Evaluation" (semantic
image pairs instead of Gaussian noise); Meng et al. 2022 (causal tracing); Heimersheim & Nanda 2024
(how to use and interpret activation patching).

Run a clean input ``x`` and a corrupted one ``x'`` with the same token layout (same length, image
and answer positions; the clean answer teacher-forced in both), then rerun ``x'`` with one activation
``a`` restored from the clean run and measure how much of the answer comes back::

    fraction(a) = (s(x' ; a <- a(x)) - s(x')) / (s(x) - s(x'))

1 = the restoration alone brings the clean answer back, 0 = nothing. The score ``s`` (fp32) is

* ``logit_diff`` (default when the pair knows the corrupted answer): summed over the target tokens,
  ``logit(y_t) - logit(y'_t)`` at the predicting position, ``y`` the clean and ``y'`` the corrupted
  answer's token. It is what Heimersheim & Nanda recommend: linear in the final residual, blind to
  the probability mass other tokens take;
* ``logprob`` (default for blurred / noised pairs, which have no corrupted answer):
  ``sum_t log p(y_t)``, the clean answer's log-probability.

Restorations (``Restoration``; shapes as :mod:`mech_vqa.interventions` defines the sites):

============  =============================================  =================================
site          what is copied from the clean run              builder
============  =============================================  =================================
resid_pre     the residual stream entering layer l, at one   :func:`residual_restorations`,
              position p (or all: restores everything), or   :func:`image_restorations`,
              at a named group of positions together         :func:`group_restorations`
z             head h's output before ``o_proj`` (all pos.)   :func:`head_restorations`
mlp_out       the MLP block's output (all positions)         :func:`mlp_restorations`
============  =============================================  =================================

Batched: each restoration gets its own batch row of copies of ``x'``; restorations are grouped by
layer and every group resumes from that layer with the corrupted run's residual stream
(:class:`~mech_vqa.runner.ResidualCheckpoint`), so the vision tower and the layers before are never
recomputed and only the target rows are unembedded. On backends other than hooks each group is a
whole forward through ``vqa.trace`` (:class:`~mech_vqa.runner.FullForwardRuns`): same numbers.

:func:`activation_patching` runs the usual set in one call; :func:`patched_log_probs` returns the full
log-probabilities (for checks).

Where (``restore(..., where=...)``, also :func:`activation_patching` and :func:`patched_log_probs`):

- ``"full"`` (default): a restoration rewrites every position it names (all of them for a head, an MLP
  or a whole-layer residual) in a full-sequence run of the corrupted input from its layer on. A
  restoration at a position ``p`` before the answer changes, from that layer on, the residual
  stream, keys and values of ``p`` and of every later position, so the answer sees the restored
  activation both directly and through everything the later context computes from it.
- ``"answer"``: only the answer rows are restored and recomputed (the scored predicting rows, from the
  first to the last, :class:`~mech_vqa.runner.AnswerRowRunner`): the corrupted run is kept as a KV
  cache, computed once, and every earlier position keeps its corrupted residual stream, keys and
  values at every layer; each restoration recomputes only the answer rows (a decoding step's
  arithmetic), many restorations in one batch whatever their layers. A head, MLP or whole-layer
  residual restoration then restores only what the answer rows themselves read and write through
  that component, not its effect through the context; a restoration that names an explicit position
  inside the answer rows means exactly what it means on the full path (nothing before it changes),
  and both paths agree there. A restoration at any earlier position (an image patch, the question, a
  group reaching before the answer rows) cannot run this way and is an error (use ``where="full"``).

Pairs: :func:`counterfactual_pair` (the organism's scene with one object's colour or pattern
changed: the queried object's, which changes the answer, or a distractor's, a control whose gap
should be near 0) and :func:`baseline_pair` (the image blurred, blacked out or replaced by noise).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..inputs import PreparedInput
from ..interventions import Intervention
from ..results.patching import ALL, GROUP, PatchingResult
from ..runner import answer_rows_for, checkpoint_for

SITES = ("resid_pre", "z", "mlp_out")
METRICS = ("auto", "logit_diff", "logprob")
WHERE = ("full", "answer")
MIN_GAP = 1e-3
"""Below this clean-vs-corrupted score gap (in the metric's units) the fraction is undefined (NaN)."""


class LayoutMismatch(ValueError):
    """The clean and corrupted inputs do not share one token layout, so positions cannot be matched."""


@dataclasses.dataclass(frozen=True)
class Restoration:
    """Copy ``site`` of ``layer`` (at ``position``, or all with -1; head ``head`` for ``z``) from clean.

    ``group`` (with ``label``): a set of positions restored together instead of one (``position`` is then
    :data:`GROUP`), e.g. every image token or the answer object's patches.
    """

    site: str
    layer: int
    position: int = ALL
    head: int = ALL
    group: tuple = ()
    label: str = ""

    def __post_init__(self):
        if self.group:
            object.__setattr__(self, "group", tuple(int(p) for p in self.group))
            object.__setattr__(self, "position", GROUP)
            if not self.label:
                raise ValueError("a group restoration needs a label naming its positions (e.g. 'image')")
        elif self.position == GROUP:
            raise ValueError("position GROUP needs the group's positions (group=...)")
        if self.site not in SITES:
            raise ValueError(f"unknown restoration site {self.site!r}; choose one of {SITES}")
        if self.head != ALL and self.site != "z":
            raise ValueError("a head applies to site 'z' only (per-head outputs before o_proj)")
        if self.site == "z" and self.head == ALL:
            raise ValueError("a 'z' restoration names one head (use mlp_out / resid_pre for whole blocks)")


@dataclasses.dataclass
class PatchPair:
    """A clean and a corrupted input with one token layout.

    Attributes:
        clean, corrupt: the prepared inputs (the clean answer teacher-forced in both).
        kind: ``counterfactual`` / ``blur`` / ``noise`` / ``black`` / ``custom``.
        corrupt_token_ids: ``[n_answer]`` the corrupted answer's tokens at the answer positions (for
            ``logit_diff``), or None when the corruption has no answer of its own.
        box: the answer object's box in the preprocessed image's pixels, or None.
        info: what was changed (object, attribute, old and new value...).
    """

    clean: PreparedInput
    corrupt: PreparedInput
    kind: str = "custom"
    corrupt_token_ids: torch.Tensor | None = None
    box: list | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check_same_layout(self.clean, self.corrupt)
        if self.corrupt_token_ids is not None:
            self.corrupt_token_ids = torch.as_tensor(self.corrupt_token_ids, dtype=torch.long).flatten()
            if self.corrupt_token_ids.numel() != self.clean.answer_positions.numel():
                raise LayoutMismatch(
                    f"the corrupted answer has {self.corrupt_token_ids.numel()} tokens, the clean one "
                    f"{self.clean.answer_positions.numel()}; logit differences pair tokens by position, so both "
                    "answers must tokenize to the same length (or pass corrupt_token_ids=None and use 'logprob')")


def check_same_layout(clean: PreparedInput, corrupt: PreparedInput) -> None:
    """One :class:`LayoutMismatch` naming the first difference that breaks position-wise patching."""
    for name, value in (("clean", clean), ("corrupt", corrupt)):
        if not isinstance(value, PreparedInput):
            raise TypeError(f"the {name} input must be a PreparedInput (VQAModel.prepare), got {type(value).__name__}")
    fix = ("build both from the same template, question and answer length (e.g. counterfactual_pair / "
           "baseline_pair), with images of the same size")
    if clean.seq_len != corrupt.seq_len:
        raise LayoutMismatch(f"the clean input has {clean.seq_len} tokens, the corrupted one {corrupt.seq_len}; "
                             f"patching restores position by position, so {fix}")
    if not torch.equal(clean.image_positions, corrupt.image_positions):
        raise LayoutMismatch(f"the image tokens sit at other positions in the two inputs; {fix}")
    if not torch.equal(clean.answer_positions, corrupt.answer_positions):
        raise LayoutMismatch(f"the answers sit at other positions in the two inputs; {fix}")
    if clean.answer_positions.numel() == 0:
        raise ValueError("the clean input has no answer to score; prepare it with an answer")
    if tuple(clean.pixel_values.shape) != tuple(corrupt.pixel_values.shape):
        raise LayoutMismatch(f"pixel values differ in shape ({tuple(clean.pixel_values.shape)} vs "
                             f"{tuple(corrupt.pixel_values.shape)}); {fix}")
    answers = clean.answer_positions
    if not torch.equal(clean.input_ids[0, answers], corrupt.input_ids[0, answers]):
        raise LayoutMismatch("the corrupted input teacher-forces another answer; force the clean answer in both (the "
                             "corrupted answer goes to PatchPair.corrupt_token_ids)")


# ------------------------------------------------------------------------------------------ pairs
def _naming_attribute(family: str) -> str:
    return "pattern" if family == "color" else "color"


def changed_item(item, index: int, *, color: str | None = None, pattern: str | None = None):
    """``item`` with object ``index`` repainted in another ``color`` / ``pattern`` (nothing else changes).

    The object's pixels are its shape's mask, so repainting the same mask changes exactly that object:
    the background and every other object keep their pixels, bit for bit. The question is kept; the
    answer follows when the changed object is the one asked about.
    """
    from PIL import Image

    from ..organism.synthetic import COLORS, PATTERNS, QUESTION_TEMPLATES, SHADE, SceneObject, pattern_mask

    if not 0 <= index < len(item.objects):
        raise IndexError(f"object {index} is out of range: the scene has {len(item.objects)} objects")
    if color is not None and color not in COLORS:
        raise ValueError(f"unknown colour {color!r}; choose one of {list(COLORS)}")
    if pattern is not None and pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {list(PATTERNS)}")
    old = item.objects[index]
    new = SceneObject(old.shape, color or old.color, pattern or old.pattern, old.box)
    pixels = np.asarray(item.image, dtype=np.float64).copy()
    size = pixels.shape[0]
    shape = new.mask(size)
    dark = shape & pattern_mask(new.pattern, new.box, size)
    rgb = np.array(COLORS[new.color], dtype=np.float64)
    pixels[shape] = rgb
    pixels[dark] = rgb * SHADE
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "RGB")
    objects = [new if i == index else o for i, o in enumerate(item.objects)]
    target = objects[item.target]
    question, answer = (t.format(color=target.color, shape=target.shape, pattern=target.pattern)
                        for t in QUESTION_TEMPLATES[item.family])
    return dataclasses.replace(item, image=image, question=question, answer=answer, answer_word=answer.split()[-1],
                               objects=objects, mask=target.mask(size))


def counterfactual_pair(vqa, item, *, change: str = "target", attribute: str | None = None, seed: int = 0,
                        value: str | None = None) -> PatchPair:
    """A semantic counterfactual of an organism item (:class:`~mech_vqa.organism.synthetic.VQAItem`).

    Args:
        change: ``target`` (the object asked about: its answer changes) or ``distractor`` (another object,
            drawn by ``seed``: the answer should not change, a control).
        attribute: ``color`` or ``pattern``; default the attribute the question asks for. The attribute the
            question names the object by cannot change on the target (the question would lose its referent).
        seed: draws the new value (among those no other object shows) and the distractor.
        value: the new value instead of a drawn one.
    """
    from ..organism.synthetic import COLORS, PATTERNS

    if change not in ("target", "distractor"):
        raise ValueError(f"change must be 'target' or 'distractor', got {change!r}")
    if not getattr(item, "objects", None):
        raise ValueError("this item lists no objects; counterfactual pairs need the scene description "
                         "(items from organism.synthetic or load_eval_split)")
    asked = "color" if item.family == "color" else "pattern" if item.family == "pattern" else "shape"
    attribute = attribute or asked
    if attribute not in ("color", "pattern"):
        raise ValueError(f"attribute must be 'color' or 'pattern', got {attribute!r}")
    naming = _naming_attribute(item.family)
    rng = np.random.default_rng(seed)
    if change == "target":
        if attribute == naming:
            raise ValueError(f"the question names the object by its {naming}: changing the target's {naming} leaves "
                             f"the question without a referent; change its {asked} or a distractor instead")
        index = item.target
    else:
        others = [i for i in range(len(item.objects)) if i != item.target]
        if not others:
            raise ValueError("the scene has one object only: there is no distractor to change")
        index = others[int(rng.integers(len(others)))]
    current = getattr(item.objects[index], attribute)
    choices = list(COLORS) if attribute == "color" else list(PATTERNS)
    if value is None:
        used = {getattr(o, attribute) for o in item.objects}
        free = [c for c in choices if c not in used]
        if not free and attribute != naming:  # a shared value is harmless when the question does not name by it
            free = [c for c in choices if c != current]
        if not free:
            raise ValueError(f"every {attribute} is taken in this scene and the question names objects by "
                             f"{attribute}; pick another item or attribute")
        value = free[int(rng.integers(len(free)))]
    if value == current:
        raise ValueError(f"object {index} already has {attribute} {value!r}; choose another value")
    corrupt_item = changed_item(item, index, **{attribute: value})
    clean = vqa.prepare(item.image, item.question, item.answer, generate=False)
    corrupt = vqa.prepare(corrupt_item.image, item.question, item.answer, generate=False)
    corrupt_ids = None
    if corrupt_item.answer != item.answer:
        own = vqa.prepare(corrupt_item.image, item.question, corrupt_item.answer, generate=False)
        if own.seq_len == clean.seq_len:
            corrupt_ids = own.input_ids[0, own.answer_positions]
    return PatchPair(clean, corrupt, kind="counterfactual", corrupt_token_ids=corrupt_ids,
                     box=clean.box_to_model(item.box),
                     info={"change": change, "object": index, "attribute": attribute, "old": current, "new": value,
                           "clean_answer": item.answer, "corrupt_answer": corrupt_item.answer, "seed": seed,
                           "corrupt_image": corrupt_item.image})


def baseline_pair(vqa, inp: PreparedInput, kind: str = "blur", *, box=None, **kwargs) -> PatchPair:
    """``inp`` against its image blurred / blacked out / replaced by noise (:mod:`~mech_vqa.methods.scoring`'s
    baselines, ``kwargs`` go to :func:`~mech_vqa.methods.scoring.baseline_image`), same text."""
    from .scoring import baseline_image

    if inp.image is None:
        raise ValueError("this PreparedInput carries no PIL image; prepare it with VQAModel.prepare(image, ...)")
    if inp.answer is None:
        raise ValueError("the input has no answer to score; prepare it with an answer")
    image = baseline_image(inp.image, kind, **kwargs)
    corrupt = vqa.prepare(image, inp.question, inp.answer, generate=False)
    return PatchPair(inp, corrupt, kind=kind, box=list(box) if box is not None else None,
                     info={"baseline": kind, "corrupt_image": image})


# ----------------------------------------------------------------------------------- restorations
def _layers(vqa, layers) -> list[int]:
    adapter = vqa.adapter
    return list(range(adapter.n_layers)) if layers is None else [adapter.check_layer(int(x)) for x in layers]


def residual_restorations(vqa, pair: PatchPair, layers=None, positions=None, *,
                          whole: bool = True) -> list[Restoration]:
    """The residual stream entering each layer at each position (default: every position up to the last
    answer token's predicting one; later ones cannot reach the answer), plus, with ``whole``, at every
    position at once (restores the clean run exactly: a check)."""
    if positions is None:
        positions = range(int(pair.clean.answer_positions.max()))
    positions = [pair.clean.check_position(int(p)) for p in positions]
    out = []
    for layer in _layers(vqa, layers):
        out += [Restoration("resid_pre", layer, p) for p in positions]
        if whole:
            out.append(Restoration("resid_pre", layer))
    return out


def image_restorations(vqa, pair: PatchPair, layer: int) -> list[Restoration]:
    """The residual stream entering ``layer`` at each image position, one restoration each (for a
    :meth:`PatchingResult.patch_map`)."""
    layer = vqa.adapter.check_layer(layer)
    return [Restoration("resid_pre", layer, int(p)) for p in pair.clean.image_positions.tolist()]


def group_restorations(vqa, groups: dict, layers=None, site: str = "resid_pre") -> list[Restoration]:
    """``site`` of each layer at each named set of positions at once (``groups``: ``{label: positions}``;
    empty sets are skipped)."""
    return [Restoration(site, layer, group=tuple(int(p) for p in positions), label=label)
            for layer in _layers(vqa, layers) for label, positions in groups.items() if len(positions)]


def pair_groups(pair: PatchPair) -> dict:
    """The usual position groups of a pair: ``image``, ``object`` (the box's patches, with a box),
    ``question`` and ``answer`` (every answer token's predicting position: the rows the answer is read
    from, the last prompt token included)."""
    clean = pair.clean
    groups = {"image": clean.image_positions.tolist()}
    if pair.box is not None:
        groups["object"] = clean.positions_in_box(pair.box)
    groups["question"] = clean.question_positions.tolist()
    groups["answer"] = (clean.answer_positions - 1).tolist()
    return groups


def head_restorations(vqa, layers=None, heads=None) -> list[Restoration]:
    """Each head's output (``z``, before ``o_proj``) at every position."""
    adapter = vqa.adapter
    heads = list(range(adapter.n_heads)) if heads is None else [adapter.check_head(int(h)) for h in heads]
    return [Restoration("z", layer, ALL, head) for layer in _layers(vqa, layers) for head in heads]


def mlp_restorations(vqa, layers=None) -> list[Restoration]:
    """Each MLP block's output at every position."""
    return [Restoration("mlp_out", layer) for layer in _layers(vqa, layers)]


# -------------------------------------------------------------------------------------- running
def _resolve_metric(metric: str, pair: PatchPair) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    if metric == "auto":
        return "logit_diff" if pair.corrupt_token_ids is not None else "logprob"
    if metric == "logit_diff" and pair.corrupt_token_ids is None:
        raise ValueError("metric 'logit_diff' needs the corrupted answer's tokens (PatchPair.corrupt_token_ids); "
                         "this pair has none (a blurred / noised image has no answer of its own): use 'logprob'")
    return metric


def _resolve_targets(pair: PatchPair, targets, clean_lp: torch.Tensor, corrupt_lp: torch.Tensor) -> list[int]:
    """Answer-token indices to score. Default: the tokens where the two answers differ, else the one
    whose log-probability the corruption lowers most. ``*_lp``: ``[n_answer]`` clean-answer log-probs."""
    n = pair.clean.answer_positions.numel()
    if targets is not None:
        indices = [int(t) for t in ([targets] if isinstance(targets, int) else targets)]
        for i in indices:
            if not -n <= i < n:
                raise IndexError(f"answer token {i} is out of range: the answer has {n} tokens")
        if not indices:
            raise ValueError("no targets given: pass answer-token indices or None")
        return [i % n for i in indices]
    if pair.corrupt_token_ids is not None:
        clean_ids = pair.clean.input_ids[0, pair.clean.answer_positions]
        differ = (clean_ids != pair.corrupt_token_ids).nonzero().flatten().tolist()
        if differ:
            return differ
    return [int((clean_lp - corrupt_lp).argmax())]


def _score(logprobs: torch.Tensor, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor | None) -> torch.Tensor:
    """``[B, T, V]`` fp32 log-probs -> ``[B]`` score (a log-prob difference equals the logit difference)."""
    index = clean_ids.to(logprobs.device).view(1, -1, 1).expand(logprobs.shape[0], -1, 1)
    score = logprobs.gather(-1, index)[..., 0]
    if corrupt_ids is not None:
        other = corrupt_ids.to(logprobs.device).view(1, -1, 1).expand(logprobs.shape[0], -1, 1)
        score = score - logprobs.gather(-1, other)[..., 0]
    return score.sum(-1).float().cpu()


def _clean_values(vqa, pair: PatchPair, restorations: Sequence[Restoration]) -> tuple[dict, torch.Tensor]:
    """``({(site, layer): [S, ...] clean activation}, clean logits [S, V] fp32)`` in one clean forward."""
    wanted: dict[str, set] = defaultdict(set)
    for r in restorations:
        wanted[r.site].add(r.layer)
    names = sorted(wanted)
    with torch.no_grad(), vqa.trace(names, layers={n: sorted(wanted[n]) for n in names}) as cache:
        logits = vqa.forward(pair.clean).logits[0].float()
    return {(n, layer): cache[n, layer][0] for n in names for layer in wanted[n]}, logits


def _intervention(r: Restoration, row: int, values: dict) -> Intervention:
    clean = values[(r.site, r.layer)]  # [S, d] or [S, n_heads, head_dim] for z
    positions = None if r.position == ALL else list(r.group) if r.group else [r.position]
    picked = clean if positions is None else clean[positions]
    if r.site == "z":
        return Intervention("z", r.layer, heads=r.head, positions=positions, mode="replace",
                            value=picked[:, r.head:r.head + 1], rows=(row,))
    return Intervention(r.site, r.layer, positions=positions, mode="replace", value=picked, rows=(row,))


def _runs(checkpoint, restorations: Sequence[Restoration], values: dict, positions: torch.Tensor, batch_size: int,
          progress: bool = False, where: str = "full"):
    """Yield ``(restoration indices, log-probs [len(indices), P, V] fp32 at positions)`` chunk by chunk.

    ``full``: restorations grouped by layer, each group resumed from its layer on the corrupted residual
    stream. ``answer``: only the answer rows are recomputed, so a chunk mixes layers (sorted by layer): one
    pass reads every weight once for the whole chunk, each row joining it at its own layer.
    """
    if where == "answer":
        order = sorted(range(len(restorations)), key=lambda index: restorations[index].layer)
        chunks = [(restorations[members[0]].layer, members)
                  for members in (order[i:i + batch_size] for i in range(0, len(order), batch_size))]
        def run(layer, batch, positions, edits, members):  # rows join the batch at their own layer
            return checkpoint.run_rows(layer, batch, positions, edits,
                                       joins=[restorations[index].layer for index in members])
    else:
        groups: dict[int, list[int]] = defaultdict(list)
        for index, r in enumerate(restorations):
            groups[r.layer].append(index)
        chunks = [(layer, members[i:i + batch_size]) for layer, members in sorted(groups.items())
                  for i in range(0, len(members), batch_size)]
        def run(layer, batch, positions, edits, members):
            return checkpoint.run_from(layer, batch, positions, edits)
    for layer, members in tqdm(chunks, desc="restorations", disable=not progress):
        edits = [_intervention(restorations[index], row, values) for row, index in enumerate(members)]
        yield members, run(layer, len(members), positions, edits, members).float().cpu()


def _restoration_name(r: Restoration) -> str:
    where = r.label if r.group else "all" if r.position == ALL else str(r.position)
    return f"L{r.layer}{f'H{r.head}' if r.head != ALL else ''}.{r.site}@{where}"


def _check_answer_rows(restorations: Sequence[Restoration], positions: torch.Tensor) -> None:
    """One error naming the restorations that reach before the answer rows (``where="answer"``)."""
    first, last = int(positions.min()), int(positions.max())
    outside = [r for r in restorations
               if any(not first <= p <= last for p in (r.group or ([] if r.position == ALL else [r.position])))]
    if outside:
        names = ", ".join(_restoration_name(r) for r in outside[:5]) + (" ..." if len(outside) > 5 else "")
        raise ValueError(
            f"{len(outside)} restoration(s) touch positions outside the answer rows {first}..{last} ({names}); "
            "where='answer' keeps every earlier position's corrupted keys and values, so it can restore only those "
            "rows: use where='full' for them, or restore whole heads / MLPs / layers (position -1), which "
            "where='answer' restores at the answer rows")


def _corrupt_runner(vqa, pair: PatchPair, where: str, rows: torch.Tensor):
    if where not in WHERE:
        raise ValueError(f"unknown where={where!r}; choose one of {WHERE}")
    if where == "answer":  # the corrupted run's keys and values, computed once; its logits at `rows` only
        return answer_rows_for(vqa, pair.corrupt, rows)  # whole forwards on backends other than hooks
    return checkpoint_for(vqa, pair.corrupt)  # whole forwards on backends other than hooks


def _check_restorations(vqa, pair: PatchPair, restorations) -> list[Restoration]:
    if not isinstance(pair, PatchPair):
        raise TypeError(f"expected a PatchPair (counterfactual_pair / baseline_pair), got {type(pair).__name__}")
    restorations = list(restorations)
    if not restorations:
        raise ValueError("no restorations given; build them with residual_restorations / head_restorations / "
                         "mlp_restorations / image_restorations")
    for r in restorations:
        if not isinstance(r, Restoration):
            raise TypeError(f"restorations must be Restoration objects, got {type(r).__name__}")
        vqa.adapter.check_layer(r.layer)
        if r.head != ALL:
            vqa.adapter.check_head(r.head)
        for position in r.group or ([] if r.position == ALL else [r.position]):
            pair.clean.check_position(position)
    return restorations


def patched_log_probs(vqa, pair: PatchPair, restorations: Sequence[Restoration], positions=None, *,
                      batch_size: int = 16, where: str = "full") -> dict:
    """Full log-probabilities (fp32) at ``positions`` (default: the answer tokens' predicting positions):
    ``{"clean": [P, V], "corrupt": [P, V], "patched": [n, P, V]}``, one row per restoration. ``where``: as
    for :func:`restore` (``answer``: the rows from the first to the last of ``positions`` are recomputed)."""
    restorations = _check_restorations(vqa, pair, restorations)
    if positions is None:
        positions = pair.clean.answer_positions - 1
    positions = torch.as_tensor([pair.clean.check_position(int(p)) for p in torch.as_tensor(positions).flatten()])
    checkpoint = _corrupt_runner(vqa, pair, where, positions)
    if where == "answer":
        _check_answer_rows(restorations, positions)
    values, clean_logits = _clean_values(vqa, pair, restorations)
    patched = torch.zeros(len(restorations), len(positions), clean_logits.shape[-1])
    for members, logprobs in _runs(checkpoint, restorations, values, positions, batch_size, where=where):
        patched[members] = logprobs
    return {"clean": clean_logits[positions.to(clean_logits.device)].log_softmax(-1).cpu(),
            "corrupt": checkpoint.clean_logits_at(positions).float().log_softmax(-1).cpu(),
            "patched": patched}


def restore(vqa, pair: PatchPair, restorations: Sequence[Restoration], *, targets=None, metric: str = "auto",
            batch_size: int = 16, min_gap: float = MIN_GAP, progress: bool = False,
            where: str = "full") -> PatchingResult:
    """Run every restoration on the corrupted input and score how much of the clean answer returns.

    Args:
        pair: a :class:`PatchPair` (:func:`counterfactual_pair`, :func:`baseline_pair`).
        restorations: from the builders (or :class:`Restoration` s); each gets its own batch row.
        targets: answer-token indices to score (default: where the clean and corrupted answers differ,
            else the token the corruption hurts most).
        metric: ``auto`` / ``logit_diff`` / ``logprob`` (module docstring).
        batch_size: restorations per forward.
        min_gap: fractions are NaN when ``|s(x) - s(x')|`` is below it (``info["flag"]`` says so).
        where: ``full`` (default) restores every position a restoration names in a full-sequence run;
            ``answer`` restores and recomputes only the answer rows (the scored targets' predicting rows,
            first to last) on the corrupted run's cached prefix: heads, MLPs and whole-layer residuals are
            restored at those rows only, and a restoration of an earlier position is an error (module
            docstring: the difference in meaning). Other backends than hooks run it as whole forwards
            with the same numbers (:class:`~mech_vqa.runner.FullForwardAnswerRows`).

    Returns a :class:`~mech_vqa.results.patching.PatchingResult`.
    """
    restorations = _check_restorations(vqa, pair, restorations)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    metric = _resolve_metric(metric, pair)
    start = time.perf_counter()
    answers = pair.clean.answer_positions
    answer_ids = pair.clean.input_ids[0, answers]
    predicting = answers - 1
    checkpoint = _corrupt_runner(vqa, pair, where, predicting)
    values, clean_logits = _clean_values(vqa, pair, restorations)

    clean_all = clean_logits[predicting.to(clean_logits.device)].log_softmax(-1).cpu()
    # (the checkpoint's unedited run: here the corrupted one)
    corrupt_all = checkpoint.clean_logits_at(predicting).float().log_softmax(-1).cpu()
    chosen = _resolve_targets(pair, targets, clean_all.gather(-1, answer_ids[:, None])[:, 0],
                              corrupt_all.gather(-1, answer_ids[:, None])[:, 0])
    clean_ids = answer_ids[chosen]
    corrupt_ids = pair.corrupt_token_ids[chosen] if metric == "logit_diff" else None
    if corrupt_ids is not None and bool((corrupt_ids == clean_ids).any()):
        raise ValueError("a chosen target has the same token in both answers: its logit difference is 0 by definition; "
                         "choose targets where the answers differ or use metric='logprob'")
    positions = predicting[chosen]
    if where == "answer":
        _check_answer_rows(restorations, positions)
    clean_score = float(_score(clean_all[chosen][None], clean_ids, corrupt_ids)[0])
    corrupt_score = float(_score(corrupt_all[chosen][None], clean_ids, corrupt_ids)[0])

    patched = torch.zeros(len(restorations))
    for members, logprobs in _runs(checkpoint, restorations, values, positions, batch_size, progress, where):
        patched[members] = _score(logprobs, clean_ids, corrupt_ids)
    gap = clean_score - corrupt_score
    flag = None
    if abs(gap) < min_gap:
        fraction = torch.full_like(patched, float("nan"))
        flag = (f"the corruption changes the score by {gap:.3g} ({metric}), below min_gap={min_gap}: nothing to "
                "restore, fractions undefined (raw patched scores kept)")
    else:
        fraction = (patched - corrupt_score) / gap
    clean = pair.clean
    geometry = clean.geometry
    targets_out = []
    for k, i in enumerate(chosen):
        target = clean.target(i).to_dict()
        if corrupt_ids is not None:
            target["corrupt_token_id"] = int(corrupt_ids[k])
            target["corrupt_token"] = vqa.to_str_tokens([int(corrupt_ids[k])])[0]
        targets_out.append(target)
    return PatchingResult(
        patched=patched, fraction=fraction, sites=[r.site for r in restorations],
        layers=[r.layer for r in restorations],
        positions=[r.position for r in restorations], heads=[r.head for r in restorations],
        labels=[r.label for r in restorations],
        clean_score=clean_score, corrupt_score=corrupt_score, targets=targets_out,
        image_positions=geometry.positions.cpu(), image_rowcol=geometry.rowcol.cpu(), image_view=geometry.view.cpu(),
        grid=list(geometry.grid), image_size=list(geometry.image_size), image=torch.from_numpy(clean.display_image()),
        box=list(pair.box) if pair.box is not None else None,
        info={"model": vqa.name, "metric": metric, "pair": pair.kind,
              "pair_info": {k: v for k, v in pair.info.items() if k != "corrupt_image"},
              "question": clean.question, "answer": clean.answer, "prompt": clean.prompt,
              "str_tokens": list(clean.str_tokens), "n_layers": vqa.adapter.n_layers, "n_heads": vqa.adapter.n_heads,
              "batch_size": batch_size, "where": where, "min_gap": min_gap, "flag": flag,
              "backend": getattr(vqa.backend, "name", ""), "runtime_s": time.perf_counter() - start},
    )


def activation_patching(vqa, pair: PatchPair, *, layers=None, positions=None, heads: bool = True, mlp: bool = True,
                        groups: bool | dict = False, image_layer: int | None = None, **kwargs) -> PatchingResult:
    """Residual (layer x position, plus whole layers), every head and every MLP output, with ``groups``
    the residual at groups of positions (True: :func:`pair_groups`), and with ``image_layer`` the image
    positions at that layer, in one :func:`restore` (``kwargs`` go there). ``positions=()`` skips the
    single-position residual grid (costly on large models: layers x positions restorations).

    With ``where="answer"`` (see :func:`restore`) the default grid is the whole-layer residual at the answer
    rows only (``positions`` defaults to ``()``), and groups or image positions before the answer rows are
    an error."""
    if kwargs.get("where") == "answer" and positions is None:
        positions = ()
    restorations = residual_restorations(vqa, pair, layers, positions)
    if groups:
        restorations += group_restorations(vqa, pair_groups(pair) if groups is True else groups, layers)
    if heads:
        restorations += head_restorations(vqa, layers)
    if mlp:
        restorations += mlp_restorations(vqa, layers)
    if image_layer is not None:
        have = {(r.layer, r.position) for r in restorations if r.site == "resid_pre"}
        restorations += [r for r in image_restorations(vqa, pair, image_layer) if (r.layer, r.position) not in have]
    return restore(vqa, pair, restorations, **kwargs)
