"""One adapter per model family, each in its own module; `adapter_for` picks it by the config's `model_type`."""
from __future__ import annotations

from torch import nn

from .base import VLMAdapter, check_image, pad_to_square
from .gemma3 import Gemma3Adapter
from .idefics3 import Idefics3Adapter, SmolVLMAdapter
from .llava import LlavaAdapter, component_sizes
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import Qwen25VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter

ADAPTERS: dict[str, type[VLMAdapter]] = {"llava": LlavaAdapter, "llava_next": LlavaNextAdapter,
                                         "llava_onevision": LlavaOnevisionAdapter,
                                         "qwen2_vl": Qwen2VLAdapter, "qwen2_5_vl": Qwen25VLAdapter,
                                         "qwen3_vl": Qwen3VLAdapter, "gemma3": Gemma3Adapter,
                                         "idefics3": Idefics3Adapter, "smolvlm": SmolVLMAdapter}


def adapter_for(model: nn.Module, processor) -> VLMAdapter:
    family = getattr(model.config, "model_type", None)
    if family not in ADAPTERS:
        raise ValueError(f"model family {family!r} is not supported; supported families: {', '.join(ADAPTERS)}. "
                         "Add an adapter to vlminterp_utils.core.families.ADAPTERS for it.")
    return ADAPTERS[family](model, processor)


__all__ = ["ADAPTERS", "Gemma3Adapter", "Idefics3Adapter", "LlavaAdapter", "LlavaNextAdapter", "LlavaOnevisionAdapter",
           "Qwen25VLAdapter", "Qwen2VLAdapter", "Qwen3VLAdapter", "SmolVLMAdapter", "VLMAdapter", "adapter_for",
           "check_image", "component_sizes", "pad_to_square"]
