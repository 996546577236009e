"""Deletion and insertion curves for any patch-importance map.

Petsiuk et al. 2018 (RISE, arXiv 1806.07421) introduced the two curves; Xing et al. 2025
("Where do Large Vision-Language Models Look at when Answering Questions?", arXiv 2503.13891)
use them for open-ended answers, scoring the mean probability of the visually relevant tokens
``S``. For a map ``M`` ``[h, w]`` (any resolution: a :class:`~mech_vqa.results.PatchMap` or a
tensor), image pixels ``I`` and baseline pixels ``B`` (both ``[1, *pixel_shape]``)::

    order      = cells of M from most to least important (ties: raster order)
    c          = max(1, round(step_fraction * h * w)) cells per step,  n_k = min(k c, h w), k = 0..K
    R_k        = [h, w] indicator of the first n_k cells, nearest-upsampled to the pixel grid [H, W]
                 (for a tiled image, onto every view over the box it shows: ImageGeometry.view_boxes)
    deletion   X_k = I * (1 - R_k) + B * R_k          (remove the most important cells first)
    insertion  X_k = B * (1 - R_k) + I * R_k          (reveal them first)
    s(X)       = mean_{t in S} p(y_t | X)             (teacher-forced, float32)
    curve_k    = (s(X_k) - s(B)) / (s(I) - s(B))       (1 = as on the image, 0 = as on the baseline)
    AUC        = mean_k curve_k

A faithful map has a *low* deletion AUC and a *high* insertion AUC. Every point is computed by a
forward pass (``s(I)`` is the deletion curve's first point, ``s(B)`` the insertion curve's; the
last points, everything removed / revealed, are computed, not assumed), several curve points per
forward (``chunk_size`` rows), no gradient.
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
    map_shape: list = dataclasses.field(default_factory=list)
    method: str = ""
    tokens: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)

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
        ax.set_title(kwargs.get("title", self.method or "insertion / deletion"), fontsize=9)
        ax.legend(fontsize=8)
        return fig, ax

    def __repr__(self) -> str:
        return (f"InsertionDeletion(method={self.method!r}, map={self.map_shape}, points={self.fractions.numel()}, "
                f"deletion_auc={self.deletion_auc:.4f}, insertion_auc={self.insertion_auc:.4f})")


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


def cell_order(scores: torch.Tensor) -> torch.Tensor:
    """``[h * w]`` flat cell indices from most to least important (ties in raster order)."""
    return torch.sort(scores.flatten(), descending=True, stable=True).indices


def step_counts(n_cells: int, step_fraction: float) -> torch.Tensor:
    """``[K + 1]`` number of cells removed at each curve point: 0, c, 2c, ..., n_cells."""
    if not 0 < step_fraction <= 1:
        raise ValueError(f"step_fraction must be in (0, 1], got {step_fraction}")
    per_step = max(1, round(step_fraction * n_cells))
    counts = torch.arange(0, n_cells + per_step, per_step).clamp(max=n_cells)
    return torch.unique_consecutive(counts)


def reveal_masks(scores: torch.Tensor, counts: torch.Tensor, pixel_shape, geometry=None) -> torch.Tensor:
    """Pixel masks ``[K + 1, ...]`` of the first ``counts[k]`` cells of the map's order (1 = chosen),
    nearest-upsampled onto one row of pixel values of shape ``pixel_shape`` (every view of a tiled
    image through ``geometry``), shaped to broadcast against ``[K + 1, *pixel_shape]``."""
    h, w = scores.shape
    rank = torch.empty(h * w, dtype=torch.long)
    rank[cell_order(scores)] = torch.arange(h * w)
    chosen = (rank.view(1, h * w) < counts.view(-1, 1)).float().view(-1, h, w)
    to_pixels = geometry.mask_to_pixels if geometry is not None else mask_to_pixels
    return to_pixels(chosen, pixel_shape, "nearest")


def insertion_deletion_curves(prob_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                              baseline: torch.Tensor, scores: torch.Tensor, *, step_fraction: float = 0.02,
                              chunk_size: int = 16, progress: bool = True, geometry=None) -> dict:
    """The raw curves for one map with a model-agnostic ``prob_fn: pixels [N, ...] -> s [N]``.

    Returns a dict with ``fractions``, ``deletion_raw``, ``insertion_raw`` ``[K + 1]`` and the
    scores of the image (``deletion_raw[0]``: nothing removed) and of the baseline
    (``insertion_raw[0]``: nothing revealed).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scores = as_map(scores)
    counts = step_counts(scores.numel(), step_fraction)
    masks = reveal_masks(scores, counts, image.shape[1:], geometry).to(image.device)   # [K+1, ..., H, W]
    image, baseline = image.float(), baseline.float().to(image.device)
    n_points = masks.shape[0]
    total = 2 * n_points                       # rows: the deletion points, then the insertion points
    chunks = torch.arange(total).tensor_split(math.ceil(total / chunk_size))   # equal-sized forwards
    values = []
    with torch.no_grad():
        for rows in tqdm(chunks, desc="insertion/deletion", disable=not progress, leave=False):
            chosen = masks[rows % n_points]                                     # [c, ..., H, W]
            deleting = (rows < n_points).to(image.device).view(-1, *[1] * (image.dim() - 1))
            # deletion: image -> baseline on the chosen cells; insertion: baseline -> image
            start, end = torch.where(deleting, image, baseline), torch.where(deleting, baseline, image)
            values.append(prob_fn(start + chosen * (end - start)).float().cpu())
    values = torch.cat(values)
    deletion, insertion = values[:n_points], values[n_points:]
    return {"fractions": counts.float() / scores.numel(), "score_image": float(deletion[0]),
            "score_baseline": float(insertion[0]), "deletion_raw": deletion, "insertion_raw": insertion}


