"""Result types of the LVLM-Interpret methods (raw attention, relevancy, causal interpretation).

Every one of them can produce the shared :class:`~mech_vqa.results.patch_map.PatchMap` (so the
comparison and the insertion/deletion metric take them unchanged); these classes keep what a
single map would lose:

* :class:`AnswerAttention` -- attention rows ``[layers, heads, targets, seq]`` of the answer
  tokens' predicting positions, with the aggregations (head / layer / token mean or max) and views.
* :class:`AttentionMass` -- heads x layers share of attention on image / question / answer tokens.
* :class:`PatchToText` -- the reverse view: how much each answer token attends to chosen patches.
* :class:`RelevancyMaps` -- Chefer relevancy rows per target, on the patch grid (LLM and vision stage).
* :class:`CausalExplanation` -- the learned causal graph over attention nodes and its explanation set.

Image positions are stored with their grid coordinates (``image_rowcol``, ``image_view``) so that
maps are laid on the grid exactly as :meth:`ImageGeometry.to_grid` does, also after ``load``.
"""

from __future__ import annotations

import dataclasses

import torch

from ..adapters import ImageGeometry
from ..adapters.base import paint_view
from .base import Result, tensor_topk
from .patch_map import PatchMap

REDUCTIONS = ("mean", "max", "sum")
MASS_GROUPS = ("image", "question", "answer", "other")


