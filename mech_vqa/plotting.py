"""Matplotlib helpers shared by the results' ``plot`` methods.

Every function that draws takes ``ax=None`` (a new figure when None) and returns ``(fig, ax)``;
nothing is shown unless the caller shows it. Matplotlib is imported inside the functions so that
importing a result type stays cheap.

The one way a patch map is drawn (:func:`overlay_heatmap`): the image the model saw at full colour,
and over it the map in a perceptually uniform, colour-blind-safe colour map (reversed magma; a diverging
RdBu for signed maps) whose OPACITY follows the importance, so the image shows through wherever the
method claims nothing. A map with no positive importance (constant, all zero, or not finite) is
drawn as an explicit "no evidence" panel: the image, and a sentence saying why.
"""

from __future__ import annotations

import math
import re

import torch

# magma reversed: perceptually uniform and colour-blind safe, and its strong end is dark, so a claimed
# cell stands out over yellow, red or blue objects alike (viridis' bright yellow end vanishes on yellow)
SEQUENTIAL_CMAP = "magma_r"
DIVERGING_CMAP = "RdBu_r"  # ColorBrewer RdBu: readable under the common colour-vision deficiencies
MAX_ALPHA = 0.85  # the strongest cell still lets a little of the image through
# Okabe & Ito (2008) colour-blind-safe palette, for bars and lines
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")

# internal method names -> what a reader calls them
_METHOD_LABELS = {"mechanistic_head_positions": "mechanistic", "causal_explanation": "causal",
                  "relevancy_llm": "relevancy", "relevancy_vision": "relevancy"}
_DEFAULT_UNIT = "importance (method's own units)"


# ------------------------------------------------------------------------------ text pieces
def method_label(method: str) -> str:
    """The name a reader knows a method by (``relevancy_llm`` -> ``relevancy``)."""
    return _METHOD_LABELS.get(method, method)


def file_stem(name: str) -> str:
    """A filesystem-safe file name for a method key: ``igos+`` -> ``igos_plus``,
    ``igos++`` -> ``igos_plusplus``, any other character outside ``[A-Za-z0-9_.-]`` -> ``_``."""
    stem = re.sub(r"\++", lambda m: "_" + "plus" * len(m.group()), str(name))
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._")
    return stem or "map"


def tokens_label(targets) -> str:
    """``'yellow'`` or ``'dark' 'red'``: the explained tokens, quoted."""
    return " ".join(repr(t.get("token", "")) for t in targets or []) or "(no token)"


def heads_label(heads) -> str:
    """``[(2, 0)]`` -> ``head L2H0``; several -> ``heads L2H0+L1H3 (summed)``."""
    pairs = [tuple(int(v) for v in h) for h in heads or []]
    names = "+".join(f"L{layer}H{head}" for layer, head in pairs)
    return f"head {names}" if len(pairs) == 1 else f"heads {names} (summed)"


def _layers_label(layers) -> str:
    layers = [int(v) for v in layers]
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return ("layer " if len(layers) == 1 else "layers ") + ",".join(map(str, layers))


def components_label(method: str, info: dict) -> str:
    """Which heads / layers / stage a map was read from, from the map's ``info``."""
    info = info or {}
    per_token = info.get("components_per_token")
    if per_token and len(set(per_token)) > 1:  # a mean of several tokens' maps, each from its own components
        return "mean of tokens' maps: " + "; ".join(per_token)
    parts = []
    if "heads" in info and info["heads"] not in (None, "all") and isinstance(info["heads"], (list, tuple)) \
            and info["heads"] and isinstance(info["heads"][0], (list, tuple)):
        parts.append(heads_label(info["heads"]))
    elif "head" in info and "layer" in info:
        parts.append(f"head L{info['layer']}H{info['head']}")
    else:
        if "heads" in info:
            heads = info["heads"]
            reduction = info.get("head_reduce", "")
            parts.append(f"{reduction} over all heads".strip() if heads in (None, "all") else
                         f"heads {','.join(map(str, heads))}" + (f" ({reduction})" if reduction else ""))
        if "layers" in info and isinstance(info["layers"], (list, tuple)) and info["layers"]:
            reduction = info.get("layer_reduce", "")
            parts.append((f"{reduction} over " if reduction else "") + _layers_label(info["layers"]))
        elif "layer" in info:
            parts.append("projector output" if info["layer"] == "input" else f"after layer {info['layer']}")
    if "stage" in info:
        parts.append(f"{info['stage'].upper() if info['stage'] == 'llm' else info['stage']} stage")
    if info.get("variant") and info["variant"] != method:
        parts.append(f"{info['variant']} variant")
    return ", ".join(parts)


