"""Resume a forward pass from a decoder layer, reusing the clean run's residual stream.

An ablation at layer ``l`` leaves everything before ``l`` unchanged, so a sweep need not recompute
the vision tower, the projector or layers ``0..l-1``: :class:`ResidualCheckpoint` records the
residual stream entering every decoder layer and the keyword arguments HF passed to it (mask,
rotary embeddings, position ids) in one clean forward, then :meth:`ResidualCheckpoint.run_from`
calls the model's own decoder layers ``l..L-1`` on a batch of copies, with interventions applied
through the usual hooks, and unembeds only the positions asked for.

Both here and in the perturbation scorer (:class:`~mech_vqa.methods.scoring.AnswerScorer`) only a
few rows of the last layer's output are ever read, so :func:`last_mlp_only_at` runs the last
layer's MLP (most of a layer's arithmetic) at those rows alone; its attention still runs at every
position, since the kept rows attend to all of them.

When an intervention touches only the last rows (the answer rows), every earlier row is the clean
run's at every layer: :class:`AnswerRowRunner` keeps the clean run's keys and values as well (a KV
cache) and :meth:`AnswerRowRunner.run_rows` recomputes only those rows, batched over
interventions, with optional attention-edge edits (the attention knockout's). Ablation uses it for
``where="answer"``; any method that edits only the answer rows (patching at the answer position)
can call ``answer_rows_for(vqa, inp).run_rows(layer, batch, positions, interventions)``: on backends
other than hooks that is :class:`FullForwardAnswerRows`, the same numbers by whole forwards through
``vqa.trace`` (attention edits through :class:`~mech_vqa.interventions.AttentionEdit`).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence

import torch

from .hooks import HookSet, preserved_state
from .interventions import AttentionEdit, Intervention, check_explicit_masks, register_interventions
from .tensor_parallel import local_head_mask


def last_mlp_only_at(hooks: HookSet, adapter, rows: torch.Tensor) -> None:
    """Make the last decoder layer's MLP compute only sequence ``rows`` (zeros elsewhere).

    Valid whenever nothing reads the last layer's output outside ``rows``; exact at ``rows`` (the
    MLP acts on each position alone). Differentiable. Register it before any intervention hook on
    that MLP, so those see the full ``[B, S, d]`` output.
    """
    mlp = adapter.mlp(adapter.n_layers - 1)
    shapes = []

    def keep_rows(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states", None)
        if hidden is None:  # called in a way we do not recognise: leave it whole
            return None
        shapes.append(hidden.shape)
        return (hidden.index_select(1, rows.to(hidden.device)),) + tuple(args[1:]), kwargs

    def scatter_back(module, args, kwargs, output):
        if not shapes:
            return None
        shape = shapes.pop()
        return output.new_zeros(shape).index_copy(1, rows.to(output.device), output)

    hooks.pre(mlp, keep_rows)
    hooks.post(mlp, scatter_back)


def _clean_logits(vqa, inp, rows) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The clean forward's fp32 logits: ``(rows, [1, len(rows), vocab])`` at ``rows`` only (HF's
    ``logits_to_keep``), or ``(None, [1, S, vocab])`` at every position."""
    if rows is None or "logits_to_keep" not in inspect.signature(vqa.model.forward).parameters:
        return None, vqa.forward(inp).logits.float()
    rows = torch.as_tensor(rows, dtype=torch.long).flatten() % inp.seq_len
    return rows, vqa.forward(inp, logits_to_keep=rows.to(vqa.device)).logits.float()  # [1, len(rows), vocab]


