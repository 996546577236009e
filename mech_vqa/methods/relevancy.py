"""Relevancy maps (Chefer et al.'s generic rule) for answer tokens, as LVLM-Interpret uses them.

Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers", ICCV 2021; applied to LLaVA by Ben Melech Stan et al.,
"LVLM-Interpret", CVPR 2024 workshops (arXiv 2404.03118).

For a target ``y_t`` predicted at position ``p``, with ``A_l`` ``[heads, seq, seq]`` the attention
probabilities of LLM layer ``l`` and ``z = logits[p, y_t]`` the RAW logit (no temperature, top-p
or any generation processing -- the reference differentiates a temperature-scaled score, so its
maps change with the temperature):

    Abar_l = mean_heads( (dz/dA_l * A_l)^+ )                 [seq, seq]
    R = I;  R <- R + Abar_l R   for l = 0 .. L-1              [seq, seq]
    map_t = R[p, image positions]  -> patch grid              [rows, cols]

Only the row ``p`` of ``R`` is needed, and ``R = (I + Abar_{L-1}) ... (I + Abar_0)``, so the row
is computed right to left as vector-matrix products, ``v = e_p; v <- v + v Abar_l`` for
``l = L-1 .. 0``: the same numbers in O(L seq^2) instead of O(L seq^3). ``row_normalize=True``
applies the reference's ``Rbar = rownorm(R - I) + I`` to that row.

``vision=True`` continues into the vision tower up to the layer LLaVA reads
(``config.vision_feature_layer``): with ``Abar^v_l`` from the same logit's gradient, the LLM's
image relevancy seeds the vision tokens that became image tokens, ``s^T (I + Abar^v_{n-1}) ...
(I + Abar^v_0)`` is propagated the same way and its patch columns are read (LLaVA drops the CLS
token, so reading the CLS row as the reference does explains a token the LLM never sees).

Gradients: one forward (eager attention, every parameter frozen, so only the attention
probabilities' graph is built -- pixel values are made differentiable so that graph exists), then
one ``torch.autograd.grad`` per target. ``autograd.grad`` returns fresh gradients and accumulates
nothing, so no token's gradient leaks into another's map (the reference's ViT maps accumulate
across tokens). Relevancy arithmetic is float32 whatever the model dtype.

On the nnsight backend (LLM stage, in process or remote) the backward and the propagation run inside
one trace (:meth:`~mech_vqa.backends.nnsight_backend.NNsightBackend.relevancy_rows`): only the rows
come back.
"""

from __future__ import annotations

import torch
from torch import nn

from ..hooks import HookSet, preserved_state
from ..inputs import PreparedInput
from ..results.attention import RelevancyMaps
from ..results.patch_map import PatchMap
from ..tensor_parallel import whole_heads
from .raw_attention import check_single_input, logits_at, resolve_targets


def vision_encoder_layers(adapter) -> list[nn.Module]:
    """The vision tower's encoder layers, found generically: the first ``ModuleList`` under
    ``adapter.vision_tower`` whose members all have a ``self_attn`` module (CLIP, SigLIP...)."""
    for module in adapter.vision_tower.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(hasattr(m, "self_attn") for m in module):
            return list(module)
    raise ValueError(
        f"cannot find the encoder layers of {type(adapter.vision_tower).__name__} (no ModuleList of layers with "
        "self_attn); run relevancy with vision=False"
    )


def vision_layers_used(adapter) -> int:
    """How many vision encoder layers feed the projector: ``hidden_states[vision_feature_layer]``
    is the output of that many layers (index 0 is the embeddings)."""
    feature_layer = getattr(adapter.model.config, "vision_feature_layer", -1)
    n_layers = len(vision_encoder_layers(adapter))
    if not isinstance(feature_layer, int):
        raise NotImplementedError(
            f"vision_feature_layer={feature_layer} concatenates several layers; vision-tower relevancy "
            "supports a single feature layer (run with vision=False)"
        )
    return feature_layer % (n_layers + 1)


