"""The backend interface and the default backend, plain hooks in this process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager

import torch

from ..capture import ActivationCache, keep_hooks, trace
from ..hooks import HookSet
from ..interventions import AttentionEdit, Intervention, register_attention_edits


class BackendNotSupported(NotImplementedError):
    """A method that the chosen backend cannot run (yet); the message names the method and the fix."""


class Backend:
    """Runs forwards of one :class:`~mech_vqa.model.VQAModel` and records / edits activations.

    ``trace(...)`` is a context manager yielding an :class:`~mech_vqa.capture.ActivationCache` that
    is filled by the ``forward(...)`` calls made inside it (nested traces all see the same forward);
    names, shapes and :class:`~mech_vqa.interventions.Intervention` semantics are those of
    :func:`mech_vqa.capture.trace` for every backend. ``attention_edits``
    (:class:`~mech_vqa.interventions.AttentionEdit`) remove attention edges through the masks the
    layers' attention receives, the same way on every backend.
    """

    name = "base"

    def __init__(self, vqa):
        self.vqa = vqa

    def trace(self, names: Sequence[str] = (), *, layers: Iterable[int] | None = None, positions=None,
              to_cpu: bool = False, detach: bool = True,
              interventions: Sequence[Intervention] = (),
              attention_edits: Sequence[AttentionEdit] = ()) -> AbstractContextManager[ActivationCache]:
        raise NotImplementedError

    def forward(self, inputs: dict, **kwargs):
        """The HF forward on model inputs (a dict of tensors); returns the HF output."""
        raise NotImplementedError

    def generate(self, inputs: dict, **kwargs) -> torch.Tensor:
        """HF ``generate`` on model inputs; returns the token ids ``[B, prompt + new]``."""
        raise NotImplementedError

    def keep_hooks(self) -> AbstractContextManager:
        """A block inside which captures keep their set-up between calls (see the hooks backend);
        nothing here."""
        return contextlib.nullcontext()

    def read_only(self) -> AbstractContextManager:
        """The grad mode for a forward whose activations are only read afterwards: ``torch.no_grad()``
        here; backends that can skip more autograd bookkeeping override it."""
        return torch.no_grad()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class HooksBackend(Backend):
    """Plain PyTorch forward hooks (:func:`mech_vqa.capture.trace`), the fastest in-process engine."""

    name = "hooks"

    def trace(self, names=(), *, attention_edits: Sequence[AttentionEdit] = (), **kwargs):
        if not attention_edits:
            return trace(self.vqa.model, self.vqa.adapter, names, **kwargs)
        return self._trace_with_edges(names, attention_edits, kwargs)

    @contextlib.contextmanager
    def _trace_with_edges(self, names, attention_edits, kwargs):
        hooks = HookSet()
        try:
            register_attention_edits(hooks, self.vqa.adapter, attention_edits)
            with trace(self.vqa.model, self.vqa.adapter, names, **kwargs) as cache:
                yield cache
        finally:
            hooks.remove()

    def forward(self, inputs: dict, **kwargs):
        return self.vqa.model(**inputs, **kwargs)

    def keep_hooks(self) -> AbstractContextManager:
        """:func:`mech_vqa.capture.keep_hooks`: captures leave their hooks installed (idle between
        calls) until the block ends, so a loop of calls pays each capture's set-up once."""
        return keep_hooks(self.vqa.model)

    def read_only(self) -> AbstractContextManager:
        """``torch.inference_mode()``: no version counters or view tracking on the forward's tensors
        (~7% of a 3-layer model's forward, measured with benchmarks/reference_mechanism.py). What it
        records are inference tensors: read them, compute from them, never edit them in place.
        A model dispatched by accelerate (``hf_device_map``) keeps ``no_grad``: its hooks re-create
        offloaded parameters during the forward."""
        # (read from the instance's attributes: an nn.Module attribute miss raises and formats an error)
        if self.vqa.model.__dict__.get("hf_device_map"):
            return torch.no_grad()
        if torch.is_inference_mode_enabled():  # (inside the block already: the methods nest it)
            return contextlib.nullcontext()
        return torch.inference_mode()

    def generate(self, inputs: dict, **kwargs) -> torch.Tensor:
        return self.vqa.model.generate(**inputs, **kwargs)


def require_hooks(vqa, method: str) -> None:
    """Raise :class:`BackendNotSupported` unless ``vqa`` runs on the hooks backend.

    For methods that register their own hooks or call the model's modules directly: on another
    backend they would silently run on plain hooks while the model claims that backend.
    """
    backend = getattr(vqa, "backend", None)
    name = getattr(backend, "name", "hooks")
    if name != "hooks":
        raise BackendNotSupported(
            f"{method} is not yet supported on the {name} backend (it runs its own hooks / module calls "
            "outside vqa.trace); load the model with backend='hooks' for it")