class _CleanLogits:
    """The clean run's logits, at every position or at a few rows only, read through
    :meth:`clean_logits_at` (no ``[1, S, vocab]`` tensor is built unless ``clean_logits`` is read)."""

    _kept_rows: torch.Tensor | None
    _kept: torch.Tensor

    @property
    def clean_logits(self) -> torch.Tensor:
        """``[1, S, vocab]`` fp32; NaN at the rows that were not computed."""
        if self._kept_rows is None:
            return self._kept
        logits = self._kept.new_full((1, self.inputs[0].shape[1], self._kept.shape[-1]), float("nan"))
        logits[:, self._kept_rows.to(logits.device)] = self._kept
        return logits

    def clean_logits_at(self, positions) -> torch.Tensor:
        """``[P, vocab]`` fp32 clean logits at ``positions`` (which must be among the computed rows)."""
        positions = torch.as_tensor(positions, dtype=torch.long).flatten()
        if self._kept_rows is None:
            return self._kept[0, positions.to(self._kept.device)]
        seq_len = self.inputs[0].shape[1]
        index = {int(row): i for i, row in enumerate(self._kept_rows)}
        missing = sorted({int(p) % seq_len for p in positions} - set(index))
        if missing:
            raise ValueError(f"the clean logits were computed at rows {sorted(index)} only, not at {missing}; "
                             "pass those positions as rows when building the checkpoint")
        picked = torch.tensor([index[int(p) % seq_len] for p in positions], device=self._kept.device)
        return self._kept[0, picked]


class ResidualCheckpoint(_CleanLogits):
    """The clean run's residual stream entering each layer, plus each layer's call arguments."""

    def __init__(self, vqa, inp, rows: Sequence[int] | torch.Tensor | None = None):
        """``rows``: the only positions whose clean logits are wanted (``clean_logits`` is NaN
        elsewhere): the clean run then unembeds those rows alone, not the whole sequence."""
        from .backends import require_hooks

        require_hooks(vqa, "ablate / ResidualCheckpoint (it calls decoder layers directly)")
        self.vqa = vqa
        self.adapter = vqa.adapter
        self.inputs: list[torch.Tensor] = []
        self.calls: list[dict] = []
        hooks = HookSet()

        #: what the text model adds after a layer outside the layer modules (Qwen3-VL's DeepStack), per layer
        self.added: dict[int, torch.Tensor] = {}

        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs.append(hidden.detach())
            self.calls.append({k: v for k, v in kwargs.items() if k != "hidden_states"})

        def record_added(module, args, kwargs):
            embeds = kwargs.get("inputs_embeds", args[0] if args else None)
            if embeds is not None:
                self.added = {layer: value.detach()
                              for layer, value in self.adapter.deepstack_additions(kwargs, embeds).items()}

        with torch.no_grad(), preserved_state(vqa.model):
            try:
                if self.adapter.deepstack_layers():
                    hooks.pre(self.adapter.text_model, record_added)
                for layer in range(self.adapter.n_layers):
                    hooks.pre(self.adapter.layer(layer), record)
                self._kept_rows, self._kept = _clean_logits(vqa, inp, rows)
            finally:
                hooks.remove()
        if len(self.inputs) != self.adapter.n_layers:
            raise RuntimeError(f"recorded {len(self.inputs)} decoder-layer calls, expected {self.adapter.n_layers}")

    @torch.no_grad()
    def run_from(self, layer: int, batch: int, positions: Sequence[int] | torch.Tensor,
                 interventions: Sequence[Intervention] = ()) -> torch.Tensor:
        """Log-probabilities ``[batch, P, vocab]`` (fp32) at ``positions`` after running layers ``layer..``.

        Interventions may target layers ``>= layer`` only (earlier ones would be silently lost).
        """
        layer = self.adapter.check_layer(layer)
        early = [edit.layer for edit in interventions if self.adapter.check_layer(edit.layer) < layer]
        if early:
            raise ValueError(f"interventions at layers {sorted(set(early))} precede the resume layer {layer}")
        positions = torch.as_tensor(positions, dtype=torch.long, device=self.inputs[0].device)
        hidden = self.inputs[layer].expand(batch, -1, -1).clone()
        hooks = HookSet()
        with preserved_state(self.vqa.model):
            try:
                last_mlp_only_at(hooks, self.adapter, positions)  # first: interventions see full outputs
                register_interventions(hooks, self.adapter, interventions)
                for index in range(layer, self.adapter.n_layers):
                    out = self.adapter.layer(index)(hidden, **self.calls[index])
                    hidden = out[0] if isinstance(out, tuple) else out
                    if index in self.added:  # as the text model does after this layer (zeros off the image)
                        hidden = hidden + self.added[index]
            finally:
                hooks.remove()
        final = self.adapter.final_norm(hidden[:, positions])
        return self.adapter.unembed(final).float().log_softmax(-1)


