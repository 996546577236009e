"""Log-probability of a target token read from a residual vector through the frozen final norm.

Yu & Ananiadou 2024, "Understanding Multimodal LLMs: the Mechanistic Interpretability of Llava in
Visual Question Answering" (arXiv 2411.10950), and Yu & Ananiadou, EMNLP 2024, "Neuron-Level
Knowledge Attribution in Large Language Models": a vector ``v`` ``[d_model]`` in the residual
stream at the target's predicting position ``t`` is read as if it were the last layer's output,
with the final norm's scale frozen at its value for the real last-layer output ``r`` at ``t``::

    rms:   s = 1 / sqrt(mean(r^2) + eps),                 n(v) = gamma * v * s
    layer: s = 1 / sqrt(var(r) + eps),  mu = mean(r),     n(v) = gamma * (v - mu) * s + beta
    logits(v) = W_U n(v) (+ b_U)                          [vocab]
    lp(v)     = log_softmax(logits(v))[y]

Where the model soft-caps its logits (:meth:`~mech_vqa.adapters.ModelAdapter.logit_softcap`),
``logits(v)`` is capped the same way, chunk by chunk, before the log-softmax.

``gamma`` is the gain the norm applies (its weight; ``1 + weight`` for Gemma's norm), as
:meth:`~mech_vqa.adapters.ModelAdapter.final_norm_params` reads it. Freezing makes ``logits`` affine in ``v``: ``logits(x + u) = logits(x) + s * W_U (gamma * u)``.
:class:`FrozenNormScorer` uses this to score many vectors ``x + u`` cheaply when every ``u`` lies
in a small basis (a head's value space, or one MLP neuron's value vector).

Everything is float32 whatever the model's dtype. The vocabulary is visited in chunks with a
running logsumexp, so peak memory is ``[B, N, chunk]``, never ``[B, N, vocab]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapters import ModelAdapter
from ..adapters.base import module_parameter
from ..backends.nnsight_ops import use_direct_route
from ..hooks import float32, without_grad

#: Default size, in float32 elements, of one chunk of logits ``[B, N, chunk]`` (2 MiB): small enough
#: for the in-place log-sum-exp passes to stay in cache, large enough for efficient GEMMs. Measured on
#: the mid-size benchmark model (2^17..2^20, interleaved, 1 and 2 threads): 2^19 was fastest or near
#: it for head-level, one head's positions and neurons alike; 2^20 cost up to 1.5x more.
CHUNK_ELEMENTS = 1 << 19


def check_token_ids(adapter: ModelAdapter, token_ids: torch.Tensor, *, as_tensor: bool = True) -> torch.Tensor | None:
    """``token_ids`` as a long tensor, or an IndexError naming the vocabulary size. ``as_tensor=False``:
    only the check, for a list of ints (returns None)."""
    vocab = adapter.vocab_size
    if isinstance(token_ids, (list, tuple)) and all(type(t) is int for t in token_ids):  # no tensor ops needed
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if not as_tensor and not bad:
            return None
        token_ids = torch.tensor(token_ids, dtype=torch.long)
    else:
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        bad = token_ids[(token_ids < 0) | (token_ids >= vocab)].tolist()
    if bad:
        raise IndexError(
            f"target token id {int(bad[0])} is outside the vocabulary (0..{vocab - 1}); pass a Target "
            "whose token_id the model's tokenizer produced (e.g. inp.target())"
        )
    return token_ids


def normalise(adapter: ModelAdapter, resid: torch.Tensor) -> torch.Tensor:
    """The final norm applied per vector in float32 (NOT frozen): ``[..., d_model]`` -> same shape.

    Used by the logit lens; equals the model's own final norm up to float rounding.
    """
    params = adapter.final_norm_params()
    x = resid.float()
    if params["kind"] == "layer":
        x = x - x.mean(-1, keepdim=True)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + params["eps"])
    x = x * params["weight"].float()
    if params["bias"] is not None:
        x = x + params["bias"].float()
    return x


def _detached(x: torch.Tensor) -> torch.Tensor:
    return x.detach() if x.requires_grad else x  # (a detach is an op of its own, on every scorer)


def _softcap(adapter) -> float | None:
    """The model's logit soft-cap (None for adapters that predate it, or duck-typed ones without it)."""
    method = getattr(adapter, "logit_softcap", None)
    return None if method is None else method()


