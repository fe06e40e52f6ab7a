"""Run the model and read it: hidden states, visual tokens, answer logits, answer-token losses.

Every chapter reads the model through these few functions, and training the embedded model uses the same
answer-token loss as MIMIC's inversion (chapter 3). They work on any model an adapter supports.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

from . import sites


@torch.no_grad()
def forward(adapter, batch: dict, hidden_states: bool = False, attentions: bool = False, logits_to_keep: int = 1):
    """One forward pass; hidden states of every layer (embeddings first) and attention weights on request.

    Logits only at the last `logits_to_keep` positions (0: every position): the unembedding is as wide as the
    vocabulary, and over a whole prompt it can cost more than the LLM's layers."""
    if attentions and adapter.attn_implementation != "eager":
        raise ValueError("attention weights need eager attention: model.set_attn_implementation('eager')")
    return adapter.model(**batch, output_hidden_states=hidden_states, output_attentions=attentions,
                         logits_to_keep=logits_to_keep)


@contextmanager
def edit_visual_inputs(adapter, edit: Callable[[torch.Tensor], torch.Tensor | None],
                       edit_deepstack: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None):
    """Within the block, the visual tokens of every prompt, as the LLM receives them (batch, n_visual, d_model),
    pass through `edit`, which returns their replacement (or None to leave them).

    Qwen3-VL's LLM receives visual features again after its first decoder layers (DeepStack: level i is added to
    the visual tokens' stream after layer i). `edit_deepstack(level, features)` edits those, (batch, n_visual,
    d_model) per level, the same way; without it they are left as they are.

    The edit sits at the `llm_input` site (`core.sites`), where every model family hands its merged sequence to
    the LLM, and finds the visual tokens from `input_ids == image_token_id` at `model_input`, so it works
    whatever the projector's output shape (LLaVA-NeXT's tiles). Only a forward pass whose `input_ids` hold image
    tokens is edited: tokens generated afterwards are untouched.
    """
    state = {}

    def find_positions(layer, ids, call):
        has_image = ids is not None and bool((ids == adapter.image_token_id).any())
        state["positions"] = adapter.visual_positions(ids) if has_image else None

    def replace(layer, embeds, call):
        positions = state.get("positions")
        if positions is None or embeds is None:
            return None
        changed = {}
        rows = torch.arange(embeds.shape[0], device=embeds.device)[:, None]
        new = edit(embeds[rows, positions])  # (batch, n_visual, d_model)
        if new is not None:
            changed["inputs_embeds"] = embeds.clone()
            changed["inputs_embeds"][rows, positions] = new.to(embeds.dtype)
        deepstack = call.get("deepstack_visual_embeds")
        if edit_deepstack is not None and deepstack is not None:
            # each level is (batch * n_visual, d_model), the visual tokens of every prompt in sequence order
            levels = [edit_deepstack(i, f.view(*positions.shape, -1)) for i, f in enumerate(deepstack)]
            changed["deepstack_visual_embeds"] = [f if n is None else n.to(f.dtype).reshape(f.shape)
                                                  for f, n in zip(deepstack, levels)]
        return changed or None

    with sites.hook(adapter, "model_input", find_positions), sites.hook(adapter, "llm_input", replace):
        yield


def image_token_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(batch, n_visual) positions of the image tokens in each row of `input_ids` (batch, seq); every row holds
    the same number of them. Left padding shifts a row's positions, so each row is read on its own."""
    is_image = input_ids == image_token_id  # (batch, seq) bool
    n_visual = int(is_image[0].sum()) if len(input_ids) else 0
    columns = is_image.nonzero()[:, 1]  # (batch * n_visual,) row by row, left to right
    return columns.view(input_ids.shape[0], n_visual)  # (batch, n_visual)


def merge_visual_tokens(text_embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                        features: torch.Tensor) -> torch.Tensor:
    """The sequence the LLM receives: `text_embeds` (batch, seq, d_model) with each row's image-token positions
    filled, in order, by that row's visual tokens `features` (batch, n_visual, d_model). The input is not changed."""
    positions = image_token_positions(input_ids, image_token_id)  # (batch, n_visual)
    rows = torch.arange(len(input_ids), device=input_ids.device)[:, None]  # (batch, 1): broadcasts over tokens
    merged = text_embeds.clone()  # (batch, seq, d_model)
    merged[rows, positions] = features.to(merged.dtype)
    return merged


@torch.no_grad()
def visual_embeddings(adapter, batch: dict) -> torch.Tensor:
    """(batch, n_visual, d_model): the visual tokens as the LLM receives them (after the projector).

    The forward pass stops where the LLM would start (`sites.capture`), so the LLM's layers and its
    vocabulary-wide unembedding never run (with a tiny vision tower in front of a real LLM, they were nearly all
    of the cost)."""
    embeds = sites.capture(adapter, "llm_input", batch)  # (batch, seq, d_model)
    positions = adapter.visual_positions(batch["input_ids"]).to(embeds.device)
    return embeds[torch.arange(len(embeds), device=embeds.device)[:, None], positions]