class FullForwardRuns:
    """:class:`ResidualCheckpoint`'s interface by whole forwards through ``vqa.trace`` / ``vqa.forward``.

    For backends other than hooks (nnsight), where calling decoder layers directly would bypass the
    backend: every run recomputes the vision tower and the layers before the edits, so a sweep costs
    more, but its log-probabilities are those of the same forward.
    """

    def __init__(self, vqa, inp):
        self.vqa = vqa
        self.adapter = vqa.adapter
        self.one = inp.model_inputs(vqa.device, vqa.adapter.vision_dtype())
        with torch.no_grad():
            self.clean_logits = vqa.forward(self.one).logits.float()  # [1, S, vocab]

    def clean_logits_at(self, positions) -> torch.Tensor:
        """``[P, vocab]`` fp32 clean logits at ``positions``."""
        positions = torch.as_tensor(positions, dtype=torch.long).flatten()
        return self.clean_logits[0, positions.to(self.clean_logits.device)]

    @torch.no_grad()
    def run_from(self, layer: int, batch: int, positions: Sequence[int] | torch.Tensor,
                 interventions: Sequence[Intervention] = ()) -> torch.Tensor:
        """Log-probabilities ``[batch, P, vocab]`` (fp32) at ``positions``; interventions at layers ``>= layer``."""
        layer = self.adapter.check_layer(layer)
        early = [edit.layer for edit in interventions if self.adapter.check_layer(edit.layer) < layer]
        if early:
            raise ValueError(f"interventions at layers {sorted(set(early))} precede the resume layer {layer}")
        positions = torch.as_tensor(positions, dtype=torch.long, device=self.clean_logits.device)
        inputs = {k: v.repeat(batch, *[1] * (v.dim() - 1)) if torch.is_tensor(v) else v for k, v in self.one.items()}
        # the unembedding at the asked rows only (HF takes an index tensor): [batch, S, vocab] would be
        # most of a sweep's memory and time
        keep = {"logits_to_keep": positions} if "logits_to_keep" in inspect.signature(
            self.vqa.model.forward).parameters else {}
        with self.vqa.trace((), interventions=interventions):
            logits = self.vqa.forward(inputs, **keep).logits
        return (logits if keep else logits[:, positions]).float().log_softmax(-1)


def checkpoint_for(vqa, inp, rows=None):
    """A :class:`ResidualCheckpoint` on the hooks backend (clean logits at ``rows`` only, when
    given), :class:`FullForwardRuns` on any other."""
    if getattr(getattr(vqa, "backend", None), "name", "hooks") == "hooks":
        return ResidualCheckpoint(vqa, inp, rows)
    return FullForwardRuns(vqa, inp)


# ----------------------------------------------------------------------------- answer rows only
class _RecordKeysValues:
    """Stands in for HF's cache object in one attention call of the clean run: keeps the keys and
    values (after rotary embedding, before any GQA repeat) and hands them back unchanged."""

    def __init__(self):
        self.keys = self.values = None

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        self.keys, self.values = key_states.detach(), value_states.detach()
        return key_states, value_states


class _PrefixKeysValues:
    """Stands in for HF's cache object when rows ``first..`` are recomputed: hands the new rows' keys
    and values back unchanged and leaves the clean run's keys and values of rows ``< first`` (one copy,
    shared by every batch row) for :func:`_answer_rows_attention`, which the attention calls next.
    Nothing is stored, so one prefix serves any number of runs."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values  # [1, kv_heads, first, head_dim]

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        _pending_prefix()[:] = [(self.keys.to(key_states), self.values.to(value_states))]
        return key_states, value_states


_PENDING = threading.local()


def _pending_prefix() -> list:
    """The prefix the attention call under way in this thread reads (set by :meth:`_PrefixKeysValues.update`,
    taken once): per thread, so that runs on different models in different threads never take each
    other's prefix."""
    slot = getattr(_PENDING, "prefix", None)
    if slot is None:
        slot = _PENDING.prefix = []
    return slot

ANSWER_ROWS_ATTENTION = "mech_vqa_answer_rows"
"""The name under which :func:`_answer_rows_attention` is registered in transformers' AttentionInterface."""


