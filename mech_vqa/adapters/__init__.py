"""Model adapters: module paths, dimensions and image-token geometry per model family."""

from .base import AdapterError, ImageGeometry, ModelAdapter, get_adapter, register_adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from .qwen_vl import Qwen3VLAdapter, Qwen25VLAdapter, QwenVLAdapter

__all__ = ["AdapterError", "ImageGeometry", "ModelAdapter", "LlavaAdapter", "LlavaNextAdapter", "LlavaOnevisionAdapter",
           "QwenVLAdapter", "Qwen25VLAdapter", "Qwen3VLAdapter",
           "get_adapter",
           "register_adapter"]
