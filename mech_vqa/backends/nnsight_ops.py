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
        head_index = list(heads) if heads is not None else slice(None)
        if per_head and isinstance(position_index, list) and isinstance(head_index, list):
            # every named head at every named position (paired lists would pick one head per position)
            position_index, head_index = torch.tensor(position_index)[:, None], torch.tensor(head_index)[None, :]
        idx = (position_index, head_index) if per_head else (position_index,)
        current = target[(slice(None), *idx)]
        new = torch.zeros_like(current) if mode == "zero" else value.to(current).expand_as(current)
        target[(slice(None), *idx)] = new
        view[row_index] = target
    return x


def block_edges(mask, edits, layer: int, batch: int, seq: int):
    """The attention mask of one layer with attention edges removed (the knockout's), for every backend.

    ``mask``: what the layer's attention received: None (plain causal, SDPA's shortcut), bool ``[b, 1, S, S]``
    (SDPA, True = attend) or additive float (eager, 0 = attend, the dtype's minimum = blocked); ``edits``:
    ``[(first, blocked)]`` with ``blocked`` ``[batch, 1 | heads, R, K]`` bool, True removing the edge from
    query row ``first + r`` to key ``k``. Returns ``[batch, 1 | heads, S, S]`` of the same kind (bool for
    None), with ``-inf`` at the removed edges of a float mask: the softmax gives them exactly zero weight and
    renormalises each row over its remaining edges. Raises ValueError when an edited row is left with no
    edge at all (its softmax would be undefined).
    """
    heads = max(int(blocked.shape[1]) for _, blocked in edits)
    device = edits[0][1].device if mask is None else mask.device
    if mask is None:
        keys = torch.arange(seq, device=device)
        mask = (keys.view(1, -1) <= keys.view(-1, 1)).view(1, 1, seq, seq)
    mask = mask[..., :seq, :seq].expand(batch, heads, seq, seq)
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    removed = torch.zeros(batch, heads, seq, seq, dtype=torch.bool, device=device)
    for first, blocked in edits:
        rows, keys = int(blocked.shape[-2]), int(blocked.shape[-1])
        removed[:, :, first:first + rows, :keys] |= blocked.to(device).expand(batch, heads, rows, keys)
    empty = ~(allowed & ~removed).any(-1) & removed.any(-1)
    if bool(empty.any()):
        where = empty.nonzero()[0].tolist()
        raise ValueError(
            f"the attention edit leaves query position {where[2]} at layer {layer} with no key to attend to (every "
            "allowed edge blocked); keep at least one source position per row, e.g. do not block a token's edge "
            "to itself when it attends to nothing else")
    if mask.dtype == torch.bool:
        return mask & ~removed
    return mask.masked_fill(removed, float("-inf"))


# --------------------------------------------------------------------------------------------------
# Scores computed next to the model: what a remote trace sends back instead of activations.
# The arithmetic is that of mech_vqa.methods.logprob / mechanistic / logit_lens (the hooks backend's),
# written again here with torch only; the backend tests hold the two equal to 1e-5.


def _vocab_reduce(targets: torch.Tensor, chunk_logits, vocab: int, chunk: int) -> torch.Tensor:
    """``logit[y] - logsumexp(logits)`` ``[B, N]`` over the vocabulary in chunks (running logsumexp);
    ``chunk_logits(start, stop)`` -> ``[B, N, stop - start]``. The whole vocabulary in one chunk: a
    log-softmax, as the hooks backend computes it."""
    if chunk >= vocab:
        logits = chunk_logits(0, vocab)
        return logits.log_softmax(-1).gather(-1, targets.view(-1, 1, 1).expand(-1, logits.shape[1], 1))[..., 0]
    lse, target = None, None
    for start in range(0, vocab, chunk):
        stop = min(start + chunk, vocab)
        logits = chunk_logits(start, stop)
        inside = (targets >= start) & (targets < stop)
        index = (targets - start).clamp(0, stop - start - 1).view(-1, 1, 1).expand(-1, logits.shape[1], 1)
        picked = logits.gather(-1, index)[..., 0]
        target = picked if target is None else torch.where(inside.view(-1, 1), picked, target)
        part = logits.logsumexp(-1)
        lse = part if lse is None else torch.logaddexp(lse, part)
    return target - lse


