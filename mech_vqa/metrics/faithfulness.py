"""Patch faithfulness: does knocking out the cells a map ranks highest hurt the answer?

A patch map claims that some image cells matter for the answer tokens ``S``. The claim is tested
by an intervention on the model's own input and compared with what *any* cells of the same number
would do, and with what the ground-truth object's cells do::

    cells_k(M)   = the k cells the map ranks highest on the model's token grid (view 0); a map on
                   another grid is area-resampled onto it; tied cells are drawn at random,
                   averaged over ``n_orders`` tie-breaks (seeded; 1 when the map has no ties)
    lp(X)        = mean_{t in S} log p(y_t | X)                     (teacher-forced, float32)
    drop_k(M)    = lp(I) - lp(I with cells_k(M) knocked out)        (nats; > 0 = the answer needed them)
    random_k     = mean over ``n_random`` seeded draws of k uniformly random cells
    box          = the ground-truth box as a map (1 on cells whose centre lies in the box): at
                   k = n_box (the "box" column) exactly the box's cells

Knock-out modes (both as batch rows of the same forward):

* ``zero``: every image token whose patch centre lies in a chosen cell (every view of a tiled
  image) gets a zero embedding at the input of the first decoder layer (the
  :func:`~mech_vqa.methods.ablation.image_token_ablation` intervention);
* ``blur``: the chosen cells' pixels are replaced by the baseline's (the blurred image by default;
  the same nearest-upsampled cell masks as the insertion / deletion metric, every view).

k runs over ``fractions`` of the grid's cells (default 2 %, 5 %, 10 %; at least one cell) and, with
a box, over the box's own cell count. One batched pass scores every (map, k, mode) row, the random
draws and the clean image (``chunk_size`` rows per forward; no gradient). A map whose drop does not
exceed the random drop at the same k names cells the answer does not need more than any others.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..hooks import preserved_state
from ..results.base import Result
from .insertion_deletion import _to_pixels, as_map, tie_orders

#: shares of the token grid knocked out (each at least one cell)
KNOCKOUT_FRACTIONS = (0.02, 0.05, 0.1)
MODES = ("zero", "blur")


def token_cells(geometry) -> torch.Tensor:
    """``[n_image_tokens]`` flat index of the view-0 grid cell holding each token's patch centre
    (-1 for a tile's padding beyond the image)."""
    rows, cols = geometry.grid
    height, width = geometry.image_size
    boxes = geometry.boxes.float()
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    row, col = (cy * rows / height).floor().long(), (cx * cols / width).floor().long()
    inside = (row >= 0) & (row < rows) & (col >= 0) & (col < cols)
    return torch.where(inside, row * cols + col, torch.full_like(row, -1))


def on_token_grid(saliency, grid: tuple[int, int]) -> torch.Tensor:
    """The map's scores on the token grid (area-resampled when the map has another resolution)."""
    scores = as_map(saliency)
    if tuple(scores.shape) == tuple(grid):
        return scores
    return F.interpolate(scores[None, None], size=tuple(grid), mode="area")[0, 0]


def knockout_sizes(n_cells: int, fractions: Sequence[float], n_box: int | None = None) -> tuple[list[int], list[str]]:
    """``(ks, labels)``: ``max(1, round(f * n_cells))`` per fraction (label ``"2%"``...) and the box's size."""
    ks, labels = [], []
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"knock-out fractions must be in (0, 1], got {fraction}")
        ks.append(max(1, round(fraction * n_cells)))
        labels.append(f"{100 * fraction:g}%")
    if n_box:
        ks.append(int(n_box))
        labels.append("box")
    return ks, labels


