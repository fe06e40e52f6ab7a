"""Loading VLMs and reaching into them through one adapter per model family.

Every chapter talks to a model through a `VLMAdapter`: where the visual tokens sit in a batch, the patch grid,
the decoder layers, the final norm, the unembedding. The adapter takes all of this from the model's config and
from the processor's output (`input_ids == image_token_id`), never from hard-coded offsets or module paths, so the
embedded `shapes-llava` and `llava-hf/llava-1.5-7b-hf` go through the same code.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
from torch import nn

from . import geometry, weights
from .storage import atomic_path, cache_dir, data_path, sha256_of

# Embedded models and the package-data folder of each: shapes-llava (its LLM frozen); shapes-llava-tuned (the same
# vision tower and projector trained 500 steps further with the LLM tuned by LoRA of rank 8); its frozen-LLM twin
# (the same 500 steps from the same start, no LoRA), and two more LoRA ranks of that run (chapter 4's dose-response).
EMBEDDED_DIRS = {"shapes-llava": "shapes_llava", "shapes-llava-tuned": "shapes_llava_tuned",
                 "shapes-llava-twin": "shapes_llava_twin"}
EMBEDDED_MODELS = tuple(EMBEDDED_DIRS)
VISION_FILE = "vision_projector.safetensors"
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


# ---------------------------------------------------------------------------------------------- adapters

@dataclass
class VLMAdapter:
    """Uniform access to a loaded VLM. Subclass once per model family."""

    model: nn.Module
    processor: object
    _warned: set = field(default_factory=set, init=False, repr=False, compare=False)  # input notes said once

    family = "base"

    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.config.get_text_config()

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def visual_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, n_visual) sequence positions of the visual tokens, read off `input_ids == image_token_id`."""
        is_visual = input_ids == self.image_token_id
        counts = is_visual.sum(-1)
        if (counts == 0).any() or (counts != counts[0]).any():
            raise ValueError(f"every sequence needs the same, non-zero number of image tokens; got {counts.tolist()}."
                             " Put exactly one image (and one <image> placeholder) in each prompt, and give every "
                             "image of a batch the same size.")
        self.check_visual_count(int(counts[0]))
        return is_visual.nonzero()[:, 1].view(input_ids.shape[0], int(counts[0]))

    def check_visual_count(self, n: int) -> None:
        """Refuse a count of image tokens this adapter cannot map to image regions."""

    # ------------------------------------------------------------------------------------------ geometry
    def token_regions(self, image_size: tuple[int, int]) -> np.ndarray:
        """(n_visual, 4): the box `(x0, y0, x1, y1)`, in the original image's pixels, that each visual token
        shows, in sequence order; NaN for tokens that show no patch (see `core.geometry`)."""
        raise NotImplementedError

    def object_tokens(self, mask: np.ndarray, buffer: int = 0) -> np.ndarray:
        """(n_visual,) bool: the visual tokens that a pixel mask of the original image touches, grown by `buffer`."""
        h, w = np.asarray(mask).shape
        return geometry.tokens_touching(mask, self.token_regions((w, h)), buffer)

    def patch_tokens(self, image_size: tuple[int, int]) -> np.ndarray:
        """(n_visual,) bool: which visual tokens show a patch of the image (not a row end or a CLS token)."""
        return ~np.isnan(self.token_regions(image_size)).any(1)

    def display_tokens(self, image_size: tuple[int, int]) -> np.ndarray:
        """(n_visual,) bool: the tokens a figure draws over the image (one grid, no overlapping tiles)."""
        return self.patch_tokens(image_size)

    # The pieces below are found, not addressed: HF's accessors and the config say where they are.
    @property
    def language_model(self) -> nn.Module:
        return self.model.get_decoder()

    @functools.cached_property  # found once: knockouts ask for it in every layer of every pass
    def layers(self) -> nn.ModuleList:
        n = self.n_layers
        lists = [m for m in self.language_model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
        if len(lists) != 1:
            raise RuntimeError(f"cannot identify the {n} decoder layers of {type(self.language_model).__name__}")
        return lists[0]

    @property
    def final_norm(self) -> nn.Module:
        norms = [m for name, m in self.language_model.named_children() if "norm" in type(m).__name__.lower()]
        if not norms:
            raise RuntimeError(f"{type(self.language_model).__name__} has no final norm among its children")
        return norms[-1]

    def attention(self, layer: int) -> nn.Module:
        """The self-attention module of decoder layer `layer`."""
        found = [m for m in self.layers[layer].modules() if type(m).__name__.endswith("Attention")]
        if not found:
            raise RuntimeError(f"decoder layer {layer} ({type(self.layers[layer]).__name__}) has no attention module")
        return found[0]

    @property
    def attn_implementation(self) -> str:
        return self.text_config._attn_implementation

    @property
    def unembedding(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def n_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def grid(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def n_visual_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # ------------------------------------------------------------------------------------------ prompting
    def prompt(self, question: str) -> str:
        """The model's own chat format for one image and one question, ending where the answer begins."""
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def input_notes(self, image_size: tuple[int, int]) -> list[str]:
        """What the processor will do to an image of this size that a reader may not expect (each a warning that
        says the fix); none for the family's base adapter."""
        return []

    def _note_inputs(self, images) -> None:
        for image in images:
            for note in self.input_notes(image.size):
                kind = note.split(":")[0]
                if kind not in self._warned:  # once per kind of note, not once per image of a sweep
                    self._warned.add(kind)
                    warnings.warn(note, stacklevel=3)

    def inputs(self, images, questions, answer_prefixes=None) -> dict[str, torch.Tensor]:
        """Processor output for a batch of (image, question), left-padded so every answer starts at the end.

        `answer_prefixes` (one string per question) are appended after the prompt, as if the model had already
        said them: the last position then predicts the token that follows. An empty question, or a prompt longer
        than the LLM's context, is an error; an image the processor will squash, crop or blow up is a warning
        (`input_notes`).
        """
        images = [check_image(im) for im in _as_list(images)]
        questions = _as_list(questions)
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions; pass one question per image")
        empty = [i for i, q in enumerate(questions) if not str(q).strip()]
        if empty:
            raise ValueError(f"question {empty[0]} is empty: ask the model something about the image, e.g. "
                             "'What colour is the circle?'")
        self._note_inputs(images)
        prefixes = [""] * len(questions) if answer_prefixes is None else _as_list(answer_prefixes)
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            batch = self.processor(images=images, text=[self.prompt(q) + a for q, a in zip(questions, prefixes)],
                                   return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
        context = getattr(self.text_config, "max_position_embeddings", None)
        if context and batch["input_ids"].shape[1] > context:
            raise ValueError(f"the prompt is {batch['input_ids'].shape[1]} tokens, image tokens included, but the "
                             f"LLM's context is {context}: shorten the question")
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def generate(self, images, questions, max_new_tokens: int = 24) -> list[str]:
        """Greedy answers, decoded without the prompt."""
        batch = self.inputs(images, questions)
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return [s.strip() for s in self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                                  skip_special_tokens=True)]


class LlavaAdapter(VLMAdapter):
    """`LlavaForConditionalGeneration`: a vision tower, a projector and a decoder-only LLM."""

    family = "llava"

    @property
    def image_size(self) -> int:
        """Side of the square image the vision tower takes, in pixels."""
        return int(self.config.vision_config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.config.vision_config.patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        """Rows and columns of patches; a remainder of pixels (384 px in 14 px patches) is seen by no patch."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def strategy(self) -> str:
        return self.config.vision_feature_select_strategy

    @property
    def extra_tokens(self) -> int:
        """Visual tokens before the patches that show none (a CLS token kept by the "full" strategy)."""
        cls = int(getattr(self.processor, "num_additional_image_tokens", 0) or 0)
        return cls if self.strategy == "full" else 0

    @property
    def n_visual_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols + self.extra_tokens

    def check_visual_count(self, n: int) -> None:
        if n != self.n_visual_tokens:
            raise ValueError(f"found {n} image tokens per sequence but the patch grid {self.grid} has "
                             f"{self.n_visual_tokens}; this model family needs its own adapter")

    def input_notes(self, image_size: tuple[int, int]) -> list[str]:
        width, height = image_size
        notes = []
        if min(width, height) < self.patch_size:
            notes.append(f"tiny image: {width}x{height} px is smaller than one {self.patch_size} px patch, so the "
                         f"model sees it blown up to {self.image_size} px of a few flat colours; pass the image "
                         "at its real size")
        if width != height:
            ip = self.processor.image_processor
            size = geometry.size_setting(getattr(ip, "size", None) or {})
            if getattr(ip, "do_center_crop", False):
                notes.append(f"cropped image: the processor resizes a {width}x{height} image and keeps its central "
                             "square, so what lies outside it is never seen (token_regions says which part is); "
                             "pad it to a square first with models.pad_to_square to keep all of it")
            elif "height" in size and "width" in size:
                notes.append(f"squashed image: the processor resizes a {width}x{height} image to "
                             f"{size['width']}x{size['height']} without keeping its aspect ratio, so shapes look "
                             "stretched to the model; pad it to a square first with models.pad_to_square")
        return notes

    def token_regions(self, image_size: tuple[int, int]) -> np.ndarray:
        boxes = geometry.resize_crop_regions(image_size, self.processor.image_processor, self.image_size,
                                             self.patch_size)
        return np.concatenate([np.full((self.extra_tokens, 4), np.nan), boxes])

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels to the model's input scale, with the processor's own mean and std."""
        ip = self.processor.image_processor
        mean = torch.tensor(ip.image_mean, dtype=pixels.dtype, device=pixels.device)[:, None, None]
        std = torch.tensor(ip.image_std, dtype=pixels.dtype, device=pixels.device)[:, None, None]
        return (pixels - mean) / std

    def pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable image inputs for (batch, 3, side, side) pixels in [0, 1] at the tower's own size."""
        return {"pixel_values": self.normalize(pixels).to(next(self.model.parameters()).dtype)}

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.base_model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.base_model.multi_modal_projector


def component_sizes(adapter: LlavaAdapter) -> dict[str, int]:
    """Parameter counts of the three parts of a LLaVA."""
    parts = {"vision tower": adapter.vision_tower, "projector": adapter.projector,
             "language model": adapter.language_model}
    return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}


class LlavaNextAdapter(LlavaAdapter):
    """`LlavaNextForConditionalGeneration` (LLaVA-NeXT, "anyres"): the base image's grid, then a grid over tiles
    of a larger canvas with a row-end token after each row. The number of visual tokens depends on the image's
    size; `grid` is the base image's."""

    family = "llava_next"

    @property
    def n_visual_tokens(self) -> int:
        raise AttributeError("LLaVA-NeXT's number of visual tokens depends on the image: use "
                             "len(adapter.token_regions(image.size))")

    def check_visual_count(self, n: int) -> None:
        pass  # any count: it depends on the image size; token_regions says which token is what

    def input_notes(self, image_size: tuple[int, int]) -> list[str]:
        """Only the tiny-image note: anyres tiles keep any aspect ratio."""
        return [note for note in super().input_notes(image_size) if note.startswith("tiny")]

    def token_regions(self, image_size: tuple[int, int]) -> np.ndarray:
        if self.strategy != "default" and self.extra_tokens:
            raise ValueError("LLaVA-NeXT with a CLS token kept ('full' strategy) is not supported")
        return geometry.anyres_regions(image_size, self.config.image_grid_pinpoints, self.image_size,
                                       self.patch_size, newline=True)

    def pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable anyres inputs: the base image and the tiles of its canvas (resized keeping the aspect
        ratio, centred on black, cut row by row), as the processor makes them, up to the resampling filter."""
        n, _, h, w = pixels.shape
        side = self.image_size
        canvas_h, canvas_w = geometry.select_best_resolution(h, w, self.config.image_grid_pinpoints)
        new_w, new_h, left, top = geometry.fit_in_canvas(w, h, canvas_w, canvas_h)
        resized = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False)
        canvas = F.pad(resized, (left, canvas_w - new_w - left, top, canvas_h - new_h - top))
        tiles = canvas.unfold(2, side, side).unfold(3, side, side)  # (n, 3, rows, cols, side, side)
        tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(n, -1, 3, side, side)
        base = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False)[:, None]
        values = self.normalize(torch.cat([base, tiles], 1).flatten(0, 1)).unflatten(0, (n, -1))
        sizes = torch.tensor([[h, w]] * n, device=pixels.device)
        return {"pixel_values": values.to(next(self.model.parameters()).dtype), "image_sizes": sizes}

    def display_tokens(self, image_size: tuple[int, int]) -> np.ndarray:
        rows, cols = self.grid
        shown = np.zeros(len(self.token_regions(image_size)), bool)
        shown[:rows * cols] = True  # the base image's grid, which covers the whole image once
        return shown


ADAPTERS: dict[str, type[VLMAdapter]] = {"llava": LlavaAdapter, "llava_next": LlavaNextAdapter}


def adapter_for(model: nn.Module, processor) -> VLMAdapter:
    family = getattr(model.config, "model_type", None)
    if family not in ADAPTERS:
        raise ValueError(f"model family {family!r} is not supported; supported families: {', '.join(ADAPTERS)}. "
                         "Add an adapter to vlminterp_utils.core.models.ADAPTERS for it.")
    return ADAPTERS[family](model, processor)


def check_image(image) -> Image.Image:
    """A PIL RGB image, or a clear error that says how to make one."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}; use image.convert('RGB')")
    return image


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] | None = None) -> Image.Image:
    """The image centred on a square canvas of its longer side, so that a processor that squashes or crops to a
    square keeps all of it undistorted. `fill`: the canvas colour (default: the image's top-left pixel, the
    background in the shapes world)."""
    image = check_image(image)
    width, height = image.size
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill or image.getpixel((0, 0)))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ---------------------------------------------------------------------------------------------- loading

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
    from transformers import AutoModelForImageTextToText, AutoProcessor
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
    processor = AutoProcessor.from_pretrained(path)
    return model, processor, adapter_for(model, processor)


# ---------------------------------------------------------------------------------------------- shapes-llava

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
    target = cache_dir() / f"{name}-{source}-{digest}"
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


@torch.no_grad()
def lora_updates(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each update of a LoRA file: the path of the linear layer it was trained on, and `alpha / rank * B @ A` (fp32).

    The file holds `<module path>.lora_A` (rank x in) and `<module path>.lora_B` (out x rank), its JSON side file
    `rank` and `alpha` (as `workshop.train` writes them)."""
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    scale = lora_scale(json.loads(Path(path).with_suffix(".json").read_text()))
    for key, down in tensors.items():
        if key.endswith(".lora_A"):
            name = key.removesuffix(".lora_A")
            yield name, scale * (tensors[name + ".lora_B"].float() @ down.float())


@torch.no_grad()
def merge_lora(model: nn.Module, path: Path) -> None:
    """Add each LoRA update (`lora_updates`) to the weight of the linear layer it was trained on; the merged model
    is a plain HF model, with no LoRA layer left and no dependency on peft."""
    for name, update in lora_updates(path):
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"{path} does not fit this model: it has no layer {name!r}") from err
        layer.weight += update.to(layer.weight)


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
