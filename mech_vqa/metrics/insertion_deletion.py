"""Deletion and insertion curves for any patch-importance map.

Petsiuk et al. 2018 (RISE, arXiv 1806.07421) introduced the two curves; Xing et al. 2025
("Where do Large Vision-Language Models Look at when Answering Questions?", arXiv 2503.13891)
use them for open-ended answers, scoring the mean probability of the visually relevant tokens
``S``. For a map ``M`` ``[h, w]`` (any resolution: a :class:`~mech_vqa.results.PatchMap` or a
tensor), image pixels ``I`` and baseline pixels ``B`` (both ``[1, *pixel_shape]``)::

    order_o    = cells of M from most to least important, tied cells in a random order drawn from
                 ``seed`` (o = 1..n_orders; n_orders = 1 when M has no tied cells)
    c          = max(1, round(step_fraction * h * w)) cells per step,  n_k = min(k c, h w), k = 0..K
    R_ok       = [h, w] indicator of the first n_k cells of order_o, nearest-upsampled to the pixel
                 grid [H, W] (for a tiled image, onto every view over the box it shows: ImageGeometry.view_boxes)
    deletion   X_ok = I * (1 - R_ok) + B * R_ok       (remove the most important cells first)
    insertion  X_ok = B * (1 - R_ok) + I * R_ok       (reveal them first)
    s(X)       = mean_{t in S} p(y_t | X)             (teacher-forced, float32)
    raw_k      = mean_o s(X_ok)                       (the raw curve; raw AUC = mean_k raw_k)
    curve_k    = (raw_k - s(B)) / (s(I) - s(B))       (1 = as on the image, 0 = as on the baseline)
    AUC        = mean_k curve_k

*Ties.* Cells with equal scores carry no order, so none is imposed: the curve is the average over
``n_orders`` (default 4) random orders of the tied cells (ties broken independently per order;
seeded, so a run is reproducible). A constant map thus scores as a random ordering of its cells,
not as a raster scan that favours the top rows. Orders agree wherever a step does not cut through a
tie group, and each distinct composite is computed once, so a map without ties costs nothing extra
and a map with few ties little.

*Normalisation.* The normalised curve divides by ``s(I) - s(B)``; when the baseline nearly keeps
the answer that gap is noise and the curve leaves any sensible range. An item is therefore
*flagged* (``InsertionDeletion.flag`` says why) when ``log s(I) - log s(B) < min_gap`` nats
(default 1 nat, the token selection's ``tau``): its normalised AUCs are still computed but must be
left out of normalised means (the comparison and the dataset summary do so); the raw curves and
AUCs are always kept. For a kept item ``s(B) <= e^-min_gap s(I)`` and ``0 <= s <= 1`` give every
normalised point, hence both AUCs, the range::

    -1 / (e^min_gap - 1)  <=  curve_k  <=  (1 - s(B)) / (s(I) - s(B))

(-0.582 .. 1 / ((1 - e^-1) s(I)) at 1 nat; stored as ``info["normalised_range"]``). Points outside
[0, 1] are real effects (removing cells that the answer needs less than the blur does), not
clipped. When ``S`` is chosen by the gap rule with ``tau >= min_gap`` every token, hence the mean,
loses at least ``tau`` nats, so only fallback, single-token and hand-picked selections are flagged.

A faithful map has a *low* deletion AUC and a *high* insertion AUC. Every point is computed by a
forward pass (``s(I)`` is the deletion curve's first point, ``s(B)`` the insertion curve's; the
last points, everything removed / revealed, are computed, not assumed), several curve points per
forward (``chunk_size`` rows, the tie orders' points batched together), no gradient.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..adapters.base import mask_to_pixels
from ..hooks import preserved_state
from ..inputs import check_pixels
from ..results.base import Result

#: nats of ``log s(I) - log s(B)`` below which normalised curves are flagged (the selection's tau)
MIN_GAP = 1.0


@dataclasses.dataclass
class InsertionDeletion(Result):
    """Deletion and insertion curves of one map.

    Attributes:
        fractions: ``[K + 1]`` share of the cells removed / revealed at each point (0 .. 1).
        deletion: ``[K + 1]`` normalised deletion curve (starts at 1, ends at 0).
        insertion: ``[K + 1]`` normalised insertion curve (starts at 0, ends at 1).
        deletion_raw: ``[K + 1]`` mean probability of the tokens in ``S`` along deletion.
        insertion_raw: ``[K + 1]`` same along insertion.
        score_image: ``s(I)``; score_baseline: ``s(B)``.
        deletion_auc: mean of ``deletion`` (lower is better); insertion_auc: mean of ``insertion``.
        deletion_auc_raw / insertion_auc_raw: means of the raw curves (always comparable).
        log_gap: ``log s(I) - log s(B)`` in nats.
        flag: why the normalised curves must not be averaged (gap below ``min_gap``), else None.
        n_orders: random orders of tied cells averaged (1 when the map has no ties).
        map_shape: ``[h, w]`` of the scored map; method: its method name; tokens: the tokens in ``S``.
        info: metadata (step size, message when the curve cannot be normalised...).
    """

    fractions: torch.Tensor
    deletion: torch.Tensor
    insertion: torch.Tensor
    deletion_raw: torch.Tensor
    insertion_raw: torch.Tensor
    score_image: float = math.nan
    score_baseline: float = math.nan
    deletion_auc: float = math.nan
    insertion_auc: float = math.nan
    deletion_auc_raw: float = math.nan
    insertion_auc_raw: float = math.nan
    log_gap: float = math.nan
    flag: str | None = None
    n_orders: int = 1
    map_shape: list = dataclasses.field(default_factory=list)
    method: str = ""
    tokens: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def kept(self) -> bool:
        """True when the normalised AUCs may enter a normalised mean (see :attr:`flag`)."""
        return self.flag is None

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"method": self.method, "fraction": self.fractions.tolist(),
                             "deletion": self.deletion.tolist(), "insertion": self.insertion.tolist(),
                             "deletion_raw": self.deletion_raw.tolist(), "insertion_raw": self.insertion_raw.tolist()})

    def topk(self, k: int = 10):
        """The ``k`` deletion steps that lowered the (normalised) score most."""
        frame = self.to_dataframe()
        frame["deletion_drop"] = -frame["deletion"].diff()
        return frame.iloc[1:].nlargest(k, "deletion_drop")

    def plot(self, ax=None, **kwargs):
        """Both curves against the share of cells removed / revealed; returns ``(fig, ax)``."""
        from ..plotting import new_axes

        fig, ax = new_axes(ax, figsize=(4.5, 3.2))
        x = self.fractions.numpy()
        ax.plot(x, self.deletion.numpy(), color="#D55E00",
                label=f"deletion (AUC {self.deletion_auc:.3f}, lower is better)")
        ax.fill_between(x, self.deletion.numpy(), color="#D55E00", alpha=0.15)
        ax.plot(x, self.insertion.numpy(), color="#0072B2", linestyle="--",
                label=f"insertion (AUC {self.insertion_auc:.3f}, higher is better)")
        ax.set_xlabel("share of cells removed (deletion) / revealed (insertion)")
        ax.set_ylabel("normalised answer probability\n(0 = baseline, 1 = image)", fontsize=8)
        title = kwargs.get("title", self.method or "insertion / deletion")
        if self.flag:  # the normalisation divides by a negligible gap: say so on the figure
            title += f"\nflagged: log s(I) - log s(B) = {self.log_gap:.2f} nats, use the raw AUCs"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        return fig, ax

    def __repr__(self) -> str:
        return (f"InsertionDeletion(method={self.method!r}, map={self.map_shape}, points={self.fractions.numel()}, "
                f"deletion_auc={self.deletion_auc:.4f}, insertion_auc={self.insertion_auc:.4f}, "
                f"raw {self.deletion_auc_raw:.4f} / {self.insertion_auc_raw:.4f}, orders={self.n_orders}"
                + (", flagged" if self.flag else "") + ")")


def as_map(saliency) -> torch.Tensor:
    """The ``[h, w]`` float32 scores of a PatchMap / tensor, or a clear error."""
    scores = getattr(saliency, "scores", saliency)
    if not torch.is_tensor(scores):
        raise TypeError(f"the map must be a PatchMap or a [h, w] tensor, got {type(saliency).__name__}")
    if scores.dim() != 2 or scores.numel() == 0:
        raise ValueError(f"the map must be a non-empty [h, w] tensor, got shape {tuple(scores.shape)}")
    scores = scores.detach().float().cpu()
    if not torch.isfinite(scores).all():
        raise ValueError("the map has NaN or infinite scores; fix the method or nan_to_num the map first")
    return scores


def check_map_shape(scores: torch.Tensor, geometry) -> None:
    """A map ``[h, w]`` the curves can lay over the image the model saw, or one clear error.

    The map is stretched over the preprocessed image (``geometry.image_size``, ``H x W``). Accepted:
    the model's patch grid; a pixel-size map ``H x W``; or any other ``h x w`` whose cells have the
    patches' shape (``w == round(h * W / H)``: square cells on a square image, such as an iGOS mask
    of 32 x 32) and cover at least one pixel (``h <= H``, ``w <= W``). A map of other proportions was
    made for another image or model: its cells would cut across patches.
    """
    h, w = (int(v) for v in scores.shape)
    grid = tuple(int(v) for v in geometry.grid)
    height, width = (int(v) for v in geometry.image_size)
    if (h, w) in (grid, (height, width)):
        return
    if h > height or w > width:
        raise ValueError(f"the map is {h} x {w} cells but the image the model saw is {height} x {width} pixels: "
                         f"cells smaller than a pixel; resample it to the {grid[0]} x {grid[1]} patch grid "
                         "(PatchMap.resample) or use a coarser map")
    if w != round(h * width / height):
        raise ValueError(f"the map is {h} x {w} cells but the model's patch grid is {grid[0]} x {grid[1]} "
                         f"(image {height} x {width} pixels): its cells are not the patches' shape, so it was "
                         "made for another image or model; give a map on the patch grid, a pixel-size map, or "
                         "one of the image's proportions")



def has_ties(scores: torch.Tensor) -> bool:
    """True when at least two cells of the map share a score."""
    flat = scores.flatten()
    return int(torch.unique(flat).numel()) < flat.numel()


def cell_order(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[h * w]`` flat cell indices from most to least important.

    Ties come in raster order without ``generator``, in a uniformly random order drawn from it with
    one (a random permutation first, then a stable sort: equal scores keep the permuted order).
    """
    flat = scores.flatten()
    if generator is None:
        return torch.sort(flat, descending=True, stable=True).indices
    shuffle = torch.randperm(flat.numel(), generator=generator)
    return shuffle[torch.sort(flat[shuffle], descending=True, stable=True).indices]


