"""The iGOS+ / iGOS++ optimisation itself, torch-only (see :mod:`mech_vqa.methods.igos` for the maths).

Imports nothing but torch and the standard library: the nnsight backend ships this module by value
(``nnsight.register``) so that the whole loop runs inside one nnsight session next to the model, on a
server where mech_vqa is not installed; the hooks backend runs the same code in this process. Either
way :class:`MaskOptimiser` holds the state, and each interpolation chunk is scored by the caller:
``composite(chunk)`` -> the caller's forward scores ``s`` -> ``backward(chunk, s)``; ``step`` applies
the regulariser and the Nesterov update once per iteration.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- regulariser
def upsample(mask: torch.Tensor, size) -> torch.Tensor:
    """``U(m)``: ``[..., h, w]`` -> ``[..., H, W]`` bilinear, ``align_corners=False``."""
    lead = mask.shape[:-2]
    up = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]), size=tuple(size), mode="bilinear", align_corners=False)
    return up.reshape(*lead, *up.shape[-2:])


def edge_weights(image: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(-(mean_c dI)^2 / sigma)`` for vertical ``[H-1, W]`` and horizontal ``[H, W-1]`` neighbours."""
    first = image.detach().float().reshape(-1, *image.shape[-3:])[0]          # [C, H, W], first view
    dy = (first[:, 1:] - first[:, :-1]).mean(0)
    dx = (first[:, :, 1:] - first[:, :, :-1]).mean(0)
    return torch.exp(-dy ** 2 / sigma), torch.exp(-dx ** 2 / sigma)


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean() if x.numel() else x.new_zeros(())  # a 1-cell side has no neighbours