@dataclasses.dataclass
class PatchFaithfulness(Result):
    """Answer log-probability drops when each map's top-k cells are knocked out.

    Attributes:
        methods: the maps' names (``"box"`` is the ground-truth box as a map, when given).
        modes: knock-out modes (``"zero"``, ``"blur"``).
        ks: cells knocked out per column; labels: their names (``"5%"``, ``"box"``).
        drops: ``[n_methods, n_modes, n_k]`` mean drop over the map's tie-breaks (nats).
        random: ``[n_modes, n_k]`` mean drop of ``n_random`` random cell sets; random_std: their std.
        clean_logprob: ``lp(I)``; n_box: cells in the box (0 without one).
        tokens: the answer tokens in ``S``; info: seeds, counts, runtime.
    """

    methods: list
    modes: list
    ks: list
    labels: list
    drops: torch.Tensor
    random: torch.Tensor
    random_std: torch.Tensor
    clean_logprob: float = math.nan
    n_box: int = 0
    tokens: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)

    def columns(self, method: str) -> dict:
        """``{"drop_<mode>@<label>": drop, "excess_<mode>@<label>": drop - random}`` for one map."""
        index = self.methods.index(method)
        out = {}
        for m, mode in enumerate(self.modes):
            for j, label in enumerate(self.labels):
                drop = float(self.drops[index, m, j])
                out[f"drop_{mode}@{label}"] = drop
                out[f"excess_{mode}@{label}"] = drop - float(self.random[m, j])
        return out

    def reference_columns(self) -> dict:
        """``{"random_<mode>@<label>": mean random drop}``."""
        return {f"random_{mode}@{label}": float(self.random[m, j])
                for m, mode in enumerate(self.modes) for j, label in enumerate(self.labels)}

    def to_dataframe(self):
        import pandas as pd

        rows = [{"method": name, **self.columns(name)} for name in self.methods]
        rows.append({"method": "random", **{key.replace("random_", "drop_"): value
                                            for key, value in self.reference_columns().items()}})
        return pd.DataFrame(rows)

    def topk(self, k: int = 10):
        """Maps ranked by excess drop (over random cells) in the first mode at the last k (the box's when given)."""
        frame = self.to_dataframe()
        column = f"excess_{self.modes[0]}@{self.labels[-1]}"
        return frame[frame.method != "random"].sort_values(column, ascending=False).head(k).reset_index(drop=True)

    def plot(self, ax=None, mode: str | None = None, **kwargs):
        """Drop against k for every map, random cells dashed; returns ``(fig, ax)``."""
        from ..plotting import new_axes

        fig, ax = new_axes(ax, figsize=(5, 3.4))
        m = self.modes.index(mode or self.modes[0])
        x = list(range(len(self.labels)))
        for index, name in enumerate(self.methods):
            ax.plot(x, self.drops[index, m].numpy(), marker="o", label=name)
        ax.errorbar(x, self.random[m].numpy(), yerr=self.random_std[m].numpy(), color="black", linestyle="--",
                    capsize=3, label="random cells")
        ax.set_xticks(x, [f"{label}\n(k={k})" for label, k in zip(self.labels, self.ks)])
        ax.set_xlabel("cells knocked out")
        ax.set_ylabel("answer log-prob drop (nats)")
        ax.set_title(kwargs.get("title", f"patch faithfulness ({self.modes[m]})"), fontsize=9)
        ax.legend(fontsize=7)
        return fig, ax

    def __repr__(self) -> str:
        return (f"PatchFaithfulness(methods={self.methods}, modes={self.modes}, ks={self.ks}, "
                f"clean_logprob={self.clean_logprob:.4f})")


