"""Backends: the engine that runs ``vqa.trace`` / ``vqa.forward`` under the methods.

``hooks`` (default): plain PyTorch hooks on the model in this process (:mod:`mech_vqa.capture`).
``nnsight``: the same captures and interventions expressed as an nnsight trace
(:mod:`mech_vqa.backends.nnsight_backend`, the only module that imports nnsight), locally or through
nnsight's ``remote="local"`` simulation of a remote call. Methods do not know which backend runs them.

A method that does not go through ``vqa.trace`` / ``vqa.forward`` (it registers its own hooks or
calls the model's modules directly) calls :func:`require_hooks` first, so that on another backend it
raises :class:`BackendNotSupported` instead of silently running on plain hooks.
"""

from __future__ import annotations

from .base import Backend, BackendNotSupported, HooksBackend, require_hooks

BACKENDS = ("hooks", "nnsight")


def make_backend(name: str | Backend, vqa, **options) -> Backend:
    """The backend called ``name`` for ``vqa`` (``options`` go to the nnsight backend: ``remote``)."""
    if isinstance(name, Backend):
        return name
    if name == "hooks":
        if options:
            raise ValueError(f"the hooks backend takes no options, got {sorted(options)}")
        return HooksBackend(vqa)
    if name == "nnsight":
        from .nnsight_backend import NNsightBackend

        return NNsightBackend(vqa, **options)
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "Backend", "BackendNotSupported", "HooksBackend", "make_backend", "require_hooks"]