def _fold(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, kv_heads * g, R, n] -> [kv_heads, B * g * R, n]``: every batch row's queries of one key head
    side by side, so one product per key head reads the shared prefix once."""
    batch, heads, rows, n = x.shape
    return x.reshape(batch, kv_heads, heads // kv_heads, rows, n).transpose(0, 1).reshape(kv_heads, -1, n)


def _unfold(x: torch.Tensor, batch: int, heads: int, rows: int) -> torch.Tensor:
    """The inverse of :func:`_fold`: ``[kv_heads, B * g * R, n] -> [B, heads, R, n]``."""
    kv_heads, _, n = x.shape
    return x.view(kv_heads, batch, heads // kv_heads, rows, n).transpose(0, 1).reshape(batch, heads, rows, n)


def _answer_rows_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                           **kwargs):
    """Attention of the recomputed rows over the shared clean prefix and their own new keys.

    The prefix ``[1, kv_heads, P, d]`` is never copied per batch row (a ``torch.cat`` of it per row and
    layer was most of a sweep's time): the queries of all batch rows are folded into one matrix per key
    head against it, and each batch row's own keys ``[B, kv_heads, R, d]`` are scored apart. Scores are
    those of eager attention (scaling, optional soft-capping, the mask: bool True = attend or additive
    float over ``P + R`` keys), softmax in fp32. Returns ``([B, R, heads, d], None)`` as HF's functions do.
    """
    batch, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    pending = _pending_prefix()
    prefix_keys, prefix_values = pending.pop() if pending else (None, None)
    scaling = dim ** -0.5 if scaling is None else scaling
    own = torch.matmul(query.reshape(batch, kv_heads, -1, dim), key.transpose(-1, -2)).view(batch, heads, rows, -1)
    scores = own
    if prefix_keys is not None:
        folded = _fold(query, kv_heads)  # [kv, B * g * R, d]
        before = _unfold(torch.bmm(folded, prefix_keys[0].transpose(-1, -2)), batch, heads, rows)
        scores = torch.cat([before, own], dim=-1)
    scores = scores.float() * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[..., -scores.shape[-1]:]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    weights = scores.softmax(-1).to(value.dtype)
    prefix = 0 if prefix_keys is None else prefix_keys.shape[-2]
    out = torch.matmul(weights[..., prefix:].reshape(batch, kv_heads, -1, weights.shape[-1] - prefix),
                       value).view(batch, heads, rows, dim)
    if prefix_keys is not None:
        out = out + _unfold(torch.bmm(_fold(weights[..., :prefix], kv_heads), prefix_values[0]), batch, heads, rows)
    return out.transpose(1, 2).contiguous(), None


def _register_answer_rows_attention() -> None:
    from transformers.modeling_utils import AttentionInterface

    if ANSWER_ROWS_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ANSWER_ROWS_ATTENTION, _answer_rows_attention)


def _cache_keyword(layer_module) -> str:
    """The name under which a decoder layer takes its KV cache (``cache`` from transformers 5.x on)."""
    parameters = inspect.signature(layer_module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _rows_edit(edit: Intervention, first: int, count: int, seq_len: int) -> Intervention:
    """``edit`` expressed on the recomputed rows ``first .. first + count - 1`` only.

    Positions are shifted; an edit of all positions edits every recomputed row (and a value that
    holds one row per sequence position, as ``resample`` writes, is cut to those rows). An edit at a
    row that is not recomputed cannot be honoured and is an error.
    """
    import dataclasses

    if edit.positions is not None:
        absolute = [p % seq_len for p in edit.positions]
        outside = sorted(p for p in absolute if not first <= p < first + count)
        if outside:
            raise ValueError(
                f"intervention at {edit.site} L{edit.layer} edits positions {outside}, outside the recomputed rows "
                f"{first}..{first + count - 1}; the answer-row path keeps every earlier row clean, so use the "
                "full-sequence path (where='full') for edits before the answer")
        return dataclasses.replace(edit, positions=tuple(p - first for p in absolute))
    value = edit.value
    per_position_dims = 3 if edit.site == "z" else 2
    if value is not None and value.dim() == per_position_dims and value.shape[0] == seq_len:
        value = value[first:first + count]
    return dataclasses.replace(edit, value=value)


def _check_rows_run(adapter, layer, batch, positions, interventions, first, blocked, joins, seq_len, device):
    """:meth:`AnswerRowRunner.run_rows`'s arguments checked: ``(layer, starts per row, positions, first, last)``."""
    layer = adapter.check_layer(layer)
    early = [edit.layer for edit in interventions if adapter.check_layer(edit.layer) < layer]
    if early:
        raise ValueError(f"interventions at layers {sorted(set(early))} precede the resume layer {layer}")
    starts = [layer] * batch if joins is None else [adapter.check_layer(j) for j in joins]
    if len(starts) != batch or starts[0] != layer or any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"joins must give one non-decreasing layer per batch row ({batch}), the first equal to "
                         f"the start layer {layer}; got {list(joins)}")
    if joins is not None and blocked is not None:
        raise ValueError("joins (a batch that grows over the layers) cannot be combined with attention edits")
    late = [edit.layer for edit in interventions
            if any(adapter.check_layer(edit.layer) < starts[row]
                   for row in (range(batch) if edit.rows is None else edit.rows) if row < batch)]
    if late:
        raise ValueError(f"interventions at layers {sorted(set(late))} edit batch rows that join later")
    positions = torch.as_tensor(positions, dtype=torch.long, device=device).flatten() % seq_len
    last = int(positions.max())
    first = int(positions.min()) if first is None else int(first)
    if not 0 <= first <= int(positions.min()):
        raise ValueError(f"first recomputed row {first} must lie in 0..{int(positions.min())} (the first "
                         "unembedded position)")
    return layer, starts, positions, first, last


