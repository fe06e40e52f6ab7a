"""Loading a VLM by name: the embedded models offline, any checkpoint of a supported family, with its adapter."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .embedded import EMBEDDED_MODELS, shapes_llava_checkpoint
from .families import ADAPTERS, adapter_for
from .processors import load_processor


def default_device() -> str:
    """The GPU when there is one (Colab), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on the CPU (bf16 there is many times slower), bf16 on a GPU that has it, else fp16."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16


def model_family(path: str) -> str:
    """The `model_type` of a checkpoint, read before any weight is loaded."""
    local = Path(path) / "config.json"
    if local.exists():
        return json.loads(local.read_text()).get("model_type", "")
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path).model_type


def load_vlm(name: str = "shapes-llava", device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             load_in_4bit: bool = False):
    """Load a VLM by name: `(model, processor, adapter)`. The model is in eval mode with frozen weights.

    `shapes-llava` is the embedded model (offline, CPU); any checkpoint of a supported family (a hub id such as
    `llava-hf/llava-1.5-7b-hf`, or a local folder saved with `save_pretrained`) goes through the same path.
    `device` defaults to the GPU when there is one, `dtype` to fp32 on the CPU and bf16 or fp16 on a GPU;
    `load_in_4bit` (GPU, needs `bitsandbytes`) fits a 7B model in a 16 GB GPU.
    """
    if name in EMBEDDED_MODELS:
        path = shapes_llava_checkpoint(name)
    elif Path(name).is_dir() or "/" in name:
        path = name
    else:
        raise ValueError(f"unknown model {name!r}: use an embedded model ({', '.join(EMBEDDED_MODELS)}), a hub id "
                         "such as 'llava-hf/llava-1.5-7b-hf', or a local folder saved with save_pretrained")
    from transformers import AutoModelForImageTextToText
    try:
        family = model_family(str(path))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load {name!r}: {err}. Offline, only the embedded models "
                         f"({', '.join(EMBEDDED_MODELS)}) and local folders are available.") from err
    if family not in ADAPTERS:
        raise ValueError(f"model family {family!r} of {name!r} is not supported; supported families: "
                         f"{', '.join(ADAPTERS)}")
    device = device or default_device()
    kwargs = {"dtype": dtype or default_dtype(device)}
    if load_in_4bit:
        if torch.device(device).type != "cuda":
            raise ValueError("load_in_4bit needs a CUDA GPU; on the CPU load the model in fp32 (the default)")
        from transformers import BitsAndBytesConfig
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
                                                             bnb_4bit_compute_dtype=kwargs["dtype"]),
                      device_map={"": device})
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    model = (model if load_in_4bit else model.to(device)).eval()
    model.requires_grad_(False)
    processor = load_processor(str(path))
    return model, processor, adapter_for(model, processor)
