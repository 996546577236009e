"""``PatchingResult``: how much of the clean answer each restored activation brings back.

One row per restoration (a site, a layer, a position or all of them, a head or none), each with the
patched score and the restored fraction ``(s_patched - s_corrupt) / (s_clean - s_corrupt)``. Views:
a (layer x position) grid of the residual restorations, a (layer x head) grid, the MLP outputs per
layer, and a :class:`~mech_vqa.results.PatchMap` of the image positions restored at one layer.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import Result
from .patch_map import PatchMap

ALL = -1
"""``position`` / ``head`` of a restoration that covers every position / no single head."""
GROUP = -2
"""``position`` of a restoration of a named set of positions (its ``label``), e.g. every image token."""


@dataclasses.dataclass
class PatchingResult(Result):
    """Activation-patching restorations of one clean / corrupted pair.

    Attributes:
        patched: ``[n]`` float32 score of the corrupted run with restoration ``i`` applied.
        fraction: ``[n]`` float32 restored fraction (NaN when the pair's gap is below ``min_gap``).
        sites, layers, positions, heads: per restoration (``positions`` / ``heads`` -1 = all / none;
            ``positions`` -2 = the named group in ``labels``).
        labels: per restoration, the group's name ("" for others).
        clean_score, corrupt_score: the scores of the two unpatched runs.
        targets: the scored tokens ``[{"token_id", "position", "token", "corrupt_token_id"?}]``.
        image_positions, image_rowcol, image_view: the image tokens' geometry (for :meth:`patch_map`).
        grid, image_size, image, box: as for :class:`PatchMap`.
        info: metric, pair kind, prompt, answers, n_layers, n_heads, runtime...
    """

    patched: torch.Tensor
    fraction: torch.Tensor
    sites: list = dataclasses.field(default_factory=list)
    layers: list = dataclasses.field(default_factory=list)
    positions: list = dataclasses.field(default_factory=list)
    heads: list = dataclasses.field(default_factory=list)
    labels: list = dataclasses.field(default_factory=list)
    clean_score: float = 0.0
    corrupt_score: float = 0.0
    targets: list = dataclasses.field(default_factory=list)
    image_positions: torch.Tensor | None = None
    image_rowcol: torch.Tensor | None = None
    image_view: torch.Tensor | None = None
    grid: list = dataclasses.field(default_factory=list)
    image_size: list = dataclasses.field(default_factory=list)
    image: torch.Tensor | None = None
    box: list | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.patched = torch.as_tensor(self.patched, dtype=torch.float32)
        self.fraction = torch.as_tensor(self.fraction, dtype=torch.float32)
        n = self.patched.numel()
        if not self.labels:
            self.labels = [""] * n
        for name in ("fraction", "sites", "layers", "positions", "heads", "labels"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"PatchingResult: {name} has {len(getattr(self, name))} entries for {n} restorations")

    @property
    def gap(self) -> float:
        return self.clean_score - self.corrupt_score

    def names(self) -> list[str]:
        return [restoration_name(s, l, p, h, label)
                for s, l, p, h, label in zip(self.sites, self.layers, self.positions, self.heads, self.labels)]

    def _rows(self, site: str, *, positions=None, heads=None) -> list[int]:
        return [i for i, (s, p, h) in enumerate(zip(self.sites, self.positions, self.heads))
                if s == site and p != GROUP and (positions is None or (p != ALL) == positions)
                and (heads is None or (h != ALL) == heads)]

    # ------------------------------------------------------------------------ views
    def position_grid(self, site: str = "resid_pre", values: str = "fraction") -> tuple[list, list, torch.Tensor]:
        """``(layers, positions, [len(layers), len(positions)])`` of single-position restorations of
        ``site`` (NaN where a pair was not run)."""
        rows = self._rows(site, positions=True, heads=False if site != "z" else None)
        if not rows:
            raise ValueError(f"no single-position {site} restorations in this result; run residual_restorations")
        layers = sorted({self.layers[i] for i in rows})
        positions = sorted({self.positions[i] for i in rows})
        grid = torch.full((len(layers), len(positions)), float("nan"))
        source = getattr(self, values)
        for i in rows:
            grid[layers.index(self.layers[i]), positions.index(self.positions[i])] = source[i]
        return layers, positions, grid

    def head_grid(self, values: str = "fraction") -> torch.Tensor:
        """``[n_layers, n_heads]`` restored fraction of each head's output at every position (NaN: not run)."""
        grid = torch.full((self.info["n_layers"], self.info["n_heads"]), float("nan"))
        source = getattr(self, values)
        for i in self._rows("z", positions=False, heads=True):
            grid[self.layers[i], self.heads[i]] = source[i]
        return grid

    def layer_line(self, site: str = "mlp_out", values: str = "fraction") -> torch.Tensor:
        """``[n_layers]`` restored fraction of ``site`` restored at every position (NaN: not run)."""
        line = torch.full((self.info["n_layers"],), float("nan"))
        source = getattr(self, values)
        for i in self._rows(site, positions=False, heads=False):
            line[self.layers[i]] = source[i]
        return line

    def group_lines(self, site: str = "resid_pre", values: str = "fraction") -> dict:
        """``{label: [n_layers]}`` restored fraction of each named group of positions per layer (NaN: not run)."""
        source = getattr(self, values)
        out: dict = {}
        for i, (s, p, label) in enumerate(zip(self.sites, self.positions, self.labels)):
            if s == site and p == GROUP:
                line = out.setdefault(label, torch.full((self.info["n_layers"],), float("nan")))
                line[self.layers[i]] = source[i]
        return out

    def patch_map(self, layer: int, site: str = "resid_pre", box=None) -> PatchMap:
        """The restored fraction of each image position's ``site`` at ``layer``, on the patch grid (first view)."""
        if self.image_positions is None:
            raise ValueError("this result kept no image geometry")
        where = {int(p): i for i, p in enumerate(self.image_positions.tolist())}
        values = torch.full((len(where),), float("nan"))
        found = 0
        for i in self._rows(site, positions=True, heads=False if site != "z" else None):
            if self.layers[i] == layer and self.positions[i] in where:
                values[where[self.positions[i]]] = self.fraction[i]
                found += 1
        if not found:
            raise ValueError(f"no image-position {site} restorations at layer {layer}; run "
                             "image_restorations(vqa, pair, layer) for that layer")
        first = self.image_view == 0
        rows, cols = self.grid
        scores = torch.full((rows, cols), float("nan"))
        rc = self.image_rowcol[first].long()
        scores[rc[:, 0], rc[:, 1]] = values[first]
        if torch.isnan(scores).any():
            raise ValueError(f"layer {layer}'s {site} restorations cover only part of the image grid; restore every "
                             "image position to draw a map")
        return PatchMap(scores, method="patching", image_size=self.image_size, image=self.image, targets=self.targets,
                        box=box if box is not None else self.box,
                        info={**self.info, "layer": layer, "site": site,
                              "unit": f"restored fraction ({self.info.get('metric', '')})"})

    # ------------------------------------------------------------------------ verbs
    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"restoration": self.names(), "site": self.sites, "layer": self.layers,
                             "position": self.positions, "head": self.heads, "group": self.labels,
                             "patched": self.patched.tolist(), "fraction": self.fraction.tolist()})

    def topk(self, k: int = 10):
        """The ``k`` restorations bringing back the most of the answer (restorations of every position
        of a residual stream are left out: they restore everything by construction)."""
        frame = self.to_dataframe()
        frame = frame[~((frame.site == "resid_pre") & (frame.position == ALL))]
        return frame.sort_values("patched", ascending=False).head(k).reset_index(drop=True)

    def plot(self, ax=None, *, view: str = "positions", site: str = "resid_pre", tokens: list | None = None):
        """``view``: ``positions`` (layers x positions, restored fraction), ``heads`` (layers x heads),
        ``mlp`` (restored fraction per layer) or ``groups`` (one line per named group of positions).
        Returns ``(fig, ax)``."""
        import matplotlib.pyplot as plt

        if ax is None:
            width = 10 if view == "positions" else 5
            fig, ax = plt.subplots(figsize=(width, 3.6))
        else:
            fig = ax.figure
        metric = self.info.get("metric", "")
        if view == "groups":
            lines = self.group_lines(site)
            if not lines:
                raise ValueError("no group restorations in this result; run group_restorations")
            for label, line in lines.items():
                ax.plot(range(len(line)), line.numpy(), marker="o", label=label)
            ax.axhline(0, color="k", lw=0.5)
            ax.axhline(1, color="0.6", lw=0.5, ls="--")
            ax.set_xlabel("layer (residual entering it)")
            ax.set_ylabel("restored fraction")
            ax.set_xticks(range(self.info["n_layers"]))
            ax.legend(fontsize=7, frameon=False)
            ax.set_title(f"{site} restored per group of positions ({metric})", fontsize=9)
            return fig, ax
        if view == "mlp":
            line = self.layer_line("mlp_out")
            ax.bar(range(len(line)), line.numpy(), color="tab:green")
            ax.set_xlabel("layer")
            ax.set_ylabel("restored fraction")
            ax.axhline(0, color="k", lw=0.5)
            ax.set_title(f"MLP output restored ({metric})", fontsize=9)
            return fig, ax
        if view == "heads":
            grid, xlabel, ylabel, xticks = self.head_grid(), "head", "layer", None
        elif view == "positions":
            layers, positions, grid = self.position_grid(site)
            xlabel, ylabel = "position", "layer"
            xticks = positions
        else:
            raise ValueError(f"view must be 'positions', 'heads', 'mlp' or 'groups', got {view!r}")
        limit = float(torch.nan_to_num(grid.abs(), nan=0.0).max()) or 1.0
        image = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, label="restored fraction")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if view == "heads":
            ax.set_xticks(range(grid.shape[1]))
            ax.set_yticks(range(grid.shape[0]))
        if view == "positions":
            ax.set_yticks(range(len(layers)), [str(x) for x in layers])
            labels = [tokens[p] if tokens is not None and p < len(tokens) else str(p) for p in xticks]
            step = max(1, len(labels) // 40)
            ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=90, fontsize=6)
        ax.set_title(f"{site if view == 'positions' else 'head output'} restored "
                     f"(corrupt -> clean, {metric}, gap {self.gap:.2f})", fontsize=9)
        return fig, ax


def restoration_name(site: str, layer: int, position: int, head: int, label: str = "") -> str:
    name = f"L{layer}" + (f"H{head}" if head != ALL else "") + f".{site}"
    if position == GROUP:
        return name + f"@{label}"
    return name + (f"@{position}" if position != ALL else "")
