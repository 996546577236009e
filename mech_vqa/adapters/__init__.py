"""Model adapters: module paths, dimensions and image-token geometry per model family."""

from .base import AdapterError, ImageGeometry, ModelAdapter, get_adapter, register_adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from .qwen_vl import Qwen3VLAdapter, Qwen25VLAdapter, QwenVLAdapter
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .idefics3 import Idefics3Adapter
from .mistral3 import Mistral3Adapter

__all__ = ["AdapterError", "Gemma3Adapter", "Idefics3Adapter", "InternVLAdapter", "ImageGeometry", "ModelAdapter", "LlavaAdapter", "LlavaNextAdapter", "LlavaOnevisionAdapter", "Mistral3Adapter",
           "QwenVLAdapter", "Qwen25VLAdapter", "Qwen3VLAdapter",
           "get_adapter",
           "register_adapter"]
