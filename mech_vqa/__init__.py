"""mech_vqa: mechanistic interpretability of LLaVA-family models in visual question answering.

Data flow: inputs (:mod:`mech_vqa.inputs`) -> model adapter (:mod:`mech_vqa.adapters`) -> capture and
interventions (:mod:`mech_vqa.capture`, :mod:`mech_vqa.interventions`) -> methods
(:mod:`mech_vqa.methods`) -> typed results (:mod:`mech_vqa.results`) -> plots / CLI.

The public names below are imported on first use (PEP 562), so ``import mech_vqa`` and the
``mech-vqa`` command's ``--help`` do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    ".adapters": ["AdapterError", "ImageGeometry", "ModelAdapter", "get_adapter", "register_adapter"],
    ".capture": ["ActivationCache", "CaptureError", "attention_rows", "trace"],
    ".inputs": ["PreparedInput", "Target", "prepare"],
    ".interventions": ["Intervention", "zero_block", "zero_head"],
    ".model": ["VQAModel"],
    ".methods.ablation": ["ablate", "block_ablations", "head_ablations", "image_token_ablation"],
    ".methods.causal": ["causal_explanation", "causal_map"],
    ".methods.head_claims": ["head_claims"],
    ".methods.igos": ["IGOSConfig", "igos"],
    ".methods.knockout": ["knockout"],
    ".methods.logit_lens": ["logit_lens"],
    ".methods.mechanistic": ["explain"],
    ".methods.neurons": ["neuron_increase"],
    ".methods.patching": ["PatchPair", "Restoration", "activation_patching", "baseline_pair", "counterfactual_pair",
                          "restore"],
    ".methods.raw_attention": ["answer_attention", "attention_mass", "patch_to_text", "raw_attention_map"],
    ".methods.relevancy": ["relevancy", "relevancy_map"],
    ".methods.tam": ["tam_map", "token_activation_maps"],
    ".methods.token_selection": ["visually_relevant_tokens"],
    ".compare": ["compare"],
    ".metrics.faithfulness": ["patch_faithfulness"],
    ".metrics.insertion_deletion": ["insertion_deletion"],
    ".results": ["PatchMap", "Result"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mech_vqa' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps a public function when the import system binds a same-named submodule over it
    (``mech_vqa.compare`` is the function, as with an eager ``from .compare import compare``)."""

    def __setattr__(self, name, value):
        if name in _WHERE and isinstance(value, types.ModuleType) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