def bilateral_tv(mask: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``BTV(m)``: half the squared TV of the mask plus the edge-weighted squared TV of ``U(m)``."""
    w_y, w_x = weights
    up = upsample(mask, (w_x.shape[0], w_y.shape[1]))
    tv = _mean((mask[1:] - mask[:-1]) ** 2) + _mean((mask[:, 1:] - mask[:, :-1]) ** 2)
    btv = _mean(w_y * (up[1:] - up[:-1]) ** 2) + _mean(w_x * (up[:, 1:] - up[:, :-1]) ** 2)
    return 0.5 * (tv + btv)


def regulariser(mask: torch.Tensor, weights, config, iteration: int) -> dict[str, torch.Tensor]:
    """The three terms of ``R`` (L2 with its graduated decay ``exp(-gamma i)``)."""
    return {"l1": config.l1 * (1 - mask).mean(),   # m is in [0, 1]: |1 - m| = 1 - m, with a gradient at m = 1
            "tv": config.l3 * bilateral_tv(mask, weights),
            "l2": config.l2 * math.exp(-config.gamma * iteration) * ((1 - mask) ** 2).sum()}


# --------------------------------------------------------------------------- optimiser
@dataclasses.dataclass(frozen=True)
class _Term:
    """One integrated term: which masks multiply, deletion or insertion, and its sign/weight."""

    masks: tuple[int, ...]
    deletion: bool
    weight: float
    name: str


def _terms(two_masks: bool) -> list[_Term]:
    if not two_masks:
        return [_Term((0,), True, 1.0, "deletion"), _Term((0,), False, -1.0, "insertion")]
    # iGOS++: the four IG terms, averaged in pairs (the authors' total_grads /= 2)
    return [_Term((0, 1), True, 0.5, "deletion_combined"), _Term((0, 1), False, -0.5, "insertion_combined"),
            _Term((0,), True, 0.5, "deletion"), _Term((1,), False, -0.5, "insertion")]


class MaskOptimiser:
    """The state of one iGOS+ / iGOS++ run: the masks (leaves with gradients), the interpolation points,
    the noise generator, the Nesterov memory and the history (see :func:`mech_vqa.methods.igos.optimise_mask`).

    ``config`` needs the :class:`~mech_vqa.methods.igos.IGOSConfig` fields as attributes; ``to_pixels(masks
    [k, h, w], pixel_shape)`` lays masks over the pixels (broadcasting against ``[k, *pixel_shape]``).
    """

    def __init__(self, image: torch.Tensor, baseline: torch.Tensor, config, seed: int, to_pixels,
                 one_point_per_forward: bool = False):
        device = image.device
        self.config, self.to_pixels = config, to_pixels
        self.image, self.baseline = image.detach().float(), baseline.detach().float().to(device)
        self.weights = edge_weights(self.image, config.bilateral_sigma)
        self.masks = [torch.ones(tuple(config.mask_size), device=device, requires_grad=True)
                      for _ in range(2 if config.two_masks else 1)]
        self.terms = _terms(config.two_masks)
        n = config.n_steps
        alphas = torch.arange(1, n + 1, device=device, dtype=torch.float32) / n                 # k / N
        self.point_term = torch.arange(len(self.terms)).repeat_interleave(n)                    # [P]
        self.point_alpha = alphas.repeat(len(self.terms))                                       # [P]
        self.is_deletion = torch.tensor([self.terms[int(t)].deletion for t in self.point_term], device=device)
        self.point_weight = torch.tensor([self.terms[int(t)].weight / n for t in self.point_term], device=device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.n_points = len(self.point_term)
        # equal-sized chunks (20 points, chunk 16 -> 10 + 10, not 16 + 4): every forward is as wide as it can be
        n_chunks = self.n_points if one_point_per_forward else math.ceil(self.n_points / config.chunk_size)
        self.chunks = [c.tolist() for c in torch.arange(self.n_points).tensor_split(n_chunks)]
        self.history = {name: [] for name in [t.name for t in self.terms] + ["l1", "tv", "l2", "objective"]}
        self.theta_prev = None
        self.pixel_shape = self.image.shape[1:]
        self.noise = self.scores = None

    def start_iteration(self) -> None:
        self.noise = torch.randn((self.n_points, *self.image.shape[1:]), generator=self.generator,
                                 device=self.image.device) * self.config.noise_std
        self.scores = torch.empty(self.n_points)

    def composite(self, chunk) -> torch.Tensor:
        """The perturbed pixels of the chunk's points ``[c, *pixel_shape]`` (differentiable in the masks)."""
        rows = slice(chunk[0], chunk[-1] + 1)
        image, baseline = self.image, self.baseline
        up = self.to_pixels(torch.stack(self.masks), self.pixel_shape)                     # U(m) of every mask
        term_masks = torch.stack([math.prod(up[j] for j in t.masks) for t in self.terms])  # [n_terms, ..., H, W]
        u = term_masks[self.point_term[rows]] * self.point_alpha[rows].view(-1, *[1] * (term_masks.dim() - 1))
        # deletion Phi(I, B, u) = B + u (I - B); insertion Phi(B, I, u) = I + u (B - I)
        deleting = self.is_deletion[rows].view(-1, *[1] * (image.dim() - 1))
        lo, hi = torch.where(deleting, baseline, image), torch.where(deleting, image, baseline)
        return lo + u * (hi - lo) + self.noise[rows]

    def backward(self, chunk, s: torch.Tensor) -> None:
        """Accumulate the chunk's weighted scores' gradient into the masks (frees the chunk's graph)."""
        rows = slice(chunk[0], chunk[-1] + 1)
        s = s.float()
        (s * self.point_weight[rows]).sum().backward()
        self.scores[rows] = s.detach().cpu()

    def step(self, iteration: int) -> dict:
        """Regulariser, Nesterov update, history; returns the iteration's mean score per term."""
        config, masks = self.config, self.masks
        reg = regulariser(math.prod(masks), self.weights, config, iteration)
        sum(reg.values()).backward()
        with torch.no_grad():
            momentum = iteration / (iteration + config.momentum) if config.momentum > 0 else 0.0
            # a non-finite gradient entry would persist through the momentum: zero it
            thetas = [m - config.lr * torch.nan_to_num(m.grad, nan=0.0, posinf=0.0, neginf=0.0) for m in masks]
            for index, (mask, theta) in enumerate(zip(masks, thetas)):
                step = theta if self.theta_prev is None else theta + momentum * (theta - self.theta_prev[index])
                mask.copy_(step.clamp(0, 1))
                mask.grad = None
            self.theta_prev = thetas
        per_term = self.scores.view(len(self.terms), config.n_steps).mean(1)
        for term, value in zip(self.terms, per_term.tolist()):
            self.history[term.name].append(value)
        for name, value in reg.items():
            self.history[name].append(float(value.detach()))
        self.history["objective"].append(float((per_term * torch.tensor([t.weight for t in self.terms])).sum())
                                         + sum(float(v.detach()) for v in reg.values()))
        return {t.name: float(v) for t, v in zip(self.terms, per_term)}

    def result(self) -> dict:
        final = [m.detach() for m in self.masks]
        return {"mask": math.prod(final), "masks": final, "history": self.history}


class SeparablePixels:
    """``to_pixels`` as per-view separable bilinear factors: ``U(m)_v = Ry_v m Rx_v^T`` (``ry`` ``[V, H, h]``,
    ``rx`` ``[V, W, w]``), laid out as ``shape`` (after the mask count). What a remote session needs of the
    image geometry: every layout whose mask-to-pixel map is bilinear per axis (LLaVA-1.5, tiles), and
    flattened patches (Qwen-VL) with ``gather`` = ``(index [n_patches, P P] into the H x W pixels, copies)``:
    each patch row repeats its pixels' mask values ``copies`` (channels x frames) times."""

    def __init__(self, ry: torch.Tensor, rx: torch.Tensor, shape, gather=None):
        self.ry, self.rx, self.shape, self.gather = ry, rx, tuple(shape), gather

    def __call__(self, masks: torch.Tensor, pixel_shape=None) -> torch.Tensor:
        ry, rx = self.ry.to(masks.device), self.rx.to(masks.device)
        out = torch.matmul(torch.matmul(ry.unsqueeze(0), masks.float().unsqueeze(1)), rx.transpose(-1, -2).unsqueeze(0))
        out = out.reshape(masks.shape[0], *self.shape)
        if self.gather is None:
            return out
        index, copies = self.gather
        rows = out.reshape(masks.shape[0], -1)[:, index.to(out.device)]                  # [k, n_patches, P P]
        return rows.unsqueeze(2).expand(-1, -1, copies, -1).reshape(masks.shape[0], rows.shape[1], -1)
