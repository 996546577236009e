"""``KnockoutResult``: the answer probability's relative change when attention edges are blocked."""

from __future__ import annotations

import dataclasses

import torch

from .base import Result


@dataclasses.dataclass
class KnockoutResult(Result):
    """Attributes:
        relative_change: ``[n_pairs, n_windows]`` (``[n_pairs, n_windows, n_heads]`` per head),
            ``(p_knocked - p_clean) / p_clean`` of the answer target(s) (their joint probability).
        knocked_logprob: same shape, summed log-probability of the targets under the knockout.
        clean_logprob: scalar, the clean summed log-probability.
        pairs: ``[source, target]`` group labels (edges target -> source blocked).
        windows: half-open ``[start, stop)`` layer ranges; anchors: the layer each window is drawn at
            (its centre for the paper's centred windows, its start for explicit ones).
        per_head: whether the last axis is the head whose edges were blocked.
        groups: the sequence positions of each group; targets, info: metadata.
    """

    relative_change: torch.Tensor
    knocked_logprob: torch.Tensor
    clean_logprob: torch.Tensor
    pairs: list = dataclasses.field(default_factory=list)
    windows: list = dataclasses.field(default_factory=list)
    anchors: list = dataclasses.field(default_factory=list)
    per_head: bool = False
    groups: dict = dataclasses.field(default_factory=dict)
    targets: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)

    def pair_names(self) -> list[str]:
        return [f"{source} ↛ {target}" for source, target in self.pairs]

    def to_dataframe(self):
        """One row per (pair, window[, head])."""
        import pandas as pd

        records = []
        clean_p = float(torch.exp(self.clean_logprob))
        for p, (source, target) in enumerate(self.pairs):
            for w, (start, stop) in enumerate(self.windows):
                heads = range(self.relative_change.shape[2]) if self.per_head else [-1]
                for h in heads:
                    index = (p, w, h) if self.per_head else (p, w)
                    records.append({"pair": f"{source} ↛ {target}", "source": source, "target": target,
                                    "window_start": start, "window_stop": stop, "layer": self.anchors[w], "head": h,
                                    "relative_change": float(self.relative_change[index]),
                                    "knocked_prob": float(torch.exp(self.knocked_logprob[index])),
                                    "clean_prob": clean_p})
        return pd.DataFrame.from_records(records)

    def topk(self, k: int = 10):
        """The ``k`` knockouts that lower the answer's probability most."""
        return self.to_dataframe().sort_values("relative_change").head(k).reset_index(drop=True)

    def strongest_window(self, pair: int | str = 0) -> tuple[int, int]:
        """``(start, stop)`` of the window whose knockout lowers the answer most for ``pair``
        (an index or a ``"source ↛ target"`` / ``"source->target"`` name); per head, the head's minimum."""
        values = self.relative_change[self._pair_index(pair)]
        if self.per_head:
            values = values.min(-1).values
        return tuple(self.windows[int(values.argmin())])

    def _pair_index(self, pair) -> int:
        if isinstance(pair, int):
            return pair
        wanted = str(pair).replace("->", "↛").replace(" ", "")
        for index, name in enumerate(self.pair_names()):
            if name.replace(" ", "") == wanted:
                return index
        raise KeyError(f"no pair {pair!r}; this result holds {self.pair_names()}")

    @staticmethod
    def average(results: list[KnockoutResult]) -> KnockoutResult:
        """The mean relative change over several inputs' results (same pairs and windows), as the
        paper's curves average over the items of a task."""
        if not results:
            raise ValueError("average needs at least one KnockoutResult")
        first = results[0]
        for other in results[1:]:
            if other.pairs != first.pairs or other.windows != first.windows or other.per_head != first.per_head:
                raise ValueError("results to average must share pairs, windows and per_head")
        stack = torch.stack([r.relative_change for r in results])
        return KnockoutResult(
            relative_change=stack.mean(0),
            knocked_logprob=torch.stack([r.knocked_logprob for r in results]).mean(0),
            clean_logprob=torch.stack([r.clean_logprob for r in results]).mean(0),
            pairs=first.pairs, windows=first.windows, anchors=first.anchors, per_head=first.per_head,
            groups={}, targets=[], info={**first.info, "n_items": len(results), "averaged": True,
                                         "relative_change_std": stack.std(0).tolist() if len(results) > 1 else None})

    def plot(self, ax=None, pair: int | str | None = None, **kwargs):
        """The paper's figure: relative change (%) per window, one line per pair; per head, a heatmap
        of ``pair`` (default the first) over windows x heads."""
        from ..plotting import PALETTE, heatmap, new_axes

        centred = self.info.get("windows") == "centred"
        size = self.info.get("window")
        xlabel = (f"layer (window of {size} layer{'' if size == 1 else 's'} centred on it)" if centred
                  else "first layer of the window")
        if self.per_head:
            index = self._pair_index(0 if pair is None else pair)
            return heatmap(100 * self.relative_change[index].T, ax=ax, xlabel=xlabel, ylabel="head",
                           title=f"{self.pair_names()[index]}: change of the answer's probability (%)",
                           cbar_label="relative change (%)")
        fig, ax = new_axes(ax, figsize=(5.5, 3.5))
        styles = ("-", "--", "-.", ":")
        for p, name in enumerate(self.pair_names()):
            ax.plot(self.anchors, (100 * self.relative_change[p]).tolist(), marker="o", markersize=3,
                    color=PALETTE[p % len(PALETTE)], linestyle=styles[p % len(styles)], label=name)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("relative change of the\nanswer's probability (%)", fontsize=8)
        n_items = self.info.get("n_items")
        tokens = " ".join(repr(t.get("token", "")) for t in self.targets)
        what = f"mean of {n_items} items" if n_items else f"answer {tokens}"
        ax.set_title(f"attention knockout ({what})", fontsize=9)
        ax.legend(fontsize=7, title="blocked edges", title_fontsize=7)
        ax.set_xticks(sorted(set(self.anchors)))
        return fig, ax
