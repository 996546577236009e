"""Torch-only helpers that run INSIDE an nnsight trace (and so on a remote server).

This module imports nothing but torch: for a remote (or ``remote="local"``) trace it is shipped by
value (``nnsight.register``), where the rest of mech_vqa is not installed. Edits arrive as plain
tuples ``(rows, positions, heads, mode, value)`` built from :class:`~mech_vqa.interventions.Intervention`
on the client, already checked there, and follow ``interventions._apply`` exactly.
"""

from __future__ import annotations

import torch


def select(x: torch.Tensor, positions: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    """Pick ``positions`` ``[P]`` (shared) or ``[B, P]`` (per row) along ``dim``."""
    if positions is None:
        return x
    positions = positions.to(x.device)
    if positions.dim() == 1:
        return x.index_select(dim, positions)
    shape = [1] * x.dim()
    shape[0], shape[dim] = positions.shape
    index = positions.view(shape).expand(*[s if i != dim else positions.shape[1] for i, s in enumerate(x.shape)])
    return x.gather(dim, index)


def check_positions(seq: int, positions: torch.Tensor | None) -> None:
    if positions is not None and (positions.max() >= seq or positions.min() < -seq):
        raise IndexError(f"capture position {int(positions.max())} is outside the sequence of length {seq}")


def apply_edits(x: torch.Tensor, edits, n_heads: int, head_dim: int, per_head: bool) -> torch.Tensor:
    """``x`` ``[B, S, D]`` with ``edits`` applied (a copy; the input is not modified)."""
    x = x.clone()
    batch, seq = x.shape[:2]
    view = x.view(batch, seq, n_heads, head_dim) if per_head else x
    for rows, positions, heads, mode, value in edits:
        if rows is not None and max(rows) >= batch:
            raise IndexError(f"intervention row {max(rows)} is outside the batch of {batch}")
        if positions is not None and not all(-seq <= p < seq for p in positions):
            raise IndexError(f"intervention positions {positions} fall outside the sequence of length {seq}")
        row_index = list(rows) if rows is not None else slice(None)
        position_index = list(positions) if positions is not None else slice(None)
        target = view[row_index]  # advanced indexing copies: edit the copy, then write it back
        idx = (position_index, list(heads) if heads is not None else slice(None)) if per_head else (position_index,)
        current = target[(slice(None), *idx)]
        new = torch.zeros_like(current) if mode == "zero" else value.to(current).expand_as(current)
        target[(slice(None), *idx)] = new
        view[row_index] = target
    return x
