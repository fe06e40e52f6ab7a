"""Loading VLMs and reaching into them through one adapter per model family.

Every chapter talks to a model through a `VLMAdapter`: where the visual tokens sit in a batch, the patch grid,
the decoder layers, the final norm, the unembedding. The adapter takes all of this from the model's config and
from the processor's output (`input_ids == image_token_id`), never from hard-coded offsets or module paths, so the
embedded `shapes-llava` and `llava-hf/llava-1.5-7b-hf` go through the same code.

Three concepts, a module each, all importable from here: the adapters, one module per family
(`core.families`); loading by name (`core.loading`); the embedded models (`core.embedded`).
"""
from __future__ import annotations

from .embedded import (CHAT_TEMPLATE, EMBEDDED_DIRS, EMBEDDED_MODELS, IMAGE_TOKEN, LORA_FILE, VISION_FILE,
                       build_shapes_llava, embedded_lora_rank, lora_delta, lora_scale, lora_updates, merge_lora,
                       merge_updates, shapes_llava_checkpoint, shapes_llava_dir, shapes_llava_vision_config,
                       smollm2_tokenizer)
from .families import (ADAPTERS, LlavaAdapter, LlavaNextAdapter, VLMAdapter, adapter_for, check_image,
                       component_sizes, pad_to_square)
from .loading import default_device, default_dtype, load_vlm, model_family

__all__ = ["ADAPTERS", "CHAT_TEMPLATE", "EMBEDDED_DIRS", "EMBEDDED_MODELS", "IMAGE_TOKEN", "LORA_FILE", "LlavaAdapter",
           "LlavaNextAdapter", "VISION_FILE", "VLMAdapter", "adapter_for", "build_shapes_llava", "check_image",
           "component_sizes", "default_device", "default_dtype", "embedded_lora_rank", "load_vlm", "lora_delta",
           "lora_scale", "lora_updates", "merge_lora", "merge_updates", "model_family", "pad_to_square",
           "shapes_llava_checkpoint", "shapes_llava_dir", "shapes_llava_vision_config", "smollm2_tokenizer"]