def _chunk(vocab: int, rows: int, chunk_elements: int) -> int:
    return int(min(vocab, max(1, chunk_elements // max(rows, 1))))


#: how many more multiply-adds through the unembedding scoring vectors directly may cost than the linear
#: route and still be taken (``log_prob_in_basis`` of both backends: they take the same route, so they
#: agree): on small models the direct route's fewer steps win (the tests' 3-layer model: one head's
#: position scores in 52 tensor operations instead of 59); a 7B model's heads need ~4x fewer multiply-adds
#: the linear way and never come near it
DIRECT_SLACK = 1 << 18


def use_direct_route(batch: int, n: int, rank: int, d_model: int, vocab: int) -> bool:
    """Whether ``batch x n`` vectors ``base + coefficients @ basis`` (``rank`` basis rows) are scored
    directly rather than through the basis projected into vocabulary space (cost in multiply-adds)."""
    direct = batch * n * (rank + vocab) * d_model
    linear = (rank + batch) * d_model * vocab + batch * n * rank * vocab
    return direct <= linear + DIRECT_SLACK


class FrozenNorm:
    """The final norm frozen at each row's real last-layer output ``final`` ``[B, d]`` (see
    :mod:`mech_vqa.methods.logprob`), with the unembedding, for scoring target log-probabilities."""

    def __init__(self, final, targets, gamma, beta, eps: float, layer_norm: bool, W_U, b_U, chunk_elements: int):
        r = final.detach().float()
        self.mean = r.mean(-1, keepdim=True) if layer_norm else None
        centred = r - self.mean if layer_norm else r
        self.scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)  # [B, 1]
        self.gamma, self.beta = gamma.detach().float(), None if beta is None else beta.detach().float()
        self.W_U, self.b_U = W_U.detach(), None if b_U is None else b_U.detach()
        self.targets, self.chunk_elements = targets.to(r.device), chunk_elements

    def select(self, rows):
        out = object.__new__(FrozenNorm)
        out.__dict__.update(self.__dict__)
        out.targets, out.scale = self.targets[rows], self.scale[rows]
        out.mean = None if self.mean is None else self.mean[rows]
        return out

    def norm(self, vectors):
        shape = (vectors.shape[0],) + (1,) * (vectors.dim() - 1)
        x = vectors.float()
        x = (x if self.mean is None else x - self.mean.view(shape)) * self.scale.view(shape) * self.gamma
        return x if self.beta is None else x + self.beta

    def _bias(self, start, stop):
        return None if self.b_U is None else self.b_U[start:stop].float()

    def log_prob(self, vectors):
        """``[B, N, d]`` -> ``[B, N]``."""
        normed = self.norm(vectors)
        batch, n = normed.shape[:2]

        def chunk_logits(start, stop):
            logits = normed @ self.W_U[start:stop].float().T
            bias = self._bias(start, stop)
            return logits if bias is None else logits + bias

        return _vocab_reduce(self.targets, chunk_logits, self.W_U.shape[0],
                             _chunk(self.W_U.shape[0], batch * n, self.chunk_elements))

    def log_prob_in_basis(self, base, coefficients, basis):
        """``lp(base_b + coefficients_bn @ basis)`` ``[B, N]`` and ``lp(base)`` ``[B]`` (linear in the basis)."""
        batch, n, rank = coefficients.shape
        if use_direct_route(batch, n, rank, basis.shape[-1], self.W_U.shape[0]):  # as the hooks backend
            row = base.unsqueeze(1).float()
            vectors = torch.cat([row, row + coefficients.float() @ basis.float()], dim=1)
            lp = self.log_prob(vectors)
            return lp[:, 1:], lp[:, 0]
        base_normed = self.norm(base)
        coefficients = coefficients.float() * self.scale.view(batch, 1, 1)
        coefficients = torch.cat([coefficients, coefficients.new_zeros(batch, 1, rank)], dim=1)
        rows = torch.cat([basis.float() * self.gamma, base_normed])

        def chunk_logits(start, stop):
            projected = rows @ self.W_U[start:stop].float().T
            bias = self._bias(start, stop)
            base_logits = projected[rank:] if bias is None else projected[rank:] + bias
            return torch.baddbmm(base_logits.unsqueeze(1), coefficients, projected[:rank].expand(batch, rank, -1))

        lp = _vocab_reduce(self.targets, chunk_logits, self.W_U.shape[0],
                           _chunk(self.W_U.shape[0], batch * (n + 1), self.chunk_elements))
        return lp[:, :n], lp[:, n]


def _stack_at_target(values, name: str, layers) -> torch.Tensor:
    """``[B, L, ...]`` from per-layer captures ``[B, 1, ...]`` at each row's target."""
    return torch.cat([values[name, layer] for layer in layers], dim=1)


def _head_attention(values, layer: int, head: int, rows, t, n_heads: int, n_kv: int, head_dim: int, scaling: float,
                    window, key_mask, rotate) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``t`` of head ``(layer, head)``'s attention ``[b, S]`` and its values ``[b, S, hd]``,
    from the raw projections (rotated with the model's own rotary function)."""
    group = n_heads // n_kv
    cos, sin = values["pe", layer]
    q = values["q", layer][rows].unflatten(-1, (n_heads, head_dim))[:, :, head:head + 1].transpose(1, 2)  # [b,1,1,hd]
    k = values["k", layer][rows].unflatten(-1, (n_kv, head_dim))[:, :, head // group:head // group + 1].transpose(1, 2)
    v = values["v", layer][rows].unflatten(-1, (n_kv, head_dim))[:, :, head // group]  # [b, S, hd]
    cos, sin = cos[rows], sin[rows]
    index = t.view(-1, 1, 1).expand(-1, 1, cos.shape[-1])
    q = rotate(q, q, cos.gather(1, index), sin.gather(1, index))[0]
    k = rotate(k, k, cos, sin)[1]
    scores = (q.float() @ k.float().transpose(-1, -2))[:, 0, 0] * scaling  # [b, S]
    keys = torch.arange(scores.shape[-1], device=scores.device).view(1, -1)
    allowed = keys <= t.view(-1, 1)
    if window is not None:
        allowed = allowed & (keys > t.view(-1, 1) - window)
    if key_mask is not None:
        allowed = allowed & key_mask[rows].to(scores.device).bool()
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1), v.float()


def explain_scores(values, weights, output, **args):
    """:func:`_explain_scores` without gradients (no decorator: nnsight ships a registered module's
    functions by their source, and a decorated function's source would resolve in the decorator's module)."""
    with torch.no_grad():
        return _explain_scores(values, weights, output, **args)


def _explain_scores(values, weights, output, *, targets, t, n_layers: int, n_heads: int, n_kv: int, head_dim: int,
                   heads, scalings, windows, key_mask, rotate, gain_offset: bool, eps: float, layer_norm: bool,
                   chunk_elements: int):
    """Layer-, head- and (for ``heads``) position-level increases, computed where the activations are.

    ``values``: the trace's captures at each row's target ``t`` ``[B]`` (keys ``(name, layer)``), keys
    and values at every position for the layers ``heads`` may need; ``weights``: ``W_O`` per layer
    (o_proj weights), ``norm_weight`` / ``norm_bias``, ``W_U`` / ``b_U``; ``output`` the model's, with
    logits ``[B, 1, V]`` at ``t``. ``heads``: ``("top", k)`` or ``("pairs", [(layer, head), ...])`` shared by rows.

    Returns only scores: ``lp`` ``[B, 3L + L*H + 1]`` (the layout of
    ``mechanistic.layer_and_head_increase``), ``model_logprob`` ``[B]``, ``heads`` ``[B, k, 2]``,
    ``increase`` and ``attention`` ``[B, k, S]`` (batch coordinates).
    """
    layers = range(n_layers)
    resid_pre = _stack_at_target(values, "resid_pre", layers).float()   # [B, L, d]
    attn_out = _stack_at_target(values, "attn_out", layers).float()
    mlp_out = _stack_at_target(values, "mlp_out", layers).float()
    z = _stack_at_target(values, "z", layers).unflatten(-1, (n_heads, head_dim)).float()  # [B, L, H, hd]
    final = values["resid_post", n_layers - 1][:, 0]
    batch, d = final.shape
    gamma = weights["norm_weight"].float() + (1 if gain_offset else 0)
    scorer = FrozenNorm(final, targets, gamma, weights["norm_bias"], eps, layer_norm, weights["W_U"],
                        weights["b_U"], chunk_elements)
    head_out = torch.stack([torch.einsum("bhk,hkd->bhd", z[:, layer],
                                         weights["W_O", layer].float().T.reshape(n_heads, head_dim, d))
                            for layer in layers], dim=1)                       # [B, L, H, d]
    vectors = torch.cat([resid_pre, resid_pre + attn_out, resid_pre + attn_out + mlp_out,
                         (resid_pre.unsqueeze(2) + head_out).flatten(1, 2), final.float().unsqueeze(1)], dim=1)
    lp = scorer.log_prob(vectors)
    model_logprob = output.logits[:, 0].float().log_softmax(-1).gather(1, targets.view(-1, 1))[:, 0]
    if heads[0] == "top":
        increase_lh = lp[:, 3 * n_layers:-1] - lp[:, :n_layers].repeat_interleave(n_heads, dim=1)
        index = increase_lh.topk(heads[1], dim=1).indices                                  # [B, k]
        chosen = torch.stack([index // n_heads, index % n_heads], dim=-1)
    else:
        chosen = torch.tensor(heads[1], dtype=torch.long).view(1, -1, 2).expand(batch, -1, -1)
    seq = key_mask.shape[1]
    increase = torch.zeros(batch, chosen.shape[1], seq)
    attention = torch.zeros(batch, chosen.shape[1], seq)
    for row in range(batch):
        for slot in range(chosen.shape[1]):
            layer, head = int(chosen[row, slot, 0]), int(chosen[row, slot, 1])
            rows = [row]
            pattern, v = _head_attention(values, layer, head, rows, t[rows], n_heads, n_kv, head_dim,
                                         scalings[layer], windows[layer], key_mask, rotate)
            W_O = weights["W_O", layer].float().T.reshape(n_heads, head_dim, d)[head]
            lp_pos, lp_base = scorer.select(rows).log_prob_in_basis(resid_pre[rows, layer],
                                                                    pattern.unsqueeze(-1) * v, W_O)
            increase[row, slot] = (lp_pos - lp_base.unsqueeze(1))[0].cpu()
            attention[row, slot] = pattern[0].cpu()
    return {"lp": lp.cpu(), "model_logprob": model_logprob.cpu(), "heads": chosen.cpu(), "increase": increase,
            "attention": attention}


def logit_lens_sweep(values, weights, output, **args):
    """:func:`_logit_lens_sweep` without gradients."""
    with torch.no_grad():
        return _logit_lens_sweep(values, weights, output, **args)


def _logit_lens_sweep(values, weights, output, *, n_layers: int, k: int, word_id, gain_offset: bool, eps: float,
                     layer_norm: bool, chunk_elements: int, positions=None):
    """The logit lens at the captured positions: top-``k`` ids / probabilities ``[L + 1, P, k]`` and
    ``word_id``'s probability ``[L + 1, P]``, the final norm applied per vector (not frozen).

    Where the text model was called with DeepStack features (Qwen3-VL; captured as
    ``values["deepstack_kwargs"]``), the residual after layer ``l`` is the layer's output plus the
    ``l``-th feature at the visual positions, as the text model adds it, read at ``positions``."""
    added = {}
    if ("deepstack_kwargs",) in values:
        features, mask = values["deepstack_kwargs",]
        if features is not None and mask is not None:
            out = values["resid_post", 0]
            shape = (mask.shape[0], mask.shape[1], out.shape[-1])
            for layer, feature in enumerate(features):
                full = torch.zeros(shape, dtype=out.dtype, device=out.device)
                full[mask.to(out.device)] = feature.to(out.device, out.dtype)
                added[layer] = select(full, positions, 1)[0]
    stages = [values["resid_pre", 0][0]] + [values["resid_post", layer][0] + added[layer] if layer in added
                                            else values["resid_post", layer][0] for layer in range(n_layers)]
    resid = torch.stack(stages).float()              # [L + 1, P, d]
    n_stages, n_patches, _ = resid.shape
    x = resid.flatten(0, 1)
    if layer_norm:
        x = x - x.mean(-1, keepdim=True)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    x = x * (weights["norm_weight"].float() + (1 if gain_offset else 0))
    if weights["norm_bias"] is not None:
        x = x + weights["norm_bias"].float()
    W_U, b_U = weights["W_U"], weights["b_U"]
    vocab, n = W_U.shape[0], x.shape[0]
    chunk = _chunk(vocab, n, chunk_elements)
    lse, top_logits, top_ids = None, x.new_full((n, 0), float("-inf")), torch.zeros((n, 0), dtype=torch.long)
    for start in range(0, vocab, chunk):
        logits = x @ W_U[start:start + chunk].float().T
        if b_U is not None:
            logits = logits + b_U[start:start + chunk].float()
        part = logits.logsumexp(-1)
        lse = part if lse is None else torch.logaddexp(lse, part)
        merged = torch.cat([top_logits, logits], dim=1)
        ids = torch.cat([top_ids.to(logits.device), torch.arange(start, start + logits.shape[1],
                                                                  device=logits.device).expand(n, -1)], dim=1)
        top_logits, order = merged.topk(min(k, merged.shape[1]), dim=1)
        top_ids = ids.gather(1, order)
    out = {"top_probs": (top_logits - lse.unsqueeze(1)).exp().view(n_stages, n_patches, -1).cpu(),
           "top_ids": top_ids.view(n_stages, n_patches, -1).cpu(), "word_probs": None}
    if word_id is not None:
        logits = x @ W_U[word_id].float()
        if b_U is not None:
            logits = logits + b_U[word_id].float()
        out["word_probs"] = (logits - lse).exp().view(n_stages, n_patches).cpu()
    return out


# --------------------------------------------------------------------------------------------------
# Relevancy (Chefer's rule, mech_vqa.methods.relevancy) from the attention probabilities and their
# gradients, both held where the model runs: only the relevancy rows go back.


def relevancy_row(position: int, probs, grads, row_normalize: bool) -> torch.Tensor:
    """``e_p^T (I + Abar_{L-1}) ... (I + Abar_0)`` ``[S]`` float32 with ``Abar_l = mean_h((grad_l A_l)^+)``
    (``probs`` / ``grads`` per layer ``[1, heads, S, S]``); ``row_normalize``: ``rownorm(R - I) + I``."""
    with torch.no_grad():
        one_hot = torch.zeros(probs[0].shape[-1], device=probs[0].device)
        one_hot[position] = 1.0
        row = one_hot
        for attn, grad in zip(reversed(probs), reversed(grads)):
            abar = (grad[0].float() * attn[0].float()).clamp(min=0).mean(0)
            row = row + row @ abar
        if row_normalize:
            rest = row - one_hot
            total = rest.sum()
            row = (rest / total if total > 0 else rest) + one_hot
        return row.cpu()


def vision_row(image_row: torch.Tensor, probs, grads) -> torch.Tensor:
    """The LLM image relevancy ``[n_image]`` propagated through the vision layers (``probs`` / ``grads`` per
    layer ``[1, heads, n, n]``): the patch tokens seeded, their columns read (``[n_image]``), as
    ``mech_vqa.methods.relevancy._vision_map``."""
    with torch.no_grad():
        n_tokens, n_patches = probs[0].shape[-1], image_row.shape[0]
        offset = n_tokens - n_patches
        if offset < 0:
            raise ValueError(f"the vision tower has {n_tokens} tokens but the prompt {n_patches} image tokens")
        row = torch.zeros(n_tokens, device=probs[0].device)
        row[offset:] = image_row.to(row.device).float()
        for attn, grad in zip(reversed(probs), reversed(grads)):
            row = row + row @ (grad[0].float() * attn[0].float()).clamp(min=0).mean(0)
        return row[offset:].cpu()


def check_probabilities(probs) -> None:
    if any(p is None for p in probs):
        raise RuntimeError("the attention returned no probabilities; relevancy differentiates them, which needs "
                           "eager attention: load the model with attn_implementation='eager' (remotely: a deployment "
                           "that runs eager attention; SDPA / flash kernels return none)")


# --------------------------------------------------------------------------------------------------
# iGOS+ / iGOS++ inside a session (mech_vqa.methods.igos_core runs the loop): the answer scores of a
# batch of perturbed images, as mech_vqa.methods.scoring.AnswerScorer computes them.


def batch_inputs(base: dict, pixels: torch.Tensor) -> dict:
    """The one-row model inputs ``base`` for ``pixels`` ``[n, ...]``: every batch-1 tensor expanded to ``n`` (what
    the adapter's ``model_inputs`` does to a batch; the backend checks the two agree before a session)."""
    n = pixels.shape[0]
    # contiguous: Idefics3 views its pixel_attention_mask, which an expanded (stride-0) tensor refuses
    out = {key: value.expand(n, *value.shape[1:]).contiguous() if torch.is_tensor(value) and value.shape[:1] == (1,)
           else value for key, value in base.items()}
    if base["pixel_values"].dim() == pixels.dim() - 1:   # a flat patch list (Qwen-VL): the rows one after another
        pixels = pixels.reshape(-1, pixels.shape[-1])
    out["pixel_values"] = pixels.to(base["pixel_values"].device, base["pixel_values"].dtype)
    return out


def answer_log_probs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``log p(y_t)`` ``[n, T]`` float32 from logits ``[n, T, V]`` at the predicting rows."""
    log_probs = logits.float().log_softmax(-1)
    index = token_ids.to(log_probs.device).view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return log_probs.gather(-1, index)[..., 0]