@contextmanager
def record_residual_stream(adapter):
    """Within the block, a forward pass fills the list this yields with the residual stream, by depth.

    The book's one convention for layers: decoder layers (blocks) are numbered 0 .. n_layers - 1, as the
    knockout takes them; depth d is the stream block d reads (the `layer_input` site of layer d), so depth 0 is
    the input embeddings as the first block gets them and depth d + 1 is what block d writes.
    The last depth, n_layers, is the last block's output *before* the final norm (HF's `output_hidden_states`
    puts the normed state there instead, so a lens that applies the norm would apply it twice). Entries are
    (batch, seq, d_model). Depths below n_layers are read where the layers read them, so they hold Qwen3-VL's
    DeepStack features, which are added between layers.
    """
    stream = []
    last = adapter.n_layers - 1
    with sites.hook(adapter, "layer_input", lambda layer, h, call: stream.append(h), range(adapter.n_layers)), \
            sites.hook(adapter, "layer_output", lambda layer, h, call: stream.append(h), [last]):
        yield stream


@torch.no_grad()
def visual_hidden_states(adapter, examples) -> torch.Tensor:
    """(n_layers + 1, batch, n_visual, d_model): the residual stream at the visual tokens of `examples` (anything
    with `.scene.image` and `.question`), depth by depth (`record_residual_stream`: depth 0 the input, depth d
    the output of decoder layer d - 1, the last one before the final norm)."""
    batch = adapter.inputs([e.scene.image for e in examples], [e.question for e in examples])
    with record_residual_stream(adapter) as hidden:
        adapter.model(**batch, logits_to_keep=1)
    pos = adapter.visual_positions(batch["input_ids"])
    rows = torch.arange(len(examples))[:, None]
    return torch.stack([h[rows, pos] for h in hidden])


def answer_logits(adapter, batch: dict) -> torch.Tensor:
    """Logits of the first answer token: the last position of every (left-padded) prompt."""
    return adapter.model(**batch, logits_to_keep=1).logits[:, -1]


def answer_token_losses(adapter, batch: dict[str, torch.Tensor],
                        vision: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every answer token (`batch["loss_mask"]`), and the batch row of each.

    `vision` holds the image inputs (`pixel_values`, and `image_sizes` for LLaVA-NeXT or `image_grid_thw` for
    Qwen-VL) when they are not in the batch, e.g. differentiable pixels from `adapter.pixel_inputs`. The
    unembedding runs at answer positions alone: it is as wide as the vocabulary, and a prompt has far more
    positions than its answer.
    Training the embedded model and MIMIC's inversion both use this loss.
    """
    vision = vision if vision is not None else {k: v for k, v in batch.items() if k in ("pixel_values",
                                                                                         "image_sizes",
                                                                                         "image_grid_thw")}
    hidden = adapter.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      **adapter.token_types(batch["input_ids"]), **vision).last_hidden_state
    predicts = batch["loss_mask"][:, 1:]  # position t predicts token t + 1
    logits = adapter.unembedding(hidden[:, :-1][predicts]).float()
    losses = F.cross_entropy(logits, batch["input_ids"][:, 1:][predicts], reduction="none")
    return losses, predicts.nonzero()[:, 0]


def pad_right(sequences: list[torch.Tensor], pad_id: int,
              masks: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad token sequences into `input_ids` and `attention_mask` (and `loss_mask`, given per-token masks).

    Right padding keeps every real token at its position in its own sequence, which a causal LM's hidden states
    depend on; prompts for generation are left-padded instead (`VLMAdapter.inputs`).
    """
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        input_ids[i, :len(seq)], attention[i, :len(seq)] = torch.as_tensor(seq), 1
        if masks is not None:
            loss_mask[i, :len(seq)] = torch.as_tensor(masks[i])
    out = {"input_ids": input_ids, "attention_mask": attention}
    return {**out, "loss_mask": loss_mask} if masks is not None else out


def first_answer_token(adapter, answer: str, prefix: str = "") -> int:
    """The token id an answer starts with, as the model would write it right after the prompt and `prefix`
    (an answer prefix such as "It is a" is followed by " red", with its space)."""
    tok = adapter.tokenizer
    if not prefix:
        return tok(answer, add_special_tokens=False)["input_ids"][0]
    before = tok(prefix, add_special_tokens=False)["input_ids"]
    after = tok(f"{prefix} {answer.strip()}", add_special_tokens=False)["input_ids"]
    common = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), len(before))
    return after[common]


def same_word(adapter, token_id: int, answer_token: int) -> bool:
    """Does the model's token say the same as the answer's first token, whatever its case, leading space or
    punctuation ("Yes", " yes", "yes." all say "yes")?"""
    decode = adapter.tokenizer.decode
    said, meant = normalize_answer(decode([token_id])), normalize_answer(decode([answer_token]))
    return token_id == answer_token or (bool(meant) and said == meant)


_EDGES = re.compile(r"^[\s\"'`]+|[\s\"'`.!?,;:]+$")


def normalize_answer(answer: str) -> str:
    """Lower-case, without surrounding whitespace, quotes or final punctuation: 'Red.' -> 'red'."""
    return _EDGES.sub("", answer.strip().lower())
