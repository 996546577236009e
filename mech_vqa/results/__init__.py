"""Typed results with tensors and metadata: ``topk``, ``to_dataframe``, ``save``/``load``, ``plot``.

Importing this package registers every result type, so ``Result.load(path)`` can rebuild any of
them in a fresh process (by class name, from safetensors + JSON; no code is executed).
"""

from .ablation import AblationResult
from .attention import AnswerAttention, AttentionMass, CausalExplanation, PatchToText, RelevancyMaps
from .base import Result, tensor_topk
from .head_claims import HeadClaims
from .igos import IGOSResult
from .knockout import KnockoutResult
from .mechanistic import Explanation, HeadIncrease, HeadPositions, LayerIncrease, LogitLens, NeuronIncrease
from .patch_map import PatchMap
from .patching import PatchingResult

__all__ = [
    "AblationResult", "AnswerAttention", "AttentionMass", "CausalExplanation", "Explanation", "HeadClaims",
    "HeadIncrease",
    "HeadPositions", "IGOSResult", "KnockoutResult", "LayerIncrease", "LogitLens", "NeuronIncrease", "PatchMap",
    "PatchingResult", "PatchToText",
    "RelevancyMaps", "Result", "tensor_topk",
]
