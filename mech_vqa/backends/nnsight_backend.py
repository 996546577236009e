"""The nnsight backend: captures and interventions as one nnsight trace per forward.

The only module of mech_vqa that imports nnsight (lazily, when this backend is chosen: importing
nnsight patches ``torch.Tensor.backward`` and adds ``.save`` to every object). The adapter stays
the only source of module paths: each place it names is resolved to the envoy with the same path
(``model.named_modules()``), so any family the adapter handles runs here unchanged.

``vqa.trace(...)`` records what is asked (names, layers, positions, interventions); ``vqa.forward``
then runs ONE ``TransformersModel.trace`` that visits the places in execution order, applies the
edits (torch-only code in :mod:`~mech_vqa.backends.nnsight_ops`, shipped by value to a remote
side), and ``.save()`` s the selected activations and the model output (then unflattening heads and
rotating ``q``/``k`` happen on the client). Methods whose heavy part is a projection through the
frozen final norm and the unembedding ask instead for scores computed inside the trace
(:meth:`NNsightBackend.explain_scores`, :meth:`NNsightBackend.logit_lens_scores`): only the scores
are saved, so a remote call returns O(layers x heads) numbers for head-level attribution.

``remote="local"`` runs every forward through nnsight's local simulation of a remote call (the
trace is serialised as for NDIF, modules not installed on a server are hidden) without network.
``remote=True`` sends it to NDIF (checked first: an API key, the service up, the model hosted).
"""

from __future__ import annotations

import contextlib
import copy
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..capture import NAMES, ActivationCache, CaptureError, _layer_plan, _normalise_layers, _normalise_positions, _select
from ..hooks import preserved_state
from ..interventions import AttentionEdit, Intervention, check_explicit_masks
from . import nnsight_ops
from ..tensor_parallel import is_tensor_parallel, local_head_mask, whole_heads
from .base import Backend, BackendNotSupported

#: the nnsight versions this backend is tested with (also the pin in pyproject.toml)
SUPPORTED_NNSIGHT = (">=0.8.1", "<0.9")
PIP_HINT = "pip install 'nnsight>=0.8.1,<0.9'"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def check_nnsight_version(version: str) -> None:
    """One clear error for an nnsight outside :data:`SUPPORTED_NNSIGHT`."""
    parsed = _version_tuple(version)
    if not (0, 8, 1) <= parsed < (0, 9):
        raise ImportError(f"nnsight {version} is installed but the nnsight backend supports nnsight "
                          f"{','.join(SUPPORTED_NNSIGHT)} only (its tracing API changes between minor "
                          f"versions); {PIP_HINT}")


def import_nnsight():
    """nnsight, checked against the supported range, or one clear error naming the pip command."""
    try:
        import nnsight
    except ImportError as err:
        raise ImportError(f"the nnsight backend needs the nnsight package, which is not installed: {PIP_HINT} "
                          "(or use backend='hooks')") from err
    check_nnsight_version(getattr(nnsight, "__version__", "0"))
    return nnsight


class RemoteUnavailable(ConnectionError):
    """NDIF cannot run this model now: no API key, the service unreachable, or the model not hosted."""


def _repo_id(model) -> str:
    return str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", ""))


def check_ndif(nnsight, model) -> None:
    """One clear error unless an NDIF API key is configured and NDIF hosts ``model``'s checkpoint.

    The key is read by nnsight from ``NDIF_API_KEY`` or its config (``nnsight.CONFIG.set_default_api_key``);
    it is never logged or written anywhere by this library.
    """
    from nnsight.schema.config import CONFIG

    if not CONFIG.API.APIKEY:
        raise RemoteUnavailable(
            "remote=True sends the trace to NDIF, which needs an API key: set the NDIF_API_KEY environment variable "
            "or call nnsight.CONFIG.set_default_api_key(key) once (keys: https://login.ndif.us); or run with "
            "remote='local' (offline simulation) or remote=False")
    repo = _repo_id(model)
    if not repo:
        raise RemoteUnavailable("remote=True names the model to NDIF by its hub id, and this model has none; load "
                                "it with VQAModel.from_pretrained('<hub id>', backend='nnsight', remote=True)")
    status = nnsight.status()
    deployments = getattr(status, "deployments", {}) or {}
    if not deployments:
        raise RemoteUnavailable(f"NDIF ({CONFIG.API.HOST}) did not answer or hosts no model now; check the network "
                                "and https://discuss.ndif.us, or run with remote='local'")
    running = {d.get("repo_id") for d in deployments.values() if d.get("state") == "RUNNING"}
    if repo not in running:
        hosted = ", ".join(sorted(r for r in running if r)) or "none"
        raise RemoteUnavailable(f"NDIF does not host {repo!r} (running there now: {hosted}); choose a hosted model "
                                "or run locally (remote=False, with the weights in this process)")


# Where each name is read, per decoder layer, in the order a forward reaches them (nnsight waits for
# each place in turn, so one trace must visit them in execution order). ``element`` picks an item of a
# tuple output (attention returns (output, weights)); ``pe`` is the attention's rotary (cos, sin).
# ``attn_out`` / ``mlp_out`` / ``resid_mid`` are read where the adapter says: a block's post-norm
# (Gemma-3's sandwich norms) runs after the block module, hence the half steps of _POST_NORM_SLOTS.
_SLOTS = {"resid_pre": ("layer", "input", 0), "pe": ("attn", "pe", 1), "q": ("q_proj", "output", 2),
          "k": ("k_proj", "output", 3), "v": ("v_proj", "output", 4), "z": ("o_proj", "input", 5),
          "attn_out": ("attn_out", "output", 6), "pattern": ("attn", "output", 6),
          "resid_mid": ("resid_mid", "input", 7), "mlp_act": ("down_proj", "input", 8),
          "mlp_out": ("mlp_out", "output", 9), "resid_post": ("layer", "output", 10)}