def _chunk_size(adapter: ModelAdapter, rows: int, chunk_elements: int) -> int:
    return int(min(adapter.vocab_size, max(1, chunk_elements // max(rows, 1))))


def vocab_sweep(adapter: ModelAdapter, normed: torch.Tensor, *, k: int = 0, token_ids: torch.Tensor | None = None,
                bias: bool = True, chunk_elements: int = CHUNK_ELEMENTS, progress: bool = False) -> dict:
    """One chunked pass over the unembedding for already-normalised vectors ``normed`` ``[N, d]``.

    Returns ``{"lse": [N], "top_logits": [N, k], "top_ids": [N, k], "logits": [N, len(token_ids)]}``
    (float32): the full-vocabulary logsumexp, a running top-k and the logits of chosen tokens, without
    ever holding ``[N, vocab]``.
    """
    unembed = adapter.unembed   # its parameters whole, also where tensor parallelism shards them
    W_U, b_U = module_parameter(unembed, "weight"), (module_parameter(unembed, "bias") if bias else None)
    normed = normed.float().to(W_U.device)
    n = normed.shape[0]
    vocab = W_U.shape[0]
    cap = _softcap(adapter)
    chunk = _chunk_size(adapter, n, chunk_elements)
    lse = normed.new_full((n,), float("-inf"))
    top_logits = normed.new_full((n, 0), float("-inf"))
    top_ids = torch.zeros((n, 0), dtype=torch.long, device=normed.device)
    out = {}
    for start in tqdm(range(0, vocab, chunk), desc="vocabulary", disable=not progress, leave=False):
        logits = normed @ W_U[start:start + chunk].float().T  # [N, C]
        if b_U is not None:
            logits = logits + b_U[start:start + chunk].float()
        if cap is not None:
            logits = logits.div_(cap).tanh_().mul_(cap)
        lse = torch.logaddexp(lse, logits.logsumexp(-1))
        if k:
            merged = torch.cat([top_logits, logits], dim=1)
            ids = torch.cat([top_ids, torch.arange(start, start + logits.shape[1], device=normed.device)
                             .expand(n, -1)], dim=1)
            top_logits, order = merged.topk(min(k, merged.shape[1]), dim=1)
            top_ids = ids.gather(1, order)
    out["lse"] = lse
    out["top_logits"], out["top_ids"] = top_logits, top_ids
    if token_ids is not None:
        token_ids = check_token_ids(adapter, token_ids).to(W_U.device)
        logits = normed @ W_U[token_ids].float().T
        if b_U is not None:
            logits = logits + b_U[token_ids].float()
        out["logits"] = logits if cap is None else logits.div_(cap).tanh_().mul_(cap)
    return out


def _chunk_logsumexp(logits: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor | None:
    """``logsumexp(logits, -1)`` computed in place, shifted by ``shift`` ``[...]`` (default the max).

    Shifting by the running logsumexp of the previous chunks saves the max pass: logits of one
    vocabulary rarely exceed it by more than float32's exp range (~88); when they do, the sum is
    infinite, None is returned and the caller recomputes the chunk shifted by its max. Logits far
    below the shift underflow to 0: they are negligible in the total at float32 precision.
    """
    shift = logits.amax(-1) if shift is None else shift
    total = logits.sub_(shift.unsqueeze(-1)).exp_().sum(-1)
    if not torch.isfinite(total).all():
        return None
    return total.log_().add_(shift)


class FrozenNormScorer:
    """``lp(v)`` for many vectors at once, one target token and one frozen norm scale per batch row.

    Args:
        adapter: the model's adapter (final norm, unembedding, vocabulary size).
        final_resid: ``[B, d_model]`` the last layer's output at each row's target position.
        target_ids: ``[B]`` the token each row explains.
        chunk_elements: size of one ``[B, N, chunk]`` block of logits, in float32 elements.
    """

    def __init__(self, adapter: ModelAdapter, final_resid: torch.Tensor, target_ids, *,
                 chunk_elements: int = CHUNK_ELEMENTS):
        if final_resid.dim() != 2 or final_resid.shape[1] != adapter.d_model:
            raise ValueError(f"final_resid must be [batch, {adapter.d_model}], got {tuple(final_resid.shape)}")
        self.adapter = adapter
        device = adapter.device
        if isinstance(target_ids, (list, tuple)) and all(type(t) is int for t in target_ids):
            check_token_ids(adapter, target_ids, as_tensor=False)
            self._ids, self._targets = list(target_ids), None  # the tensor made at the first read of ``targets``
        else:
            targets = check_token_ids(adapter, target_ids)
            self._ids, self._targets = None, targets if targets.device == device else targets.to(device)
        self._batch = len(self._ids) if self._ids is not None else int(self._targets.numel())
        if self._batch != final_resid.shape[0]:
            raise ValueError(f"{self._batch} target ids for {final_resid.shape[0]} rows")
        # one row's target as an int: its log-probability is then a select, not an index tensor and a gather
        self._only_target = self._ids[0] if self._ids is not None and self._batch == 1 else None
        params = adapter.final_norm_params()
        r = final_resid if not final_resid.requires_grad else final_resid.detach()
        r = float32(r)
        r = r if r.device == device else r.to(device)
        if params["kind"] == "layer":
            self.mean = r.mean(-1, keepdim=True)  # [B, 1]
            variance = (r - self.mean).pow(2).mean(-1, keepdim=True)
        else:
            self.mean = None  # an RMS norm does not centre
            variance = r.pow(2).mean(-1, keepdim=True)
        self.scale = torch.rsqrt(variance + params["eps"])  # [B, 1]: s, frozen
        self.gamma = float32(_detached(params["weight"]))
        self.beta = float32(_detached(params["bias"])) if params["bias"] is not None else None
        self.row_gain = (self.scale * self.gamma).unsqueeze(1)  # [B, 1, d]: s_b * gamma, one product per vector
        self.chunk_elements = chunk_elements

    @property
    def targets(self) -> torch.Tensor:
        """``[B]`` long: each row's target id (made at the first read where the ids came as ints: one
        row's target is scored by index, without it)."""
        if self._targets is None:
            self._targets = torch.tensor(self._ids, dtype=torch.long, device=self.adapter.device)
        return self._targets

    @property
    def batch_size(self) -> int:
        return self._batch

    def select(self, rows) -> FrozenNormScorer:
        """The scorer restricted to batch ``rows`` (a list or tensor of row indices)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.targets.device)
        out = object.__new__(FrozenNormScorer)
        out.__dict__.update(self.__dict__)
        out._targets, out.scale, out.row_gain = self.targets[rows], self.scale[rows], self.row_gain[rows]
        out._ids, out._batch = None, int(rows.numel())
        out.mean = None if self.mean is None else self.mean[rows]
        out._only_target = int(out._targets[0]) if out._batch == 1 else None
        return out

    def frozen_norm(self, vectors: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
        """``n(v)`` for ``vectors`` ``[B, ..., d]`` (row b uses row b's frozen mean and scale);
        ``overwrite`` computes it in place when ``vectors`` is float32 on the right device."""
        dim = vectors.dim()
        shape = (vectors.shape[0],) + (1,) * (dim - 1)
        gain = self.row_gain if dim == 3 else self.row_gain.view(shape[:-1] + (-1,))  # [B, 1.., d]
        if overwrite and vectors.dtype == torch.float32 and vectors.device == self.gamma.device:
            x = vectors if self.mean is None else vectors.sub_(self.mean.view(shape))
            x = x.mul_(gain)
            return x.add_(self.beta) if self.beta is not None else x
        x = vectors.float()
        x = x if x.device == self.gamma.device else x.to(self.gamma.device)
        x = (x if self.mean is None else x - self.mean.view(shape)) * gain
        return x + self.beta if self.beta is not None else x

    # ------------------------------------------------------------------------ scoring
    def _unembedding(self) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
        """``(W_U, b_U, soft-cap)`` as stored, read once per scorer (whole where tensor parallelism
        shards them: a gather each read)."""
        cached = self.__dict__.get("_unembed")
        if cached is None:
            unembed = self.adapter.unembed
            cached = self._unembed = (module_parameter(unembed, "weight"), module_parameter(unembed, "bias"),
                                      _softcap(self.adapter))
        return cached

    def _reduce(self, n_vectors: int, chunk_logits: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]):
        """Visit the vocabulary in chunks: ``chunk_logits(W_chunk [C, d], b_chunk [C]) -> [B, N, C]``.

        Returns ``[B, N]`` ``logit[y] - logsumexp(logits)`` accumulated with a running logsumexp.
        ``chunk_logits`` must return a fresh tensor: it is overwritten in place (no temporaries, so
        peak memory stays one block of logits).
        """
        W_U, b_U, cap = self._unembedding()
        batch, vocab = self.batch_size, W_U.shape[0]
        if cap is not None:  # the model returns c * tanh(logits / c): so does every chunk here, exactly
            linear_logits = chunk_logits

            def chunk_logits(W, b):
                return linear_logits(W, b).div_(cap).tanh_().mul_(cap)
        chunk = int(min(vocab, max(1, self.chunk_elements // max(batch * n_vectors, 1))))
        if chunk >= vocab:  # the whole vocabulary in one block: a plain log-softmax, no running sums
            logits = chunk_logits(float32(W_U),
                                  None if b_U is None else b_U.float())
            # log_softmax is one fused kernel; logsumexp is several (~15x the fixed cost on small blocks)
            if self._only_target is not None:
                return logits.log_softmax(-1).select(-1, self._only_target)
            index = self.targets.view(batch, 1, 1).expand(-1, n_vectors, 1)
            return logits.log_softmax(-1).gather(-1, index)[..., 0]
        lse = torch.full((batch, n_vectors), float("-inf"), device=W_U.device)
        target = torch.zeros((batch, n_vectors), device=W_U.device)
        for start in range(0, vocab, chunk):
            stop = min(start + chunk, vocab)
            logits = chunk_logits(W_U[start:stop].float(), None if b_U is None else b_U[start:stop].float())
            inside = (self.targets >= start) & (self.targets < stop)  # rows whose target is in this chunk
            if inside.any():
                index = (self.targets - start).clamp(0, stop - start - 1).view(batch, 1, 1).expand(-1, n_vectors, 1)
                target = torch.where(inside.view(batch, 1), logits.gather(-1, index)[..., 0], target)
            shifted_lse = _chunk_logsumexp(logits, None if start == 0 else lse)
            if shifted_lse is None:  # this chunk overflowed against the running logsumexp: redo exactly
                logits = chunk_logits(W_U[start:stop].float(), None if b_U is None else b_U[start:stop].float())
                shifted_lse = _chunk_logsumexp(logits, None)
            lse = torch.logaddexp(lse, shifted_lse)
        return target - lse

    @without_grad
    def log_prob(self, vectors: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
        """``lp(v)`` for ``vectors`` ``[B, N, d]`` -> ``[B, N]`` float32 (cost ``B*N*d*vocab``).

        ``overwrite``: normalise a float32 ``vectors`` in place instead of into a copy (the caller
        no longer needs them).
        """
        normed = self.frozen_norm(vectors, overwrite=overwrite)  # [B, N, d]

        def chunk_logits(W, b):
            return F.linear(normed, W, b)  # [B, N, C] (one op: no transposed view of W to make first)

        return self._reduce(normed.shape[1], chunk_logits)

    @without_grad
    def log_prob_in_basis(self, base: torch.Tensor, coefficients: torch.Tensor, basis: torch.Tensor):
        """``lp(base_b + coefficients_bn @ basis)`` for ``base`` ``[B, d]``, ``coefficients`` ``[B, N, r]``,
        ``basis`` ``[r, d]``.

        Uses linearity: ``logits = logits(base) + s_b * coefficients @ (W_U (gamma * basis))^T``, so the
        cost is ``(r*d + B*N*r) * vocab`` instead of ``B*N*d*vocab`` (``r`` = head_dim for a head).

        Returns ``(lp [B, N], lp_base [B])``; ``lp_base = lp(base)`` goes through the same arithmetic,
        so a zero coefficient row gives an increase of exactly 0.

        Where scoring the vectors themselves costs hardly more (a small model:
        :func:`~mech_vqa.backends.nnsight_ops.use_direct_route`), they are scored directly
        (:meth:`log_prob` of ``base`` and each ``base + coefficients_n @ basis``): fewer, larger steps.
        """
        batch, n, rank = coefficients.shape
        if use_direct_route(batch, n, rank, basis.shape[-1], self.adapter.vocab_size):
            row = float32(base).unsqueeze(1)
            coefficients = float32(coefficients)
            basis = float32(basis)
            vectors = torch.cat([row, row + coefficients @ basis], dim=1)  # [B, 1 + N, d]
            lp = self.log_prob(vectors, overwrite=True)
            return lp[:, 1:], lp[:, 0]
        base_normed = self.frozen_norm(base)  # [B, d]
        device = base_normed.device
        coefficients = coefficients.float()
        coefficients = coefficients if coefficients.device == device else coefficients.to(device)
        # Row n (all zero) scores the base itself, through the same arithmetic as the others.
        scaled = coefficients.new_zeros((batch, n + 1, rank))  # [B, N+1, r]
        torch.mul(coefficients, self.scale.view(batch, 1, 1), out=scaled[:, :n])
        basis = basis.float()
        rows = torch.cat([(basis if basis.device == device else basis.to(device)) * self.gamma, base_normed])  # [r + B, d]

        def chunk_logits(W, b):
            projected = rows @ W.T  # [r + B, C]: the basis rows then the bases, in vocabulary space
            base_logits = projected[rank:] if b is None else projected[rank:] + b
            # base + coefficients @ U in one batched GEMM (the base is the GEMM's accumulator)
            return torch.baddbmm(base_logits.unsqueeze(1), scaled, projected[:rank].expand(batch, rank, -1))

        lp = self._reduce(n + 1, chunk_logits)
        return lp[:, :n], lp[:, n]

    @without_grad
    def log_prob_along_columns(self, base: torch.Tensor, coefficients: torch.Tensor, directions: torch.Tensor):
        """``lp(base_b + coefficients_bk * directions[:, k])`` for every column ``k``.

        ``base`` ``[B, d]``, ``coefficients`` ``[B, r]``, ``directions`` ``[d, r]`` (e.g. an MLP's
        ``W_down``: neuron k adds ``c_k * W_down[:, k]``). Cost ``(d*r + B*r) * vocab``.

        Returns ``(lp [B, r], lp_base [B])`` as :meth:`log_prob_in_basis`.
        """
        batch, r = coefficients.shape
        base_normed = self.frozen_norm(base)  # [B, d]
        coefficients = coefficients.float().to(base_normed.device) * self.scale.view(batch, 1)
        coefficients = torch.cat([coefficients, coefficients.new_zeros(batch, 1)], dim=1)  # [B, r+1]
        directions = directions.float().to(base_normed.device) * self.gamma.unsqueeze(1)  # [d, r]
        directions = torch.cat([directions, directions.new_zeros(directions.shape[0], 1)], dim=1)

        def chunk_logits(W, b):
            base_logits = base_normed @ W.T  # [B, C]
            if b is not None:
                base_logits = base_logits + b
            return torch.addcmul(base_logits.unsqueeze(1), coefficients.unsqueeze(2), (W @ directions).T.unsqueeze(0))

        lp = self._reduce(r + 1, chunk_logits)
        return lp[:, :r], lp[:, r]
