"""Capture: a context-managed tracer on plain PyTorch forward hooks.

    with trace(model, adapter, ["z", "attn_out"], positions=[t]) as cache:
        model(**inputs)
    cache["z", 3]          # [B, P, n_heads, head_dim] at layer 3, positions P
    cache.stack("attn_out")  # [n_layers, B, P, d_model]

Only what is asked is recorded, optionally only at chosen positions and moved to CPU. The same
context also applies :class:`~mech_vqa.interventions.Intervention` s (captures then see edited
values). Hooks are removed on exit, exceptions included, and a capture of ``pattern`` (which switches
to eager attention) puts the attention implementation, mode and ``requires_grad`` flags back
(:func:`~mech_vqa.hooks.preserved_state`); no other capture touches them. A capture's set-up
(module look-ups, a closure per hook) is kept with the adapter and used again by the next capture of
the same kind after it has checked that the model still has those modules at those places; each call
only puts the hooks on and takes them off. Inside :func:`keep_hooks` they even stay installed (idle)
until the block ends. Under sdpa attention, a capture that keeps keys or values reads q, k, v (and z)
where the attention function receives and returns them, through a tap selected by name on the text
config for its forward only (:mod:`mech_vqa.hooks`); otherwise it projects them from the attention
input when they are first read.

Activation names and shapes (``P`` = chosen query positions, ``S`` = full sequence):

=================  ===============================  =========================================
name               where                            shape
=================  ===============================  =========================================
``resid_pre``      input of decoder layer l         ``[B, P, d_model]``
``resid_mid``      input of post-attention norm     ``[B, P, d_model]``
``resid_post``     output of decoder layer l        ``[B, P, d_model]``
``attn_out``       attention block output           ``[B, P, d_model]``
``mlp_out``        MLP block output                 ``[B, P, d_model]``
``z``              per-head output before o_proj    ``[B, P, n_heads, head_dim]``
``q``              rotated queries                  ``[B, P, n_heads, head_dim]``
``k``              rotated keys (all positions)     ``[B, S, n_kv_heads, head_dim]``
``v``              values (all positions)           ``[B, S, n_kv_heads, head_dim]``
``pattern``        attention weights (eager)        ``[B, n_heads, P, S]``
``mlp_act``        input of down_proj               ``[B, P, d_mlp]``
``deepstack``      added after layer l outside it   ``[B, P, d_model]`` (Qwen3-VL's DeepStack; zeros
                   (``resid_pre[l+1] = resid_post[l]    for other families and layers)
                   + deepstack[l]``)
``vision_features``  projector input (per image)    ``[n_images, n_patches, d_vision]``
``projector_out``  projector output                 ``[n_images, n_patches, d_model]``
=================  ===============================  =========================================
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import ModelAdapter, get_adapter
from .hooks import (
    HookSet,
    config_fields,
    float32,
    preserved_state,
    tap_config,
    tapping,
    untapping,
    without_grad,
)
from .interventions import Intervention, register_interventions
from .tensor_parallel import (
    TensorParallelLayout,
    gather_heads,
    is_tensor_parallel,
    layout_of,
)

LAYER_NAMES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern", "mlp_act",
               "deepstack")
MODEL_NAMES = ("vision_features", "projector_out")
NAMES = LAYER_NAMES + MODEL_NAMES


class CaptureError(RuntimeError):
    """Something asked of a capture that the model did not provide."""


class ActivationCache:
    """Captured activations keyed by ``(name, layer)`` (or ``name`` for model-level ones)."""

    def __init__(self, names: Sequence[str], layers: Sequence[int], adapter: ModelAdapter | None = None):
        self.names = tuple(names)
        self.layers = tuple(layers)
        self.adapter = adapter  # rotates pending queries / keys
        self._store: dict = {}
        self.pending: dict = {}  # work left for the first read (queries and keys still to rotate)

    @property
    def store(self) -> dict:
        if self.pending:
            _finish_rotations(self)
        return self._store

    def __getitem__(self, key):
        if isinstance(key, tuple) and key[1] in self.pending and key[0] in ("q", "k", "v"):
            _finish_rotations(self, [key[1]])  # only this layer: a method may read a single layer's
        store = self._store if key in self._store else self.store
        if key not in store:
            raise KeyError(f"{key!r} was not captured; captured: {sorted(map(str, store))}")
        return store[key]

    def __contains__(self, key) -> bool:
        return key in self.store

    def keys(self):
        return self.store.keys()

    def stack(self, name: str, layers: Iterable[int] | None = None) -> torch.Tensor:
        """``[n_layers, ...]``: the activation ``name`` of every captured layer, stacked."""
        layers = self.layers if layers is None else layers
        return torch.stack([self[name, layer] for layer in layers])


class PerLayer(Sequence):
    """``[layer]``: a name captured in some layers, read from the cache only when asked (None elsewhere)."""

    def __init__(self, cache: ActivationCache, name: str, layers: Iterable[int], n_layers: int):
        self.cache, self.name, self.layers, self.n_layers = cache, name, set(layers), n_layers

    def __len__(self) -> int:
        return self.n_layers

    def __getitem__(self, layer):
        if isinstance(layer, slice):
            return [self[i] for i in range(self.n_layers)[layer]]
        layer = range(self.n_layers)[layer]
        return self.cache[self.name, layer] if layer in self.layers else None

    def __add__(self, other) -> list:  # reads like the list it stands for
        return list(self) + list(other)

    def __radd__(self, other) -> list:
        return list(other) + list(self)


def _select(x: torch.Tensor, positions: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    """Pick ``positions`` ``[P]`` (shared) or ``[B, P]`` (per row) along ``dim``."""
    if positions is None:
        return x
    if positions.device != x.device:
        positions = positions.to(x.device)
    if positions.dim() == 1:
        return x.index_select(dim, positions)
    shape = [1] * x.dim()
    shape[0], shape[dim] = positions.shape
    index = positions.view(shape).expand(*[s if i != dim else positions.shape[1] for i, s in enumerate(x.shape)])
    return x.gather(dim, index)


def _split_heads(x: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """``[..., n_heads * head_dim]`` -> ``[..., n_heads, head_dim]`` (a view where possible; ``Tensor.unflatten``
    does the same through a Python wrapper that hooks run per layer per call)."""
    return x.reshape(*x.shape[:-1], n_heads, head_dim)


def _normalise_positions(positions) -> torch.Tensor | None:
    if positions is None:
        return None
    if type(positions) is torch.Tensor and positions.dtype == torch.long and positions.dim() == 1:
        return positions  # (as every method passes them: the checks below would change nothing)
    positions = torch.as_tensor(positions, dtype=torch.long)
    if positions.dim() == 0:
        positions = positions.view(1)
    if positions.dim() > 2:
        raise ValueError(f"positions must be [P] or [batch, P], got shape {tuple(positions.shape)}")
    if positions.dim() == 2 and (positions.shape[0] == 1 or bool((positions == positions[:1]).all())):
        positions = positions[0]  # every row the same (one row, say): one index_select instead of a gather
    return positions


def _normalise_layers(layers):
    """``layers`` (None, layers, or ``{name: layers or None}``) with every iterable read into a tuple: they
    are read more than once (an iterator would be spent by the first read)."""
    if isinstance(layers, Mapping):
        return {name: None if which is None else tuple(which) for name, which in layers.items()}
    return None if layers is None else tuple(layers)


#: ``(names, layers key, n_layers) -> plan`` of :func:`_layer_plan` (a pure function of those; plans are read only)
_PLANS: dict = {}


def _layer_plan(adapter: ModelAdapter, names: Sequence[str], layers) -> dict[int, frozenset]:
    """``{layer: names recorded there}`` from ``layers`` (all, a list, or ``{name: layers}``), shared
    between calls: read only."""
    layers = _normalise_layers(layers)
    key = (tuple(names), _layers_key(layers), adapter.n_layers)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _new_layer_plan(adapter, names, layers)
        if len(_PLANS) > 256:  # (a long-running process asking for many layer sets)
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _new_layer_plan(adapter: ModelAdapter, names: Sequence[str], layers) -> dict[int, frozenset]:
    per_layer = [n for n in names if n in LAYER_NAMES]
    if isinstance(layers, Mapping):
        extra = [name for name in layers if name not in per_layer]
        if extra:
            raise ValueError(f"layers names {extra}, which are not captured per layer here; names: {per_layer}")
        chosen = {name: layers.get(name) for name in per_layer}
    else:
        chosen = dict.fromkeys(per_layer, layers)
    n_layers = adapter.n_layers
    everything = range(n_layers)
    plan: dict[int, set] = {}
    for name, which in chosen.items():
        for layer in (everything if which is None else which):
            if not -n_layers <= layer < n_layers:
                adapter.check_layer(layer)  # its error
            plan.setdefault(layer % n_layers, set()).add(name)
    return {layer: frozenset(wants) for layer, wants in sorted(plan.items())}


@contextlib.contextmanager
def trace(
    model: nn.Module,
    adapter: ModelAdapter | None = None,
    names: Sequence[str] = (),
    *,
    layers: Iterable[int] | Mapping[str, Iterable[int]] | None = None,
    positions=None,
    to_cpu: bool = False,
    detach: bool = True,
    interventions: Sequence[Intervention] = (),
) -> Iterator[ActivationCache]:
    """Record ``names`` (see the module table) during forward passes run inside the block.

    Args:
        model: an unmodified HF model the adapter handles.
        names: activations to record.
        layers: decoder layers to record (default all), or ``{name: layers}`` per name (names
            left out: all layers), e.g. ``{"resid_post": [-1]}``.
        positions: query positions to keep, ``[P]`` or ``[B, P]``; ``None`` keeps all.
        to_cpu: move captured tensors to CPU as they are recorded.
        detach: detach captured tensors (set False to keep them in the autograd graph).
        interventions: edits applied during the same forward.
    """
    adapter = adapter or get_adapter(model)
    layers = _normalise_layers(layers)
    positions = _normalise_positions(positions)
    if positions is not None and positions.device != adapter.device:
        positions = positions.to(adapter.device)
    wants = set(names)
    # Inside keep_hooks(model), a capture without edits leaves its hooks installed for the next one asking
    # the same (they idle in between); a capture with edits, or one that switches to eager attention,
    # installs its own (edits must run before the captures that should see them).
    kept = _KEPT.get(model)
    key = None
    if not interventions and "pattern" not in wants:
        key = (tuple(names), _layers_key(layers), positions is None, detach, to_cpu)
        if kept is not None:
            installed = kept.get(key)
            if installed is not None and installed.idle:  # asked and checked before: its plan holds
                cache = ActivationCache(names, installed.layer_list, adapter)
                with installed.recording(_Recording(_keeper(cache._store, detach, to_cpu), positions,
                                                    cache.pending if detach else None)):
                    yield cache
                return
        else:
            installed = _take_prepared(adapter, model, key)
            if installed is not None:  # the same capture set up before, on the model as it still is
                cache = ActivationCache(names, installed.layer_list, adapter)
                installed.hooks.install()
                try:
                    with installed.recording(_Recording(_keeper(cache._store, detach, to_cpu), positions,
                                                        cache.pending if detach else None)):
                        yield cache
                finally:
                    installed.hooks.remove()
                    _keep_prepared(adapter, key, installed)
                return
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown activation names {unknown}; choose from {NAMES}")
    plan = _layer_plan(adapter, names, layers)
    if isinstance(layers, Mapping):
        layer_list = list(plan)
    else:
        layer_list = [adapter.check_layer(i) for i in (range(adapter.n_layers) if layers is None else layers)]
    cache = ActivationCache(names, layer_list, adapter)
    rec = _Recording(_keeper(cache._store, detach, to_cpu), positions, cache.pending if detach else None)
    installed, stored, registered = _Installed(layer_list), False, False
    # A capture changes nothing of the model but its hooks, and its attention implementation when it
    # needs the weights: only then does it pay for the full state guard (a walk over every module and
    # parameter), else the hooks' removal below is all there is to put back.
    with preserved_state(model, eager=True) if "pattern" in wants else contextlib.nullcontext():
        try:
            with adapter.resolving():
                register_interventions(installed.hooks, adapter, interventions)
                _register_captures(installed, model, adapter, names, plan, detach=detach, to_cpu=to_cpu,
                                   edits=bool(interventions))
            registered = True
            if key is not None and kept is not None and key not in kept:
                kept[key], stored = installed, True
            with installed.recording(rec):
                yield cache
        finally:
            if not stored:
                installed.hooks.remove()
                if key is not None and kept is None and registered:  # (never a set left half made by an error)
                    _keep_prepared(adapter, key, installed, model)


def _layers_key(layers) -> tuple | None:
    """``trace``'s ``layers`` argument as a hashable key (None, a tuple, or sorted ``(name, tuple)`` pairs)."""
    if layers is None:
        return None
    if isinstance(layers, Mapping):
        return tuple(sorted((name, None if which is None else tuple(which)) for name, which in layers.items()))
    return tuple(layers)