_POST_NORM_SLOTS = {"attn_out": 6.5, "mlp_out": 9.5}
_PER_LAYER = 11
_EDIT_SLOTS = {"z": "z", "attn_out": "attn_out", "mlp_out": "mlp_out", "resid_pre": "resid_pre",
               "resid_post": "resid_post"}


@dataclass
class _Spec:
    """One active ``vqa.trace`` block."""

    names: tuple[str, ...]
    plan: dict[int, set]       # {layer: per-layer names recorded there}
    positions: torch.Tensor | None
    to_cpu: bool
    detach: bool
    interventions: tuple[Intervention, ...]
    cache: ActivationCache
    attention_edits: tuple[AttentionEdit, ...] = ()


@dataclass
class _Step:
    """One place visited inside the trace: read (and maybe replace) an input or output."""

    order: int
    path: str
    where: str                 # "input", "output" or "pe"
    per_head: bool = False
    edits: list | None = None      # interventions' tuples; at an attention's inputs ("pe"): (first, blocked)
    captures: list | None = None   # (key, element, positions, dim, check_positions)
    layer: int | None = None


class NNsightBackend(Backend):
    """Captures and interventions through nnsight 0.8 (``TransformersModel`` around the loaded model).

    Args:
        vqa: the :class:`~mech_vqa.model.VQAModel` (its model is wrapped, never modified).
        remote: False (trace in this process), ``"local"`` (nnsight's offline simulation of a
            remote call: serialised, user modules hidden, run here) or True (NDIF: the trace is sent
            to the service, which holds the weights; the local model may be weightless, on the meta
            device, as ``VQAModel.from_pretrained(id, backend="nnsight", remote=True)`` builds it).
    """

    name = "nnsight"

    def __init__(self, vqa, remote: bool | str = False):
        if remote is not True and remote not in (False, "local"):
            raise ValueError(f"remote must be False (in process), 'local' (nnsight's offline simulation of a "
                             f"remote call) or True (NDIF), got {remote!r}")
        super().__init__(vqa)
        self.nnsight = import_nnsight()
        if is_tensor_parallel(vqa.model):
            _tensor_parallel_compat()
        if remote is True:
            check_ndif(self.nnsight, vqa.model)
        from nnsight.modeling.transformers import TransformersModel

        # nnsight installs a controller as each module's instance ``forward`` and leaves it there for good;
        # this backend puts it in place only while its own forward runs, so the model is as found
        # between calls (for the hooks backend and anyone else holding it). The task must be given for
        # an already-loaded model: nnsight's guess maps *ForConditionalGeneration to text generation.
        if remote is True:
            # NDIF names the model by its hub id and holds the weights: the envoy is nnsight's own
            # weightless (meta) build of that checkpoint, whose module paths are the model's
            self._controllers = {}
            self.envoy = TransformersModel(_repo_id(vqa.model), task="image-text-to-text", processor=vqa.processor,
                                           tokenizer=vqa.processor.tokenizer, dispatch=False)
        else:
            with _controllers_removed(vqa.model) as self._controllers:
                self.envoy = TransformersModel(vqa.model, task="image-text-to-text", processor=vqa.processor,
                                               tokenizer=vqa.processor.tokenizer)
        self.remote = remote
        if remote:
            from ..methods import igos_core

            for module in (nnsight_ops, igos_core):   # the server has torch and nnsight, not mech_vqa
                self.nnsight.register(module)
        self._paths = {id(module): name for name, module in vqa.model.named_modules()}
        self._active: list[_Spec] = []
        #: bytes of the tensors the last forward's trace saved (activations and model output): what a
        #: remote call would send back
        self.last_saved_bytes = 0

    def __repr__(self) -> str:
        return f"NNsightBackend(remote={self.remote!r})"

    # ---------------------------------------------------------------------------- places
    def _path(self, module) -> str:
        try:
            return self._paths[id(module)]
        except KeyError:
            raise BackendNotSupported(f"the adapter names a module ({type(module).__name__}) that is not part of "
                                      "the wrapped model; rebuild the VQAModel after changing the model") from None

    def _envoy(self, path: str):
        envoy = self.envoy
        for part in path.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy

    def _layer_module(self, kind: str, layer: int):
        adapter = self.vqa.adapter
        getters = {"layer": adapter.layer, "attn": adapter.attn, "q_proj": adapter.q_proj, "k_proj": adapter.k_proj,
                   "v_proj": adapter.v_proj, "o_proj": adapter.o_proj, "down_proj": adapter.down_proj,
                   "attn_out": adapter.attn_out_module, "mlp_out": adapter.mlp_out_module,
                   "resid_mid": adapter.resid_mid_module}
        return getters[kind](layer)

    def _slot(self, name: str, layer: int) -> tuple[str, str, float]:
        """``(module path, "input" / "output" / "pe", order within the layer)`` where ``name`` is read."""
        kind, where, slot = _SLOTS[name]
        module = self._layer_module(kind, layer)
        if name in _POST_NORM_SLOTS:
            block = self.vqa.adapter.attn(layer) if name == "attn_out" else self.vqa.adapter.mlp(layer)
            if module is not block:   # read at the block's post-norm, which runs after the block module
                slot = _POST_NORM_SLOTS[name]
        return self._path(module), where, slot

    # ----------------------------------------------------------------------------- trace
    @contextlib.contextmanager
    def trace(self, names: Sequence[str] = (), *, layers: Iterable[int] | Mapping[str, Iterable[int]] | None = None,
              positions=None, to_cpu: bool = False, detach: bool = True,
              interventions: Sequence[Intervention] = (), attention_edits: Sequence[AttentionEdit] = ()):
        adapter = self.vqa.adapter
        unknown = [n for n in names if n not in NAMES]
        if unknown:
            raise ValueError(f"unknown activation names {unknown}; choose from {NAMES}")
        layers = _normalise_layers(layers)
        plan = _layer_plan(adapter, names, layers)  # the hooks backend's reading of ``layers``
        if isinstance(layers, Mapping):
            layer_list = list(plan)
        else:
            layer_list = [adapter.check_layer(i) for i in (range(adapter.n_layers) if layers is None else layers)]
        for edit in interventions:
            adapter.check_layer(edit.layer)
            for head in edit.heads or ():
                adapter.check_head(head)
        for edit in attention_edits:
            edit.check(adapter)
        if attention_edits:
            check_explicit_masks(self.vqa.model)
        spec = _Spec(tuple(names), plan, _normalise_positions(positions), to_cpu, detach,
                     tuple(interventions), ActivationCache(names, layer_list, adapter), tuple(attention_edits))
        self._active.append(spec)
        try:
            yield spec.cache
        finally:
            self._active.remove(spec)

    def _steps(self, specs: Sequence[_Spec] | None = None) -> list[_Step]:
        steps: dict[tuple[str, str], _Step] = {}

        def step(layer, name) -> _Step:
            path, where, slot = self._slot(name, layer)
            if (path, where) not in steps:
                steps[path, where] = _Step(layer * _PER_LAYER + slot, path, where, layer=layer)
            return steps[path, where]

        adapter = self.vqa.adapter
        projector = self._path(adapter.projector)
        whole_vision = adapter.projector is adapter.vision_tower
        for index, spec in enumerate(self._active if specs is None else specs):
            for edit in spec.attention_edits:   # the mask the attention receives, read with its rotary angles
                target = step(edit.layer, "pe")
                # per-head edits: a tensor-parallel rank's attention runs only its own heads
                target.edits = (target.edits or []) + [(edit.first, local_head_mask(adapter, edit.layer, edit.blocked))]
            for edit in spec.interventions:
                target = step(edit.layer, _EDIT_SLOTS[edit.site])
                target.per_head = edit.site == "z"
                target.edits = (target.edits or []) + [(edit.rows, edit.positions, edit.heads, edit.mode, edit.value)]
            for name in spec.names:
                if name == "deepstack":   # the text model's call arguments say what it adds after each layer
                    if adapter.deepstack_layers():
                        text = self._path(adapter.text_model)
                        target = steps.setdefault((text, "deepstack"), _Step(-0.5, text, "deepstack"))
                        target.captures = (target.captures or []) + [((index, "deepstack_kwargs"), 0, None, 1, False)]
                    continue
                if name in ("vision_features", "projector_out"):
                    # a whole vision module (Qwen-VL): both come from its output, read by the adapter
                    where = "input" if name == "vision_features" and not whole_vision else "output"
                    name = name if not whole_vision else "vision_output"
                    target = steps.setdefault((projector, where), _Step(-2 if where == "input" else -1, projector, where))
                    target.captures = (target.captures or []) + [((index, name), 0, None, 1, False)]
                    continue
                for layer, layer_names in spec.plan.items():
                    if name not in layer_names:
                        continue
                    if name in ("q", "k") and not (name == "k" and "q" in layer_names):
                        # rotary angles at the q rows only, unless k (every position) is asked too
                        pe = step(layer, "pe")
                        pe_positions = None if "k" in layer_names else spec.positions
                        pe.captures = (pe.captures or []) + [((index, "pe", layer), 0, pe_positions, 1, False)]
                    positions = spec.positions if name not in ("k", "v") else None
                    element, dim = (1, 2) if name == "pattern" else (0, 1)
                    target = step(layer, name)
                    target.captures = (target.captures or []) + [
                        ((index, name, layer), element, positions, dim, name == "resid_pre")]
        return sorted(steps.values(), key=lambda s: s.order)

    def _step_args(self, step: _Step) -> tuple:
        """What :func:`_run_trace` needs of a step (envoys and plain values; an attention edit carries its layer)."""
        edits = (step.layer, step.edits) if step.where == "pe" and step.edits else step.edits
        return self._envoy(step.path), step.where, edits, step.per_head, step.captures or []

    def forward(self, inputs: dict, **kwargs):
        adapter = self.vqa.adapter
        self._grid = inputs.get("image_grid_thw")   # Qwen2.5-VL's window order needs it to read ViT features
        self._shape = tuple(inputs["input_ids"].shape)
        steps = [self._step_args(s) for s in self._steps()]
        wants_pattern = any("pattern" in spec.names for spec in self._active)
        with preserved_state(self.vqa.model, eager=wants_pattern), _controllers_installed(self._controllers):
            saved, output = _run_trace(self.envoy, self.nnsight, nnsight_ops, steps, inputs, kwargs, self.remote,
                                       adapter.n_heads, adapter.head_dim)
        self.last_saved_bytes = _nbytes(saved) + _nbytes(dict(output) if hasattr(output, "keys") else output)
        for index, spec in enumerate(self._active):
            self._fill(index, spec, saved)
        return output

    # ---------------------------------------------------------------- scores next to the model
    #: methods may ask this backend for scores computed inside the trace (``explain_scores``,
    #: ``logit_lens_scores``): on a remote call only those come back, not the activations
    @property
    def scores_near_model(self) -> bool:
        # The in-trace scorers rotate raw q/k projections and take each layer's output as the next
        # layer's input: adapters with QK-norm (Qwen3-VL) or DeepStack additions score on the client
        # (same numbers, activations come back) until those steps are shipped too.
        # So do adapters whose layer is not a pre-norm Llama one with causal attention and plain logits
        # (Gemma-3's post-norms and bidirectional image blocks, soft-capped logits): the in-trace
        # scorers add raw block outputs and rebuild a causal mask.
        adapter = self.vqa.adapter
        return not _overrides(adapter, "normalise_qk", "qk_norm", "output_norm", "attention_blocks",
                              "logit_softcap") and not adapter.deepstack_layers()

    @property
    def lens_near_model(self) -> bool:
        """Whether the logit lens's sweep runs inside the trace: it reads only each layer's output, the
        final norm and the unembedding, so QK-norm, post-norms and attention blocks (Gemma-3) do not
        matter, and DeepStack's additions (Qwen3-VL) are read from the text model's call and added there;
        soft-capped logits keep it on the client."""
        return not _overrides(self.vqa.adapter, "logit_softcap")

    def _final_norm(self) -> dict:
        """The final norm as what the remote side needs besides its weights: LayerNorm or RMS, eps, and
        whether the gain is ``1 + weight`` (read from the class on a CPU copy, so a weightless client
        can tell too)."""
        norm = self.vqa.adapter.final_norm
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None:
            raise BackendNotSupported(f"cannot read the epsilon of the final norm {type(norm).__name__}")
        if isinstance(norm, torch.nn.LayerNorm):
            return {"layer_norm": True, "eps": float(eps), "gain_offset": False}
        probe = copy.deepcopy(norm).to_empty(device="cpu").float()
        with torch.no_grad():
            probe.weight.copy_(torch.linspace(0.5, 1.5, probe.weight.numel()))
            gain = type(probe).forward(probe, torch.ones(1, probe.weight.numel()))[0] * (1 + float(eps)) ** 0.5
        offset = bool((gain - 1 - probe.weight).abs().max() < (gain - probe.weight).abs().max())
        return {"layer_norm": False, "eps": float(eps), "gain_offset": offset}

    def _weights(self, layers) -> dict:
        adapter = self.vqa.adapter
        norm, unembed = self._path(adapter.final_norm), self._path(adapter.unembed)
        refs = {"norm_weight": (norm, "weight"), "norm_bias": (norm, "bias"), "W_U": (unembed, "weight"),
                "b_U": (unembed, "bias")}
        refs.update({("W_O", layer): (self._path(adapter.o_proj(layer)), "weight") for layer in layers})
        if self.remote:  # read where the model is: the server's weights
            return {key: (self._envoy(path), attr) for key, (path, attr) in refs.items()}
        # in process: the tensors themselves, read through accelerate's offload where a device_map put it
        from ..adapters.base import module_parameter

        return {key: module_parameter(self.vqa.model.get_submodule(path), attr) for key, (path, attr) in refs.items()}

    def _forward_reduced(self, spec: _Spec, inputs: dict, reducer, weights: dict, args: dict, **kwargs):
        """One trace recording ``spec``'s captures, then ``reducer(values, weights, output, **args)``
        inside it: only what the reducer returns is saved (and, remotely, sent back)."""
        steps = [self._step_args(s) for s in self._steps([spec])]
        with preserved_state(self.vqa.model), _controllers_installed(self._controllers):
            result, _ = _run_trace(self.envoy, self.nnsight, nnsight_ops, steps, inputs, kwargs, self.remote,
                                   self.vqa.adapter.n_heads, self.vqa.adapter.head_dim,
                                   reduce=(reducer, weights, args))
        self.last_saved_bytes = _nbytes(result)
        return result

    def _spec(self, names, layers, positions) -> _Spec:
        adapter = self.vqa.adapter
        plan = _layer_plan(adapter, names, layers)
        return _Spec(tuple(names), plan, _normalise_positions(positions), False, True, (),
                     ActivationCache(names, list(plan), adapter))

    def explain_scores(self, inputs: dict, *, positions: torch.Tensor, token_ids: torch.Tensor, heads,
                       kv_layers: list[int], chunk_elements: int) -> dict:
        """Layer-, head- and position-level increases at each row's target, scored inside the trace
        (:func:`~mech_vqa.backends.nnsight_ops.explain_scores`). ``positions`` ``[B]`` are batch
        coordinates; ``heads``: ``("top", k)`` or ``("pairs", [(layer, head), ...])``."""
        adapter = self.vqa.adapter
        n_layers = adapter.n_layers
        rotate = adapter.rotary_function(0)
        if rotate is None:
            raise BackendNotSupported(f"{type(adapter).__name__} names no rotary function that can run inside "
                                      "an nnsight trace; explain on this adapter needs backend='hooks'")
        names = ["resid_pre", "attn_out", "mlp_out", "z", "resid_post"] + (["q", "k", "v"] if kv_layers else [])
        layers = {"resid_post": [n_layers - 1]} | ({"q": kv_layers, "k": kv_layers, "v": kv_layers} if kv_layers
                                                   else {})
        spec = self._spec(names, layers, positions.view(-1, 1))
        args = dict(targets=token_ids.cpu(), t=positions.cpu(), n_layers=n_layers, n_heads=adapter.n_heads,
                    n_kv=adapter.n_kv_heads, head_dim=adapter.head_dim, heads=heads,
                    scalings=[adapter.attention_scaling(i) for i in range(n_layers)],
                    windows=[adapter.sliding_window(i) for i in range(n_layers)],
                    key_mask=inputs["attention_mask"].cpu(), rotate=rotate, chunk_elements=chunk_elements,
                    **self._final_norm())
        return self._forward_reduced(spec, inputs, nnsight_ops.explain_scores, self._weights(range(n_layers)), args,
                                     use_cache=False, logits_to_keep=positions.view(-1, 1).to(self.vqa.device))

    def logit_lens_scores(self, inputs: dict, *, positions: torch.Tensor, k: int, word_id: int | None,
                          chunk_elements: int) -> dict:
        """The logit lens at ``positions`` (the projector output and every layer's output), swept over
        the vocabulary inside the trace (:func:`~mech_vqa.backends.nnsight_ops.logit_lens_sweep`)."""
        adapter = self.vqa.adapter
        deepstack = ["deepstack"] if adapter.deepstack_layers() else []   # Qwen3-VL: what the text model adds
        spec = self._spec(["resid_pre", "resid_post"] + deepstack, {"resid_pre": [0]}, positions)
        args = dict(n_layers=adapter.n_layers, k=k, word_id=word_id, chunk_elements=chunk_elements,
                    positions=spec.positions, **self._final_norm())
        return self._forward_reduced(spec, inputs, nnsight_ops.logit_lens_sweep, self._weights([]), args,
                                     use_cache=False, logits_to_keep=1)

    def igos_masks(self, scorer, image: torch.Tensor, baseline: torch.Tensor, config, *, seed: int, geometry):
        """The iGOS+ / iGOS++ optimisation as ONE nnsight session (``None`` when this layout cannot be shipped).

        The loop (:class:`~mech_vqa.methods.igos_core.MaskOptimiser`, shipped by value) runs where the
        model runs: per chunk of interpolation points a trace scores the perturbed images (logits at the
        answer's predicting rows only) and back-propagates into the masks; only the masks and the history
        come back. The mask-to-pixel map goes as per-view separable bilinear factors read off the
        geometry; a layout whose map is not of that form (Qwen-VL's flattened patches) returns ``None``.
        """
        from ..methods import igos_core

        pixel_shape = tuple(image.shape[1:])
        to_pixels = separable_pixels(geometry, pixel_shape, tuple(config.mask_size), igos_core)
        base = scorer._inputs(image[:1])
        pair = scorer._inputs(image[:1].expand(2, *pixel_shape))
        same = set(pair) == set(base) and all(
            torch.equal(pair[k], nnsight_ops.batch_inputs(base, image[:1].expand(2, *pixel_shape))[k])
            if torch.is_tensor(pair[k]) else pair[k] == base[k] for k in pair)
        if to_pixels is None or not same:
            return None
        settings = types.SimpleNamespace(**{**config.to_dict(), "mask_size": tuple(config.mask_size)})
        rows = scorer.predicting.to(self.vqa.device)
        with preserved_state(self.vqa.model, frozen=True), _controllers_installed(self._controllers), \
                torch.enable_grad():
            result = _run_igos(self.envoy, self.nnsight, igos_core, nnsight_ops, base, rows, scorer.token_ids,
                               image.float(), baseline.float(), settings, seed, to_pixels, self.remote)
        self.last_saved_bytes = _nbytes(result)
        return result

    def relevancy_rows(self, inputs: dict, targets, *, row_normalize: bool, vision_layers=(), image_positions=None,
                       **kwargs) -> dict:
        """Chefer relevancy rows ``[T, S]`` (float32) of ``targets`` ``[(logit column, token id, position)]``,
        computed inside ONE trace: the raw logits' backward through every layer's attention probabilities
        (``with logit.backward(): probs.grad``, one per target, the graph retained) and the propagation
        (:func:`~mech_vqa.backends.nnsight_ops.relevancy_row`) run where the model runs; only the rows are
        saved. The gradient starts at the first decoder layer's input (parameters frozen): the probabilities'
        gradients are those of the hooks backend, whose graph starts at the pixels. ``vision_layers`` (the
        vision encoder layers to continue into) with ``image_positions``: the graph starts at the first of
        them and ``vision`` ``[T, n_image]`` holds each row's image relevancy propagated through them.
        Returns ``{"rows", "vision"}`` (``vision`` None without vision layers)."""
        adapter = self.vqa.adapter
        attns = [self._envoy(self._path(adapter.attn(layer))) for layer in range(adapter.n_layers)]
        first = self._envoy(self._path(vision_layers[0] if vision_layers else adapter.layer(0)))
        vision_attns = [self._envoy(self._path(layer.self_attn)) for layer in vision_layers]
        targets = [(int(c), int(t), int(p)) for c, t, p in targets]
        with preserved_state(self.vqa.model, eager=True, frozen=True), _controllers_installed(self._controllers), \
                torch.enable_grad():
            result = _run_relevancy(self.envoy, self.nnsight, nnsight_ops, first, vision_attns, attns, inputs, kwargs,
                                    self.remote, targets, row_normalize,
                                    None if image_positions is None else image_positions.cpu(),
                                    _heads_gatherer(adapter))
        self.last_saved_bytes = _nbytes(result)
        return result

    def generate(self, inputs: dict, **kwargs) -> torch.Tensor:
        """HF ``generate`` through nnsight (on NDIF for ``remote=True``): only the token ids come back."""
        with preserved_state(self.vqa.model), _controllers_installed(self._controllers):
            return _run_generate(self.envoy, inputs, kwargs, self.remote)

    def _fill(self, index: int, spec: _Spec, saved: dict) -> None:
        adapter = self.vqa.adapter
        n_heads, n_kv, head_dim = adapter.n_heads, adapter.n_kv_heads, adapter.head_dim

        def keep(key, value):
            if spec.detach:
                value = value.detach()
            if spec.to_cpu:
                value = value.cpu()
            spec.cache.store[key] = value

        for name in spec.names:
            if name == "deepstack":   # zeros where nothing is added (every layer of other families)
                zeros = torch.zeros(*self._shape, adapter.d_model, dtype=adapter.dtype, device=adapter.device)
                added = {}
                if (index, "deepstack_kwargs") in saved:
                    features, mask = saved[index, "deepstack_kwargs"]
                    added = adapter.deepstack_additions({"deepstack_visual_embeds": features,
                                                         "visual_pos_masks": mask}, zeros)
                for layer, layer_names in spec.plan.items():
                    if name in layer_names:
                        keep((name, layer), _select(added.get(layer, zeros), spec.positions))
                continue
            if name in ("vision_features", "projector_out"):
                if (index, "vision_output") in saved:   # a whole vision module's output (Qwen-VL)
                    keep(name, adapter.vision_outputs(saved[index, "vision_output"], self._grid)[name])
                else:
                    keep(name, adapter.vision_rows(saved[index, name]))
                continue
            for layer, layer_names in spec.plan.items():
                if name in ("q", "k") or name not in layer_names:
                    continue
                raw = saved[index, name, layer]
                if raw is None:  # the attention returned no weights, even in eager mode
                    raise CaptureError(
                        f"layer {layer} returned no attention weights even in eager mode; this model cannot "
                        "give attention patterns (capture 'q' and 'k' and use attention_rows instead)")
                if name == "z":
                    raw = raw.unflatten(-1, (n_heads, head_dim))
                elif name == "v":
                    raw = raw.unflatten(-1, (n_kv, head_dim))
                keep((name, layer), raw)
        for layer, layer_names in spec.plan.items():
            if "q" in layer_names or "k" in layer_names:
                self._fill_qk(index, spec, saved, layer, layer_names, keep)

    def _fill_qk(self, index, spec, saved, layer, wants, keep) -> None:
        """Rotated ``q``/``k`` as :func:`mech_vqa.capture.trace` records them, from the raw projections."""
        adapter, positions = self.vqa.adapter, spec.positions
        cos, sin = saved[index, "pe", layer]   # at the q rows when k is not asked, else at every position
        k = saved[index, "k", layer] if "k" in wants else None
        q = saved[index, "q", layer] if "q" in wants else None
        if self.remote is True and _overrides(adapter, "normalise_qk", "qk_norm") and any(
                p.device.type == "meta" for p in adapter.attn(layer).parameters()):
            raise BackendNotSupported(
                f"{type(self.vqa.model).__name__} normalises queries and keys (QK-norm) between the projection and "
                "the rotation, which this backend applies on the client with the norms' weights, and this NDIF "
                "client holds none (remote=True builds it weightless): capture q / k and score explain (head- and "
                "position-level increases) with the weights in this process (remote='local' or False, or "
                "backend='hooks'); the logit lens, ablations and knockout run remotely")
        q, k = adapter.normalise_qk(layer, q, k)   # QK-norm (Qwen3-VL) sits between projection and rotation
        q = None if q is None else q.unflatten(-1, (adapter.n_heads, adapter.head_dim)).transpose(1, 2)
        k = None if k is None else k.unflatten(-1, (adapter.n_kv_heads, adapter.head_dim)).transpose(1, 2)
        if positions is None and q is not None and k is not None:
            q_rot, k_rot = adapter.rotate_qk(layer, q, k, (cos, sin))
        else:
            q_angles = (_select(cos, positions), _select(sin, positions)) if k is not None else (cos, sin)
            q_rot = None if q is None else adapter.rotate_qk(layer, q, q, q_angles)[0]
            k_rot = None if k is None else adapter.rotate_qk(layer, k, k, (cos, sin))[1]
        if q_rot is not None:
            keep(("q", layer), q_rot.transpose(1, 2))
        if k_rot is not None:
            keep(("k", layer), k_rot.transpose(1, 2))


