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

__version__ = "0.1.0"

__all__ = [
    "ActivationCache", "AdapterError", "CaptureError", "ImageGeometry", "Intervention", "ModelAdapter",
    "PreparedInput", "Target", "VQAModel", "attention_rows", "get_adapter", "prepare", "register_adapter",
    "trace", "zero_block", "zero_head",
]
