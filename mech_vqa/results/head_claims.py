"""``HeadClaims``: the heads the direct-effect ranking names, and what zeroing each one does."""

from __future__ import annotations

import dataclasses
import math

import torch

from .base import Result


@dataclasses.dataclass
class HeadClaims(Result):
    """Top heads by log-probability increase beside the answer's change when each is zeroed.

    Attributes:
        layers / heads: the chosen heads, ranked by ``increase`` (largest first).
        increase: ``[n]`` head-level log-prob increase ``lp(x_l + h_lj) - lp(x_l)`` (the claim).
        delta: ``[n]`` ``log p(y | head ablated) - log p(y)`` (the test; negative = the answer needs it).
        flipped: ``[n]`` bool, the ablation changes the argmax at the target position.
        clean_logprob: ``log p(y)``.
        spearman: rank correlation of ``increase`` with ``-delta`` over the chosen heads (1 = the
            heads ranked highest are the ones the answer needs most; NaN when either is constant).
        mode: the ablation mode (``zero``, ``mean``, ``resample``).
        target: the explained token (``Target.to_dict()``); model, prompt, info: metadata.
    """

    layers: list
    heads: list
    increase: torch.Tensor
    delta: torch.Tensor
    flipped: torch.Tensor
    clean_logprob: float = math.nan
    spearman: float = math.nan
    mode: str = "zero"
    target: dict = dataclasses.field(default_factory=dict)
    model: str = ""
    prompt: str = ""
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [f"L{layer}H{head}" for layer, head in zip(self.layers, self.heads)]

    def to_dataframe(self):
        import pandas as pd

        needed = (-self.delta).argsort(descending=True, stable=True)
        rank_needed = torch.empty_like(needed)
        rank_needed[needed] = torch.arange(1, len(needed) + 1)
        return pd.DataFrame({"head": self.names, "layer": self.layers, "head_index": self.heads,
                             "rank_increase": list(range(1, len(self.names) + 1)),
                             "increase": self.increase.tolist(), "delta_logprob": self.delta.tolist(),
                             "flipped": self.flipped.tolist(), "rank_needed": rank_needed.tolist()})

    def topk(self, k: int = 10):
        """The ``k`` heads ranked highest by the increase, with their ablation change."""
        return self.to_dataframe().head(k)

    def to_record(self) -> dict:
        """A JSON-able summary (for comparison rows and dataset results)."""
        return {"target": self.target, "spearman": self.spearman, "clean_logprob": self.clean_logprob,
                "mode": self.mode, "heads": self.to_dataframe().to_dict("records")}

    def plot(self, ax=None, **kwargs):
        """Claimed increase against the log-prob drop when zeroed, one labelled point per head."""
        from ..plotting import new_axes

        fig, ax = new_axes(ax, figsize=(4.8, 3.6))
        x, y = self.increase.numpy(), (-self.delta).numpy()
        ax.scatter(x, y, color="tab:purple")
        for name, xi, yi in zip(self.names, x, y):
            ax.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel("head log-prob increase (claim)")
        ax.set_ylabel(f"log-prob drop when {self.mode}-ablated (test)")
        ax.set_title(kwargs.get("title", f"head claims {self.target.get('token', '')!r}: "
                                         f"Spearman {self.spearman:.2f}"), fontsize=9)
        return fig, ax

    def __repr__(self) -> str:
        return f"HeadClaims(target={self.target.get('token')!r}, heads={self.names}, spearman={self.spearman:.3f})"