def _overrides(adapter, *names: str) -> bool:
    """Whether ``adapter``'s class overrides any of the :class:`~mech_vqa.adapters.ModelAdapter` methods ``names``."""
    from ..adapters.base import ModelAdapter

    return any(getattr(type(adapter), name) is not getattr(ModelAdapter, name) for name in names)


_ABSENT = object()
_SLOTS_SET_BY_NNSIGHT = ("forward", "__nnsight__")


def _tensor_parallel_compat() -> None:
    """Let nnsight 0.8.1 read transformers' tensor-parallel plan on transformers releases that moved its
    plan matcher: nnsight imports ``_get_parameter_plan`` from ``transformers.distributed.tensor_parallel``,
    which transformers 5.24 defines in ``transformers.distributed.parallel_utils`` (the same function,
    the same signature). The name is added where nnsight looks for it, nothing else changes; with a
    transformers that still has it there, nothing is done."""
    from transformers.distributed import tensor_parallel

    if hasattr(tensor_parallel, "_get_parameter_plan"):
        return
    try:
        from transformers.distributed.parallel_utils import _get_parameter_plan
    except ImportError as err:
        raise BackendNotSupported(
            "nnsight cannot read this transformers release's tensor-parallel plan (no _get_parameter_plan in "
            "transformers.distributed); use backend='hooks' for tensor-parallel models") from err
    tensor_parallel._get_parameter_plan = _get_parameter_plan