def reduce(values: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    """Mean, max or sum of ``values`` over ``dim``; any other name is a clear error."""
    if how == "mean":
        return values.mean(dim)
    if how == "max":
        return values.amax(dim)
    if how == "sum":
        return values.sum(dim)
    raise ValueError(f"unknown reduction {how!r}; choose one of {REDUCTIONS}")


def _to_grid(values: torch.Tensor, rowcol: torch.Tensor, view: torch.Tensor, grid) -> torch.Tensor:
    """``[..., n_image]`` -> ``[..., rows, cols]`` with the adapter's geometry (first view)."""
    geometry = ImageGeometry(positions=torch.arange(rowcol.shape[0]), rowcol=rowcol.long(),
                             boxes=torch.zeros(rowcol.shape[0], 4), grid=tuple(grid), image_size=(1, 1),
                             view=view.long())
    return geometry.to_grid(values)


def _pick(requested, available: list[int], what: str) -> list[int]:
    """Indices into ``available`` of the ``requested`` items (None = all), with a clear error.

    A negative item counts from the end of ``available`` (``-1`` = the last layer / target held).
    """
    if requested is None:
        return list(range(len(available)))
    if isinstance(requested, int):
        requested = [requested]
    out = []
    for item in requested:
        item = int(item)
        if -len(available) <= item < 0:
            item = available[item]
        if item not in available:
            raise IndexError(f"{what} {item} is not in this result; it holds {what}s {available}")
        out.append(available.index(item))
    return out


def _token_label(target: dict) -> str:
    return f"{target.get('token', '')}@{target.get('position')}"


# --------------------------------------------------------------------------- raw attention
@dataclasses.dataclass
class AnswerAttention(Result):
    """Attention from each target's predicting position to every sequence position.

    Attributes:
        weights: ``[n_layers, n_heads, n_targets, seq]`` float32 attention probabilities.
        layers: model layer index of each row of ``weights``.
        targets: the explained tokens (``Target.to_dict()``); target ``i`` is column ``i``.
        image_positions / image_rowcol / image_view: ``[n_image]``, ``[n_image, 2]``, ``[n_image]``
            sequence position, grid cell and view of every image token (from the adapter).
        image_boxes: ``[n_image, 4]`` each image token's box in the first view's pixels (to paint
            the maps of later views, LLaVA-NeXT's tiles).
        question_positions, answer_positions: sequence positions of the question / answer tokens.
        grid, image_size: patch grid ``[rows, cols]`` and preprocessed image ``[height, width]``.
        image: ``[height, width, 3]`` de-normalised image (for plots) or None.
        str_tokens: the sequence's tokens.
        box: ground-truth box passed on to the maps, or None.
    """

    weights: torch.Tensor
    layers: list = dataclasses.field(default_factory=list)
    targets: list = dataclasses.field(default_factory=list)
    image_positions: torch.Tensor | None = None
    image_rowcol: torch.Tensor | None = None
    image_view: torch.Tensor | None = None
    image_boxes: torch.Tensor | None = None
    question_positions: torch.Tensor | None = None
    answer_positions: torch.Tensor | None = None
    grid: list = dataclasses.field(default_factory=list)
    image_size: list = dataclasses.field(default_factory=list)
    image: torch.Tensor | None = None
    str_tokens: list = dataclasses.field(default_factory=list)
    box: list | None = None
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def target_positions(self) -> list[int]:
        return [int(t["position"]) for t in self.targets]

    def image_weights(self) -> torch.Tensor:
        """``[n_layers, n_heads, n_targets, n_image]`` attention to the image tokens."""
        return self.weights[..., self.image_positions.long()]

    def to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """``[..., n_image]`` -> ``[..., rows, cols]``."""
        return _to_grid(values, self.image_rowcol, self.image_view, self.grid)

    def _select(self, layers=None, heads=None, tokens=None) -> tuple[torch.Tensor, list[int]]:
        """Image attention ``[L, H, T, n_image]`` at model ``layers``, ``heads``, target ``tokens``."""
        n_heads = self.weights.shape[1]
        layer_idx = _pick(layers, [int(v) for v in self.layers], "layer")
        head_idx = _pick(heads, list(range(n_heads)), "head")
        token_idx = _pick(tokens, list(range(len(self.targets))), "target")
        values = self.image_weights()
        return values[layer_idx][:, head_idx][:, :, token_idx], token_idx

    def patch_map(self, layers=None, heads=None, tokens=None, *, head_reduce: str = "mean",
                  layer_reduce: str = "mean", token_reduce: str = "mean", box=None, view: int = 0) -> PatchMap:
        """Aggregate to one ``PatchMap``: reduce heads, then layers, then target tokens.

        ``layers`` are model layer indices (a range works), ``heads`` head indices, ``tokens``
        indices into ``targets``; None = all. Reductions: ``mean``, ``max`` or ``sum``. ``view`` 0
        is the first view's patch grid; 1 paints LLaVA-NeXT's high-resolution tiles over the image.
        """
        values, token_idx = self._select(layers, heads, tokens)  # [L, H, T, n_image]
        scores = reduce(reduce(reduce(values, head_reduce, 1), layer_reduce, 0), token_reduce, 0)
        scores = self.to_grid(scores) if view == 0 else paint_view(scores, self.image_boxes, self.image_view, view,
                                                                   self.image_size)
        return PatchMap(scores, method="raw_attention", image_size=self.image_size, image=self.image,
                        targets=[self.targets[i] for i in token_idx], box=box if box is not None else self.box,
                        info={**self.info, "layers": list(layers) if layers is not None else self.layers,
                              "heads": list(heads) if heads is not None else "all", "head_reduce": head_reduce,
                              "layer_reduce": layer_reduce, "token_reduce": token_reduce, "view": view,
                              "unit": f"attention weight ({head_reduce} of heads, {layer_reduce} of layers)"})

    def head_maps(self, layer: int, tokens=None, token_reduce: str = "mean") -> torch.Tensor:
        """``[n_heads, rows, cols]``: one map per head of ``layer`` (tokens reduced)."""
        values, _ = self._select([layer], None, tokens)
        return self.to_grid(reduce(values[0], token_reduce, 1))

    def mass(self, tokens=None) -> AttentionMass:
        """Share of attention on image / question / answer / other tokens, per layer and head.

        Averaged over the target tokens. Each row sums to 1 (attention rows are distributions).
        Answer tokens already generated before a target count as ``answer``; the prompt's
        template tokens (``USER:``, ``ASSISTANT:``, BOS) as ``other``.
        """
        token_idx = _pick(tokens, list(range(len(self.targets))), "target")
        weights = self.weights[:, :, token_idx]  # [L, H, T, S]
        seq = weights.shape[-1]
        group = torch.full((seq,), 3, dtype=torch.long)
        group[self.answer_positions.long()] = 2
        group[self.question_positions.long()] = 1
        group[self.image_positions.long()] = 0
        one_hot = torch.nn.functional.one_hot(group, len(MASS_GROUPS)).float()  # [S, 4]
        mass = (weights @ one_hot).mean(2)  # [L, H, 4]
        return AttentionMass(mass=mass, layers=list(self.layers), groups=list(MASS_GROUPS),
                             targets=[self.targets[i] for i in token_idx], info=dict(self.info))

    def patch_to_text(self, cells, layers=None, heads=None, *, head_reduce: str = "mean",
                      layer_reduce: str = "mean") -> PatchToText:
        """The reverse view: attention each target token pays to the chosen patch ``cells``.

        ``cells`` are ``(row, col)`` grid cells; the score of a token is the attention mass on
        those cells summed, heads and layers reduced as asked.
        """
        cells = [tuple(int(v) for v in cell) for cell in cells]
        if not cells:
            raise ValueError("patch_to_text needs at least one (row, col) cell")
        rows, cols = self.grid
        bad = [c for c in cells if not (0 <= c[0] < rows and 0 <= c[1] < cols)]
        if bad:
            raise IndexError(f"cells {bad} are outside the {rows}x{cols} patch grid")
        rowcol = self.image_rowcol.long()
        chosen = torch.zeros(rowcol.shape[0], dtype=torch.bool)
        for r, c in cells:
            chosen |= (rowcol[:, 0] == r) & (rowcol[:, 1] == c) & (self.image_view == 0)
        values, _ = self._select(layers, heads, None)  # [L, H, T, n_image]
        on_cells = values[..., chosen].sum(-1)  # [L, H, T]
        per_layer = reduce(on_cells, head_reduce, 1)  # [L, T]
        return PatchToText(scores=reduce(per_layer, layer_reduce, 0), per_layer=per_layer,
                           layers=list(layers) if layers is not None else list(self.layers),
                           cells=[list(c) for c in cells], targets=list(self.targets), info=dict(self.info))

    # ------------------------------------------------------------------------ verbs
    def to_dataframe(self):
        """One row per (layer, head, target): attention mass on the image and its peak cell."""
        import pandas as pd

        values = self.image_weights()  # [L, H, T, n]
        peak = values.argmax(-1)
        rowcol = self.image_rowcol.long()
        records = []
        for li, layer in enumerate(self.layers):
            for head in range(values.shape[1]):
                for ti, target in enumerate(self.targets):
                    r, c = rowcol[peak[li, head, ti]].tolist()
                    records.append({"layer": int(layer), "head": head, "target": _token_label(target),
                                    "image_mass": float(values[li, head, ti].sum()),
                                    "peak_row": r, "peak_col": c, "peak": float(values[li, head, ti].max())})
        return pd.DataFrame.from_records(records)

    def topk(self, k: int = 10):
        """The ``k`` (layer, head, target) rows with the most attention on the image."""
        return self.to_dataframe().nlargest(k, "image_mass").reset_index(drop=True)

    def plot(self, ax=None, *, layer: int | None = None, tokens=None):
        """Gallery of per-head image maps of ``layer`` (default the last); returns ``(fig, axes)``."""
        import matplotlib.pyplot as plt

        from ..plotting import question_answer, shared_colorbar, tokens_label

        layer = int(self.layers[-1]) if layer is None else layer
        maps = self.head_maps(layer, tokens)
        n = maps.shape[0]
        new_figure = ax is None
        if new_figure:
            cols = min(n, 8)
            rows = -(-n // cols)
            fig, ax = plt.subplots(rows, cols, figsize=(2.2 * cols + 0.8, 2.3 * rows + 0.7), squeeze=False)
            for extra in ax.flat[n:]:
                extra.set_visible(False)
            ax = list(ax.flat)
        axes = list(ax) if hasattr(ax, "__len__") else [ax]
        if len(axes) < n:
            raise ValueError(f"plot needs {n} axes (one per head), got {len(axes)}")
        shared = float(maps.max()) or None  # one colour scale, so heads compare
        for head, axis in enumerate(axes[:n]):
            PatchMap(maps[head], method="raw_attention", image_size=self.image_size, image=self.image,
                     box=self.box).plot(ax=axis, title=f"head L{layer}H{head}", colorbar=False, vmax=shared,
                                        signed=False)
        shared_colorbar(axes[0].figure, axes[:n], shared, "attention weight")
        if new_figure:
            token_idx = _pick(tokens, list(range(len(self.targets))), "target")
            tokens_text = tokens_label([self.targets[i] for i in token_idx])
            qa = question_answer(self.info)
            axes[0].figure.suptitle(f"raw attention of answer token {tokens_text} to the image, layer {layer}, "
                                    f"one colour scale (attention weight)" + (f"\n{qa}" if qa else ""), fontsize=9)
        return axes[0].figure, axes


@dataclasses.dataclass
class AttentionMass(Result):
    """``mass``: ``[n_layers, n_heads, 4]`` share of attention on image / question / answer / other."""

    mass: torch.Tensor
    layers: list = dataclasses.field(default_factory=list)
    groups: list = dataclasses.field(default_factory=lambda: list(MASS_GROUPS))
    targets: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)

    def of(self, group: str) -> torch.Tensor:
        """``[n_layers, n_heads]`` mass on ``group``."""
        if group not in self.groups:
            raise ValueError(f"unknown token group {group!r}; choose one of {self.groups}")
        return self.mass[..., self.groups.index(group)]

    def to_dataframe(self):
        import pandas as pd

        records = [{"layer": int(layer), "head": head, **{g: float(self.mass[li, head, gi])
                                                          for gi, g in enumerate(self.groups)}}
                   for li, layer in enumerate(self.layers) for head in range(self.mass.shape[1])]
        return pd.DataFrame.from_records(records)

    def topk(self, k: int = 10, group: str = "image"):
        """The ``k`` heads with the largest mass on ``group``."""
        return self.to_dataframe().nlargest(k, group).reset_index(drop=True)

    def plot(self, ax=None, *, group: str = "image"):
        """Heads x layers heatmap of the mass on ``group``; returns ``(fig, ax)``."""
        from ..plotting import heatmap

        from ..plotting import tokens_label

        return heatmap(self.of(group).T, ax=ax, xlabel="decoder layer", ylabel="head", center=False,
                       title=f"share of attention on {group} tokens, answer token {tokens_label(self.targets)}",
                       cbar_label=f"attention share on {group} tokens (0-1)", limits=(0.0, 1.0),
                       xticklabels=[str(v) for v in self.layers],
                       yticklabels=[str(h) for h in range(self.mass.shape[1])])


@dataclasses.dataclass
class PatchToText(Result):
    """Attention of each target token to chosen patches: ``scores`` ``[T]``, ``per_layer`` ``[L, T]``."""

    scores: torch.Tensor
    per_layer: torch.Tensor | None = None
    layers: list = dataclasses.field(default_factory=list)
    cells: list = dataclasses.field(default_factory=list)
    targets: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"target": [_token_label(t) for t in self.targets],
                             "token": [t.get("token", "") for t in self.targets],
                             "position": [int(t["position"]) for t in self.targets],
                             "score": self.scores.tolist()})

    def topk(self, k: int = 10):
        return self.to_dataframe().nlargest(k, "score").reset_index(drop=True)

    def plot(self, ax=None):
        """Bar per answer token: its attention to the chosen cells; returns ``(fig, ax)``."""
        from ..plotting import new_axes

        fig, ax = new_axes(ax, figsize=(max(3.0, 0.6 * len(self.targets)), 3))
        ax.bar(range(len(self.targets)), self.scores.numpy(), color="#E69F00")
        ax.set_xticks(range(len(self.targets)), [t.get("token", "") for t in self.targets], rotation=45)
        ax.set_ylabel("attention weight on the patches\n(summed over them)", fontsize=8)
        ax.set_title(f"patches {self.cells} -> answer tokens", fontsize=9)
        return fig, ax


