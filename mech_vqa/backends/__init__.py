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


def check_tensor_parallel(model, backend: str, remote: bool | str = False) -> None:
    """One clear error for a tensor-parallel model (transformers' ``tp_plan``) where it cannot run.

    The hooks backend reads it: the capture layer gathers the slices of heads / neurons each rank holds
    and methods read whole weights (:mod:`mech_vqa.tensor_parallel`). The nnsight backend reads it in
    process, through nnsight's own gathering of sharded activations (every rank runs the same trace);
    not remotely: a remote service shards the models it hosts itself, and nnsight's offline simulation
    of a remote call does not run a sharded model (its embedding meets plain tensors and DTensors).
    """
    from ..tensor_parallel import layout_of, tp_size

    size = tp_size(model)
    if size <= 1:
        return
    if backend == "nnsight" and remote:
        raise BackendNotSupported(
            f"this model is tensor-parallel (tp_size={size}, loaded with tp_plan): the nnsight backend runs it in "
            f"process only, not with remote={remote!r} (NDIF shards the models it hosts itself; nnsight's offline "
            "simulation of a remote call fails on a sharded model); use remote=False, or backend='hooks'")
    if backend not in ("hooks", "nnsight"):
        raise BackendNotSupported(f"the {backend} backend cannot trace a tensor-parallel model (tp_size={size}); "
                                  "use backend='hooks' or 'nnsight'")
    layout_of(model)  # a model marked tensor-parallel without sharded parameters: its error now


def check_readout_not_offloaded(adapter) -> None:
    """One clear error when accelerate offloaded the final norm or the unembedding (``device_map`` entries
    "cpu" / "disk" for them): every score reads them outside the forward, where they are meta tensors."""
    for role, module in (("final norm", adapter.final_norm), ("unembedding", adapter.unembed)):
        weight = getattr(module, "weight", None)
        if weight is not None and weight.device.type == "meta" and hasattr(module, "_hf_hook"):
            raise BackendNotSupported(
                f"the {role} ({type(module).__name__}) is offloaded by accelerate's device_map, and the scores read "
                "it outside the forward; give it a device (e.g. device_map with the final norm and lm_head on a GPU "
                "or 'cpu' as main device, or max_memory that leaves room for them)")


def make_backend(name: str | Backend, vqa, **options) -> Backend:
    """The backend called ``name`` for ``vqa`` (``options`` go to the nnsight backend: ``remote``)."""
    check_readout_not_offloaded(vqa.adapter)
    if isinstance(name, Backend):
        check_tensor_parallel(vqa.model, name.name, getattr(name, "remote", False))
        return name
    if name in BACKENDS:
        check_tensor_parallel(vqa.model, name, options.get("remote", False))
    if name == "hooks":
        if options:
            raise ValueError(f"the hooks backend takes no options, got {sorted(options)}")
        return HooksBackend(vqa)
    if name == "nnsight":
        from .nnsight_backend import NNsightBackend

        return NNsightBackend(vqa, **options)
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "Backend", "BackendNotSupported", "HooksBackend", "check_readout_not_offloaded",
           "check_tensor_parallel", "make_backend", "require_hooks"]
