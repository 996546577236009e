"""Hook plumbing shared by capture and interventions: registration with guaranteed removal, and a
guard that leaves the model exactly as it was found.

Everything in mech_vqa that touches a model goes through :class:`HookSet` inside
:func:`preserved_state`, so that an exception in user code inside a ``with`` block still removes
every hook and restores parameters' ``requires_grad``, train/eval mode and attention implementation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


class HookSet:
    """A list of hook handles, removed together."""

    def __init__(self):
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def pre(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args, kwargs) -> None | (args, kwargs)``."""
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def post(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args, kwargs, output) -> None | output``."""
        self.handles.append(module.register_forward_hook(fn, with_kwargs=True))

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


def attn_implementation(model: nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def _config_attn_state(model: nn.Module) -> list[tuple[object, object]]:
    configs, seen = [], set()
    pending = [getattr(module, "config", None) for module in model.modules()]
    while pending:
        config = pending.pop()
        if config is None or id(config) in seen or not hasattr(config, "_attn_implementation_internal"):
            continue
        seen.add(id(config))
        configs.append((config, config._attn_implementation_internal))
        pending.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}))
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
    training = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    attn = _config_attn_state(model)
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
            for p in grads:
                p.requires_grad_(False)
        yield
    finally:
        for config, value in attn:
            config._attn_implementation_internal = value
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for m, flag in training.items():
            m.training = flag
