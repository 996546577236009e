"""Matplotlib helpers shared by the results' ``plot`` methods.

Each function takes ``ax=None`` (a new figure when None) and returns ``(fig, ax)``; nothing is
shown unless the caller shows it.
"""

from __future__ import annotations

import torch


def new_axes(ax=None, figsize=(4.5, 4)):
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def draw_box(ax, box, color="lime", label: str | None = "answer region"):
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=2,
                           label=label))


def overlay_heatmap(scores: torch.Tensor, image: torch.Tensor | None, image_size, *, ax=None, alpha=0.55,
                    cmap="jet", box=None, title="", colorbar=True):
    """Draw ``scores`` ``[rows, cols]`` stretched over the image (pixel coordinates)."""
    fig, ax = new_axes(ax)
    height, width = image_size
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    if image is not None:
        ax.imshow(torch.as_tensor(image).float().numpy(), extent=extent)
    shown = ax.imshow(scores.float().numpy(), cmap=cmap, alpha=alpha if image is not None else 1.0,
                      extent=extent, interpolation="nearest")
    if box is not None:
        draw_box(ax, box)
    if colorbar:
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig, ax


def heatmap(values: torch.Tensor, *, ax=None, xlabel="", ylabel="", title="", cmap="RdBu_r", center=True,
            xticklabels=None, yticklabels=None):
    """A labelled matrix heatmap (e.g. layer x head), symmetric colour scale when ``center``."""
    fig, ax = new_axes(ax, figsize=(5, 4))
    data = values.float().numpy()
    limit = float(abs(values).max()) or 1.0
    kwargs = {"vmin": -limit, "vmax": limit} if center else {}
    shown = ax.imshow(data, cmap=cmap, aspect="auto", **kwargs)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    rows, cols = data.shape
    # integer ticks: rows and columns are layers / heads, never fractions
    ax.set_xticks(range(cols), xticklabels if xticklabels is not None else range(cols),
                  rotation=90 if xticklabels is not None else 0, fontsize=7)
    ax.set_yticks(range(rows), yticklabels if yticklabels is not None else range(rows), fontsize=7)
    return fig, ax