@contextlib.contextmanager
def _controllers_removed(model):
    """Let nnsight wrap ``model`` inside the block, then put every module's ``__dict__`` slots back.

    Yields a dict filled on exit: module -> (nnsight's slot values, the values found before).
    """
    found = {module: tuple(module.__dict__.get(slot, _ABSENT) for slot in _SLOTS_SET_BY_NNSIGHT)
             for module in model.modules()}
    controllers: dict = {}
    try:
        yield controllers
    finally:
        for module, before in found.items():
            installed = tuple(module.__dict__.get(slot, _ABSENT) for slot in _SLOTS_SET_BY_NNSIGHT)
            if installed != before:
                controllers[module] = (installed, before)
            _set_slots(module, before)


@contextlib.contextmanager
def _controllers_installed(controllers: dict):
    """nnsight's controllers in place for the block, the modules' own slots back after it."""
    try:
        for module, (installed, _) in controllers.items():
            _set_slots(module, installed)
        yield
    finally:
        for module, (_, before) in controllers.items():
            _set_slots(module, before)


def _set_slots(module, values) -> None:
    for slot, value in zip(_SLOTS_SET_BY_NNSIGHT, values):
        if value is _ABSENT:
            module.__dict__.pop(slot, None)
        else:
            module.__dict__[slot] = value