def tie_orders(scores: torch.Tensor, n_orders: int = 4, seed: int = 0) -> torch.Tensor:
    """``[n, h * w]`` cell orders the curves average: ``n_orders`` random tie-breaks from ``seed``, or
    the one order of a map without ties (``n = 1``)."""
    if not isinstance(n_orders, int) or n_orders < 1:
        raise ValueError(f"n_orders must be an integer >= 1, got {n_orders!r}")
    if not has_ties(scores):
        return cell_order(scores).view(1, -1)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.stack([cell_order(scores, generator) for _ in range(n_orders)])


def chosen_cells(orders: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[n_orders, K + 1, h * w]`` bool: the first ``counts[k]`` cells of each order."""
    n_orders, n_cells = orders.shape
    rank = torch.empty_like(orders)
    rank.scatter_(1, orders, torch.arange(n_cells).expand(n_orders, -1).contiguous())
    return rank.view(n_orders, 1, n_cells) < counts.view(1, -1, 1)


def step_counts(n_cells: int, step_fraction: float) -> torch.Tensor:
    """``[K + 1]`` number of cells removed at each curve point: 0, c, 2c, ..., n_cells."""
    if not 0 < step_fraction <= 1:
        raise ValueError(f"step_fraction must be in (0, 1], got {step_fraction}")
    per_step = max(1, round(step_fraction * n_cells))
    counts = torch.arange(0, n_cells + per_step, per_step).clamp(max=n_cells)
    return torch.unique_consecutive(counts)


def reveal_masks(scores: torch.Tensor, counts: torch.Tensor, pixel_shape, geometry=None,
                 order: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel masks ``[K + 1, ...]`` of the first ``counts[k]`` cells of ``order`` (default the map's
    order with ties in raster order; 1 = chosen), nearest-upsampled onto one row of pixel values of
    shape ``pixel_shape`` (every view of a tiled image through ``geometry``), shaped to broadcast
    against ``[K + 1, *pixel_shape]``."""
    h, w = scores.shape
    order = cell_order(scores) if order is None else order
    chosen = chosen_cells(order.view(1, -1), counts)[0].float().view(-1, h, w)
    return _to_pixels(chosen, pixel_shape, geometry)


def _to_pixels(chosen: torch.Tensor, pixel_shape, geometry) -> torch.Tensor:
    to_pixels = geometry.mask_to_pixels if geometry is not None else mask_to_pixels
    return to_pixels(chosen, pixel_shape, "nearest")


def insertion_deletion_curves(prob_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                              baseline: torch.Tensor, scores: torch.Tensor, *, step_fraction: float = 0.02,
                              chunk_size: int = 16, progress: bool = True, geometry=None, n_orders: int = 4,
                              seed: int = 0) -> dict:
    """The raw curves for one map with a model-agnostic ``prob_fn: pixels [N, ...] -> s [N]``.

    Tied cells are ordered at random ``n_orders`` times (seeded; once when there are no ties) and
    the curves averaged over the orders; composites shared by several orders are computed once.

    Returns a dict with ``fractions``, ``deletion_raw``, ``insertion_raw`` ``[K + 1]`` (means over
    the orders), ``deletion_orders`` / ``insertion_orders`` ``[n, K + 1]`` (one curve per order),
    ``n_orders`` and the scores of the image (``deletion_raw[0]``: nothing removed) and of the
    baseline (``insertion_raw[0]``: nothing revealed).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scores = as_map(scores)
    h, w = scores.shape
    counts = step_counts(scores.numel(), step_fraction)
    orders = tie_orders(scores, n_orders, seed)
    chosen = chosen_cells(orders, counts)                                     # [n, K+1, h*w]
    n, n_points = chosen.shape[:2]
    # orders agree wherever a step does not cut a tie group: compute each distinct composite once
    distinct, which = torch.unique(chosen.view(n * n_points, -1), dim=0, return_inverse=True)
    image, baseline = image.float(), baseline.float().to(image.device)
    n_distinct = distinct.shape[0]
    total = 2 * n_distinct                     # rows: the deletion composites, then the insertion ones
    chunks = torch.arange(total).tensor_split(math.ceil(total / chunk_size))   # equal-sized forwards
    values = []
    with torch.no_grad():
        for rows in tqdm(chunks, desc="insertion/deletion", disable=not progress, leave=False):
            cells = distinct[rows % n_distinct].float().view(-1, h, w)
            masks = _to_pixels(cells, image.shape[1:], geometry).to(image.device)   # [c, ..., H, W]
            deleting = (rows < n_distinct).to(image.device).view(-1, *[1] * (image.dim() - 1))
            # deletion: image -> baseline on the chosen cells; insertion: baseline -> image
            start, end = torch.where(deleting, image, baseline), torch.where(deleting, baseline, image)
            values.append(prob_fn(start + masks * (end - start)).float().cpu())
    values = torch.cat(values)
    deletion = values[:n_distinct][which].view(n, n_points)
    insertion = values[n_distinct:][which].view(n, n_points)
    return {"fractions": counts.float() / scores.numel(), "score_image": float(deletion[0, 0]),
            "score_baseline": float(insertion[0, 0]), "deletion_raw": deletion.mean(0),
            "insertion_raw": insertion.mean(0), "deletion_orders": deletion, "insertion_orders": insertion,
            "n_orders": n, "forwards": total}


def mean_probability(score_fn: Callable[[torch.Tensor], torch.Tensor], indices: Sequence[int]):
    """``pixels -> mean_{t in indices} p(y_t | pixels)`` from a log-probability function ``[N, T]``."""
    index = torch.as_tensor(list(indices), dtype=torch.long)
    return lambda pixels: score_fn(pixels)[:, index.to(pixels.device)].float().exp().mean(-1)


def insertion_deletion(vqa, inp, saliency, *, tokens=None, baseline="blur", tau: float = 1.0,
                       step_fraction: float = 0.02, chunk_size: int = 16, progress: bool = True,
                       score_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       method: str | None = None, n_orders: int = 4, seed: int = 0,
                       min_gap: float = MIN_GAP) -> InsertionDeletion:
    """Deletion and insertion curves of ``saliency`` for the answer of ``inp``.

    Args:
        vqa: the :class:`~mech_vqa.model.VQAModel`.
        inp: the prepared input (answer teacher-forced).
        saliency: a :class:`~mech_vqa.results.PatchMap` or a ``[h, w]`` tensor, higher = more important.
        tokens: the tokens ``S`` to score: a
            :class:`~mech_vqa.methods.token_selection.TokenSelection`, a list of answer-token
            indices, or None to select the visually relevant tokens against ``baseline``.
        baseline: ``"blur"``, ``"black"``, ``"noise"`` or baseline pixel values.
        tau: the selection threshold when ``tokens`` is None.
        step_fraction: share of the cells removed / revealed per step (0.02 = 2 %).
        chunk_size: curve points per forward.
        score_fn: ``pixels -> log p [N, T_answer]`` over all answer tokens (default: an
            :class:`~mech_vqa.methods.scoring.AnswerScorer`).
        method: name stored in the result (default: the PatchMap's method).
        n_orders: random orders of tied cells averaged (seeded by ``seed``; 1 when there are no ties).
        min_gap: items with ``log s(I) - log s(B)`` below this many nats are flagged (see the
            module docstring): their normalised AUCs must not enter normalised means.

    Returns: an :class:`InsertionDeletion`; with an empty ``S`` its AUCs are NaN and
    ``info["message"]`` says why.
    """
    from ..methods.scoring import AnswerScorer, input_baseline
    from ..methods.token_selection import resolve_selection

    scores = as_map(saliency)
    check_map_shape(scores, inp.geometry)
    check_pixels(inp.pixel_values)  # perturbed pixels never pass through model_inputs' check
    method = method if method is not None else getattr(saliency, "method", "")
    base = input_baseline(vqa, inp, baseline).to(vqa.device)
    info = {"step_fraction": step_fraction, "baseline": baseline if isinstance(baseline, str) else "tensor",
            "seed": seed}
    with preserved_state(vqa.model):
        vqa.model.eval()  # no dropout in the scores; the mode is put back on exit
        selection = resolve_selection(vqa, inp, tokens, base, tau=tau, score_fn=score_fn)
        info["selection_rule"] = selection.rule
        if selection.empty:
            nan = torch.full((1,), math.nan)
            return InsertionDeletion(nan, nan, nan, nan, nan, map_shape=list(scores.shape), method=method,
                                     tokens=[], flag=selection.message, info={**info, "message": selection.message})
        if score_fn is None:  # score only S (the sequence is cut after its last token)
            prob_fn = mean_probability(AnswerScorer(vqa, inp, selection.indices), range(len(selection.indices)))
        else:
            prob_fn = mean_probability(score_fn, selection.indices)
        raw = insertion_deletion_curves(prob_fn, inp.pixel_values.to(vqa.device), base, scores,
                                        step_fraction=step_fraction, chunk_size=chunk_size, progress=progress,
                                        geometry=inp.geometry, n_orders=n_orders, seed=seed)
    token_names = [selection.tokens[i] for i in selection.indices]
    return from_raw(raw, map_shape=list(scores.shape), method=method, tokens=token_names, info=info,
                    min_gap=min_gap)


def normalised_range(score_image: float, score_baseline: float, min_gap: float = MIN_GAP) -> tuple[float, float]:
    """The interval every normalised point of a kept item lies in (see the module docstring).

    ``0 <= s <= 1`` bounds a point by ``[-s(B), 1 - s(B)] / (s(I) - s(B))``; the gap rule
    (``s(B) <= e^-min_gap s(I)``) makes the lower end at least ``-1 / (e^min_gap - 1)``.
    """
    span = score_image - score_baseline
    return -score_baseline / span, (1 - score_baseline) / span


def log_gap(score_image: float, score_baseline: float) -> float:
    """``log s(I) - log s(B)`` in nats (inf when ``s(B) = 0 < s(I)``, NaN when both are 0)."""
    with torch.no_grad():
        return float(torch.tensor(score_image, dtype=torch.float64).log()
                     - torch.tensor(score_baseline, dtype=torch.float64).log())


def from_raw(raw: dict, *, min_gap: float = MIN_GAP, **fields) -> InsertionDeletion:
    """Normalise raw curves into an :class:`InsertionDeletion`, flagging a gap below ``min_gap`` nats.

    A flagged item keeps its raw curves and AUCs, and normalised ones when ``s(I) != s(B)`` (NaN
    otherwise), with ``flag`` saying why they must stay out of normalised means.
    """
    if not min_gap >= 0:
        raise ValueError(f"min_gap must be >= 0 nats, got {min_gap!r}")
    s_image, s_base = raw["score_image"], raw["score_baseline"]
    span = s_image - s_base
    gap = log_gap(s_image, s_base)
    info = {**fields.pop("info", {}), "min_gap": min_gap}
    flag = None
    if abs(span) < 1e-12:
        flag = "the image and the baseline give the same score: the curves cannot be normalised"
        span = math.nan
    elif not gap >= min_gap:
        flag = (f"the baseline keeps the answer: log s(I) - log s(B) = {gap:.3f} nats < min_gap = {min_gap} "
                "(normalised curves divide by noise; use the raw AUCs)")
    else:
        info["normalised_range"] = list(normalised_range(s_image, s_base, min_gap))
    if flag is not None:
        info["message"] = flag
    deletion = (raw["deletion_raw"] - s_base) / span
    insertion = (raw["insertion_raw"] - s_base) / span
    if "deletion_orders" in raw and raw["n_orders"] > 1:  # how much the tie-break moves the AUCs
        info["auc_std_over_orders"] = {
            "deletion": float(((raw["deletion_orders"] - s_base) / span).mean(-1).std()),
            "insertion": float(((raw["insertion_orders"] - s_base) / span).mean(-1).std())}
    return InsertionDeletion(raw["fractions"], deletion, insertion, raw["deletion_raw"], raw["insertion_raw"],
                             score_image=s_image, score_baseline=s_base, deletion_auc=float(deletion.mean()),
                             insertion_auc=float(insertion.mean()),
                             deletion_auc_raw=float(raw["deletion_raw"].mean()),
                             insertion_auc_raw=float(raw["insertion_raw"].mean()), log_gap=gap, flag=flag,
                             n_orders=int(raw.get("n_orders", 1)), info=info, **fields)