class _Recording:
    """What one capture's hooks write to: ``keep(key, tensor)`` (into that capture's cache), the
    positions kept and, for lazily rotated queries / keys, the cache's pending work."""

    __slots__ = ("bounds", "keep", "pending", "positions", "tapped")

    def __init__(self, keep, positions: torch.Tensor | None, pending: dict | None):
        self.keep, self.positions, self.pending = keep, positions, pending
        self.tapped: set[int] = set()  # layers whose q / k / v their attention's tap recorded
        flat = None if positions is None else positions.flatten().tolist()
        self.bounds = None if positions is None else (max(flat), min(flat))

    def check_positions(self, seq: int) -> None:
        if self.bounds is not None and (self.bounds[0] >= seq or self.bounds[1] < -seq):
            raise IndexError(f"capture position {self.bounds[0]} is outside the sequence of length {seq}")


def _keeper(store: dict, detach: bool, to_cpu: bool):
    """``keep(key, tensor)`` into ``store`` (one per capture: lazily rotated queries and keys are kept
    after the forward, into the cache of the capture that recorded them)."""
    def keep(key, value: torch.Tensor) -> None:
        if detach and value.requires_grad:  # (under no_grad nothing needs detaching: skip the op)
            value = value.detach()
        if to_cpu:
            value = value.cpu()
        store[key] = value
    return keep