def _propagate(seed: torch.Tensor, probs: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """``seed^T (I + Abar_{n-1}) ... (I + Abar_0)`` with ``Abar_l = mean_h((grad_l * A_l)^+)``.

    ``probs``/``grads``: per layer ``[1, heads, seq, seq]``; ``seed`` ``[seq]`` float32.
    """
    row = seed
    for attn, grad in zip(reversed(probs), reversed(grads)):
        abar = (grad[0].float() * attn[0].float()).clamp(min=0).mean(0)  # [seq, seq]
        row = row + row @ abar
    return row


def relevancy(vqa, inp: PreparedInput, targets=None, *, row_normalize: bool = False, vision: bool = False,
              progress: bool = True, box=None) -> RelevancyMaps:
    """Chefer relevancy rows and image maps for each target (see the module docstring).

    Args:
        vqa: a :class:`~mech_vqa.model.VQAModel`.
        inp: one prepared input with its answer teacher-forced.
        targets: None (every answer token), answer indices, or :class:`Target` s.
        row_normalize: apply the reference's ``rownorm(R - I) + I`` to each row.
        vision: also propagate into the vision tower (``RelevancyMaps.vision``).
        progress: show a progress bar over targets.
        box: ground-truth box attached to the maps.
    """
    from ..backends import BackendNotSupported

    backend = getattr(vqa, "backend", None)
    on_hooks = getattr(backend, "name", "hooks") == "hooks"
    if not on_hooks and not hasattr(backend, "relevancy_rows"):
        raise BackendNotSupported(f"relevancy is not supported on the {backend.name} backend; use backend='hooks'")
    inp = check_single_input(inp)
    targets = resolve_targets(inp, targets)
    adapter, model, geometry = vqa.adapter, vqa.model, inp.geometry
    if vision and adapter.vision_relevancy_refusal:
        raise NotImplementedError(f"vision-tower relevancy is not available for {type(model).__name__}: "
                                  f"{adapter.vision_relevancy_refusal}; use vision=False (the LLM stage)")
    if vision and int(geometry.view.max()) > 0:
        raise NotImplementedError("vision-tower relevancy supports one image view (LLaVA-1.5 style); use vision=False")
    if vision and adapter.patches_per_image_token != 1:
        raise NotImplementedError(
            f"vision-tower relevancy seeds each vision patch with its image token's relevancy, but "
            f"{type(vqa.model).__name__}'s connector merges {adapter.patches_per_image_token} patches into each image "
            "token, so no patch has a token of its own; use stage='llm' (vision=False), which is exact")
    if not on_hooks:   # backward and propagation inside the backend's trace: only the rows come back
        vision_modules = vision_encoder_layers(adapter)[:vision_layers_used(adapter)] if vision else []
        found = _rows_through_backend(vqa, inp, targets, row_normalize, vision_modules)
        rows = list(found["rows"])
        image_maps = [geometry.to_grid(row[geometry.positions.cpu()]) for row in rows]
        vision_maps = [geometry.to_grid(row) for row in found["vision"]] if vision else []
    else:
        rows, image_maps, vision_maps, vision_modules = _rows_with_hooks(vqa, inp, targets, row_normalize, vision,
                                                                         progress)
    return RelevancyMaps(
        rows=torch.stack(rows), llm=torch.stack(image_maps),
        vision=torch.stack(vision_maps) if vision else None,
        targets=[t.to_dict() for t in targets], str_tokens=list(inp.str_tokens),
        image_size=list(geometry.image_size), image=torch.from_numpy(inp.display_image()),
        row_normalized=row_normalize, box=[float(v) for v in box] if box is not None else None,
        info={"model": vqa.name, "question": inp.question, "answer": inp.answer,
              "vision_layers": len(vision_modules), "score": "raw logit"},
        image_positions=geometry.positions.cpu(), image_boxes=geometry.boxes.cpu(), image_view=geometry.view.cpu(),
    )


def _rows_through_backend(vqa, inp: PreparedInput, targets, row_normalize: bool, vision_layers) -> dict:
    """``rows`` ``[T, S]`` (and ``vision`` ``[T, n_image]`` through ``vision_layers``) computed by a backend
    that differentiates inside its own trace."""
    positions = [t.position for t in targets]
    keep, kept = logits_at(vqa, positions)
    columns = positions if kept is None else [int((kept == p).nonzero()) for p in positions]
    inputs = vqa.adapter.model_inputs(inp.model_inputs(vqa.device, vqa.adapter.vision_dtype()))
    return vqa.backend.relevancy_rows(inputs, [(c, t.token_id, t.position) for c, t in zip(columns, targets)],
                                      row_normalize=row_normalize, vision_layers=vision_layers,
                                      image_positions=inp.geometry.positions, use_cache=False, **keep)


def _rows_with_hooks(vqa, inp: PreparedInput, targets, row_normalize: bool, vision: bool, progress: bool):
    """Rows, LLM image maps and vision maps with the hooks backend (autograd in this process)."""
    from tqdm.auto import tqdm

    adapter, model, geometry = vqa.adapter, vqa.model, inp.geometry
    llm_modules = [adapter.attn(layer) for layer in range(adapter.n_layers)]
    vision_modules = ([layer.self_attn for layer in vision_encoder_layers(adapter)[:vision_layers_used(adapter)]]
                      if vision else [])
    recorded: dict[nn.Module, torch.Tensor] = {}

    def record(module, args, kwargs, output):
        if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
            raise RuntimeError(
                f"{type(module).__name__} returned no attention probabilities in eager mode; relevancy needs "
                "them (load the model with attn_implementation='eager')"
            )
        recorded[module] = output[1]

    seq = inp.seq_len
    image_positions = geometry.positions.to(adapter.device)
    rows, image_maps, vision_maps = [], [], []
    hooks = HookSet()
    with preserved_state(model, eager=True, frozen=True):
        try:
            for module in llm_modules + vision_modules:
                hooks.post(module, record)
            inputs = inp.model_inputs(vqa.device, adapter.vision_dtype())
            # Parameters are frozen; a differentiable input makes autograd build the graph through
            # every attention probability (all of them depend on the image).
            inputs["pixel_values"] = inputs["pixel_values"].clone().requires_grad_(True)
            keep, kept = logits_at(vqa, [t.position for t in targets])
            with torch.enable_grad():
                logits = vqa.forward(inputs, **keep).logits  # [1, kept or seq, vocab]
                hooks.remove()
                llm_probs = [recorded[m] for m in llm_modules]
                vision_probs = [recorded[m] for m in vision_modules]
                # a tensor-parallel rank records its own heads: the head mean needs them all
                llm_whole = [whole_heads(adapter, layer, probs.detach()) for layer, probs in enumerate(llm_probs)]
                for target in tqdm(targets, desc="relevancy", disable=not progress):
                    column = target.position if kept is None else int((kept == target.position).nonzero())
                    raw_logit = logits[0, column, target.token_id].float()
                    grads = torch.autograd.grad(raw_logit, llm_probs + vision_probs, retain_graph=True)
                    with torch.no_grad():
                        one_hot = torch.zeros(seq, device=adapter.device)
                        one_hot[target.position] = 1.0
                        llm_grads = [whole_heads(adapter, layer, g) for layer, g in enumerate(grads[:len(llm_probs)])]
                        row = _propagate(one_hot, llm_whole, llm_grads)
                        if row_normalize:
                            rest = row - one_hot
                            total = rest.sum()
                            row = (rest / total if total > 0 else rest) + one_hot
                        image_row = row[image_positions]
                        rows.append(row.cpu())
                        image_maps.append(geometry.to_grid(image_row.cpu()))
                        if vision:
                            vision_maps.append(_vision_map(image_row, vision_probs, grads[len(llm_probs):], geometry))
            recorded.clear()  # drop the graph before returning
        finally:
            hooks.remove()
    return rows, image_maps, vision_maps, vision_modules


def _vision_map(image_row: torch.Tensor, probs: list[torch.Tensor], grads, geometry) -> torch.Tensor:
    """Propagate the LLM image relevancy ``[n_image]`` through the vision layers; ``[rows, cols]``.

    The vision sequence is ``[offset special tokens (CLS), patches in grid order]``; the image
    tokens the LLM saw are the patch tokens, so they are seeded and the patch columns are read.
    """
    n_tokens = probs[0].shape[-1]
    n_patches = geometry.n_tokens
    offset = n_tokens - n_patches
    if offset < 0:
        raise ValueError(f"the vision tower has {n_tokens} tokens but the prompt {n_patches} image tokens")
    seed = torch.zeros(n_tokens, device=image_row.device)
    seed[offset:] = image_row.float()
    row = _propagate(seed, probs, list(grads))
    return geometry.to_grid(row[offset:].cpu())


def relevancy_map(vqa, inp: PreparedInput, targets=None, *, stage: str = "llm", row_normalize: bool = False,
                  token_reduce: str = "mean", progress: bool = True, box=None, view: int = 0) -> PatchMap:
    """One :class:`PatchMap` of relevancy (``stage`` ``llm`` or ``vision``), target tokens reduced
    (``view`` 1: LLaVA-NeXT's high-resolution tokens painted over the image, LLM stage)."""
    if stage not in ("llm", "vision"):
        raise ValueError(f"stage must be 'llm' or 'vision', got {stage!r}")
    result = relevancy(vqa, inp, targets, row_normalize=row_normalize, vision=stage == "vision",
                       progress=progress, box=box)
    return result.patch_map(stage=stage, token_reduce=token_reduce, view=view)


