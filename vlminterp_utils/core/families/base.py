"""The adapter every model family shares: a chapter talks to a VLM only through it.

`VLMAdapter` says where the visual tokens sit in a batch, which image box each shows, where the decoder layers, the
final norm and the unembedding are, all read from the model's config and the processor's output
(`input_ids == image_token_id`), never from hard-coded offsets or module paths. A family subclasses it in its own
module of this folder.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import geometry, readout


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
        return readout.image_token_positions(input_ids, self.image_token_id)

    def check_visual_count(self, n: int) -> None:
        """Refuse a count of image tokens this adapter cannot map to image regions."""

    @property
    def deepstack_levels(self) -> int:
        """After how many of its first decoder layers the LLM receives visual features again (Qwen3-VL's
        DeepStack); 0: the visual tokens enter only at the input."""
        return 0

    def token_types(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inputs besides `input_ids` that a family computes from them (Qwen-VL's `mm_token_type_ids`), for
        batches built without the processor (teacher-forced answers); none for most families."""
        return {}

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

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def patch_size(self) -> int:
        """Side of one vision-tower patch, in the pixels the tower receives."""
        return int(self.config.vision_config.patch_size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels to the model's input scale, with the processor's own mean and std."""
        ip = self.image_processor
        mean = torch.tensor(ip.image_mean, dtype=pixels.dtype, device=pixels.device)[:, None, None]
        std = torch.tensor(ip.image_std, dtype=pixels.dtype, device=pixels.device)[:, None, None]
        return (pixels - mean) / std

    # ------------------------------------------------------------------------------------------ prompting
    def prompt(self, question: str) -> str:
        """The model's own chat format for one image and one question, ending where the answer begins."""
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def input_notes(self, image_size: tuple[int, int]) -> list[str]:
        """What the processor will do to an image of this size that a reader may not expect (each a warning that
        says the fix); none for the family's base adapter."""
        return []

    def images_per_prompt(self, images: list) -> list:
        """The images as the processor takes them for one image per prompt (a flat list for most families)."""
        return images

    def processor_options(self) -> dict:
        """Options the adapter passes to every processor call (Gemma 3's pan-and-scan switch); none by default."""
        return {}

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
            batch = self.processor(images=self.images_per_prompt(images),
                                   text=[self.prompt(q) + a for q, a in zip(questions, prefixes)],
                                   return_tensors="pt", padding=True, **self.processor_options())
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


class SizeDependentTokens:
    """For a family whose number of visual tokens depends on the image's size (LLaVA-NeXT's tiles, Qwen-VL's
    dynamic resolution): any count is accepted, and `token_regions` says which token is what."""

    family: str

    @property
    def n_visual_tokens(self) -> int:
        raise AttributeError(f"{self.family}'s number of visual tokens depends on the image: use "
                             "len(adapter.token_regions(image.size))")

    def check_visual_count(self, n: int) -> None:
        pass


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