class _Installed:
    """A set of capture hooks and the recording they currently write to (None: they idle).

    ``plain``: the (q, k, v) projections of the layers whose queries, keys and values are computed
    from the attention input at the first read (:func:`_plain_projections`) unless their attention's
    tap hands them over first; ``tap_configs``: the configs that select those layers' attention (the tap
    is selected on them while recording); ``z_taps``: the ``o_proj`` of the layers whose ``z`` the tap
    records (no hook there); ``untapped``: the attention modules of projected layers that could not be
    tapped when the set was made (another attention implementation selected); ``stamp``: what
    :func:`_take_prepared` checks before the set is used again (None until it is kept)."""

    __slots__ = ("current", "hooks", "layer_list", "plain", "stamp", "tap_configs", "untapped", "z_taps")

    def __init__(self, layer_list: list[int]):
        self.hooks, self.current, self.layer_list = HookSet(), None, layer_list
        self.plain: list[tuple[nn.Module, ...]] = []
        self.tap_configs: dict[int, object] = {}
        self.z_taps: list[nn.Module] = []
        self.untapped: list[nn.Module] = []
        self.stamp: _Stamp | None = None

    @property
    def idle(self) -> bool:
        return self.current is None

    @contextlib.contextmanager
    def recording(self, rec: _Recording):
        self.current = rec
        switched = tapping(self.tap_configs.values()) if self.tap_configs else None
        try:
            yield
        finally:
            self.current = None
            if switched:
                untapping(switched)


#: models inside :func:`keep_hooks`: ``{plan key: installed hooks}`` for each
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def keep_hooks(model: nn.Module) -> Iterator[None]:
    """Inside this block, captures of ``model`` leave their hooks installed for the next capture with
    the same names, layers and options, which then only points them at its own cache: what a capture
    pays per call even with its set-up kept (putting its hooks on and off, checking the model; 3-6 % of a
    3-layer model's ``explain``) is paid once per kind.

    Between captures the hooks idle (each returns at once). All are removed when the block ends,
    exceptions included. Hooks you add to the model inside the block run after kept capture hooks;
    swap no module of the model inside it. Nested blocks share the outer one.
    """
    if model in _KEPT:
        yield
        return
    _KEPT[model] = {}
    try:
        yield
    finally:
        for installed in _KEPT.pop(model, {}).values():
            installed.hooks.remove()


