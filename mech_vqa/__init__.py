"""mech_vqa: mechanistic interpretability of LLaVA-family models in visual question answering.

Data flow: inputs (:mod:`mech_vqa.inputs`) -> model adapter (:mod:`mech_vqa.adapters`) -> capture and
interventions (:mod:`mech_vqa.capture`, :mod:`mech_vqa.interventions`) -> methods
(:mod:`mech_vqa.methods`) -> typed results (:mod:`mech_vqa.results`) -> plots / CLI.
"""

from .adapters import AdapterError, ImageGeometry, ModelAdapter, get_adapter, register_adapter
from .capture import ActivationCache, CaptureError, attention_rows, trace
from .inputs import PreparedInput, Target, prepare
from .interventions import Intervention, zero_block, zero_head
from .model import VQAModel
from .methods.ablation import ablate, block_ablations, head_ablations, image_token_ablation
from .methods.causal import causal_explanation, causal_map
from .methods.head_claims import head_claims
from .methods.igos import IGOSConfig, igos
from .methods.logit_lens import logit_lens
from .methods.mechanistic import explain
from .methods.neurons import neuron_increase
from .methods.raw_attention import answer_attention, attention_mass, patch_to_text, raw_attention_map
from .methods.relevancy import relevancy, relevancy_map
from .methods.token_selection import visually_relevant_tokens
from .compare import compare
from .metrics.faithfulness import patch_faithfulness
from .metrics.insertion_deletion import insertion_deletion
from .results import PatchMap, Result

__version__ = "0.1.0"

__all__ = [
    "IGOSConfig", "PatchMap", "Result", "ablate", "answer_attention", "attention_mass", "block_ablations", "causal_explanation",
    "causal_map", "compare", "explain", "head_ablations", "head_claims", "igos", "image_token_ablation",
    "insertion_deletion", "logit_lens", "neuron_increase", "patch_faithfulness", "patch_to_text", "raw_attention_map", "relevancy", "relevancy_map",
    "visually_relevant_tokens",
    "ActivationCache", "AdapterError", "CaptureError", "ImageGeometry", "Intervention", "ModelAdapter",
    "PreparedInput", "Target", "VQAModel", "attention_rows", "get_adapter", "prepare", "register_adapter",
    "trace", "zero_block", "zero_head",
]