class AnswerRowRunner(ResidualCheckpoint):
    """Recompute only the last rows of the sequence, reusing the clean run for every earlier row.

    In a causal decoder, row ``i`` at layer ``l`` depends on rows ``<= i`` only. An intervention that
    touches only rows ``first..`` (an edit at the answer rows, an attention edit of those rows' queries)
    leaves every earlier row's residual stream, keys and values exactly as in the clean run. So one
    clean forward records, per decoder layer, the residual entering it, its call arguments and the
    keys and values of every position (a KV cache); :meth:`run_rows` then runs only rows
    ``first..last`` through layers ``layer..`` for a batch of interventions, attending to the clean keys
    and values of rows ``< first`` and to their own. The arithmetic per run is that of a
    ``last - first + 1``-token decoding step, not of a forward; the prefix is read once per layer for
    the whole batch (never copied per batch row: :func:`_answer_rows_attention`, registered in
    transformers' AttentionInterface and selected on the text layers' configs for the run only), and
    with ``rows`` given, the clean run computes the last layer's MLP and the logits at those rows alone.

    What it computes differs in meaning from :meth:`ResidualCheckpoint.run_from` with an edit of
    all positions: there every position from the edited layer on sees the edit, and later layers'
    keys and values at every position change; here only rows ``first..last`` are edited and every
    earlier position keeps its clean keys and values at every layer. The two agree exactly when the
    edit touches rows ``>= first`` only (a test checks this on every tiny layout).

    Attention edits: ``blocked(layer, first, last)`` may return a bool tensor
    ``[batch, 1 or n_heads, last - first + 1, last + 1]`` (query rows x key positions); a True entry
    removes that edge: its pre-softmax score becomes ``-inf``, so its attention weight is exactly
    zero and the row's softmax renormalises over the remaining edges (the attention knockout of
    Geva et al. 2023 / Zhang et al. 2025). A query row left with no edge at all is an error.

    Hooks backend only (it calls decoder layers directly); :func:`answer_rows_for` gives
    :class:`FullForwardAnswerRows` on other backends.
    """

    def __init__(self, vqa, inp, rows: Sequence[int] | torch.Tensor | None = None):
        """``rows``: as for :class:`ResidualCheckpoint` (clean logits computed there only)."""
        from .backends import require_hooks

        require_hooks(vqa, "AnswerRowRunner (it calls decoder layers directly)")
        _register_answer_rows_attention()
        config = vqa.model.config
        self.attn_implementation = getattr(getattr(config, "text_config", config), "_attn_implementation", None)
        if self.attn_implementation not in ("eager", "sdpa"):
            raise ValueError(f"the answer-row path needs 'sdpa' or 'eager' attention (it passes explicit masks), not "
                             f"{self.attn_implementation!r}; load the model with attn_implementation='sdpa'")
        adapter = vqa.adapter
        self.cache_keyword = _cache_keyword(adapter.layer(0))
        self.recorders = [_RecordKeysValues() for _ in range(adapter.n_layers)]
        hooks = HookSet()

        def keep_keys_values(recorder):
            def hook(module, args, kwargs):
                return args, {**kwargs, self.cache_keyword: recorder}
            return hook

        try:
            if rows is not None:  # only `rows` of the last layer's output are read: its MLP runs there alone
                last_mlp_only_at(hooks, adapter, torch.as_tensor(rows, dtype=torch.long).flatten() % inp.seq_len)
            for layer, recorder in enumerate(self.recorders):
                hooks.pre(adapter.attn(layer), keep_keys_values(recorder))
            super().__init__(vqa, inp, rows)
        finally:
            hooks.remove()
        missing = [layer for layer, r in enumerate(self.recorders) if r.keys is None]
        if missing:
            raise RuntimeError(f"the attention of layers {missing} did not pass keys/values through its cache "
                               "argument; this model family is not supported by the answer-row path")
        self.seq_len = self.inputs[0].shape[1]
        #: where the clean run's residual stream lies (attention edits may be built there)
        self.device = self.inputs[0].device

    # ------------------------------------------------------------------ per-layer arguments
    def allowed(self, layer: int, first: int, last: int) -> torch.Tensor:
        """Bool ``[1, 1, last - first + 1, last + 1]``: which keys each recomputed row may attend to in
        the clean run (causal, and the sliding window where the layer has one)."""
        mask = self.calls[layer].get("attention_mask")
        if mask is None:  # SDPA's pure causal case: HF passes no mask and lets the kernel mask
            rows = torch.arange(first, last + 1, device=self.inputs[0].device)
            keys = torch.arange(last + 1, device=rows.device)
            return (keys[None, :] <= rows[:, None])[None, None]
        mask = mask[..., first:last + 1, :last + 1]
        if mask.dtype == torch.bool:
            return mask
        return mask > torch.finfo(mask.dtype).min / 2  # additive float mask: 0 allowed, dtype min blocked

    def _layer_kwargs(self, layer: int, first: int, last: int, blocked) -> dict:
        kwargs = dict(self.calls[layer])
        rows = slice(first, last + 1)
        for key, value in list(kwargs.items()):
            if key in ("position_ids", "cache_position") and torch.is_tensor(value):
                kwargs[key] = value[..., rows]
            elif key == "position_embeddings" and value is not None:
                kwargs[key] = tuple(part[:, rows] for part in value)
            elif key in ("attention_mask", self.cache_keyword, "hidden_states"):
                continue
            elif torch.is_tensor(value) and self.seq_len in value.shape:
                raise NotImplementedError(f"decoder layer argument {key!r} {tuple(value.shape)} depends on the "
                                          "sequence; the answer-row path does not know how to cut it")
        mask = self.calls[layer].get("attention_mask")
        edit = blocked(layer, first, last) if blocked is not None else None
        if edit is not None:
            allowed = self.allowed(layer, first, last) & ~edit
            empty = ~allowed.any(-1)
            if empty.any():
                where = empty.nonzero()[0].tolist()
                raise ValueError(
                    f"the attention edit leaves query position {first + where[2]} at layer {layer} with no key to "
                    "attend to (every allowed edge blocked); keep at least one source position per row, e.g. do "
                    "not block a token's edge to itself when it attends to nothing else")
        if mask is None or mask.dtype == torch.bool or self.attn_implementation != "eager":
            mask = self.allowed(layer, first, last) if edit is None else allowed  # bool: True = attend
        else:
            mask = mask[..., rows, :last + 1]
            if edit is not None:
                mask = mask.masked_fill(edit, float("-inf")) if mask.shape == edit.shape else \
                    torch.where(edit, torch.tensor(float("-inf"), dtype=mask.dtype, device=mask.device), mask)
        kwargs["attention_mask"] = local_head_mask(self.adapter, layer, mask)  # a tensor-parallel rank's heads
        recorder = self.recorders[layer]
        kwargs[self.cache_keyword] = (_PrefixKeysValues(recorder.keys[..., :first, :], recorder.values[..., :first, :])
                                      if first > 0 else None)
        return kwargs

    @torch.no_grad()
    def run_rows(self, layer: int, batch: int, positions: Sequence[int] | torch.Tensor,
                 interventions: Sequence[Intervention] = (), *, first: int | None = None,
                 blocked=None, joins: Sequence[int] | None = None, log_softmax: bool = True) -> torch.Tensor:
        """Log-probabilities ``[batch, P, vocab]`` (fp32) at ``positions``, recomputing rows ``first..``.

        Args:
            layer: first decoder layer to run (edits and attention edits at layers ``>= layer`` only).
            batch: batch rows (interventions pick theirs through ``rows``).
            positions: the rows to unembed (absolute sequence positions).
            interventions: as for :meth:`ResidualCheckpoint.run_from`; an edit of all positions edits
                the recomputed rows only, an explicit position before ``first`` is an error.
            first: first recomputed row (default: the first of ``positions``); rows after the last of
                ``positions`` are never computed (nothing before them can read them).
            blocked: ``blocked(layer, first, last) -> bool [batch, 1|n_heads, R, last + 1] | None``,
                attention edges to remove (see the class docstring).
            joins: per batch row, the layer it starts at (non-decreasing, the first ``layer``): a row
                joins the batch at its layer with the clean residual entering it, so a batch mixing
                layers reads every weight once per layer without recomputing the clean layers before
                each row's edits (every edit of a row at a layer ``>=`` its join; not with ``blocked``).
            log_softmax: False returns the fp32 logits instead (a caller that needs a few tokens'
                log-probabilities takes one logsumexp instead of a ``[batch, P, vocab]`` log-softmax).
        """
        layer, starts, positions, first, last = _check_rows_run(self.adapter, layer, batch, positions, interventions,
                                                                first, blocked, joins, self.seq_len, self.device)
        count = last + 1 - first
        edits = [_rows_edit(edit, first, count, self.seq_len) for edit in interventions]
        joining = [starts.count(index) for index in range(self.adapter.n_layers)]  # rows joining at each layer
        hidden = self.inputs[layer][:, first:last + 1].expand(joining[layer], -1, -1).clone()
        local = positions - first
        hooks = HookSet()
        # the layers' attention through _answer_rows_attention (the shared prefix, never copied per row);
        # preserved_state puts each config's attention implementation back
        configs = {id(c): c for c in (getattr(self.adapter.attn(i), "config", None)
                                      for i in range(layer, self.adapter.n_layers)) if c is not None}
        with preserved_state(self.vqa.model):
            try:
                for config in configs.values():
                    config._attn_implementation_internal = ANSWER_ROWS_ATTENTION
                last_mlp_only_at(hooks, self.adapter, local)
                register_interventions(hooks, self.adapter, edits)
                for index in range(layer, self.adapter.n_layers):
                    if index > layer and joining[index]:
                        hidden = torch.cat([hidden, self.inputs[index][:, first:last + 1].expand(
                            joining[index], -1, -1).to(hidden)])
                    _pending_prefix().clear()
                    out = self.adapter.layer(index)(hidden, **self._layer_kwargs(index, first, last, blocked))
                    hidden = out[0] if isinstance(out, tuple) else out
            finally:
                _pending_prefix().clear()
                hooks.remove()
        logits = self.adapter.unembed(self.adapter.final_norm(hidden[:, local])).float()
        return logits.log_softmax(-1) if log_softmax else logits