# ------------------------------------------------------------------------------ relevancy
@dataclasses.dataclass
class RelevancyMaps(Result):
    """Chefer relevancy of every position for each target, and its image part on the grid.

    Attributes:
        rows: ``[n_targets, seq]`` float32 row ``R[t, :]`` of the LLM relevancy matrix for each
            target's predicting position (row-normalised when ``row_normalized``).
        llm: ``[n_targets, rows, cols]`` the image-token columns of ``rows`` on the grid.
        vision: ``[n_targets, rows, cols]`` relevancy of the input patches after propagating the
            image relevancy through the vision tower, or None when not asked.
        targets, str_tokens, image_size, image (for plots), box, info: as in :class:`AnswerAttention`.
        image_positions / image_boxes / image_view: the image tokens' sequence positions, boxes (first
            view's pixels) and views, to paint the LLM stage of later views (LLaVA-NeXT's tiles).
    """

    rows: torch.Tensor
    llm: torch.Tensor | None = None
    vision: torch.Tensor | None = None
    targets: list = dataclasses.field(default_factory=list)
    str_tokens: list = dataclasses.field(default_factory=list)
    image_size: list = dataclasses.field(default_factory=list)
    image: torch.Tensor | None = None
    row_normalized: bool = False
    box: list | None = None
    info: dict = dataclasses.field(default_factory=dict)
    image_positions: torch.Tensor | None = None
    image_boxes: torch.Tensor | None = None
    image_view: torch.Tensor | None = None

    def patch_map(self, tokens=None, *, stage: str = "llm", token_reduce: str = "mean", box=None,
                  view: int = 0) -> PatchMap:
        """``PatchMap`` of target ``tokens`` (indices, None = all) for ``stage`` ``llm`` or ``vision``;
        ``view`` 1 paints the LLM stage of LLaVA-NeXT's high-resolution tiles over the image."""
        if stage not in ("llm", "vision"):
            raise ValueError(f"stage must be 'llm' or 'vision', got {stage!r}")
        maps = self.llm if stage == "llm" else self.vision
        if maps is None:
            raise ValueError("no vision-tower relevancy here; run relevancy(..., vision=True)")
        token_idx = _pick(tokens, list(range(len(self.targets))), "target")
        if view == 0:
            scores = reduce(maps[token_idx], token_reduce, 0)
        elif stage == "llm" and self.image_positions is not None:
            values = reduce(self.rows[token_idx][:, self.image_positions], token_reduce, 0)
            scores = paint_view(values, self.image_boxes, self.image_view, view, self.image_size)
        else:
            raise ValueError("only the LLM stage of a result that kept its image-token boxes has later views")
        return PatchMap(scores, method=f"relevancy_{stage}", image_size=self.image_size, image=self.image,
                        targets=[self.targets[i] for i in token_idx], box=box if box is not None else self.box,
                        info={**self.info, "stage": stage, "row_normalized": self.row_normalized, "view": view,
                              "unit": "relevance (Chefer, row-normalised)" if self.row_normalized
                              else "relevance (Chefer, unnormalised)"})

    def to_dataframe(self):
        import pandas as pd

        n, rows, cols = self.llm.shape
        frame = pd.DataFrame({
            "target": [_token_label(t) for t in self.targets for _ in range(rows * cols)],
            "row": torch.arange(rows).repeat_interleave(cols).repeat(n).tolist(),
            "col": torch.arange(cols).repeat(rows * n).tolist(),
            "llm": self.llm.flatten().tolist(),
        })
        if self.vision is not None:
            frame["vision"] = self.vision.flatten().tolist()
        return frame

    def topk(self, k: int = 10, stage: str = "llm"):
        """The ``k`` most relevant (target, cell) pairs."""
        if stage not in ("llm", "vision") or (stage == "vision" and self.vision is None):
            raise ValueError(f"stage must be 'llm' or 'vision' (vision needs relevancy(..., vision=True)), got {stage!r}")
        maps = self.llm if stage == "llm" else self.vision
        scores, index = tensor_topk(maps, k)
        import pandas as pd

        return pd.DataFrame({"target": [_token_label(self.targets[int(i[0])]) for i in index],
                             "row": index[:, 1].tolist(), "col": index[:, 2].tolist(), "score": scores.tolist()})

    def plot(self, ax=None, *, stage: str = "llm"):
        """One overlay per target token; returns ``(fig, axes)``."""
        import matplotlib.pyplot as plt

        from ..plotting import question_answer, shared_colorbar, unit_of

        n = len(self.targets)
        new_figure = ax is None
        if new_figure:
            fig, ax = plt.subplots(1, n, figsize=(3.0 * n + 0.8, 3.2), squeeze=False)
            ax = ax[0]
        axes = list(ax) if hasattr(ax, "__len__") else [ax]
        maps = [self.patch_map([i], stage=stage) for i in range(min(n, len(axes)))]
        shared = max(float(m.scores.max()) for m in maps) or None  # one colour scale, so tokens compare
        for axis, patch_map in zip(axes, maps):
            patch_map.plot(ax=axis, colorbar=False, vmax=shared, signed=False)
        shared_colorbar(axes[0].figure, axes[:len(maps)], shared, unit_of(maps[0].info))
        qa = question_answer(self.info)
        if new_figure and qa:
            axes[0].figure.suptitle(qa, fontsize=9, y=1.04)
        return axes[0].figure, axes


