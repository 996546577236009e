"""Hook plumbing shared by capture and interventions: registration with guaranteed removal, and a
guard that leaves the model exactly as it was found.

Everything in mech_vqa that touches a model goes through :class:`HookSet` inside
:func:`preserved_state`, so that an exception in user code inside a ``with`` block still removes
every hook and restores parameters' ``requires_grad``, train/eval mode and attention implementation.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def without_grad(fn: Callable) -> Callable:
    """``@torch.no_grad()`` that costs nothing where gradients are already off: the methods call each
    other inside one read-only block, and a no_grad context per call adds up on small models."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


def float32(x: torch.Tensor) -> torch.Tensor:
    """``x.float()`` without the call where ``x`` is float32 already (a no-op cast still dispatches, and the
    scoring after a forward makes dozens of them on small tensors)."""
    return x if x.dtype == torch.float32 else x.float()


class HookSet:
    """Forward hooks (with kwargs) on modules, removed together.

    A hook goes into the module's own hook dictionaries under an id from torch's handle counter, and is
    deleted from them on removal: what ``register_forward_(pre_)hook(fn, with_kwargs=True)`` and its
    handle do, without building a handle of weak references per hook (a capture installs a dozen hooks
    per call; on a small model their handles were ~2 % of an ``explain`` call). A module without those
    dictionaries goes through torch's own registration.

    A tap (:meth:`tap`) is not a module hook: a function the attention function calls with the queries,
    keys and values it received and the output it returns, on attention modules that run transformers'
    sdpa attention (see :func:`tap_config`), while the tap attention implementation is selected
    (:func:`tapping`).
    """

    def __init__(self):
        self.handles: list = []  # (hooks dict, with-kwargs dict, id), (module id, tap) or torch's RemovableHandle
        self.entries: list = []  # (module, "pre" / "post" / "tap", fn) of every hook added, in order: see install()

    def _add(self, module: nn.Module, kind: str, fn: Callable) -> None:
        if kind == "tap":
            _register_tap_attention()
            _ATTENTION_TAPS.setdefault(id(module), []).append(fn)
            self.handles.append((id(module), fn))
            return
        fields = module.__dict__
        if kind == "pre":
            hooks, with_kwargs = fields.get("_forward_pre_hooks"), fields.get("_forward_pre_hooks_with_kwargs")
        else:
            hooks, with_kwargs = fields.get("_forward_hooks"), fields.get("_forward_hooks_with_kwargs")
        if hooks is None or with_kwargs is None:
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            self.handles.append(register(fn, with_kwargs=True))
            return
        hook_id = RemovableHandle.next_id
        RemovableHandle.next_id += 1
        hooks[hook_id] = fn
        with_kwargs[hook_id] = True
        self.handles.append((hooks, with_kwargs, hook_id))

    def pre(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args, kwargs) -> None | (args, kwargs)``."""
        self._add(module, "pre", fn)
        self.entries.append((module, "pre", fn))

    def post(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args, kwargs, output) -> None | output``."""
        self._add(module, "post", fn)
        self.entries.append((module, "post", fn))

    def tap(self, attention: nn.Module, fn: Callable) -> None:
        """``fn(query [B, H, S, hd], key [B, KV, S, hd], value [B, KV, S, hd], output [B, S, H, hd]) -> None``
        called by the attention function of ``attention`` once it has attended: what it read (rotated,
        normalised queries and keys; keys and values not repeated per query group) and what it returns
        (each head's output, which the module reshapes into ``o_proj``'s input)."""
        self._add(attention, "tap", fn)
        self.entries.append((attention, "tap", fn))

    def install(self) -> None:
        """Put every hook added so far back on its module after :meth:`remove`, in the same order and
        under new ids (so, like a new registration, after hooks others added meanwhile)."""
        if self.handles:
            raise RuntimeError("this HookSet's hooks are still installed; remove() them first")
        for module, kind, fn in self.entries:
            self._add(module, kind, fn)

    def remove(self) -> None:
        while self.handles:
            handle = self.handles.pop()
            if isinstance(handle, tuple) and len(handle) == 2:  # a tap
                key, fn = handle
                taps = _ATTENTION_TAPS.get(key)
                if taps is not None:
                    taps.remove(fn)
                    if not taps:
                        del _ATTENTION_TAPS[key]
            elif isinstance(handle, tuple):
                hooks, with_kwargs, hook_id = handle
                hooks.pop(hook_id, None)
                with_kwargs.pop(hook_id, None)
            else:
                handle.remove()


# ----------------------------------------------------------------------------- attention taps
# What a layer's attention reads (its rotated queries and keys, its values) exists only inside its
# attention function, which no module hook sees. transformers selects that function by name from the
# config (``config._attn_implementation``), so a capture that wants them registers, once, a function
# that runs transformers' own sdpa attention and then hands its inputs and output to the taps of the
# calling module, and selects it by name on the tapped layers' configs for its recording only; masks are
# built by sdpa's own mask function under that name. The forward computes exactly what it computes
# under "sdpa"; nothing is projected or rotated again afterwards.

#: the name of the tapping attention implementation in transformers' attention and mask interfaces
TAP_ATTENTION = "mech_vqa_tap_sdpa"
#: ``id(attention module) -> [tap, ...]`` installed now (a module not listed runs plain sdpa)
_ATTENTION_TAPS: dict[int, list[Callable]] = {}
_INTERFACES: list = []  # (transformers' attention interface, mask interface) once registered
#: [attention function, mask function] registered as "sdpa": read when the tap is registered and again
#: each time a capture selects it (so it follows a re-registered "sdpa"), not on every layer's call
_SDPA: list = [None, None]


