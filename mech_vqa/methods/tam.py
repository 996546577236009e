"""Token Activation Map (TAM): a class-activation map per answer token, its context's interference removed.

Li et al., "Token Activation Map to Visually Explain Multimodal LLMs", ICCV 2025 (arXiv 2506.23270);
code: github.com/xmed-lab/TAM (``tam.py``: ``TAM``, ``least_squares``, ``rank_guassian_filter``,
``multimodal_process``), read at commit 7c7df1d.

For an answer token ``y_r`` (sequence index ``a_r``, predicting position ``a_r - 1``) and the model's
own logits ``z[s, v]`` at every position ``s`` (``lm_head`` of the last, normed hidden state; one
teacher-forced forward serves every token)::

    A_c[i]   = relu(z[img_i, c])                           [n_image]  activation map of class c
    A        = A_{y_r}                                     the token's raw map
    context  = question tokens (id c_j, position q_j = their own)
               + earlier answer tokens y_0..y_{r-1} (position a_j - 1, which predicted them),
               without tokens whose id is y_r (a repeated word is not interference)
    w_j      = relu(z[q_j, y_r]) / (sum_j relu(z[q_j, y_r]) + 1e-8)
    I        = sum_j w_j A_{c_j}                           estimated causal inference (interference)
    s*       = argmin_s || A - s I ||^2 = <A, I> / <I, I>  least squares (the code's minimize_scalar)
    E        = relu(A - s* I)                              [n_image]
    T        = relu(z[q_j, y_r]) over every context position (repeats included)
    N        = (E - m) / (M - m),  m, M = min, max of E and T together (the code's joint normalisation)
    TAM      = RGF(N on the patch grid)                    [rows, cols]

The rank Gaussian filter ``RGF`` (kernel ``k``, default 3) replaces each cell by a weighted sum of its
``k x k`` neighbourhood (reflected at the borders) *sorted*, the weights a Gaussian over the rank
offset ``-k^2//2 .. k^2//2`` with ``sigma = std / mean`` of the window (coefficient of variation):
a noisy window (large spread) is averaged, a flat one keeps its median; a window with mean <= 0
gives 0.

Where this differs from the published code (each on purpose, named here):

* the code explains the first generated token by the map of the first prompt token (class: the
  greedy prediction there) and uses the last prompt token's id as the first answer token's context
  class; here every answer token, the first included, is explained with its own id, and every
  context token's map uses its own id;
* the final ``* 255`` to uint8 (for OpenCV) is left out: maps stay float32 in [0, 1];
* a constant map (``M == m``, a 0/0 in the code) is all zeros; a flat positive window
  (``sigma = 0``, NaN in the code) keeps its value, the filter's limit.

Runs on any backend: it needs one forward's logits (``vqa.forward``).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..inputs import PreparedInput
from ..results.patch_map import PatchMap
from .raw_attention import check_single_input, resolve_targets


def rank_gaussian_filter(scores: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """TAM's rank Gaussian filter of ``[rows, cols]`` scores (float64 inside, float32 out).

    Every window at once: ``unfold`` -> ``[k*k, rows*cols]`` windows, sorted, weighted.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if scores.dim() != 2:
        raise ValueError(f"rank_gaussian_filter expects [rows, cols], got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    pad = kernel_size // 2
    x = scores.detach().double()[None, None]
    # numpy's 'reflect' (the code's np.pad) as torch's, per side; a side of one cell reflects onto itself
    # in numpy, which is replicate (sides longer than one cell but not than the pad: replicate too)
    if pad:
        x = F.pad(x, (pad, pad, 0, 0), mode="reflect" if pad < cols else "replicate")
        x = F.pad(x, (0, 0, pad, pad), mode="reflect" if pad < rows else "replicate")
    windows = F.unfold(x, kernel_size).squeeze(0).sort(dim=0).values  # [k*k, rows*cols]
    mean = windows.mean(0)
    std = windows.std(0, unbiased=False)
    sigma = std / mean.where(mean > 0, torch.ones_like(mean))
    offsets = (torch.arange(kernel_size ** 2, dtype=torch.float64) - kernel_size ** 2 // 2).view(-1, 1)
    safe = sigma.where(sigma > 0, torch.ones_like(sigma))
    kernel = torch.exp(-offsets ** 2 / (2 * safe ** 2))
    kernel = kernel / kernel.sum(0, keepdim=True)
    value = (windows * kernel).sum(0)
    value = torch.where(sigma > 0, value, mean)  # flat window: the Gaussian shrinks onto the median, its value
    value = torch.where(mean > 0, value, torch.zeros_like(value))
    return value.view(rows, cols).float()


def _context(inp: PreparedInput, answer_index: int, token_id: int) -> tuple[list[int], list[int], list[int]]:
    """``(all context positions, kept positions, kept ids)``: question tokens at their own positions and
    earlier answer tokens at their predicting positions; kept = without tokens whose id is ``token_id``."""
    ids = inp.input_ids[0]
    question = inp.question_positions.tolist()
    answers = inp.answer_positions.tolist()[:answer_index]
    positions = question + [a - 1 for a in answers]
    context_ids = [int(ids[q]) for q in question] + [int(ids[a]) for a in answers]
    kept = [(p, c) for p, c in zip(positions, context_ids) if c != token_id]
    return positions, [p for p, _ in kept], [c for _, c in kept]


def token_activation_maps(vqa, inp: PreparedInput, targets=None, *, kernel_size: int = 3, eci: bool = True,
                          denoise: bool = True, box=None, view: int = 0) -> list[PatchMap]:
    """One TAM :class:`PatchMap` per answer token (``targets``: None = all, answer indices or Targets).

    ``eci=False`` skips the interference removal, ``denoise=False`` the rank Gaussian filter (to ablate
    the method's parts). The paper explains generated tokens; here the answer is teacher-forced, which is
    the same when it is the model's greedy answer (what :meth:`VQAModel.prepare` forces by default). ``view`` 0: the first view's patch grid; another
    view (LLaVA-NeXT's high-resolution tiles): filtered on that view's token grid, painted over the image.
    """
    inp = check_single_input(inp)
    targets = resolve_targets(inp, targets)
    answer_index = {int(p) - 1: i for i, p in enumerate(inp.answer_positions.tolist())}
    for t in targets:
        if t.position not in answer_index or int(inp.input_ids[0, t.position + 1]) != t.token_id:
            raise ValueError(f"TAM explains teacher-forced answer tokens; target at position {t.position} is not one "
                             "(pass answer indices or inp.answer_targets())")
    start = time.perf_counter()
    with torch.no_grad():
        logits = vqa.forward(inp).logits[0].float()  # [S, V]
    image = inp.geometry.positions.to(logits.device)
    image_logits = logits[image]  # [n_image, V]
    display = torch.from_numpy(inp.display_image())
    elapsed = time.perf_counter() - start
    maps = []
    for t in targets:
        index = answer_index[t.position]
        all_positions, kept, kept_ids = _context(inp, index, t.token_id)
        raw = image_logits[:, t.token_id].clamp(min=0)  # [n_image]
        removed = raw
        scale = 0.0
        if eci and kept:
            where = torch.tensor(kept, device=logits.device)
            weights = logits[where, t.token_id].clamp(min=0)
            weights = weights / (weights.sum() + 1e-8)
            context_maps = image_logits[:, torch.tensor(kept_ids, device=logits.device)].clamp(min=0)  # [n_image, J]
            interference = context_maps @ weights
            norm = float(interference.double().pow(2).sum())
            scale = float((raw.double() * interference.double()).sum()) / norm if norm > 0 else 0.0
            removed = (raw - interference * scale).clamp(min=0)
        text = logits[torch.tensor(all_positions, device=logits.device), t.token_id].clamp(min=0) \
            if all_positions else logits.new_zeros(0)
        both = torch.cat([removed, text])
        low, high = both.min(), both.max()
        normalised = (removed - low) / (high - low) if float(high - low) > 0 else torch.zeros_like(removed)
        scores = _on_grid(inp, normalised.cpu(), view, kernel_size if denoise else None)
        maps.append(PatchMap(
            scores, method="tam", image_size=list(inp.geometry.image_size), image=display, targets=[t.to_dict()],
            box=[float(v) for v in box] if box is not None else None,
            info={"model": vqa.name, "question": inp.question, "answer": inp.answer, "eci": eci, "denoise": denoise,
                  "kernel_size": kernel_size, "eci_scale": scale, "view": view, "context_tokens": len(kept),
                  "unit": "TAM (class activation, interference removed, normalised)", "runtime_s": elapsed}))
    return maps


def _on_grid(inp: PreparedInput, values: torch.Tensor, view: int, kernel_size: int | None) -> torch.Tensor:
    """Image-token values -> the view's token grid, filtered (``kernel_size`` None: not), as a map."""
    geometry = inp.geometry
    if view == 0:
        grid = geometry.to_grid(values)
        return rank_gaussian_filter(grid, kernel_size) if kernel_size else grid
    chosen = geometry.view == view
    if not chosen.any():
        raise ValueError(f"no image token belongs to view {view} (views: {sorted(set(geometry.view.tolist()))})")
    rowcol = geometry.rowcol[chosen].long()
    grid = torch.zeros(int(rowcol[:, 0].max()) + 1, int(rowcol[:, 1].max()) + 1)
    grid[rowcol[:, 0], rowcol[:, 1]] = values[chosen]
    if kernel_size:
        grid = rank_gaussian_filter(grid, kernel_size)
    filtered = torch.zeros_like(values)
    filtered[chosen] = grid[rowcol[:, 0], rowcol[:, 1]]
    return geometry.paint(filtered, view)


def tam_map(vqa, inp: PreparedInput, targets=None, *, box=None, **kwargs) -> PatchMap:
    """The TAMs of ``targets`` averaged into one :class:`PatchMap` (for :func:`mech_vqa.compare.compare`)."""
    maps = token_activation_maps(vqa, inp, targets, box=box, **kwargs)
    if len(maps) == 1:
        return maps[0]
    first = maps[0]
    return PatchMap(torch.stack([m.scores for m in maps]).mean(0), method="tam", image_size=first.image_size,
                    image=first.image, targets=[t for m in maps for t in m.targets], box=first.box, info=first.info)
