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
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from .hooks import HookSet, preserved_state
from .interventions import Intervention, register_interventions


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


class ResidualCheckpoint:
    """The clean run's residual stream entering each layer, plus each layer's call arguments."""

    def __init__(self, vqa, inp):
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
                self.clean_logits = vqa.forward(inp).logits.float()  # [1, S, vocab]
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


def checkpoint_for(vqa, inp):
    """A :class:`ResidualCheckpoint` on the hooks backend, :class:`FullForwardRuns` on any other."""
    if getattr(getattr(vqa, "backend", None), "name", "hooks") == "hooks":
        return ResidualCheckpoint(vqa, inp)
    return FullForwardRuns(vqa, inp)
