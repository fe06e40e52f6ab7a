"""The embedded models: shapes-llava (SmolLM2-135M behind a small CLIP tower trained on the shapes world), its
LoRA-tuned versions and its frozen-LLM twin, assembled offline from package data and cached."""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from . import weights
from .storage import atomic_path, cache_dir, data_path, sha256_of

# Embedded models and the package-data folder of each: shapes-llava (its LLM frozen); shapes-llava-tuned (the same
# vision tower and projector trained 500 steps further with the LLM tuned by LoRA of rank 8); its frozen-LLM twin
# (the same 500 steps from the same start, no LoRA), and that run with LoRA of ranks 2 and 32 (chapter 4's
# dose-response).
EMBEDDED_DIRS = {"shapes-llava": "shapes_llava", "shapes-llava-tuned": "shapes_llava_tuned",
                 "shapes-llava-twin": "shapes_llava_twin", "shapes-llava-tuned-r32": "shapes_llava_tuned_r32",
                 "shapes-llava-tuned-r2": "shapes_llava_tuned_r2"}
EMBEDDED_MODELS = tuple(EMBEDDED_DIRS)
VISION_FILE = "vision_projector.safetensors"
ASSEMBLY = "a2"  # how the weights are put together; a2: <image>'s embedding row drawn from a fixed seed
LORA_FILE = "lora.safetensors"
IMAGE_TOKEN = "<image>"
# ChatML like SmolLM2's own, without its default system prompt (shorter sequences, same format), and with the
# llava-hf convention for image items, so `processor.apply_chat_template` works as for llava-hf models.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def shapes_llava_vision_config(image_size: int = 64, patch_size: int = 8):
    """The small CLIP vision tower of shapes-llava: global self-attention over an 8x8 grid of patches."""
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=192, intermediate_size=768,
                            num_hidden_layers=6, num_attention_heads=6, projection_dim=192)