def _run_trace(root, nnsight, ops, steps, inputs, kwargs, remote, n_heads, head_dim, reduce=None):
    """One nnsight trace visiting ``steps`` in order; returns ``(saved tensors, model output)``.

    Module-level and free of ``self`` so that a remote trace serialises only the envoys, the steps
    and the torch-only ``ops`` module, not the client's objects. ``reduce``: ``(reducer, weights
    {key: (envoy, attribute)}, args)``: the captures (keyed without the trace index) go to
    ``reducer(values, weights, output, **args)`` inside the trace and only its result is saved;
    returns ``(result, None)``.
    """
    with root.trace(**inputs, **kwargs, remote=remote):
        saved = nnsight.save({}) if reduce is None else {}
        for envoy, where, edits, per_head, captures in steps:
            if where == "deepstack":   # the text model's DeepStack arguments (Qwen3-VL)
                call = envoy.inputs[1]
                for key, _, _, _, _ in captures:
                    saved[key] = (call["deepstack_visual_embeds"], call["visual_pos_masks"])
                continue
            if where == "pe":
                args, call = envoy.inputs
                if edits:   # attention edits: (layer, [(first, blocked)]) applied to the mask the attention receives
                    hidden = args[0] if args else call["hidden_states"]
                    call = {**call, "attention_mask": ops.block_edges(call.get("attention_mask"), edits[1], edits[0],
                                                                      hidden.shape[0], hidden.shape[1])}
                    envoy.inputs = (args, call)
                if not captures:
                    continue
                cos, sin = call["position_embeddings"]
                for key, _, positions, dim, _ in captures:
                    saved[key] = (ops.select(cos, positions, dim), ops.select(sin, positions, dim))
                continue
            value = envoy.input if where == "input" else envoy.output
            first = value[0] if isinstance(value, tuple) else value
            if edits:
                first = ops.apply_edits(first, edits, n_heads, head_dim, per_head)
                if where == "input":
                    envoy.input = first
                elif isinstance(value, tuple):
                    envoy.output = (first, *value[1:])
                else:
                    envoy.output = first
            for key, element, positions, dim, check in captures:
                x = first if element == 0 else value[element]
                if check:
                    ops.check_positions(x.shape[1], positions)
                saved[key] = None if x is None else ops.select(x, positions, dim)
        if reduce is not None:
            reducer, weights, args = reduce
            values = {key[1:]: value for key, value in saved.items()}
            params = {key: getattr(ref[0], ref[1], None) if isinstance(ref, tuple) else ref
                      for key, ref in weights.items()}
            result = nnsight.save(reducer(values, params, root.output, **args))
            output = None
        else:
            output = root.output.save()
    return (saved, output) if reduce is None else (result, None)