def patch_faithfulness(vqa, inp, maps, *, tokens=None, box=None, fractions: Sequence[float] = KNOCKOUT_FRACTIONS,
                       modes: Sequence[str] = MODES, n_random: int = 4, n_orders: int = 4, seed: int = 0,
                       baseline="blur", tau: float = 1.0, chunk_size: int = 64) -> PatchFaithfulness:
    """Knock out each map's top-k cells, k random cells and the box's cells; measure the answer (module docstring).

    Args:
        vqa: the :class:`~mech_vqa.model.VQAModel` (left as found).
        inp: the prepared input (answer teacher-forced).
        maps: ``{name: PatchMap or [h, w] tensor}`` (one map alone is named by its method).
        tokens: answer-token indices of ``S`` (or a ``TokenSelection``); default the visually relevant ones.
        box: ground-truth box in the preprocessed image's pixels: adds the ``"box"`` map and k = its size.
        fractions: shares of the token grid to knock out.
        modes: ``"zero"`` (zero image-token embeddings) and / or ``"blur"`` (baseline pixels).
        n_random: random cell sets per k; n_orders: tie-breaks per tied map; seed: seeds both.
        baseline: the pixels the ``blur`` mode writes (``"blur"``, ``"black"``, ``"noise"`` or a tensor).
        chunk_size: rows per forward.
    """
    from ..methods.ablation import image_token_ablation
    from ..methods.scoring import AnswerScorer, input_baseline
    from ..methods.token_selection import resolve_selection
    from ..results.patch_map import PatchMap

    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown knock-out modes {unknown or list(modes)}; choose from {MODES}")
    for name, value in (("n_random", n_random), ("n_orders", n_orders), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(maps, dict):
        maps = {getattr(maps, "method", "") or "map": maps}
    if not maps:
        raise ValueError("no maps given: pass {name: PatchMap or [h, w] tensor}")
    start = time.perf_counter()
    geometry = inp.geometry
    grid = tuple(geometry.grid)
    n_cells = grid[0] * grid[1]
    scores = {name: on_token_grid(m, grid) for name, m in maps.items()}
    if box is not None:
        if "box" in scores:
            raise ValueError("a map is named 'box', the name of the ground-truth reference; rename it")
        inside = PatchMap(scores=torch.zeros(grid), image_size=list(geometry.image_size), box=list(box)).inside_box()
        if inside.any():
            scores["box"] = inside.float()
        else:
            box = None
    n_box = int(scores["box"].sum()) if "box" in scores else 0
    ks, labels = knockout_sizes(n_cells, fractions, n_box)
    base = input_baseline(vqa, inp, baseline).to(vqa.device).float()
    image = inp.pixel_values.float().to(vqa.device)

    # every cell set to score: (map or random draw, k) -> [n_sets, n_cells] bool, one per tie-break / draw
    generator = torch.Generator().manual_seed(int(seed))
    sets, owners = [], []                          # owners[i] = (kind index, k index); kind -1 = random
    names = list(scores)
    for index, name in enumerate(names):
        orders = tie_orders(scores[name], n_orders, seed + index)
        for j, k in enumerate(ks):
            chosen = torch.zeros(len(orders), n_cells, dtype=torch.bool)
            chosen.scatter_(1, orders[:, :k], True)
            sets.append(chosen)
            owners += [(index, j)] * len(orders)
    for j, k in enumerate(ks):
        draws = torch.stack([torch.randperm(n_cells, generator=generator)[:k] for _ in range(n_random)])
        sets.append(torch.zeros(n_random, n_cells, dtype=torch.bool).scatter_(1, draws, True))
        owners += [(-1, j)] * n_random
    sets = torch.cat(sets)
    # composites shared by several rows (a box of k cells, untied k-prefixes alike) are scored once
    distinct, which = torch.unique(sets, dim=0, return_inverse=True)
    cells_of_token = token_cells(geometry)
    positions = geometry.positions

    with preserved_state(vqa.model):
        vqa.model.eval()
        selection = resolve_selection(vqa, inp, tokens, base, tau=tau)
        if selection.empty:
            raise ValueError(f"{selection.message}; pass the answer-token indices to explain (tokens=[...])")
        scorer = AnswerScorer(vqa, inp, selection.indices)
        # rows: the clean image, then every distinct cell set once per mode
        row_mode = ["clean"] + [mode for mode in modes for _ in range(len(distinct))]
        row_set = [-1] + [i for _ in modes for i in range(len(distinct))]
        values = []
        with torch.no_grad():
            for chunk in torch.arange(len(row_mode)).split(chunk_size):
                pixels, edits = [], []
                for row, r in enumerate(chunk.tolist()):
                    mode, cells = row_mode[r], distinct[row_set[r]] if row_set[r] >= 0 else None
                    if mode == "blur":
                        mask = _to_pixels(cells.float().view(1, *grid), image.shape[1:], geometry).to(image.device)
                        pixels.append(image + mask * (base - image))
                        continue
                    pixels.append(image)
                    if mode == "zero":
                        knocked = positions[cells[cells_of_token.clamp(min=0)] & (cells_of_token >= 0)]
                        if knocked.numel():
                            ablation = image_token_ablation(vqa, inp, knocked)
                            edits += [dataclasses.replace(e, rows=(row,)) for e in ablation.interventions]
                with vqa.trace((), interventions=edits):   # any backend applies the knock-outs
                    values.append(scorer(torch.cat(pixels)).float().mean(-1).cpu())
    values = torch.cat(values)
    clean = float(values[0])
    per_mode = (clean - values[1:]).view(len(modes), len(distinct))[:, which]      # [n_modes, n_sets]
    owner_kind, owner_k = torch.tensor(owners).unbind(-1)
    drops = torch.full((len(names), len(modes), len(ks)), math.nan)
    for index in range(len(names)):
        for j in range(len(ks)):
            drops[index, :, j] = per_mode[:, (owner_kind == index) & (owner_k == j)].mean(-1)
    random_drops = [per_mode[:, (owner_kind == -1) & (owner_k == j)] for j in range(len(ks))]   # [n_modes, n_random]
    random = torch.stack([d.mean(-1) for d in random_drops], -1)
    random_std = torch.stack([d.std(-1) if d.shape[-1] > 1 else torch.zeros(len(modes)) for d in random_drops], -1)
    return PatchFaithfulness(
        methods=names, modes=list(modes), ks=ks, labels=labels, drops=drops, random=random, random_std=random_std,
        clean_logprob=clean, n_box=n_box, tokens=[selection.tokens[i] for i in selection.indices],
        info={"fractions": list(fractions), "n_random": n_random, "n_orders": n_orders, "seed": seed,
              "baseline": baseline if isinstance(baseline, str) else "tensor", "rows": len(row_mode),
              "cell_sets": int(sets.shape[0]), "grid": list(grid), "runtime_s": time.perf_counter() - start,
              "box": [float(v) for v in box] if box is not None else None})


__all__ = ["KNOCKOUT_FRACTIONS", "MODES", "PatchFaithfulness", "knockout_sizes", "on_token_grid", "patch_faithfulness",
           "token_cells"]