def build_shapes_llava(vision_weights: Path | None = None, lora: Path | None = None):
    """Assemble shapes-llava from the cached SmolLM2 weights and (if given) trained vision/projector weights, with
    (if given) LoRA updates merged into the LLM (`merge_lora`).

    Returns `(model, processor)`. Without `vision_weights`, the vision tower and projector are freshly
    initialised (the starting point of training).
    """
    from transformers import (AutoModelForCausalLM, CLIPImageProcessorPil, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    tokenizer = smollm2_tokenizer()
    source, kwargs = weights.smollm2_pretrained()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    # The one new row, <image>'s, never reaches the LLM (LLaVA puts the image's features at those positions), yet it
    # is a weight: drawn from a fixed seed, every embedded model's LLM is the same unless LoRA tuned it, so what is
    # computed from the LLM alone (a LatentLens index) is shared. Forked: the rest of the build draws as before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    vision_config = shapes_llava_vision_config()
    if vision_weights is not None:
        meta = json.loads(Path(vision_weights).with_suffix(".json").read_text())
        vision_config = vision_config.__class__(**meta["vision_config"])
    config = LlavaConfig(vision_config=vision_config, text_config=llm.config,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
                         projector_hidden_act="gelu", tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.get_decoder().load_state_dict(llm.get_decoder().state_dict())
    model.tie_weights()
    if vision_weights is not None:
        from safetensors.torch import load_file
        missing, unexpected = model.load_state_dict(load_file(str(vision_weights)), strict=False)
        if unexpected or any(not k.startswith(("model.language_model.", "lm_head.")) for k in missing):
            raise ValueError(f"{vision_weights} does not fit shapes-llava: unexpected {unexpected[:3]}, "
                             f"missing {[k for k in missing if 'language_model' not in k][:3]}")
    if lora is not None:
        merge_lora(model, lora)

    image_processor = CLIPImageProcessorPil(
        size={"height": vision_config.image_size, "width": vision_config.image_size}, do_center_crop=False,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    # CLIP adds one CLS token, which the "default" feature strategy drops again.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                               patch_size=vision_config.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token=IMAGE_TOKEN)
    return model.eval(), processor


def shapes_llava_dir(name: str = "shapes-llava") -> Path:
    """The shipped weights, model card and training record of an embedded model (package data)."""
    if name not in EMBEDDED_DIRS:
        raise ValueError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    return data_path(EMBEDDED_DIRS[name])


def embedded_lora_rank(name: str) -> int:
    """The LoRA rank an embedded model's LLM was tuned with, read from its training record (0: the LLM is
    SmolLM2 as shipped, frozen)."""
    record = shapes_llava_dir(name) / VISION_FILE
    side = record.with_suffix(".json")
    if not side.exists():
        raise FileNotFoundError(f"{side} is missing: reinstall the package, which ships it")
    return int(json.loads(side.read_text()).get("lora_rank", 0))


def shapes_llava_checkpoint(name: str = "shapes-llava") -> Path:
    """A save_pretrained folder of an embedded model in the cache, assembled on first use (keyed by the weights'
    hashes). A model trained with LoRA (its training record says the rank) also merges its updates into the LLM, so
    it loads as a plain Llava."""
    folder = shapes_llava_dir(name)
    vision_weights = folder / VISION_FILE
    lora = folder / LORA_FILE if embedded_lora_rank(name) else None
    for needed in (vision_weights, lora):
        if needed is not None and not needed.exists():
            raise FileNotFoundError(f"{needed} is missing: train it with `python -m vlminterp_utils.workshop.train` "
                                    f"(see {folder / 'MODEL_CARD.md'}) or reinstall the package, which ships it")
    source = os.environ.get("VLMINTERP_SMOLLM2", "gguf")  # the LLM's source is part of the assembled model
    digest = sha256_of(vision_weights)[:16] + (sha256_of(lora)[:16] if lora else "")
    target = cache_dir() / f"{name}-{source}-{ASSEMBLY}-{digest}"
    if not (target / "config.json").exists():
        model, processor = build_shapes_llava(vision_weights, lora)
        # A half-assembled folder never sits at the cached path; one that another process (a chapter running
        # beside this one) assembled meanwhile is kept, since that process may be loading it.
        with atomic_path(target, folder=True, keep_existing=True) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
    return target


def lora_scale(meta: dict) -> float:
    return meta["alpha"] / meta["rank"]


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """The change LoRA makes to a linear layer's weight (out, in): `alpha / rank * B @ A`, from its factors
    A (rank, in) and B (out, rank), in fp32."""
    return alpha / rank * (lora_B.float() @ lora_A.float())  # (out, rank) @ (rank, in) -> (out, in)


@torch.no_grad()
def merge_updates(model: nn.Module, updates: dict[str, torch.Tensor]) -> None:
    """Add each update (out, in) to the weight of the linear layer at its module path, in place, in the
    weight's dtype; nothing else of the model changes."""
    for name, update in updates.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"the model has no layer {name!r} for this update") from err
        layer.weight += update.to(layer.weight)


@torch.no_grad()
def lora_updates(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each update of a LoRA file: the path of the linear layer it was trained on, and `alpha / rank * B @ A` (fp32).

    The file holds `<module path>.lora_A` (rank x in) and `<module path>.lora_B` (out x rank), its JSON side file
    `rank` and `alpha` (as `workshop.train` writes them)."""
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    meta = json.loads(Path(path).with_suffix(".json").read_text())
    for key, down in tensors.items():
        if key.endswith(".lora_A"):
            name = key.removesuffix(".lora_A")
            yield name, lora_delta(down, tensors[name + ".lora_B"], meta["alpha"], meta["rank"])


@torch.no_grad()
def merge_lora(model: nn.Module, path: Path) -> None:
    """Add each LoRA update (`lora_updates`) to the weight of the linear layer it was trained on; the merged model
    is a plain HF model, with no LoRA layer left and no dependency on peft."""
    try:
        for name, update in lora_updates(path):  # one at a time: all updates at once would double the LLM's memory
            merge_updates(model, {name: update})
    except ValueError as err:
        raise ValueError(f"{path} does not fit this model: {err}") from err


def smollm2_tokenizer():
    """SmolLM2's tokenizer with the `<image>` token and the book's chat template."""
    from transformers import AutoTokenizer
    source, kwargs = weights.smollm2_pretrained()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