def separable_pixels(geometry, pixel_shape, mask_size, core):
    """``geometry.mask_to_pixels`` (``masks [k, h, w] -> pixels``) as :class:`~mech_vqa.methods.igos_core.SeparablePixels`
    factors, read off by laying one mask row / column of ones at a time (bilinear weights sum to one along
    each axis), or ``None`` when the map is not of that form (checked against the geometry on random masks)."""
    from ..adapters.base import mask_to_pixels

    h, w = mask_size
    factor_fn, factor_shape, gather = geometry.mask_to_pixels, pixel_shape, None
    if geometry.patch_layout is not None and len(pixel_shape) == 2:   # flattened patches: which pixel feeds each
        height, width = (int(v) for v in geometry.image_size)
        channels = geometry.patch_layout["channels"]
        cells = torch.arange(height * width).view(1, 1, height, width).expand(1, channels, height, width)
        index = geometry.patchify(cells)[0]                                     # [n_patches, C T P P]
        copies = channels * geometry.patch_layout["temporal"]
        per_copy = index.view(index.shape[0], copies, -1)
        if not bool((per_copy == per_copy[:, :1]).all()):
            return None
        factor_fn, factor_shape, gather = mask_to_pixels, (1, height, width), (per_copy[:, 0].contiguous(), copies)
    if len(factor_shape) < 3:
        return None
    ones_rows = torch.zeros(h, h, w)
    ones_rows[torch.arange(h), torch.arange(h)] = 1
    ones_cols = torch.zeros(w, h, w)
    ones_cols[torch.arange(w), :, torch.arange(w)] = 1
    with torch.no_grad():
        by_row = factor_fn(ones_rows, factor_shape)
        height, width = by_row.shape[-2:]
        ry = by_row.reshape(h, -1, height, width)[..., 0].permute(1, 2, 0).contiguous()       # [V, H, h]
        rx = factor_fn(ones_cols, factor_shape).reshape(w, -1, height, width)[:, :, 0].permute(1, 2, 0).contiguous()
        factors = core.SeparablePixels(ry, rx, by_row.shape[1:], gather)
        probe = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
        exact, laid = geometry.mask_to_pixels(probe, pixel_shape), factors(probe)
    if exact.shape != laid.shape or not torch.allclose(laid, exact, rtol=0, atol=1e-6):
        return None
    return factors