def _register_captures(installed: _Installed, model: nn.Module, adapter: ModelAdapter, names: Sequence[str],
                       plan: dict, *, detach: bool, to_cpu: bool, edits: bool = False) -> None:
    """Every capture hook of a trace; each writes to the recording ``installed.current`` of the moment,
    and returns at once while there is none. ``edits``: the trace also applies interventions."""
    hooks, wants = installed.hooks, set(names)
    shape = (adapter.n_heads, adapter.n_kv_heads, adapter.head_dim)
    whole = _Whole(layout_of(model))  # gathers a tensor-parallel model's slices (else hands tensors through)
    for layer, layer_wants in plan.items():
        _register_layer(installed, adapter, layer, layer_wants, shape, project_later=detach and not to_cpu, whole=whole,
                        edits=edits)
    if "deepstack" in wants:
        _register_deepstack(installed, adapter, [layer for layer, w in plan.items() if "deepstack" in w])
    vision_wants = [name for name in MODEL_NAMES if name in wants]
    if vision_wants and _whole_vision(adapter):
        # the projector is a whole vision module (Qwen-VL): both read from its output, as the adapter says
        def vision_post(module, args, kwargs, out):
            rec = installed.current
            if rec is None:
                return
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            for name, value in adapter.vision_outputs(out, grid).items():
                if name in vision_wants:
                    rec.keep(name, value)
        hooks.post(adapter.projector, vision_post)
    else:
        if "vision_features" in wants:
            def vision_pre(module, args, kwargs):
                rec = installed.current
                if rec is not None:
                    rec.keep("vision_features", adapter.vision_rows(
                        whole.input(module, args[0] if args else next(iter(kwargs.values())))))
            hooks.pre(adapter.projector, vision_pre)
        if "projector_out" in wants:
            def projector_post(module, args, kwargs, out):
                rec = installed.current
                if rec is not None:
                    rec.keep("projector_out", adapter.vision_rows(whole.output(module, out)))
            hooks.post(adapter.projector, projector_post)


def _register_deepstack(installed: _Installed, adapter: ModelAdapter, layers: list[int]) -> None:
    """Record what the text model adds to the residual stream after each of ``layers`` outside the layer
    modules (Qwen3-VL's DeepStack; zeros where nothing is added), read from the text model's own call."""
    def record(module, args, kwargs):
        rec = installed.current
        if rec is None:
            return
        embeds = kwargs.get("inputs_embeds", args[0] if args else None)
        if embeds is None:
            raise CaptureError("the text model was called without inputs_embeds; cannot capture 'deepstack'")
        added = adapter.deepstack_additions(kwargs, embeds)
        for layer in layers:
            value = added.get(layer)
            rec.keep(("deepstack", layer), _select(value if value is not None else torch.zeros_like(embeds),
                                                   rec.positions))

    installed.hooks.pre(adapter.text_model, record)


