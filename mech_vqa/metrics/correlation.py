"""Rank correlation shared by the method comparison and the head-claims check."""

from __future__ import annotations

import torch


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """``[n]`` float64 ranks 1..n of flattened ``values``; tied values share their average rank."""
    flat = values.flatten().double()
    order = torch.sort(flat, stable=True).indices
    sorted_values = flat[order]
    # each run of equal values gets the mean of the positions it spans
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(flat)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally shaped tensors (average ranks for ties; NaN when one is constant)."""
    if a.numel() != b.numel():
        raise ValueError(f"spearman needs equally sized inputs, got {a.numel()} and {b.numel()} values")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else float("nan")
