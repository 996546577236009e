"""Results of the mechanistic attributions (Yu & Ananiadou 2024) and of the logit lens.

* :class:`LayerIncrease`  -- log-prob increase of each attention and MLP block, ``[n_layers]`` each.
* :class:`HeadIncrease`   -- log-prob increase of every head, ``[n_layers, n_heads]``.
* :class:`HeadPositions`  -- position-level increase of chosen heads, ``[n_chosen, seq]``, and its
  image part on the patch grid; :meth:`HeadPositions.patch_map` gives the :class:`PatchMap`.
* :class:`NeuronIncrease` -- log-prob increase of MLP neurons, ``[n_layers_done, d_mlp]``.
* :class:`LogitLens`      -- top tokens of every image patch at every layer.
* :class:`Explanation`    -- the bundle ``explain`` returns.

All scores are float32 differences of natural-log probabilities of ``target`` (a
``Target.to_dict()``) at its predicting position.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..adapters.base import paint_boxes, paint_view
from ..plotting import PALETTE, SEQUENTIAL_CMAP, heatmap, new_axes, question_answer
from .base import Result, load_bundle, save_bundle, tensor_topk
from .patch_map import PatchMap


@dataclasses.dataclass(kw_only=True)
class TargetResult(Result):
    """Metadata shared by every attribution: the model, the prompt and the explained token."""

    model: str = ""
    prompt: str = ""
    target: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)

    def _title(self, what: str) -> str:
        """``what`` for the explained token, where it is predicted, and the question and answer."""
        token = self.target.get("token", "")
        title = f"{what} for answer token {token!r} (predicted at sequence position {self.target.get('position', '?')})"
        qa = question_answer(self.info, width=120)
        return title + (f"\n{qa}" if qa else "")

    @property
    def _unit(self) -> str:
        return f"increase of log p({self.target.get('token', '')!r}) (nats)"


@dataclasses.dataclass
class LayerIncrease(TargetResult):
    """``attention[l] = lp(x_l + a_l) - lp(x_l)``, ``mlp[l] = lp(x_l + a_l + m_l) - lp(x_l + a_l)``.

    ``base[l] = lp(x_l)`` (x_l = residual entering layer l); ``final_logprob`` is ``lp`` of the last
    layer's output (equal to the model's ``model_logprob`` by construction of the frozen norm).
    """

    attention: torch.Tensor
    mlp: torch.Tensor
    base: torch.Tensor
    final_logprob: float = 0.0
    model_logprob: float = 0.0

    def to_dataframe(self):
        import pandas as pd

        n = self.attention.numel()
        return pd.DataFrame({"layer": list(range(n)) * 2, "block": ["attention"] * n + ["mlp"] * n,
                             "increase": torch.cat([self.attention, self.mlp]).tolist()})

    def topk(self, k: int = 10):
        return self.to_dataframe().nlargest(k, "increase").reset_index(drop=True)

    def plot(self, ax=None):
        """Side-by-side bars per layer: attention vs MLP increase."""
        n = self.attention.numel()
        fig, ax = new_axes(ax, figsize=(max(6.0, 0.35 * n + 3), 3.4))
        layers = torch.arange(n).float()
        ax.bar(layers - 0.2, self.attention.float().numpy(), width=0.4, label="attention block", color=PALETTE[0])
        ax.bar(layers + 0.2, self.mlp.float().numpy(), width=0.4, label="MLP block", color=PALETTE[1])
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(self._unit, fontsize=8)
        step = max(1, n // 16)
        ax.set_xticks(layers[::step].tolist(), [str(i) for i in range(0, n, step)])
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  title=f"final log p = {self.final_logprob:.3g}\n(p = {math.exp(self.final_logprob):.2f})",
                  title_fontsize=7)
        ax.set_title(self._title("layer attribution"), fontsize=9)
        return fig, ax


@dataclasses.dataclass
class HeadIncrease(TargetResult):
    """``scores[l, j] = lp(x_l + z_lj[t] @ W_O[j]) - lp(x_l)``, ``[n_layers, n_heads]``."""

    scores: torch.Tensor

    def top_heads(self, k: int = 1) -> list[tuple[int, int]]:
        """The ``k`` heads with the largest increase, as ``(layer, head)``."""
        _, index = tensor_topk(self.scores, k)
        return [(int(layer), int(head)) for layer, head in index]

    def to_dataframe(self):
        import pandas as pd

        n_layers, n_heads = self.scores.shape
        return pd.DataFrame({"layer": torch.arange(n_layers).repeat_interleave(n_heads).tolist(),
                             "head": torch.arange(n_heads).repeat(n_layers).tolist(),
                             "increase": self.scores.flatten().tolist()})

    def topk(self, k: int = 10):
        return self.to_dataframe().nlargest(k, "increase").reset_index(drop=True)

    def plot(self, ax=None):
        """Layer x head heatmap of the increase (diverging scale centred on 0), the top head outlined."""
        top = self.top_heads(1)
        n_layers, n_heads = self.scores.shape
        if ax is None:
            ax = new_axes(None, figsize=(min(14.0, max(7.0, 0.45 * n_heads + 2.5)),
                                         min(12.0, max(3.5, 0.3 * n_layers + 1.5))))[1]
        title = self._title(f"head attribution (top head L{top[0][0]}H{top[0][1]} outlined)")
        return heatmap(self.scores, ax=ax, xlabel="head", ylabel="decoder layer", title=title,
                       cbar_label=self._unit, highlight=top)


@dataclasses.dataclass
class HeadPositions(TargetResult):
    """Position-level increase of chosen heads.

    ``scores[i, p] = lp(x_l + A_lj[t, p] * v_lj[p] @ W_O[j]) - lp(x_l)`` for head ``heads[i] = (l, j)``
    and every source position ``p`` of the sequence (``[n_chosen, seq]``); ``image_scores`` is the
    image part laid on the patch grid (``[n_chosen, rows, cols]``). ``attention`` holds ``A_lj[t, :]``.
    """

    scores: torch.Tensor
    image_scores: torch.Tensor
    attention: torch.Tensor
    heads: list = dataclasses.field(default_factory=list)
    str_tokens: list = dataclasses.field(default_factory=list)
    image_positions: list = dataclasses.field(default_factory=list)
    image_size: list = dataclasses.field(default_factory=list)
    image: torch.Tensor | None = None
    image_boxes: torch.Tensor | None = None
    image_view: torch.Tensor | None = None

    def patch_map(self, box=None, view: int = 0) -> PatchMap:
        """The image heatmap: the SUM of the chosen heads' position-level increases per patch.

        Summing keeps the map in log-prob units; each head's term is its own direct effect on ``lp``
        through the frozen norm (not additive in ``lp`` across heads, which is not linear).
        ``view``: 0 = the first view's patch grid; a later view (LLaVA-NeXT's tiles, 1) is painted
        over the same image at its pixel resolution (:func:`~mech_vqa.adapters.base.paint_boxes`).
        """
        token = self.target.get("token", "")
        info = {**self.info, "heads": self.heads, "model": self.model, "prompt": self.prompt, "view": view,
                "unit": f"increase of log p({token!r}) (nats)"}
        if view == 0:
            scores = self.image_scores.sum(0)
        else:
            scores = paint_view(self.scores[:, self.image_positions].sum(0), self.image_boxes, self.image_view,
                                view, self.image_size)
        return PatchMap(scores=scores, method="mechanistic_head_positions", image_size=self.image_size,
                        image=self.image, targets=[self.target], box=box, info=info)

    def to_dataframe(self):
        import pandas as pd

        n_heads, seq = self.scores.shape
        image = set(self.image_positions)
        return pd.DataFrame({
            "layer": [h[0] for h in self.heads for _ in range(seq)],
            "head": [h[1] for h in self.heads for _ in range(seq)],
            "position": list(range(seq)) * n_heads,
            "token": (self.str_tokens or [""] * seq) * n_heads,
            "is_image": [p in image for p in range(seq)] * n_heads,
            "attention": self.attention.flatten().tolist(),
            "increase": self.scores.flatten().tolist(),
        })

    def topk(self, k: int = 10):
        return self.to_dataframe().nlargest(k, "increase").reset_index(drop=True)

    def plot(self, ax=None):
        """Increase over source positions, one line per head, image span shaded."""
        fig, ax = new_axes(ax, figsize=(7, 3))
        if self.image_positions:
            ax.axvspan(min(self.image_positions) - 0.5, max(self.image_positions) + 0.5, color="0.9",
                       label="image tokens")
        for index, ((layer, head), row) in enumerate(zip(self.heads, self.scores)):
            ax.plot(row.float().numpy(), label=f"head L{layer}H{head}", linewidth=1,
                    color=PALETTE[index % len(PALETTE)])
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel("source position in the sequence")
        ax.set_ylabel(self._unit, fontsize=8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_title(self._title("position attribution"), fontsize=9)
        return fig, ax


@dataclasses.dataclass
class NeuronIncrease(TargetResult):
    """``scores[i, k] = lp(x_l + a_l + c_k W_down[:, k]) - lp(x_l + a_l)`` for ``l = layers[i]``.

    ``coefficients`` ``[n, d_mlp]`` are the ``c_k`` (input of down_proj at t). ``top_neurons``
    ``[n, k]`` are each layer's best neurons and ``promoted[i][r]`` the vocabulary tokens that neuron
    ``top_neurons[i, r]``'s contribution ``c_k W_down[:, k]`` raises most (top of ``W_U (gamma * c_k w_k)``).
    """

    scores: torch.Tensor
    coefficients: torch.Tensor
    top_neurons: torch.Tensor
    layers: list = dataclasses.field(default_factory=list)
    promoted: list = dataclasses.field(default_factory=list)

    def to_dataframe(self):
        """One row per top neuron of each layer (the full score matrix is ``self.scores``)."""
        import pandas as pd

        rows = []
        for i, layer in enumerate(self.layers):
            for rank, neuron in enumerate(self.top_neurons[i].tolist()):
                rows.append({"layer": layer, "neuron": neuron, "rank": rank + 1,
                             "increase": float(self.scores[i, neuron]),
                             "coefficient": float(self.coefficients[i, neuron]),
                             "promotes": " ".join(self.promoted[i][rank]) if self.promoted else ""})
        return pd.DataFrame(rows)

    def topk(self, k: int = 10):
        return self.to_dataframe().nlargest(k, "increase").reset_index(drop=True)

    def plot(self, ax=None, k: int = 15):
        """Horizontal bars of the ``k`` best neurons, labelled with the tokens they promote."""
        fig, ax = new_axes(ax, figsize=(6, 0.3 * k + 1))
        top = self.topk(k).iloc[::-1]
        labels = [f"L{r.layer}.N{r.neuron} ({r.promotes[:30]})" for r in top.itertuples()]
        ax.barh(range(len(top)), top["increase"].tolist(), color=PALETTE[0])
        ax.set_yticks(range(len(top)), labels, fontsize=7)
        ax.set_xlabel(self._unit)
        ax.set_title(self._title("neuron attribution"), fontsize=9)
        return fig, ax


@dataclasses.dataclass
class LogitLens(Result):
    """Image-position residuals read through the final norm (per position) and the unembedding.

    Stage ``0`` is the projector output (the input of layer 0), stage ``i + 1`` the output of
    decoder layer ``i``. ``top_ids``/``top_probs`` ``[stages, n_patches, k]``; ``word_probs``
    ``[stages, n_patches]`` is the probability of ``word`` (None when no word was asked). Patches
    are in grid order; ``rowcol`` ``[n_patches, 2]`` places them on the ``grid``. ``view``: which
    image view the patches belong to; a later view's map is painted from the patches' ``boxes``.
    """

    top_ids: torch.Tensor
    top_probs: torch.Tensor
    rowcol: torch.Tensor
    word_probs: torch.Tensor | None = None
    top_tokens: list = dataclasses.field(default_factory=list)
    word: str | None = None
    word_id: int | None = None
    grid: list = dataclasses.field(default_factory=list)
    image_size: list = dataclasses.field(default_factory=list)
    image: torch.Tensor | None = None
    model: str = ""
    prompt: str = ""
    info: dict = dataclasses.field(default_factory=dict)
    view: int = 0
    boxes: torch.Tensor | None = None

    def __repr__(self) -> str:
        stages, patches, k = self.top_ids.shape
        word = ""
        if self.word_probs is not None:
            best = int(self.word_probs.max(dim=1).values.argmax())
            where = "input" if best == 0 else f"layer {best - 1}"
            word = (f", word={self.word!r}: max p={float(self.word_probs.max()):.3g} at {where}")
        return (f"LogitLens(model={self.model!r}, layers={stages - 1} + input, {patches} image tokens "
                f"(grid {'x'.join(map(str, self.grid))}, view {self.view}), top-{k} words each{word})")

    @property
    def n_layers(self) -> int:
        return self.top_ids.shape[0] - 1

    def stage(self, layer) -> int:
        """Row of the stage tensors for ``layer``: ``"input"`` (projector output) or a layer index."""
        if layer == "input":
            return 0
        if not -self.n_layers <= layer < self.n_layers:
            raise IndexError(f"layer {layer} is out of range: the lens has layers 0..{self.n_layers - 1} and 'input'")
        return layer % self.n_layers + 1

    def _grid(self, values: torch.Tensor) -> torch.Tensor:
        if self.view != 0:  # a later view's tokens (LLaVA-NeXT's tiles): painted over the image
            return paint_boxes(values, self.boxes, self.image_size)
        out = values.new_zeros(tuple(self.grid))
        out[self.rowcol[:, 0], self.rowcol[:, 1]] = values
        return out

    def patch_map(self, layer=-1) -> PatchMap:
        """Probability of ``word`` at every patch after ``layer`` as a :class:`PatchMap`."""
        if self.word_probs is None:
            raise ValueError("this lens was run without a word; call logit_lens(..., word='red')")
        return PatchMap(scores=self._grid(self.word_probs[self.stage(layer)]), method="logit_lens",
                        image_size=self.image_size, image=self.image,
                        targets=[{"token_id": self.word_id, "position": -1, "token": self.word}],
                        info={**{key: self.info[key] for key in ("question", "answer") if key in self.info},
                              "layer": layer, "model": self.model, "prompt": self.prompt,
                              "unit": f"probability of {self.word!r}"})

    def to_dataframe(self):
        import pandas as pd

        stages, n, k = self.top_ids.shape
        rows = []
        for s in range(stages):
            for i in range(n):
                for rank in range(k):
                    rows.append({
                        "layer": "input" if s == 0 else s - 1, "row": int(self.rowcol[i, 0]),
                        "col": int(self.rowcol[i, 1]), "rank": rank + 1, "token_id": int(self.top_ids[s, i, rank]),
                        "token": self.top_tokens[s][i][rank] if self.top_tokens else "",
                        "prob": float(self.top_probs[s, i, rank]),
                        "word_prob": float(self.word_probs[s, i]) if self.word_probs is not None else None,
                    })
        return pd.DataFrame(rows)

    def topk(self, k: int = 10):
        """The ``k`` (layer, patch) cells whose top-1 token is most probable."""
        frame = self.to_dataframe()
        return frame[frame["rank"] == 1].nlargest(k, "prob").reset_index(drop=True)

    def _stage_name(self, stage: int) -> str:
        return "projector output" if stage == 0 else f"after layer {stage - 1}"

    def _centres(self) -> torch.Tensor:
        """``[n_patches, 2]`` (x, y) pixel centre of every patch, for writing its word."""
        if self.boxes is not None:
            boxes = self.boxes.float()
            return torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2 - 0.5, (boxes[:, 1] + boxes[:, 3]) / 2 - 0.5], 1)
        (rows, cols), (height, width) = self.grid, self.image_size
        rowcol = self.rowcol.float()
        return torch.stack([(rowcol[:, 1] + 0.5) * width / cols - 0.5, (rowcol[:, 0] + 0.5) * height / rows - 0.5], 1)

    def _words(self, stage: int, width: int = 8) -> list[str]:
        """Each patch's top-1 token, whitespace made visible and cut to ``width`` characters."""
        words = []
        for i in range(self.top_ids.shape[1]):
            word = self.top_tokens[stage][i][0] if self.top_tokens else str(int(self.top_ids[stage, i, 0]))
            word = word.replace("\n", "\\n").replace("▁", " ").replace("Ġ", " ").strip() or "·"  # "·": a space
            words.append(word if len(word) <= width else word[:width - 1] + "…")
        return words

    def _draw_words(self, ax, stage: int, fontsize: float | None):
        """The image, the top-1 probability as a backdrop (opacity = probability) and each patch's word."""
        import matplotlib
        import matplotlib.patheffects as effects

        from ..plotting import add_colorbar, show_image

        fig = ax.figure
        show_image(self.image, self.image_size, ax=ax, title="")
        probs = self._grid(self.top_probs[stage, :, 0].float()).clamp(0, 1)
        colour_map = matplotlib.colormaps[SEQUENTIAL_CMAP]
        rgba = colour_map(probs.numpy())
        rgba[..., 3] = 0.45 * probs.numpy()  # keeps the words and the image readable at p = 1
        height, width = self.image_size
        ax.imshow(rgba, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")
        from matplotlib.colors import Normalize

        add_colorbar(fig, ax, Normalize(0, 1), colour_map, "probability of the top-1 word (backdrop)")
        lengths = sorted(len(w) for w in self._words(stage, width=99))
        fit = max(4, min(8, lengths[int(0.9 * (len(lengths) - 1))]))  # 9 in 10 words whole, longer ones cut
        words = self._words(stage, width=fit)
        if fontsize is None:  # a word of ``fit`` characters fills about one cell's width
            box = ax.get_position()
            side = min(box.width * fig.get_figwidth(), box.height * fig.get_figheight())  # the image is square-ish
            cell_points = side * 72 / max(self.grid[1], 1)
            fontsize = max(3.5, min(11.0, cell_points / (0.62 * fit)))
        for (x, y), word in zip(self._centres().tolist(), words):
            ax.text(x, y, word, ha="center", va="center", fontsize=fontsize, color="black",
                    path_effects=[effects.withStroke(linewidth=2, foreground="white")])

    def _strip_stages(self, chosen: int, max_panels: int) -> list[int]:
        stages = self.top_ids.shape[0]
        if stages <= max_panels:
            return list(range(stages))
        picked = {round(i * (stages - 1) / (max_panels - 2)) for i in range(max_panels - 1)} | {chosen}
        return sorted(picked)

    def plot(self, ax=None, layer=-1, fontsize: float | None = None, strip: bool = True, max_strip: int = 12):
        """Each patch's top-1 token after ``layer`` written on the image, the token's probability as
        a backdrop; returns ``(fig, ax)`` (``ax``: the word panel).

        With ``ax=None`` and ``strip``, a strip of small maps below shows every stage (at most
        ``max_strip``, evenly spaced): the probability of ``word`` (or of each patch's top-1 token
        when no word was asked) per patch, with the stage's most frequent top-1 token; the chosen
        layer is framed.
        """
        stage = self.stage(layer)
        stages = self._strip_stages(stage, max_strip) if strip and ax is None else []
        if ax is None:
            import matplotlib.pyplot as plt

            side = min(12.0, max(7.0, 0.5 * self.grid[1]))
            strip_height = side / max(len(stages), 6) * 1.45 if stages else 0.0
            fig = plt.figure(figsize=(side + 1.2, side + strip_height + 0.7))
            grid = fig.add_gridspec(2 if stages else 1, max(len(stages), 1), top=0.93, bottom=0.04, left=0.06,
                                    right=0.98, height_ratios=[side, strip_height] if stages else [1], hspace=0.15)
            ax = fig.add_subplot(grid[0, :])
            strip_axes = [fig.add_subplot(grid[1, i]) for i in range(len(stages))]
        else:
            fig, strip_axes = ax.figure, []
        self._draw_words(ax, stage, fontsize)
        last = " (the last)" if stage == self.n_layers else ""
        ax.set_title(f"logit lens {self._stage_name(stage)}{last}: top-1 token of each image patch", fontsize=10)
        if strip_axes:
            self._draw_strip(strip_axes, stages, stage)
            qa = question_answer(self.info)
            if qa:
                fig.suptitle(qa, fontsize=9)
        return fig, ax

    def _draw_strip(self, axes, stages: list[int], chosen: int):
        from collections import Counter

        import matplotlib

        from ..plotting import show_image

        values = self.word_probs if self.word_probs is not None else self.top_probs[..., 0]
        colour_map = matplotlib.colormaps[SEQUENTIAL_CMAP]
        height, width = self.image_size
        for axis, stage in zip(axes, stages):
            show_image(self.image, self.image_size, ax=axis, title="")
            probs = self._grid(values[stage].float()).clamp(0, 1).numpy()
            rgba = colour_map(probs)
            rgba[..., 3] = 0.85 * probs
            axis.imshow(rgba, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")
            common, count = Counter(self._words(stage, width=7)).most_common(1)[0]
            name = "input" if stage == 0 else f"L{stage - 1}"
            axis.set_title(f"{name}\n{common!r} ×{count}", fontsize=7)
            if stage == chosen:
                for spine in axis.spines.values():
                    spine.set_linewidth(2.5)
                    spine.set_edgecolor(PALETTE[5])
        what = f"p({self.word!r})" if self.word_probs is not None else "p(top-1)"
        axes[0].set_ylabel(f"{what} per stage\n(opacity = p)", fontsize=7)
        axes[len(axes) // 2].set_xlabel("each stage's most frequent top-1 token (×patches); framed: the stage "
                                        "shown above", fontsize=7)


_PARTS = ("layers", "heads", "positions", "patch_map", "neurons")


@dataclasses.dataclass
class Explanation(Result):
    """What ``explain`` returns for one target: every level of the mechanistic attribution.

    ``layers``, ``heads``, ``positions`` (the chosen heads), ``patch_map`` (their summed image map),
    ``neurons`` (None unless asked). Saved as one manifest ``<path>.json`` plus one file pair per part
    (``<path>.<part>.json/.safetensors``); load with :meth:`Explanation.load`.
    """

    layers: LayerIncrease
    heads: HeadIncrease
    positions: HeadPositions
    patch_map: PatchMap
    neurons: NeuronIncrease | None = None

    @property
    def target(self) -> dict:
        return self.heads.target

    def save(self, path) -> Path:
        return save_bundle(path, "Explanation", {name: getattr(self, name) for name in _PARTS})

    @classmethod
    def load(cls, path) -> Explanation:
        parts, _ = load_bundle(path, "Explanation")
        return cls(**parts)

    def to_dataframe(self):
        """Every block, head and (when computed) top neuron, with its increase, in one table."""
        import pandas as pd

        layers = self.layers.to_dataframe().assign(component=lambda f: f["block"])
        heads = self.heads.to_dataframe().assign(component="head")
        frames = [layers.drop(columns="block"), heads]
        if self.neurons is not None:
            frames.append(self.neurons.to_dataframe()[["layer", "neuron", "increase"]].assign(component="neuron"))
        return pd.concat(frames, ignore_index=True)

    def topk(self, k: int = 10):
        return self.to_dataframe().nlargest(k, "increase").reset_index(drop=True)

    def plot(self, ax=None):
        """Four panels: layer bars, layer x head heatmap, position curve, patch map. ``ax``: 4 axes or None."""
        if ax is None:
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(2, 2, figsize=(12, 8))
        axes = list(getattr(ax, "flat", ax))
        if len(axes) != 4:
            raise ValueError(f"Explanation.plot needs 4 axes, got {len(axes)}")
        self.layers.plot(ax=axes[0])
        self.heads.plot(ax=axes[1])
        self.positions.plot(ax=axes[2])
        self.patch_map.plot(ax=axes[3])
        top = self.heads.top_heads(1)[0]
        # the token and the question once, above all four panels
        for axis, title in zip(axes, ("layer attribution", f"head attribution (top head L{top[0]}H{top[1]} outlined)",
                                      "position attribution of the map's heads")):
            axis.set_title(title, fontsize=9)
        fig = axes[0].figure
        headline = self.heads._title("mechanistic attribution")
        fig.suptitle(headline, fontsize=10)
        fig.tight_layout()
        return fig, ax

    def __repr__(self) -> str:
        top = self.heads.top_heads(1)[0]
        return (f"Explanation(target={self.target.get('token')!r}@{self.target.get('position')}, "
                f"top head=L{top[0]}H{top[1]}, map heads={self.positions.heads})")
