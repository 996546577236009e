"""``PatchMap``: the one result type every patch-importance method returns.

Mechanistic position-level increase, logit-lens word maps, raw attention, relevancy and iGOS++ all
produce a ``[rows, cols]`` map over the image; sharing the type lets the comparison, the
insertion/deletion metric and the localisation scores take any of them unchanged.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .base import Result, tensor_topk

#: why a constant map gets no pointing score
UNINFORMATIVE = "constant map: no cell scores above another, so it points nowhere (uninformative)"


@dataclasses.dataclass
class PatchMap(Result):
    """Importance of each image cell for some target tokens.

    Attributes:
        scores: ``[rows, cols]`` float32 importance (higher = more important; may be signed).
        method: name of the method that made it.
        image_size: ``[height, width]`` of the preprocessed image the model saw.
        image: ``[height, width, 3]`` that image de-normalised to [0, 1] (for plots), or None.
        targets: the explained tokens, ``[{"token_id", "position", "token"}]``.
        box: a ground-truth box ``[x0, y0, x1, y1]`` in the preprocessed image's pixels, or None.
        info: metadata (model, prompt, method parameters, runtime...).
    """

    scores: torch.Tensor
    method: str = ""
    image_size: list = dataclasses.field(default_factory=list)
    image: torch.Tensor | None = None
    targets: list = dataclasses.field(default_factory=list)
    box: list | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.scores.dim() != 2:
            raise ValueError(f"PatchMap scores must be [rows, cols], got shape {tuple(self.scores.shape)}")
        scores = self.scores  # (no detach / cast / move where there is nothing to do: each is an op on every map)
        scores = scores.detach() if scores.requires_grad else scores
        scores = scores if scores.dtype == torch.float32 else scores.float()
        self.scores = scores if scores.is_cpu else scores.cpu()
        if not self.image_size:
            self.image_size = list(self.image.shape[:2]) if self.image is not None else list(self.scores.shape)
        self.image_size = [int(s) for s in self.image_size]

    # ---------------------------------------------------------------------- geometry
    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.scores.shape)

    def cell_boxes(self) -> torch.Tensor:
        """``[rows, cols, 4]`` pixel box ``(x0, y0, x1, y1)`` of every cell."""
        rows, cols = self.grid
        height, width = self.image_size
        r = torch.arange(rows, dtype=torch.float32).view(rows, 1).expand(rows, cols)
        c = torch.arange(cols, dtype=torch.float32).view(1, cols).expand(rows, cols)
        ch, cw = height / rows, width / cols
        return torch.stack([c * cw, r * ch, (c + 1) * cw, (r + 1) * ch], dim=-1)

    def resample(self, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        """The map resampled to ``size`` ``(h, w)`` (e.g. pixels or another method's grid)."""
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        if mode == "area" or (mode == "bilinear" and (size[0] < self.grid[0] or size[1] < self.grid[1])):
            mode, kwargs = "area", {}
        return F.interpolate(self.scores[None, None], size=tuple(size), mode=mode, **kwargs)[0, 0]

    def inside_box(self, box=None) -> torch.Tensor:
        """``[rows, cols]`` bool: cells whose centre lies in ``box`` (default: the stored box)."""
        box = self._box(box)
        cells = self.cell_boxes()
        cx, cy = (cells[..., 0] + cells[..., 2]) / 2, (cells[..., 1] + cells[..., 3]) / 2
        return (cx >= box[0]) & (cx < box[2]) & (cy >= box[1]) & (cy < box[3])

    def _box(self, box):
        box = self.box if box is None else box
        if box is None:
            raise ValueError("no box given and none stored with the map")
        return [float(v) for v in box]

    # ---------------------------------------------------------------- localisation
    @property
    def uninformative(self) -> str | None:
        """Why the map cannot point anywhere (a constant map: no cell beats another), else None."""
        if float(self.scores.max()) == float(self.scores.min()):
            return UNINFORMATIVE
        return None

    def peak_cells(self) -> torch.Tensor:
        """``[rows, cols]`` bool: the cells that share the map's maximum (exact ties, e.g. a clipped mask)."""
        return self.scores == self.scores.max()

    def pointing(self, box=None) -> dict:
        """The pointing game with its evidence: ``{"pointing_game", "peaks", "peaks_in_box", "reason"}``.

        ``pointing_game`` is the expected hit when one of the tied maxima is drawn uniformly at
        random: ``peaks_in_box / peaks`` (1 or 0 when the peak is unique). A constant map has no
        peak: ``pointing_game`` is None and ``reason`` says so; it is neither a hit nor a miss.
        """
        inside = self.inside_box(box)
        reason = self.uninformative
        if reason is not None:
            return {"pointing_game": None, "peaks": int(self.scores.numel()), "peaks_in_box": None, "reason": reason}
        peaks = self.peak_cells()
        n_peaks, n_inside = int(peaks.sum()), int((peaks & inside).sum())
        return {"pointing_game": n_inside / n_peaks, "peaks": n_peaks, "peaks_in_box": n_inside, "reason": None}

    def pointing_game(self, box=None) -> float | None:
        """Expected hit over tied maxima: the share of the peak cells whose centre lies inside the box.

        A unique peak scores 1.0 (inside) or 0.0; ``k`` tied maxima of which ``j`` lie inside score
        ``j / k`` (the argmax's first index would favour the top-left cell). A constant map has no
        peak and returns None (:attr:`uninformative` gives the reason): tables count such maps
        apart instead of scoring them as misses.
        """
        return self.pointing(box)["pointing_game"]

    def in_box_share(self, box=None) -> float:
        """Share of the positive importance that falls in cells inside the box (0 when none is positive)."""
        positive = self.scores.clamp(min=0)
        total = float(positive.sum())
        return float(positive[self.inside_box(box)].sum()) / total if total > 0 else 0.0

    # ------------------------------------------------------------------------ verbs
    def topk(self, k: int = 10):
        """The ``k`` most important cells as a DataFrame (row, col, score, pixel box)."""
        scores, index = tensor_topk(self.scores, k)
        frame = self.to_dataframe().set_index(["row", "col"])
        picked = frame.loc[[tuple(map(int, rc)) for rc in index]].reset_index()
        return picked.assign(rank=range(1, len(picked) + 1))

    def to_dataframe(self):
        import pandas as pd

        rows, cols = self.grid
        boxes = self.cell_boxes().reshape(-1, 4)
        inside = self.inside_box().flatten().tolist() if self.box is not None else [None] * (rows * cols)
        return pd.DataFrame({
            "method": self.method,
            "row": torch.arange(rows).repeat_interleave(cols).tolist(),
            "col": torch.arange(cols).repeat(rows).tolist(),
            "score": self.scores.flatten().tolist(),
            "x0": boxes[:, 0].tolist(), "y0": boxes[:, 1].tolist(),
            "x1": boxes[:, 2].tolist(), "y1": boxes[:, 3].tolist(),
            "in_box": inside,
        })

    def plot(self, ax=None, *, box=None, title: str | None = None, label: str | None = None, colorbar: bool = True,
             with_image: bool = True, signed: bool | None = None, cmap: str | None = None,
             vmax: float | None = None):
        """The map over the image the model saw, opacity following importance; returns ``(fig, ax)``.

        With ``ax=None`` (and ``with_image``) a two-panel figure: the image as it is (with the box)
        and the map, the question and answer above both; ``ax`` is then the map's axis. Given an
        ``ax``, only the map is drawn there. ``label`` names the method in the title (default: the
        map's ``method``); the colour bar carries ``info["unit"]``. A map with no positive
        importance is drawn as a "no evidence" panel (see :func:`mech_vqa.plotting.overlay_heatmap`).
        """
        from ..plotting import overlay_heatmap, question_answer, show_image, unit_of

        box = box if box is not None else self.box
        title = title if title is not None else self.title(label)
        image_ax = None
        if ax is None and with_image:
            import matplotlib.pyplot as plt

            fig, (image_ax, ax) = plt.subplots(1, 2, figsize=(8.4, 4.1), gridspec_kw={"width_ratios": [1, 1.1]})
        fig, ax = overlay_heatmap(self.scores, self.image, self.image_size, ax=ax, box=box, title=title,
                                  colorbar=colorbar, unit=unit_of(self.info), signed=signed, cmap=cmap,
                                  empty_reason=self.info.get("empty_reason"), vmax=vmax)
        if image_ax is not None:
            show_image(self.image, self.image_size, ax=image_ax, box=box,
                       title="image as the model saw it" + ("\n(box: answer region)" if box is not None else ""))
            text = question_answer(self.info)
            if text:
                fig.suptitle(text, fontsize=9)
        return fig, ax

    def title(self, label: str | None = None) -> str:
        """``method: token 'x'`` and, on a second line, the heads / layers the map was read from."""
        from ..plotting import components_label, method_label, tokens_label

        name = label or method_label(self.method)
        first = f"{name}: token {tokens_label(self.targets)}" if self.targets else name
        components = components_label(self.method, self.info)
        return first + (f"\n{components}" if components else "")

    def __repr__(self) -> str:
        return (f"PatchMap(method={self.method!r}, grid={self.grid}, image_size={self.image_size}, "
                f"targets={[t.get('token') for t in self.targets]}, peak={float(self.scores.max()):.4g})")