def _tapped_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, then ``module``'s taps given its inputs and output."""
    out = _SDPA[0](module, query, key, value, attention_mask, **kwargs)
    taps = _ATTENTION_TAPS.get(id(module))
    if taps:
        output = out[0]
        for tap in taps:
            tap(query, key, value, output)
    return out


def _tap_mask(*args, **kwargs):
    return _SDPA[1](*args, **kwargs)


def _resolve_sdpa() -> None:
    attention, mask = _INTERFACES[0]
    _SDPA[:] = attention["sdpa"], mask["sdpa"]


def _register_tap_attention() -> None:
    if _INTERFACES:
        return
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    AttentionInterface.register(TAP_ATTENTION, _tapped_sdpa)
    AttentionMaskInterface.register(TAP_ATTENTION, _tap_mask)
    _INTERFACES.append((ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS))
    _resolve_sdpa()


def tap_config(attention: nn.Module):
    """The config through which ``attention`` picks its attention function, when a tap can read it:
    a config that selects "sdpa" (or the tap itself); None otherwise (eager attention, flash kernels:
    the capture then projects queries, keys and values itself)."""
    config = attention.__dict__.get("config")
    fields = None if config is None else config_fields(config)
    if fields is None or fields.get("_attn_implementation_internal") not in ("sdpa", TAP_ATTENTION):
        return None
    return config


def tapping(configs) -> list[tuple[object, str]]:
    """Select the tap attention on each of ``configs`` that selects "sdpa"; returns what to put back
    (:func:`untapping`). A config that selects anything else by now is left alone: its layers'
    taps then do not run, and captures fall back on projecting what they did not receive."""
    switched = []
    if _INTERFACES:
        _resolve_sdpa()
    for config in configs:
        fields = config_fields(config)
        if fields.get("_attn_implementation_internal") == "sdpa":
            fields["_attn_implementation_internal"] = TAP_ATTENTION
            switched.append((config, "sdpa"))
    return switched


def untapping(switched: list[tuple[object, str]]) -> None:
    for config, value in switched:
        config_fields(config)["_attn_implementation_internal"] = value


def config_fields(config) -> dict:
    """A config's attribute dictionary, read past transformers' Python ``__getattribute__`` (every attribute
    read of a config runs it, ``__dict__`` included; captures read the attention choice on every call)."""
    return object.__getattribute__(config, "__dict__")


def attn_implementation(model: nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def _submodules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` once (as ``model.modules()``), in one iterative pass over ``_modules``
    (no nested generators): the guard runs on every guarded call."""
    out, seen, pending = [], set(), [model]
    pop, push, mark = pending.pop, pending.extend, seen.add
    while pending:
        module = pop()
        if module is None or id(module) in seen:
            continue
        mark(id(module))
        out.append(module)
        push(module._modules.values())
    return out


def _config_attn_state(modules: list[nn.Module]) -> list[tuple[object, object]]:
    """``(config, its _attn_implementation_internal)`` for every config of ``modules`` and their sub-configs.

    Read through each object's ``__dict__``: a model's config is a plain attribute, which skips
    nn.Module's slow ``__getattr__`` miss on the many modules that have none, and transformers'
    configs route every attribute read through a Python ``__getattribute__``.
    """
    configs, seen = [], set()
    pending = [module.__dict__.get("config") for module in modules]
    while pending:
        config = pending.pop()
        if config is None or id(config) in seen:
            continue
        seen.add(id(config))
        fields = config_fields(config)
        if "_attn_implementation_internal" not in fields:
            continue
        configs.append((config, fields["_attn_implementation_internal"]))
        pending.extend(fields.get(key) for key in getattr(type(config), "sub_configs", {}))
    return configs


def count_hooks(model: nn.Module) -> int:
    """Number of forward / pre-forward / backward hooks on any module of ``model``."""
    total = 0
    for module in model.modules():
        total += len(module._forward_hooks) + len(module._forward_pre_hooks)
        total += len(module._backward_hooks) + len(getattr(module, "_backward_pre_hooks", {}))
    return total


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, eager: bool = False, frozen: bool = False) -> Iterator[None]:
    """Run a block and put back mode, ``requires_grad`` flags and attention implementation.

    Args:
        eager: switch to eager attention for the block (the only one that returns weights).
        frozen: set ``requires_grad=False`` on every parameter for the block (gradient methods
            then differentiate only with respect to their own inputs).
    """
    modules = _submodules(model)
    training = [m.training for m in modules]
    params = [p for m in modules for p in m._parameters.values() if p is not None]
    grads = [p.requires_grad for p in params]
    attn = _config_attn_state(modules)
    try:
        if eager and attn_implementation(model) != "eager":
            try:
                model.set_attn_implementation("eager")
            except Exception as err:  # noqa: BLE001 - re-raised with the fix named
                raise RuntimeError(
                    f"{type(model).__name__} cannot switch to eager attention ({err}); attention "
                    "weights need it. Load the model with attn_implementation='eager'."
                ) from err
        if frozen:
            for p in params:
                p.requires_grad_(False)
        yield
    finally:
        for config, value in attn:
            if config_fields(config).get("_attn_implementation_internal") != value:
                config._attn_implementation_internal = value
        # only what changed is written back (nn.Module.__setattr__ is slow, and most blocks change nothing)
        for p, flag in zip(params, grads):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for m, flag in zip(modules, training):
            if m.training != flag:
                m.training = flag