def _run_igos(root, nnsight, core, ops, base, rows, token_ids, image, baseline, config, seed, to_pixels, remote):
    """The whole iGOS loop in one session (module-level for the reason of :func:`_run_trace`)."""
    with root.session(remote=remote):
        optimiser = core.MaskOptimiser(image, baseline, config, seed, to_pixels)
        for iteration in range(config.iterations):
            optimiser.start_iteration()
            for chunk in optimiser.chunks:
                inputs = ops.batch_inputs(base, optimiser.composite(chunk))
                with root.trace(**inputs, use_cache=False, logits_to_keep=rows):
                    optimiser.backward(chunk, ops.answer_log_probs(root.output.logits, token_ids).sum(-1))
            optimiser.step(iteration)
        result = nnsight.save(optimiser.result())
    return result


def _heads_gatherer(adapter):
    """``(layer, x [B, local heads, ...]) -> x [B, heads, ...]`` for a tensor-parallel model (each rank's
    attention runs its own heads; the ranks' slices are gathered), None for any other. Runs inside an
    in-process trace only: tensor-parallel models are refused remotely."""
    if not is_tensor_parallel(adapter.model):
        return None
    return lambda layer, x: whole_heads(adapter, layer, x)


def _run_relevancy(root, nnsight, ops, first_layer, vision_attns, attns, inputs, kwargs, remote, targets,
                   row_normalize, image_positions, whole=None):
    """One trace: the forward, then per target the raw logit's backward and its relevancy row (module-level
    for the reason of :func:`_run_trace`). Gradients are served in reverse-forward order: the LLM's last layer
    first, the vision tower's first layer last. ``whole``: :func:`_heads_gatherer`'s function (tensor-parallel
    models: the probabilities and gradients of every rank's heads)."""
    with root.trace(**inputs, **kwargs, remote=remote):
        first_layer.input.requires_grad_(True)   # a leaf: the graph through every probability exists
        vision_probs = [attn.output[1] for attn in vision_attns]
        probs = [attn.output[1] for attn in attns]
        ops.check_probabilities(vision_probs + probs)
        logits = root.output.logits
        rows, vision_rows = [], []
        for column, token, position in targets:
            logit = logits[0, column, token].float()
            with logit.backward(retain_graph=True):
                grads = [probs[layer].grad for layer in reversed(range(len(probs)))]
                vision_grads = [vision_probs[layer].grad for layer in reversed(range(len(vision_probs)))]
            grads = grads[::-1]
            if whole is not None:
                probs_whole = [whole(layer, p.detach()) for layer, p in enumerate(probs)]
                row = ops.relevancy_row(position, probs_whole, [whole(layer, g) for layer, g in enumerate(grads)],
                                        row_normalize)
            else:
                row = ops.relevancy_row(position, probs, grads, row_normalize)
            rows.append(row)
            if vision_probs:
                vision_rows.append(ops.vision_row(row[image_positions], vision_probs, vision_grads[::-1]))
        result = nnsight.save({"rows": torch.stack(rows), "vision": torch.stack(vision_rows) if vision_rows else None})
    return result


def _run_generate(root, inputs, kwargs, remote):
    with root.generate(**inputs, **kwargs, remote=remote) as tracer:
        ids = tracer.result.save()
    return ids


def _nbytes(value) -> int:
    """Bytes of every tensor in a (nested) dict / tuple / list."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0
