"""Typed results with tensors and metadata: ``topk``, ``to_dataframe``, ``save``/``load``, ``plot``."""

from .base import Result, tensor_topk
from .ablation import AblationResult
from .patch_map import PatchMap

__all__ = ["AblationResult", "PatchMap", "Result", "tensor_topk"]
