"""``IGOSResult``: the mask iGOS+/iGOS++ optimised, the tokens it explains, and its own curves."""

from __future__ import annotations

import dataclasses
import math

import torch

from .base import Result
from .patch_map import PatchMap


@dataclasses.dataclass
class IGOSResult(Result):
    """Result of :func:`mech_vqa.methods.igos.igos`.

    Attributes:
        saliency: ``[h, w]`` float32 ``1 - mask`` (higher = more important); zeros when ``S`` is empty.
        mask: ``[h, w]`` the optimised mask in [0, 1] (1 = keep the image); the product of the
            deletion and insertion masks for iGOS++.
        mask_deletion / mask_insertion: ``[h, w]`` iGOS++'s two masks (None for iGOS+).
        tokens: one record per answer token (token, id, log-probs on image and baseline, gap,
            content, selected); see :class:`~mech_vqa.methods.token_selection.TokenSelection`.
        targets: the tokens in ``S`` as ``Target.to_dict()`` (predicting position = index - 1).
        fractions / deletion_curve / insertion_curve: ``[K + 1]`` normalised curves of the
            saliency (None when not evaluated or ``S`` is empty).
        deletion_auc / insertion_auc: their means (NaN when not available).
        history: per-iteration objective terms (``deletion``, ``insertion``, ``l1``, ``tv``, ``l2``).
        timings: seconds spent in ``selection``, ``optimisation``, ``metric`` and ``total``.
        image: ``[H, W, 3]`` the preprocessed image in [0, 1] (for plots); image_size ``[H, W]``.
        box: ground-truth box ``[x0, y0, x1, y1]`` in the preprocessed image's pixels, or None.
        params: the configuration used; message: what happened (e.g. why ``S`` is empty).
        info: the input's metadata.
    """

    saliency: torch.Tensor
    mask: torch.Tensor
    mask_deletion: torch.Tensor | None = None
    mask_insertion: torch.Tensor | None = None
    tokens: list = dataclasses.field(default_factory=list)
    targets: list = dataclasses.field(default_factory=list)
    fractions: torch.Tensor | None = None
    deletion_curve: torch.Tensor | None = None
    insertion_curve: torch.Tensor | None = None
    deletion_auc: float = math.nan
    insertion_auc: float = math.nan
    history: dict = dataclasses.field(default_factory=dict)
    timings: dict = dataclasses.field(default_factory=dict)
    image: torch.Tensor | None = None
    image_size: list = dataclasses.field(default_factory=list)
    box: list | None = None
    params: dict = dataclasses.field(default_factory=dict)
    message: str = ""
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """True when no visually relevant token was found (nothing was optimised)."""
        return not self.targets

    @property
    def method(self) -> str:
        return "igos++" if self.params.get("two_masks") else "igos+"

    @property
    def selected_tokens(self) -> list[str]:
        return [t["token"] for t in self.targets]

    def to_patch_map(self) -> PatchMap:
        """The saliency as a :class:`PatchMap` (method ``"igos+"`` or ``"igos++"``, as run) for comparisons
        and localisation."""
        return PatchMap(scores=self.saliency, method=self.method, image_size=list(self.image_size), image=self.image,
                        targets=list(self.targets), box=self.box,
                        info={**self.info, "variant": self.method, "params": self.params,
                              "masks": 2 if self.mask_deletion is not None else 1,
                              "deletion_auc": self.deletion_auc, "insertion_auc": self.insertion_auc,
                              "unit": "saliency (1 - mask)",
                              **({"empty_reason": self.message or "no visually relevant answer token"}
                                 if self.empty else {})})

    def topk(self, k: int = 10):
        """The ``k`` most salient mask cells (row, col, score, pixel box)."""
        return self.to_patch_map().topk(k)

    def to_dataframe(self):
        """One row per mask cell, with the saliency and, for iGOS++, both masks."""
        frame = self.to_patch_map().to_dataframe()
        frame["mask"] = self.mask.flatten().tolist()
        for name in ("mask_deletion", "mask_insertion"):
            value = getattr(self, name)
            if value is not None:
                frame[name] = value.flatten().tolist()
        return frame

    def plot(self, ax=None, **kwargs):
        """Saliency over the image with the box (see :meth:`PatchMap.plot`); returns ``(fig, ax)``."""
        patch_map = self.to_patch_map()
        title = kwargs.pop("title", None)
        if title is None:
            title = patch_map.title(label=self.method) if not self.empty else f"{self.method}: empty S"
            if not math.isnan(self.insertion_auc):
                title += f"\ninsertion AUC {self.insertion_auc:.3f} (higher is better), " \
                         f"deletion {self.deletion_auc:.3f} (lower)"
        return patch_map.plot(ax=ax, title=title, **kwargs)

    def plot_curves(self, ax=None):
        """Deletion and insertion curves of the saliency; returns ``(fig, ax)``."""
        from ..metrics.insertion_deletion import InsertionDeletion

        if self.fractions is None:
            raise ValueError(f"this result has no curves ({self.message or 'run igos with evaluate=True'})")
        curves = InsertionDeletion(self.fractions, self.deletion_curve, self.insertion_curve,
                                   self.deletion_curve, self.insertion_curve, deletion_auc=self.deletion_auc,
                                   insertion_auc=self.insertion_auc, method=self.method)
        return curves.plot(ax=ax)

    def __repr__(self) -> str:
        return (f"IGOSResult({self.method}, mask={tuple(self.mask.shape)}, S={self.selected_tokens}, "
                f"deletion_auc={self.deletion_auc:.4f}, insertion_auc={self.insertion_auc:.4f})")
