"""FFN neuron attribution: log-probability increase of each MLP neuron's value vector.

Yu & Ananiadou, EMNLP 2024, "Neuron-Level Knowledge Attribution in Large Language Models", as used
for LLaVA in Yu & Ananiadou 2024 (arXiv 2411.10950). Neuron ``k`` of layer ``l`` adds
``c_k * W_down[:, k]`` to the residual stream at the target position ``t`` (``c`` ``[d_mlp]`` the input
of ``down_proj``, ``W_down`` ``[d, d_mlp]``). With ``lp`` the frozen-norm log-probability of
:mod:`mech_vqa.methods.logprob` and ``x_l + a_l`` the residual after layer ``l``'s attention::

    increase_lk = lp(x_l + a_l + c_k W_down[:, k]) - lp(x_l + a_l)        [layers, d_mlp]

All neurons of a layer are scored in one chunked sweep of the vocabulary using linearity of the
frozen norm: ``logits = logits(x_l + a_l) + s * c_k * (W_U diag(gamma) W_down)[:, k]``, so the cost per
layer is ``d * d_mlp * vocab`` (one pass of ``W_U`` against ``W_down``), not ``d_mlp`` full scorings.
The tokens a top neuron promotes are the top of ``W_U (gamma * c_k W_down[:, k])``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..inputs import PreparedInput, Target
from ..results.mechanistic import NeuronIncrease
from .logprob import vocab_sweep
from .mechanistic import capture_target


@torch.no_grad()
def neuron_increase_from_capture(capture, layers=None, *, k: int = 10, n_tokens: int = 5,
                                 progress: bool = True) -> list[NeuronIncrease]:
    """Neuron increases of ``layers`` (default all) for every row of a :class:`TargetCapture`."""
    adapter = capture.adapter
    if capture.mlp_act is None:
        raise ValueError("this capture has no MLP activations; capture with capture_target(..., mlp_act=True)")
    layers = list(range(adapter.n_layers)) if layers is None else [adapter.check_layer(int(l)) for l in layers]
    if not layers:
        raise ValueError("no layers given for the neuron attribution; pass None for all layers")
    if k < 1:
        raise ValueError(f"k must be at least 1 (top neurons kept per layer), got {k}")
    scores = []
    for layer in tqdm(layers, desc="neurons", disable=not progress, leave=False):
        base = capture.resid_pre[:, layer].float() + capture.attn_out[:, layer].float()
        coefficients, directions = capture.mlp_act[:, layer], adapter.W_down(layer)
        frozen = capture.frozen_output_norm(layer, "mlp")
        if frozen is not None:  # post-norm (Gemma-3): neuron k adds c_k W_down[:, k] * s * gain, s frozen
            coefficients = coefficients.float() * frozen[0]
            directions = directions.float() * frozen[1].unsqueeze(1)
        lp, lp_base = capture.scorer.log_prob_along_columns(base, coefficients, directions)
        scores.append(lp - lp_base.unsqueeze(1))
    k = min(k, adapter.d_mlp)
    with torch.inference_mode(False):  # the results' tensors are new ones: ordinary whatever mode scored them
        scores = torch.stack(scores, dim=1)  # [B, n_layers, d_mlp]
        coefficients = capture.mlp_act[:, layers].float()
        top = scores.topk(k, dim=-1).indices  # [B, n_layers, k]
    # what each neuron adds per unit of activation: W_down's column, through a post-norm frozen at t
    frozen = [capture.frozen_output_norm(layer, "mlp") for layer in layers]
    gamma = adapter.final_norm_params()["weight"].float()
    results = []
    for row in range(scores.shape[0]):
        # The contribution of each top neuron, c_k * W_down[:, k], read in vocabulary space.
        contributions = torch.stack([
            adapter.W_down(layer).float()[:, top[row, i]] * coefficients[row, i, top[row, i]]
            * (1 if frozen[i] is None else frozen[i][0][row] * frozen[i][1].unsqueeze(1))
            for i, layer in enumerate(layers)])  # [n_layers, d, k]
        directions = (contributions * gamma.view(1, -1, 1)).transpose(1, 2).flatten(0, 1)  # [n_layers*k, d]
        promoted_ids = vocab_sweep(adapter, directions, k=n_tokens, bias=False)["top_ids"]
        promoted = [[capture.vqa.to_str_tokens(ids) for ids in promoted_ids.view(len(layers), k, -1)[i]]
                    for i in range(len(layers))]
        results.append(NeuronIncrease(scores=scores[row].cpu(), coefficients=coefficients[row].cpu(),
                                      top_neurons=top[row].cpu(), layers=layers, promoted=promoted,
                                      **capture.meta(row)))
    return results


def neuron_increase(vqa, inp: PreparedInput, target: Target | None = None, *, layers=None, k: int = 10,
                    n_tokens: int = 5, progress: bool = True) -> NeuronIncrease:
    """FFN-neuron increases ``[len(layers), d_mlp]`` for one input (one forward), top ``k`` per layer.

    Args:
        target: the token to explain (default ``inp.target()``).
        layers: decoder layers to score (default all).
        k: top neurons kept per layer, each with the ``n_tokens`` vocabulary tokens it promotes.
    """
    if not isinstance(inp, PreparedInput):
        raise TypeError(f"neuron_increase takes one PreparedInput; for a batch use explain(..., neurons=True) "
                        f"(got {type(inp).__name__})")
    capture = capture_target(vqa, inp, target, kv_layers=None)
    return neuron_increase_from_capture(capture, layers, k=k, n_tokens=n_tokens, progress=progress)[0]