# ------------------------------------------------------------------------------ causal
@dataclasses.dataclass
class CausalExplanation(Result):
    """A causal graph over attention nodes of one head, and the target's explanation set.

    Attributes:
        nodes: ``[n]`` sequence positions of the graph's nodes, in token (= causal) order; the
            last one is the target's predicting position.
        kinds: ``"image"``, ``"text"`` or ``"target"`` per node.
        adjacency: ``[n, n]`` bool, ``adjacency[i, j]`` = edge ``nodes[i] -> nodes[j]`` (i < j).
        correlation: ``[n, n]`` float32 the attention-derived correlation the graph was learned from.
        attention: ``[n]`` the target's attention to each node (the node-selection score).
        explanation: ``[m]`` positions of the explanation set (target excluded).
        image_positions / image_rowcol / image_view / image_boxes, grid, image_size: to lay image nodes on the
            patch grid; image: the de-normalised image (for plots) or None.
        tokens: token string of each node; layer, head; targets; box; info (alpha, radius...).
    """

    nodes: torch.Tensor
    kinds: list = dataclasses.field(default_factory=list)
    adjacency: torch.Tensor | None = None
    correlation: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    explanation: torch.Tensor | None = None
    image_positions: torch.Tensor | None = None
    image_rowcol: torch.Tensor | None = None
    image_view: torch.Tensor | None = None
    image_boxes: torch.Tensor | None = None
    grid: list = dataclasses.field(default_factory=list)
    image_size: list = dataclasses.field(default_factory=list)
    image: torch.Tensor | None = None
    tokens: list = dataclasses.field(default_factory=list)
    layer: int = -1
    head: int = 0
    targets: list = dataclasses.field(default_factory=list)
    box: list | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def _in_explanation(self) -> torch.Tensor:
        return torch.isin(self.nodes, self.explanation)

    def explanation_patches(self) -> list[tuple[int, int]]:
        """``(row, col)`` cells of the image nodes in the explanation set."""
        image_pos = self.image_positions.long().tolist()
        cells = []
        for pos in self.explanation.tolist():
            if pos in image_pos:
                cells.append(tuple(self.image_rowcol[image_pos.index(pos)].tolist()))
        return cells

    def node_labels(self) -> list[str]:
        """Token of each text node, ``img(row,col)`` of each image node."""
        image_pos = self.image_positions.long().tolist()
        return [f"img{tuple(self.image_rowcol[image_pos.index(p)].tolist())}" if kind == "image" else self.tokens[i]
                for i, (p, kind) in enumerate(zip(self.nodes.tolist(), self.kinds))]

    def explanation_tokens(self) -> list[tuple[int, str]]:
        """``(position, token)`` of the text nodes in the explanation set."""
        return [(int(p), self.tokens[i]) for i, p in enumerate(self.nodes.tolist())
                if self.kinds[i] == "text" and p in self.explanation.tolist()]

    def patch_map(self, box=None, view: int = 0) -> PatchMap:
        """Image nodes of the explanation set, scored by the target's attention to them (0 elsewhere).

        ``view`` 0: the first view's patch grid; 1: LLaVA-NeXT's high-resolution tokens painted over
        the image (nodes of the other view do not show).
        """
        image_pos = self.image_positions.long()
        scores = torch.zeros(image_pos.shape[0])
        for node, pos in enumerate(self.nodes.tolist()):
            if self.kinds[node] == "image" and pos in self.explanation.tolist():
                scores[image_pos == pos] = float(self.attention[node])
        if view == 0:
            grid = _to_grid(scores, self.image_rowcol, self.image_view, self.grid)
        else:
            grid = paint_view(scores, self.image_boxes, self.image_view, view, self.image_size)
        info = {**self.info, "layer": self.layer, "head": self.head, "view": view,
                "unit": "attention weight of the target to explanation-set patches"}
        if not bool((scores != 0).any()):  # say why, so the empty map is not read as data
            n_text = len(self.explanation_tokens())
            info["empty_reason"] = (f"the explanation set of head L{self.layer}H{self.head} holds no image patch "
                                    f"({n_text} text token{'s' if n_text != 1 else ''} only)")
        return PatchMap(grid, method="causal_explanation", image_size=self.image_size, image=self.image,
                        targets=list(self.targets), box=box if box is not None else self.box, info=info)

    def to_dataframe(self):
        import pandas as pd

        inside = self._in_explanation()
        return pd.DataFrame({"position": self.nodes.tolist(), "token": self.tokens, "kind": self.kinds,
                             "attention": self.attention.tolist(), "in_explanation": inside.tolist(),
                             "edge_to_target": self.adjacency[:, -1].tolist()})

    def topk(self, k: int = 10):
        """The ``k`` explanation nodes the target attends to most."""
        frame = self.to_dataframe()
        return frame[frame.in_explanation].nlargest(k, "attention").reset_index(drop=True)

    def plot(self, ax=None):
        """The graph in token order: nodes on a line, edges as arcs, explanation set highlighted."""
        from matplotlib.patches import Arc

        from ..plotting import new_axes

        n = int(self.nodes.numel())
        fig, ax = new_axes(ax, figsize=(max(4.0, 0.35 * n), 3))
        inside = self._in_explanation()
        colours = ["tab:red" if k == "target" else ("tab:green" if inside[i] else "lightgray")
                   for i, k in enumerate(self.kinds)]
        markers = {"image": "s", "text": "o", "target": "*"}
        for i in range(n):
            ax.scatter([i], [0], c=colours[i], marker=markers[self.kinds[i]], s=80, zorder=3)
        for i, j in self.adjacency.nonzero().tolist():
            width = j - i
            explained = bool(inside[i] or i == n - 1) and bool(inside[j] or j == n - 1)
            ax.add_patch(Arc(((i + j) / 2, 0), width, width * 0.6, theta1=0, theta2=180, lw=0.8,
                             color="tab:green" if explained else "gray"))
        ax.set_xticks(range(n), self.node_labels(), rotation=90, fontsize=6)
        ax.set_yticks([])
        ax.set_xlim(-1, n)
        ax.set_ylim(-0.5, max(1.0, 0.3 * n))
        from ..plotting import question_answer, tokens_label

        qa = question_answer(self.info, width=90)
        ax.set_title(f"causal graph over attention nodes of head L{self.layer}H{self.head}, answer token "
                     f"{tokens_label(self.targets)}\n(green: explanation set, red: target; square: image patch, "
                     f"circle: text)" + (f"\n{qa}" if qa else ""), fontsize=9)
        return fig, ax
