"""``AblationResult``: the change of the answer tokens' log-probabilities under each ablation."""

from __future__ import annotations

import dataclasses

import torch

from .base import Result


@dataclasses.dataclass
class AblationResult(Result):
    """Attributes:
        delta: ``[n_ablations, n_targets]`` log-prob change of each target token (ablated - clean).
        clean_logprob: ``[n_targets]`` clean log-probabilities.
        flipped: ``[n_ablations]`` bool, the argmax changed at some target position.
        ablated_argmax: ``[n_ablations, n_targets]`` predicted token under the ablation.
        names, layers, heads, kinds: per-ablation labels (head -1 when not a head ablation).
        targets: the target tokens; info: metadata.
    """

    delta: torch.Tensor
    clean_logprob: torch.Tensor
    flipped: torch.Tensor
    ablated_argmax: torch.Tensor
    names: list = dataclasses.field(default_factory=list)
    layers: list = dataclasses.field(default_factory=list)
    heads: list = dataclasses.field(default_factory=list)
    kinds: list = dataclasses.field(default_factory=list)
    targets: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        """``[n_ablations]`` summed log-prob change over the targets."""
        return self.delta.sum(-1)

    def head_grid(self) -> torch.Tensor:
        """``[n_layers, n_heads]`` summed change of the head ablations (NaN where not run)."""
        grid = torch.full((self.info["n_layers"], self.info["n_heads"]), float("nan"))
        for index, (layer, head, kind) in enumerate(zip(self.layers, self.heads, self.kinds)):
            if kind == "head":
                grid[layer, head] = self.total[index]
        return grid

    def to_dataframe(self):
        import pandas as pd

        frame = pd.DataFrame({"ablation": self.names, "kind": self.kinds, "layer": self.layers, "head": self.heads,
                              "delta_logprob": self.total.tolist(), "flipped": self.flipped.tolist()})
        for j, target in enumerate(self.targets):
            frame[f"delta[{j}:{target.get('token', '')}]"] = self.delta[:, j].tolist()
        return frame

    def topk(self, k: int = 10):
        """The ``k`` ablations that hurt the answer most (most negative summed change)."""
        frame = self.to_dataframe().sort_values("delta_logprob").head(k)
        return frame.reset_index(drop=True)

    def plot(self, ax=None, **kwargs):
        from ..plotting import heatmap, new_axes

        if self.kinds and all(kind == "head" for kind in self.kinds):
            return heatmap(self.head_grid(), ax=ax, xlabel="head", ylabel="decoder layer",
                           title="answer log-prob change when the head is ablated (blank: not ablated)",
                           cbar_label="change of summed answer log-prob (nats)")
        fig, ax = new_axes(ax, figsize=(max(4, 0.3 * len(self.names)), 3.5))
        colors = ["#D55E00" if f else "#0072B2" for f in self.flipped.tolist()]
        ax.bar(range(len(self.names)), self.total.numpy(), color=colors)
        ax.set_xticks(range(len(self.names)), self.names, rotation=90, fontsize=7)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_ylabel("change of summed answer\nlog-prob (nats)", fontsize=8)
        ax.set_title("ablations (vermilion: the answer flips, blue: it does not)", fontsize=9)
        return fig, ax