class _Whole:
    """Puts back together what a hook sees of a tensor-parallel module's input or output: the slices
    its style splits (read once per module from the model's plan) gathered across the TP group; on
    any other model, or a module whose input / output is whole on every rank, the tensor itself."""

    __slots__ = ("layout", "splits")

    def __init__(self, layout: TensorParallelLayout | None):
        self.layout, self.splits = layout, {}

    def _split(self, module: nn.Module, side: str):
        key = (id(module), side)
        if key not in self.splits:
            self.splits[key] = self.layout.split(module, side)
        return self.splits[key]

    def input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        split = None if self.layout is None else self._split(module, "input")
        return x if split is None else self.layout.gather(x, *split)

    def output(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        split = None if self.layout is None else self._split(module, "output")
        return x if split is None else self.layout.gather(x, *split)

    def heads(self, q_proj: nn.Module, pattern: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
        """Attention weights ``[B, local heads, P, S]`` -> ``[B, n_heads, P, S]``."""
        return gather_heads(self.layout, q_proj, pattern, n_heads, head_dim)


def _whole_vision(adapter: ModelAdapter) -> bool:
    """Whether the adapter's ``projector`` is its whole vision module, read through ``vision_outputs``."""
    return adapter.projector is adapter.vision_tower


def _register_layer(installed: _Installed, adapter: ModelAdapter, layer: int, wants: frozenset,
                    shape: tuple[int, int, int], project_later: bool = False, whole: _Whole | None = None,
                    edits: bool = False):
    """One hook per module and kind at most, each doing everything asked of that module, into the
    recording ``installed.current`` (:class:`_Recording`; None: the hook returns at once).

    The recording's ``pending``: where raw queries / keys wait to be rotated at the first read of the
    cache, all layers sharing the same angles in one call (None: rotate in the hook, inside the graph).
    ``project_later``: q, k and v of layers that keep keys or values are taken from the attention
    function (its tap, under sdpa) or else projected at that read from the attention block's input (kept
    on its device until then).
    ``whole``: gathers the slices of a tensor-parallel model (every hook reads through it).
    ``edits``: interventions run in the same forward (``z`` is then read where they edit it, o_proj's input)."""
    hooks = installed.hooks
    n_heads, n_kv, head_dim = shape
    whole = whole or _Whole(None)
    decoder = adapter.layer(layer)
    attn = adapter.attn(layer)

    def hidden_of(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    if "resid_pre" in wants:
        def resid_pre(module, args, kwargs):
            rec = installed.current
            if rec is not None:
                x = hidden_of(args, kwargs)
                rec.check_positions(x.shape[1])
                rec.keep(("resid_pre", layer), whole.input(module, _select(x, rec.positions)))
        hooks.pre(decoder, resid_pre)
    if "resid_mid" in wants:
        def resid_mid(module, args, kwargs):
            rec = installed.current
            if rec is not None:
                rec.keep(("resid_mid", layer), whole.input(module, _select(hidden_of(args, kwargs), rec.positions)))
        hooks.pre(adapter.resid_mid_module(layer), resid_mid)
    if "resid_post" in wants:
        def resid_post(module, args, kwargs, out):
            rec = installed.current
            if rec is not None:
                rec.keep(("resid_post", layer),
                         whole.output(module, _select(out[0] if isinstance(out, tuple) else out, rec.positions)))
        hooks.post(decoder, resid_post)
    want_q, want_k, want_v = "q" in wants, "k" in wants, "v" in wants
    # Where keys or values are kept at every position, the attention block's input is too: q, k and v
    # are then computed from it when first read (the projection the model ran, on the same tensor),
    # which spares three hooks per layer and projects only the layers a method reads.
    projections = _plain_projections(adapter, layer) if project_later and (want_k or want_v) else None
    tap_z = False
    if projections is not None:
        installed.plain.append(projections)
        # Under sdpa attention the attention function hands them over as it reads them (rotated, as the
        # model rotated them): nothing to project or rotate afterwards. The attention input stays the
        # fall-back, for a forward in which the tap does not run (another implementation selected since).
        config = tap_config(attn) if whole.layout is None else None
        if config is None and whole.layout is None:
            installed.untapped.append(attn)  # (eager, flash: a set kept for later is remade once sdpa is back)
        if config is not None:
            installed.tap_configs[id(config)] = config
            # z too, as the attention returns it, where nothing edits o_proj's input (no interventions here,
            # no other pre-hook on o_proj): one hook fewer per layer
            o_proj = adapter.o_proj(layer)
            tap_z = "z" in wants and not edits and not o_proj._forward_pre_hooks
            if tap_z:
                installed.z_taps.append(o_proj)

            def attn_tap(query, key, value, output):
                rec = installed.current
                if rec is None:
                    return
                positions = rec.positions
                if tap_z:
                    rec.keep(("z", layer), _select(output, positions))
                # laid out as the cache has them ([B, positions, heads, hd]) at the first read, if any
                tapped = _Tapped(_select(query, positions, dim=2) if want_q else None, key if want_k else None,
                                 value if want_v else None, rec.keep)
                if rec.pending is None:
                    tapped.finish(layer)
                else:
                    rec.pending[layer] = tapped
                rec.tapped.add(layer)
            hooks.tap(attn, attn_tap)
    raw = {}
    if projections is None:
        if want_q:  # queries only at the chosen positions: selected before rotating (QK-norm is per vector)
            def q_post(module, args, kwargs, out):
                rec = installed.current
                if rec is not None:
                    raw["q"] = adapter.qk_norm(layer, "q", whole.output(module, _select(out, rec.positions)))
            hooks.post(adapter.q_proj(layer), q_post)
        if want_k:
            def k_post(module, args, kwargs, out):
                if installed.current is not None:
                    raw["k"] = adapter.qk_norm(layer, "k", whole.output(module, out))
            hooks.post(adapter.k_proj(layer), k_post)
        if want_v:
            def v_post(module, args, kwargs, out):
                rec = installed.current
                if rec is not None:
                    rec.keep(("v", layer), _split_heads(whole.output(module, out), n_kv, head_dim))
            hooks.post(adapter.v_proj(layer), v_post)
    # a post-normed block (Gemma-3) adds its norm's output, not the attention module's, to the residual
    out_module = adapter.attn_out_module(layer) if "attn_out" in wants else attn
    if out_module is not attn:
        def attn_out_post(module, args, kwargs, out):
            rec = installed.current
            if rec is not None:
                rec.keep(("attn_out", layer), whole.output(module, _select(out, rec.positions)))
        hooks.post(out_module, attn_out_post)
    if want_q or want_k or want_v or (out_module is attn and "attn_out" in wants) or "pattern" in wants:
        want_out, want_pattern = "attn_out" in wants and out_module is attn, "pattern" in wants

        def attn_post(module, args, kwargs, out):
            rec = installed.current
            if rec is None:
                return
            positions, keep = rec.positions, rec.keep
            if want_out:
                keep(("attn_out", layer), whole.output(module, _select(out[0], positions)))
            if want_pattern:
                if out[1] is None:
                    raise CaptureError(
                        f"layer {layer} returned no attention weights even in eager mode; this model cannot "
                        "give attention patterns (capture 'q' and 'k' and use attention_rows instead)"
                    )
                keep(("pattern", layer), whole.heads(adapter.q_proj(layer), _select(out[1], positions, dim=2),
                                                     n_heads, head_dim))
            if projections is not None:
                if layer not in rec.tapped:
                    if tap_z:
                        raise CaptureError(
                            f"layer {layer}'s attention did not run through sdpa in this forward, so its z (read "
                            "where the attention returns it) was not recorded: another attention implementation was "
                            "selected after the capture was set up (inside the trace or inside keep_hooks); select it "
                            "before the trace")
                    hidden = args[0] if args else kwargs["hidden_states"]
                    if hidden.requires_grad:
                        hidden = hidden.detach()
                    rec.pending[layer] = (_Projections(hidden, projections, want_q, want_k, want_v, adapter),
                                          None, kwargs["position_embeddings"], positions, keep, shape)
            elif want_q or want_k:
                job = (raw.pop("q", None), raw.pop("k", None), kwargs["position_embeddings"], positions, keep, shape)
                if rec.pending is None:
                    _rotate(adapter, {layer: job})
                else:
                    rec.pending[layer] = job
        hooks.post(attn, attn_post)
    if "z" in wants and not tap_z:
        def z_pre(module, args, kwargs):
            rec = installed.current
            if rec is not None:
                rec.keep(("z", layer), _split_heads(whole.input(module, _select(args[0], rec.positions)),
                                                    n_heads, head_dim))
        hooks.pre(adapter.o_proj(layer), z_pre)
    if "mlp_act" in wants:
        def mlp_act_pre(module, args, kwargs):
            rec = installed.current
            if rec is not None:
                rec.keep(("mlp_act", layer), whole.input(module, _select(args[0], rec.positions)))
        hooks.pre(adapter.down_proj(layer), mlp_act_pre)
    if "mlp_out" in wants:
        def mlp_out_post(module, args, kwargs, out):
            rec = installed.current
            if rec is not None:
                rec.keep(("mlp_out", layer), whole.output(module, _select(out, rec.positions)))
        hooks.post(adapter.mlp_out_module(layer), mlp_out_post)


def _plain_projections(adapter: ModelAdapter, layer: int) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    """Layer ``layer``'s query, key and value projections when recomputing them from the attention
    input gives exactly what the forward produced: plain ``nn.Linear`` s with no hooks (a subclass,
    a quantised or adapter-wrapped layer, a hook that edits the output, or accelerate's dispatch hook,
    which may offload the weight after the forward: None, captured by hooks)."""
    modules = (adapter.q_proj(layer), adapter.k_proj(layer), adapter.v_proj(layer))
    return modules if _all_plain(modules) else None


def _all_plain(modules) -> bool:
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    for module in modules:
        fields = module.__dict__
        if type(module) is not nn.Linear or fields["_forward_hooks"] or fields["_forward_pre_hooks"]:
            return False
        # a forward replaced on the instance (tensor parallelism, a wrapper); accelerate's dispatch hook
        # (weights may be offloaded again after the forward)
        if "forward" in fields or "_hf_hook" in fields:
            return False
    return True


# A capture's set-up (module look-ups, one closure per hook) is kept per adapter and kind of capture
# (names, layers, options), and used again by the next capture of that kind once it has checked that
# the model still has those modules at those places: a call then only puts the hooks into the modules'
# hook dictionaries and takes them out again (hooks are never left on the model between calls).


class _Stamp:
    """The model as a kept capture set was made for: every hooked module's places, as ``(parent, name,
    module)`` links up to the root, the decoder-layer list and its length, the text config."""

    __slots__ = ("config", "layers", "links", "model", "n_layers", "plain", "tap_configs", "untapped", "z_taps")

    def __init__(self, adapter: ModelAdapter, model: nn.Module, links: tuple, installed: _Installed):
        self.model, self.links, self.config = model, links, adapter.text_config
        self.layers = adapter.layers
        self.n_layers = len(self.layers._modules)
        self.tap_configs, self.z_taps = tuple(installed.tap_configs.values()), tuple(installed.z_taps)
        self.untapped = tuple(installed.untapped)
        # where every projected layer's z comes from its tap, a forward without the tap is an error rather
        # than a projection: what the projections look like then does not matter
        covered = len(self.z_taps) == len(installed.plain)
        self.plain = () if covered else tuple(module for modules in installed.plain for module in modules)

    def holds(self, adapter: ModelAdapter, model: nn.Module) -> bool:
        if model is not self.model or len(self.layers._modules) != self.n_layers or \
                adapter.text_config is not self.config:
            return False
        for parent, name, module in self.links:
            if parent._modules.get(name) is not module:  # swapped, deleted or moved since
                return False
        # z read by the attention's tap needs it to run (sdpa still selected) and nothing else to edit o_proj's input
        if self.z_taps and (any(m._forward_pre_hooks for m in self.z_taps) or any(
                config_fields(c).get("_attn_implementation_internal") != "sdpa" for c in self.tap_configs)):
            return False
        # a set made without taps (another attention selected then) is made again, tapped, once sdpa is back
        if self.untapped and any(tap_config(attention) is not None for attention in self.untapped):
            return False
        # what made the set compute q / k / v from the attention input must still hold
        return _all_plain(self.plain) and not is_tensor_parallel(model)


#: kept capture sets per adapter (and so per model), at most this many kinds each
_MAX_KEPT_KINDS = 32


def _take_prepared(adapter: ModelAdapter, model: nn.Module, key) -> _Installed | None:
    """The capture set kept for ``key`` (taken out: a capture running meanwhile sets up its own), or
    None when there is none or the model changed since (it is then dropped)."""
    kept = adapter.__dict__.get("_capture_sets")
    installed = kept.pop(key, None) if kept else None
    if installed is None or not installed.stamp.holds(adapter, model):
        return None
    return installed


def _keep_prepared(adapter: ModelAdapter, key, installed: _Installed, model: nn.Module | None = None) -> None:
    """Keep ``installed`` (its hooks removed) for the next capture of the same kind on this adapter.

    A new set is kept from the second capture of its kind on: stamping it walks the model once, which
    a capture asked for only once (a sweep over changing layers, say) should not pay."""
    if installed.stamp is None:
        if model is None or is_tensor_parallel(model):
            return
        seen = adapter.__dict__.setdefault("_capture_kinds_seen", set())
        if key not in seen:
            if len(seen) >= 4 * _MAX_KEPT_KINDS:
                seen.clear()
            seen.add(key)
            return
        links = _links_to(model, [module for module, _, _ in installed.hooks.entries])
        if links is None:
            return
        installed.stamp = _Stamp(adapter, model, links, installed)
    kept = adapter.__dict__.setdefault("_capture_sets", {})
    if len(kept) >= _MAX_KEPT_KINDS and key not in kept:
        kept.clear()
    kept.setdefault(key, installed)


def _links_to(model: nn.Module, modules: list[nn.Module]) -> tuple | None:
    """``(parent, name, child)`` for every link from ``model`` down to each of ``modules`` (all of a
    module's places where it has several), or None when one of them is not a submodule of ``model``."""
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    pending, seen = [model], {id(model)}
    while pending:
        module = pending.pop()
        for name, child in module._modules.items():
            if child is None:
                continue
            parents.setdefault(id(child), []).append((module, name))
            if id(child) not in seen:
                seen.add(id(child))
                pending.append(child)
    links: dict[tuple[int, str], tuple] = {}
    pending, seen = list(modules), set()
    while pending:
        module = pending.pop()
        if module is model or id(module) in seen:
            continue
        seen.add(id(module))
        places = parents.get(id(module))
        if not places:
            return None
        for parent, name in places:
            links[id(parent), name] = (parent, name, module)
            pending.append(parent)
    return tuple(links.values())


class _Projections:
    """A layer's attention input, kept so its queries, keys and values are projected at the first read."""

    __slots__ = ("adapter", "hidden", "modules", "versions", "want")

    def __init__(self, hidden: torch.Tensor, modules, want_q: bool, want_k: bool, want_v: bool, adapter: ModelAdapter):
        self.hidden, self.modules, self.want, self.adapter = hidden, modules, (want_q, want_k, want_v), adapter
        self.versions = tuple(m._parameters["weight"]._version for m in modules)  # (plain nn.Linear s)

    def project(self, layer: int, positions, keep, shape, *, all_queries: bool = False):
        """``(raw q at positions or None, raw k or None)``; values are kept straight away.
        ``all_queries``: q at every position."""
        if tuple(m._parameters["weight"]._version for m in self.modules) != self.versions:
            raise CaptureError(f"layer {layer}'s q/k/v projection weights changed after the forward; read "
                               "the captured q, k and v before editing the model's weights")
        (q_proj, k_proj, v_proj), (want_q, want_k, want_v) = self.modules, self.want
        hidden = self.hidden

        def project(module: nn.Linear) -> torch.Tensor:  # the module's own linear map, its parameters read directly
            return F.linear(hidden, module._parameters["weight"], module._parameters.get("bias"))

        if want_v:
            keep(("v", layer), _split_heads(project(v_proj), shape[1], shape[2]))
        q = project(q_proj) if want_q else None
        if q is not None and not all_queries:
            q = _select(q, positions)
        k = project(k_proj) if want_k else None
        # QK-norm (Gemma-3, Qwen3-VL) between projection and rotation, as the attention applies it
        return self.adapter.normalise_qk(layer, q, k)


class _Tapped:
    """A layer's queries (at the kept positions), keys and values as its attention function read them,
    ``[B, heads, positions, hd]``: put in the cache's layout (``[B, positions, heads, hd]``, views) when
    first read (a method reads one layer's, not all)."""

    __slots__ = ("k", "keep", "q", "v")

    def __init__(self, q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None, keep):
        self.q, self.k, self.v, self.keep = q, k, v, keep

    def finish(self, layer: int) -> None:
        for name, value in (("q", self.q), ("k", self.k), ("v", self.v)):
            if value is not None:
                self.keep((name, layer), value.transpose(1, 2))


@without_grad  # pending work belongs to a detached capture (its inputs may be inference tensors)
def _finish_rotations(cache: ActivationCache, layers=None) -> None:
    """Rotate the pending queries / keys of ``layers`` (default all), layers sharing angles together
    (and lay out what an attention tap recorded)."""
    if layers is None:
        jobs, cache.pending = cache.pending, {}
    else:
        jobs = {layer: cache.pending.pop(layer) for layer in layers}
    for layer, job in list(jobs.items()):
        if isinstance(job, _Tapped):
            job.finish(layer)
            del jobs[layer]
        elif isinstance(job[0], _Projections):
            if len(jobs) == 1 and all(job[0].want[:2]):
                # one layer read on its own: rotate its queries at every position together with the keys,
                # as the model does, and keep the chosen rows (a rotation is per position: same values)
                _rotate_layer(cache.adapter, layer, job)
                return
            q, k = job[0].project(layer, job[3], job[4], job[5])
            if q is None and k is None:
                del jobs[layer]  # values only: nothing to rotate
            else:
                jobs[layer] = (q, k, *job[2:])
    groups: dict = {}
    for layer, job in jobs.items():  # layers given the same angle tensors (HF passes one pair to all)
        cos, sin = job[2]
        groups.setdefault((id(cos), id(sin)), {})[layer] = job
    for group in groups.values():
        _rotate(cache.adapter, group)


def _rotate_layer(adapter: ModelAdapter, layer: int, job: tuple) -> None:
    """Project and rotate one layer's queries and keys (a pending :class:`_Projections` job)."""
    projections, _, (cos, sin), positions, keep, (n_heads, n_kv, head_dim) = job
    q, k = projections.project(layer, positions, keep, job[5], all_queries=True)
    q_rot, k_rot = adapter.rotate_qk(layer, _split_heads(q, n_heads, head_dim).transpose(1, 2),
                                     _split_heads(k, n_kv, head_dim).transpose(1, 2), (cos, sin))
    keep(("q", layer), _select(q_rot.transpose(1, 2), positions))
    keep(("k", layer), k_rot.transpose(1, 2))


def _rotate(adapter: ModelAdapter, jobs: dict) -> None:
    """Rotate recorded raw queries (at the chosen positions) and keys (everywhere) of several layers
    that share their angles, with the model's own rotary function, all layers in one call.

    ``jobs``: ``{layer: (raw q or None, raw k or None, (cos, sin), positions, keep, shape)}``.
    Only what was asked is rotated (an unused slot gets one head of the other: a negligible row).
    """
    layers = list(jobs)
    _, _, (cos, sin), positions, _, (n_heads, n_kv, head_dim) = jobs[layers[0]]
    first = layers[0]
    qs = [jobs[layer][0] for layer in layers if jobs[layer][0] is not None]
    ks = [jobs[layer][1] for layer in layers if jobs[layer][1] is not None]
    # [B, n_layers * heads, P or S, hd]: the layers side by side as extra heads
    q = (qs[0] if len(qs) == 1 else torch.cat(qs, -1)).unflatten(-1, (-1, head_dim)).transpose(1, 2) if qs else None
    k = (ks[0] if len(ks) == 1 else torch.cat(ks, -1)).unflatten(-1, (-1, head_dim)).transpose(1, 2) if ks else None
    if q is not None and k is not None and positions is None:
        q_rot, k_rot = adapter.rotate_qk(first, q, k, (cos, sin))
    elif q is not None and k is not None and q.shape[1] == k.shape[1] and positions.dim() == 1:
        # as many query as key heads (multi-head attention): the queries ride along as extra rows of the
        # keys, each row with its own angles, so one call rotates both
        rows = torch.cat([k, q], dim=2)
        angles = (torch.cat([cos, _select(cos, positions)], dim=1), torch.cat([sin, _select(sin, positions)], dim=1))
        both = adapter.rotate_qk(first, rows[:, :1], rows, angles)[1]
        k_rot, q_rot = both[:, :, :k.shape[2]], both[:, :, k.shape[2]:]
    else:
        if q is not None:  # q sits at the chosen positions: its own angles
            angles = (cos, sin) if positions is None else (_select(cos, positions), _select(sin, positions))
            q_rot = adapter.rotate_qk(first, q, q[:, :1], angles)[0]
        if k is not None:
            k_rot = adapter.rotate_qk(first, k[:, :1], k, (cos, sin))[1]
    q_layers = [layer for layer in layers if jobs[layer][0] is not None]
    k_layers = [layer for layer in layers if jobs[layer][1] is not None]
    if q is not None:
        for layer, part in zip(q_layers, q_rot.transpose(1, 2).split(n_heads, dim=2)):
            jobs[layer][4](("q", layer), part)
    if k is not None:
        for layer, part in zip(k_layers, k_rot.transpose(1, 2).split(n_kv, dim=2)):
            jobs[layer][4](("k", layer), part)


def _flat_list(x: torch.Tensor) -> list:
    """``x.flatten().tolist()`` for a tensor of up to 2 dimensions, without the flatten op."""
    values = x.tolist()
    dim = x.dim()
    return values if dim == 1 else [values] if dim == 0 else [v for row in values for v in row]


def attention_rows(adapter: ModelAdapter, layer: int | Sequence[int], q: torch.Tensor, k: torch.Tensor,
                   query_positions: torch.Tensor, key_mask: torch.Tensor | None = None,
                   heads: Sequence[int] | None = None, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention weights at chosen query rows, recomputed from captured rotated ``q`` and ``k``.

    Exact for causal softmax attention (what eager attention computes), without eager mode:
    ``softmax(q k^T * scaling + mask)``, the mask being causal, padding and, for a sliding-window
    layer (:meth:`ModelAdapter.sliding_window`, window ``w``), ``key > query - w``. Where ``blocks``
    marks bidirectional blocks (Gemma-3's image tokens), a query also sees the later keys of its own
    block: HF's ``AND(window, OR(causal, same block))``.

    Args:
        layer: the layer of ``q``/``k``, or one layer per batch row (rows of different layers,
            each with its own scaling and window, in one call).
        q: ``[B, P, n_heads, head_dim]`` captured ``q`` at ``query_positions``.
        k: ``[B, S, n_kv_heads, head_dim]`` captured ``k``.
        query_positions: ``[P]`` or ``[B, P]`` sequence positions of the rows of ``q``.
        key_mask: ``[B, S]`` attention mask (1 = real token); None = all real.
        heads: only these query heads (default all): each reads its own key head.
        blocks: ``[B, S]`` or ``[S]`` block id per position (``-1`` = none), as
            :meth:`ModelAdapter.attention_blocks` gives it; None = causal everywhere.

    Returns: ``[B, n_heads or len(heads), P, S]`` float32.
    """
    batch = q.shape[0]
    one_layer = isinstance(layer, int)
    layers = [layer] * batch if one_layer else [int(x) for x in layer]
    if len(layers) != batch:
        raise ValueError(f"attention_rows got {len(layers)} layers for {batch} batch rows")
    group = adapter.n_heads // adapter.n_kv_heads
    if one_layer:
        scaling, windows = adapter.attention_scaling(layer), [adapter.sliding_window(layer)]
    else:
        scales = {x: adapter.attention_scaling(x) for x in set(layers)}
        window_of = {x: adapter.sliding_window(x) for x in scales}
        scaling = torch.tensor([scales[x] for x in layers], device=k.device).view(-1, 1, 1, 1)
        windows = [window_of[x] for x in layers]
    if heads is not None and len(heads) == 1 and one_layer:
        # one head (the usual map): [B, P, hd] x [B, hd, S] in one batched product on views
        head = adapter.check_head(int(heads[0]))
        scores = torch.bmm(float32(q.select(2, head)), float32(k.select(2, head // group)).transpose(1, 2))
        scores = scores.mul_(scaling).unsqueeze(1)  # [B, 1, P, S]
    else:
        if heads is None:
            k = k.float().repeat_interleave(group, dim=2)  # [B, S, H, hd]
        else:
            heads = [adapter.check_head(int(h)) for h in heads]
            q = q[:, :, heads]
            k = k[:, :, [h // group for h in heads]].float()
        scores = torch.matmul(q.float().transpose(1, 2), k.permute(0, 2, 3, 1)).mul_(scaling)  # [B, H, P, S]
    seq = k.shape[1]
    blocked = None  # [B, P, S]
    windowed = any(w is not None for w in windows)
    # queries at the last position see every key: no causal mask to build (the usual explained token)
    if windowed or blocks is not None or any(p != seq - 1 for p in _flat_list(query_positions)):
        if query_positions.device != scores.device:
            query_positions = query_positions.to(scores.device)
        if query_positions.dim() == 1:
            query_positions = query_positions.unsqueeze(0).expand(batch, -1)
        keys = torch.arange(seq, device=scores.device)
        blocked = keys > query_positions.unsqueeze(-1)  # causal
        if blocks is not None:
            blocks = blocks.to(scores.device)
            blocks = blocks.unsqueeze(0).expand(batch, -1) if blocks.dim() == 1 else blocks
            query_block = blocks.gather(1, query_positions)  # [B, P]
            blocked &= (query_block.unsqueeze(-1) != blocks.unsqueeze(1)) | (query_block < 0).unsqueeze(-1)
        if windowed:
            width = torch.tensor([w if w is not None else seq + 1 for w in windows], device=scores.device)
            blocked |= keys <= (query_positions - width.view(-1, 1)).unsqueeze(-1)
    if key_mask is not None:
        padding = (key_mask.to(scores.device) == 0).unsqueeze(1)  # [B, 1, S]
        blocked = padding if blocked is None else blocked | padding
    if blocked is not None:
        scores = scores.masked_fill_(blocked.unsqueeze(1), float("-inf"))
    return scores.softmax(dim=-1)