def question_answer(info: dict | None, width: int = 110) -> str:
    """``Q: ...   A: ...`` from a result's ``info`` (empty when neither is known), shortened to ``width``."""
    info = info or {}
    question, answer = info.get("question"), info.get("answer")
    text = "   ".join(part for part in (f"Q: {question}" if question else "", f"A: {answer}" if answer else "")
                      if part)
    return text if len(text) <= width else text[:width - 1] + "…"


def unit_of(info: dict | None) -> str:
    return (info or {}).get("unit") or _DEFAULT_UNIT


# ------------------------------------------------------------------------------- drawing
def new_axes(ax=None, figsize=(4.5, 4)):
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def draw_box(ax, box, label: str | None = "answer region"):
    """The ground-truth box, black under white dashes: visible on any image and colour map."""
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    for colour, style, width, name in (("black", "-", 3.0, label), ("white", "--", 1.5, None)):
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                               linestyle=style, linewidth=width, label=name))


def _extent(image_size):
    height, width = image_size
    return (-0.5, width - 0.5, height - 0.5, -0.5)


def show_image(image, image_size, *, ax=None, box=None, title="image (as the model saw it)"):
    """The image as it is (no overlay), with the box; a grey square when no image was kept."""
    fig, ax = new_axes(ax)
    if image is not None:
        ax.imshow(torch.as_tensor(image).float().clamp(0, 1).numpy(), extent=_extent(image_size))
    else:
        ax.imshow([[0.85]], cmap="gray", vmin=0, vmax=1, extent=_extent(image_size))
        ax.text(0.5, 0.5, "no image stored", transform=ax.transAxes, ha="center", va="center", fontsize=8)
    if box is not None:
        draw_box(ax, box)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig, ax


def no_evidence_reason(scores: torch.Tensor, signed: bool = False) -> str | None:
    """Why a map claims nothing (None when it does): not finite, constant, or nothing positive."""
    values = scores.detach().float()
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return "the map holds no finite value"
    if finite.numel() < values.numel():
        return f"{values.numel() - finite.numel()} of {values.numel()} cells are not finite"
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        return f"the map is constant (every cell = {high:.3g})"
    if not signed and high <= 0:
        return f"no cell has positive importance (max {high:.3g})"
    return None


def importance_rgba(scores: torch.Tensor, *, signed: bool = False, cmap: str | None = None,
                    max_alpha: float = MAX_ALPHA, vmax: float | None = None):
    """``(rgba [rows, cols, 4] numpy, norm, cmap)``: colour and opacity of every cell.

    Unsigned maps: colour = ``cmap(s / max(s))`` over ``[0, max]``, opacity ``max_alpha * max(s, 0) / max(s)``
    -- zero and negative cells are fully transparent. Signed maps: a diverging map centred on 0 over
    ``[-m, m]`` (``m = max |s|``), opacity ``max_alpha * |s| / m``. ``vmax`` replaces ``max(s)`` /
    ``m`` (one scale shared by several panels).
    """
    import matplotlib
    from matplotlib.colors import Normalize

    values = scores.detach().float().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    colour_map = matplotlib.colormaps[cmap or (DIVERGING_CMAP if signed else SEQUENTIAL_CMAP)]
    if signed:
        limit = vmax or float(values.abs().max()) or 1.0
        norm = Normalize(-limit, limit)
        weight = values.abs() / limit
    else:
        limit = vmax or float(values.clamp(min=0).max()) or 1.0
        norm = Normalize(0.0, limit)
        weight = values.clamp(min=0) / limit
    rgba = colour_map(norm(values.numpy()))
    rgba[..., 3] = max_alpha * weight.clamp(0, 1).numpy()
    return rgba, norm, colour_map


def add_colorbar(fig, ax, norm, cmap, label: str):
    from matplotlib.cm import ScalarMappable

    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.046, pad=0.03)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar


def shared_colorbar(fig, axes, vmax: float, label: str, *, signed: bool = False, cmap: str | None = None):
    """One colour bar for several panels drawn with the same ``vmax`` (space taken from all of them)."""
    from matplotlib.cm import ScalarMappable

    _, norm, colour_map = importance_rgba(torch.zeros(1, 1), signed=signed, cmap=cmap, vmax=vmax or 1.0)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=colour_map), ax=list(axes), fraction=0.025, pad=0.02)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar


def overlay_heatmap(scores: torch.Tensor, image: torch.Tensor | None, image_size, *, ax=None, cmap=None,
                    signed: bool | None = None, max_alpha: float = MAX_ALPHA, box=None, title="",
                    colorbar=True, unit: str = _DEFAULT_UNIT, empty_reason: str | None = None,
                    vmax: float | None = None):
    """Draw ``scores`` ``[rows, cols]`` over the image (pixel coordinates) with importance-driven opacity.

    ``signed`` (default: the map has a negative cell) picks the diverging colour map. When the map
    claims nothing (see :func:`no_evidence_reason`) the image is drawn with a "no evidence" note
    instead (``empty_reason``, when the method knows why, is said first). The overlay is the last
    image of ``ax`` (``ax.images[-1].get_array()`` is its RGBA). ``vmax``: the top of the colour
    scale (default the map's maximum), to share one scale between panels.
    """
    fig, ax = new_axes(ax)
    signed = bool(float(scores.float().nan_to_num(0.0).min()) < 0) if signed is None else signed
    extent = _extent(image_size)
    show_image(image, image_size, ax=ax, box=None, title=title)
    reason = no_evidence_reason(scores, signed)
    if reason is not None or empty_reason:
        why = empty_reason or reason
        ax.text(0.5, 0.5, "no evidence\n" + _wrap(why, 34), transform=ax.transAxes, ha="center", va="center",
                fontsize=8, bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.5"})
        if colorbar:  # an empty bar keeps the panel the size of its neighbours
            add_colorbar(fig, ax, *importance_rgba(torch.zeros(1, 1))[1:], label="").ax.set_visible(False)
    else:
        rgba, norm, colour_map = importance_rgba(scores, signed=signed, cmap=cmap, max_alpha=max_alpha, vmax=vmax)
        ax.imshow(rgba, extent=extent, interpolation="nearest")
        if colorbar:
            add_colorbar(fig, ax, norm, colour_map, unit)
    if box is not None:
        draw_box(ax, box)
    return fig, ax


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def heatmap(values: torch.Tensor, *, ax=None, xlabel="", ylabel="", title="", cmap=None, center=True,
            xticklabels=None, yticklabels=None, cbar_label: str = "", annotate: bool | None = None,
            highlight=None, limits: tuple[float, float] | None = None):
    """A labelled matrix heatmap (e.g. layer x head).

    ``center``: a diverging colour map symmetric about 0 (signed values); else the sequential map
    from the minimum. ``annotate`` writes each value in its cell (default: small matrices); ``highlight``
    outlines the cells ``[(row, col), ...]``; ``limits`` fixes the colour scale (e.g. ``(0, 1)`` for
    shares). NaN cells (not computed) are left blank.
    """
    fig, ax = new_axes(ax, figsize=(5, 4))
    data = values.float().numpy()
    finite = values[torch.isfinite(values)].float()
    limit = float(finite.abs().max()) if finite.numel() else 1.0
    limit = limit or 1.0
    kwargs = {"vmin": -limit, "vmax": limit} if center else {}
    if limits is not None:
        kwargs = {"vmin": limits[0], "vmax": limits[1]}
    shown = ax.imshow(data, cmap=cmap or (DIVERGING_CMAP if center else SEQUENTIAL_CMAP), aspect="auto", **kwargs)
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(cbar_label, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    rows, cols = data.shape
    # integer ticks: rows and columns are layers / heads, never fractions
    ax.set_xticks(range(cols), xticklabels if xticklabels is not None else range(cols),
                  rotation=90 if xticklabels is not None and cols > 12 else 0, fontsize=7)
    ax.set_yticks(range(rows), yticklabels if yticklabels is not None else range(rows), fontsize=7)
    if annotate is None:
        annotate = rows * cols <= 144
    if annotate:
        for r in range(rows):
            for c in range(cols):
                value = data[r, c]
                if math.isfinite(value):
                    strong = abs(value) > 0.6 * limit if center else (value - shown.norm.vmin) > 0.5 * (
                        shown.norm.vmax - shown.norm.vmin)  # the dark end of both maps
                    text = f"{value:.2g}" if abs(value) >= 0.01 or value == 0 else "≈0"
                    ax.text(c, r, text, ha="center", va="center", fontsize=7,
                            color="white" if strong else "black")
    for r, c in highlight or []:
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.5))
    return fig, ax