class FullForwardAnswerRows(_CleanLogits):
    """:class:`AnswerRowRunner`'s interface by whole forwards through ``vqa.trace`` / ``vqa.forward``.

    For backends other than hooks (nnsight, locally or remotely), where calling decoder layers directly
    would bypass the backend. :meth:`run_rows` computes what :meth:`AnswerRowRunner.run_rows` does:
    interventions edit only rows ``first..last`` (an edit of all positions is cut to them, as there) and
    attention edits go to the masks the layers receive (:class:`~mech_vqa.interventions.AttentionEdit`).
    Every earlier row is then the clean run's at every layer (causal attention), so the numbers are
    those of the answer-row path; each run recomputes the whole sequence (the vision tower included),
    which costs a forward per batch instead of a decoding step. ``joins`` need no special handling here:
    a row's clean layers before its first edit are recomputed as they were.
    """

    def __init__(self, vqa, inp, rows: Sequence[int] | torch.Tensor | None = None):
        self.vqa = vqa
        self.adapter = vqa.adapter
        self.one = inp.model_inputs(vqa.device, vqa.adapter.vision_dtype())
        self.seq_len = int(inp.seq_len)
        self.device = vqa.device
        with torch.no_grad():
            self._kept_rows, self._kept = _clean_logits(vqa, inp, rows)

    @property
    def clean_logits(self) -> torch.Tensor:
        """``[1, S, vocab]`` fp32; NaN at the rows that were not computed."""
        if self._kept_rows is None:
            return self._kept
        logits = self._kept.new_full((1, self.seq_len, self._kept.shape[-1]), float("nan"))
        logits[:, self._kept_rows.to(logits.device)] = self._kept
        return logits

    def clean_logits_at(self, positions) -> torch.Tensor:
        """``[P, vocab]`` fp32 clean logits at ``positions`` (which must be among the computed rows)."""
        positions = torch.as_tensor(positions, dtype=torch.long).flatten() % self.seq_len
        if self._kept_rows is None:
            return self._kept[0, positions.to(self._kept.device)]
        index = {int(row): i for i, row in enumerate(self._kept_rows)}
        missing = sorted({int(p) for p in positions} - set(index))
        if missing:
            raise ValueError(f"the clean logits were computed at rows {sorted(index)} only, not at {missing}; "
                             "pass those positions as rows when building the runner")
        return self._kept[0, torch.tensor([index[int(p)] for p in positions], device=self._kept.device)]

    @torch.no_grad()
    def run_rows(self, layer: int, batch: int, positions: Sequence[int] | torch.Tensor,
                 interventions: Sequence[Intervention] = (), *, first: int | None = None,
                 blocked=None, joins: Sequence[int] | None = None, log_softmax: bool = True) -> torch.Tensor:
        """As :meth:`AnswerRowRunner.run_rows` (same arguments, same numbers), by one whole forward."""
        layer, _, positions, first, last = _check_rows_run(self.adapter, layer, batch, positions, interventions,
                                                           first, blocked, joins, self.seq_len, self.device)
        count = last + 1 - first
        edits = [_absolute(_rows_edit(edit, first, count, self.seq_len), first, count) for edit in interventions]
        attention = []
        for index in range(layer, self.adapter.n_layers) if blocked is not None else ():
            mask = blocked(index, first, last)
            if mask is not None:
                attention.append(AttentionEdit(index, mask.bool(), first))
        if attention:
            check_explicit_masks(self.vqa.model)
        # every tensor once per row, as FullForwardRuns batches them (flat patch lists and views included)
        inputs = {k: v.repeat(batch, *[1] * (v.dim() - 1)) if torch.is_tensor(v) else v for k, v in self.one.items()}
        keep = {"logits_to_keep": positions} if "logits_to_keep" in inspect.signature(
            self.vqa.model.forward).parameters else {}
        with self.vqa.trace((), interventions=edits, attention_edits=attention):
            logits = self.vqa.forward(inputs, **keep).logits
        logits = (logits if keep else logits[:, positions]).float()
        return logits.log_softmax(-1) if log_softmax else logits


def _absolute(edit: Intervention, first: int, count: int) -> Intervention:
    """An edit of the recomputed rows (positions relative to ``first``, None = all of them) at absolute positions."""
    import dataclasses

    positions = range(count) if edit.positions is None else edit.positions
    return dataclasses.replace(edit, positions=tuple(first + p for p in positions))


def answer_rows_for(vqa, inp, rows=None):
    """An :class:`AnswerRowRunner` on the hooks backend (clean logits at ``rows`` only, when given),
    :class:`FullForwardAnswerRows` (same numbers, whole forwards through the backend) on any other."""
    if getattr(getattr(vqa, "backend", None), "name", "hooks") == "hooks":
        return AnswerRowRunner(vqa, inp, rows)
    return FullForwardAnswerRows(vqa, inp, rows)
