"""Test the head-level direct-effect ranking against ablation.

The mechanistic method ranks heads by ``increase_lj = lp(x_l + h_lj) - lp(x_l)``: what the head's
output *would* add to the answer's log-probability read at its own layer (Yu & Ananiadou 2024).
That is a claim about the head, not a test of it: a head can write in the answer's direction while
later layers (or other heads) make the answer without it. :func:`head_claims` takes the top ``n``
heads of that ranking and zeroes each one (its ``z`` before ``o_proj``, every position, its own
batch row of one ablation sweep resumed from the clean residual stream:
:func:`~mech_vqa.methods.ablation.ablate`), then reports both numbers per head and the Spearman
rank correlation of ``increase`` with the ablation's drop ``-delta``. A high-ranked head whose
zeroing leaves the answer unchanged is a head the answer does not need.
"""

from __future__ import annotations

import torch

from ..inputs import PreparedInput, Target
from ..metrics.correlation import spearman
from ..results.head_claims import HeadClaims
from .ablation import ablate, head_ablations
from .mechanistic import head_increase


def head_claims(vqa, inp: PreparedInput, target: Target | None = None, *, n: int | None = 10, mode: str = "zero",
                reference=None, source=None, batch_size: int = 16) -> HeadClaims:
    """The ``n`` heads with the largest log-prob increase for ``target``, each ablated (module docstring).

    Args:
        vqa: the model (left as found).
        inp: the prepared input (answer teacher-forced).
        target: the token to explain (default: the input's first answer token).
        n: how many top heads to test (None: every head).
        mode: ``"zero"`` (default), ``"mean"`` (needs ``reference``) or ``"resample"`` (needs ``source``).
        batch_size: ablations per forward.
    """
    target = inp.target() if target is None else target
    increase = head_increase(vqa, inp, target)
    scores = increase.scores.float()
    n_heads = scores.shape[1]
    n = scores.numel() if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1 (or None for every head), got {n}")
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices[:n]
    chosen = [(int(i) // n_heads, int(i) % n_heads) for i in order]
    layers = sorted({layer for layer, _ in chosen})
    sweep = {(a.layer, a.head): a for a in head_ablations(vqa, layers, None, mode=mode, reference=reference,
                                                         source=source, seq_len=inp.seq_len)}
    result = ablate(vqa, inp, [sweep[pair] for pair in chosen], targets=[target], batch_size=batch_size,
                    progress=False)
    claimed = scores.flatten()[order]
    delta = result.delta[:, 0]
    return HeadClaims(layers=[layer for layer, _ in chosen], heads=[head for _, head in chosen], increase=claimed,
                      delta=delta, flipped=result.flipped, clean_logprob=float(result.clean_logprob[0]),
                      spearman=spearman(claimed, -delta), mode=mode, target=target.to_dict(), model=vqa.name,
                      prompt=inp.prompt, info={"n": n, "batch_size": batch_size, "answer": inp.answer})


__all__ = ["head_claims"]
