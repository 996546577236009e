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


class HookSet:
    """Forward hooks (with kwargs) on modules, removed together.

    A hook goes into the module's own hook dictionaries under an id from torch's handle counter, and is
    deleted from them on removal: what ``register_forward_(pre_)hook(fn, with_kwargs=True)`` and its
    handle do, without building a handle of weak references per hook (a capture installs a dozen hooks
    per call; on a small model their handles were ~2 % of an ``explain`` call). A module without those
    dictionaries goes through torch's own registration.
    """

    def __init__(self):
        self.handles: list = []  # (hooks dict, with-kwargs dict, id) or torch's RemovableHandle
        self.entries: list = []  # (module, "pre" or "post", fn) of every hook added, in order: see install()

    def _add(self, module: nn.Module, kind: str, fn: Callable) -> None:
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
            if isinstance(handle, tuple):
                hooks, with_kwargs, hook_id = handle
                hooks.pop(hook_id, None)
                with_kwargs.pop(hook_id, None)
            else:
                handle.remove()


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
        fields = vars(config)
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
            if vars(config).get("_attn_implementation_internal") != value:
                config._attn_implementation_internal = value
        # only what changed is written back (nn.Module.__setattr__ is slow, and most blocks change nothing)
        for p, flag in zip(params, grads):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for m, flag in zip(modules, training):
            if m.training != flag:
                m.training = flag