def mean_probability(score_fn: Callable[[torch.Tensor], torch.Tensor], indices: Sequence[int]):
    """``pixels -> mean_{t in indices} p(y_t | pixels)`` from a log-probability function ``[N, T]``."""
    index = torch.as_tensor(list(indices), dtype=torch.long)
    return lambda pixels: score_fn(pixels)[:, index.to(pixels.device)].float().exp().mean(-1)


def insertion_deletion(vqa, inp, saliency, *, tokens=None, baseline="blur", tau: float = 1.0,
                       step_fraction: float = 0.02, chunk_size: int = 16, progress: bool = True,
                       score_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       method: str | None = None) -> InsertionDeletion:
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

    Returns: an :class:`InsertionDeletion`; with an empty ``S`` its AUCs are NaN and
    ``info["message"]`` says why.
    """
    from ..methods.scoring import AnswerScorer, input_baseline
    from ..methods.token_selection import TokenSelection, manual_selection, visually_relevant_tokens

    scores = as_map(saliency)
    check_map_shape(scores, inp.geometry)
    check_pixels(inp.pixel_values)  # perturbed pixels never pass through model_inputs' check
    method = method if method is not None else getattr(saliency, "method", "")
    base = input_baseline(vqa, inp, baseline).to(vqa.device)
    info = {"step_fraction": step_fraction, "baseline": baseline if isinstance(baseline, str) else "tensor"}
    with preserved_state(vqa.model):
        vqa.model.eval()  # no dropout in the scores; the mode is put back on exit
        if tokens is None:
            selection = visually_relevant_tokens(vqa, inp, base, tau=tau, score_fn=score_fn)
        elif isinstance(tokens, TokenSelection):
            selection = tokens
        else:
            selection = manual_selection(vqa, inp, tokens)
        info["selection_rule"] = selection.rule
        if selection.empty:
            nan = torch.full((1,), math.nan)
            return InsertionDeletion(nan, nan, nan, nan, nan, map_shape=list(scores.shape), method=method,
                                     tokens=[], info={**info, "message": selection.message})
        if score_fn is None:  # score only S (the sequence is cut after its last token)
            prob_fn = mean_probability(AnswerScorer(vqa, inp, selection.indices), range(len(selection.indices)))
        else:
            prob_fn = mean_probability(score_fn, selection.indices)
        raw = insertion_deletion_curves(prob_fn, inp.pixel_values.to(vqa.device), base, scores,
                                        step_fraction=step_fraction, chunk_size=chunk_size, progress=progress,
                                        geometry=inp.geometry)
    token_names = [selection.tokens[i] for i in selection.indices]
    return from_raw(raw, map_shape=list(scores.shape), method=method, tokens=token_names, info=info)


def from_raw(raw: dict, **fields) -> InsertionDeletion:
    """Normalise raw curves into an :class:`InsertionDeletion` (NaN when ``s(I) == s(B)``)."""
    s_image, s_base = raw["score_image"], raw["score_baseline"]
    span = s_image - s_base
    info = dict(fields.pop("info", {}))
    if abs(span) < 1e-12:
        info["message"] = "the image and the baseline give the same score: the curves cannot be normalised"
        span = math.nan
    deletion = (raw["deletion_raw"] - s_base) / span
    insertion = (raw["insertion_raw"] - s_base) / span
    return InsertionDeletion(raw["fractions"], deletion, insertion, raw["deletion_raw"], raw["insertion_raw"],
                             score_image=s_image, score_baseline=s_base, deletion_auc=float(deletion.mean()),
                             insertion_auc=float(insertion.mean()), info=info, **fields)
