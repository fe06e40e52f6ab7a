"""Lenses that read a hidden state as words, and the shapes-world rule for when a reading counts as right.

Every lens has one interface: `lens.describe(hidden_states, layer, k)` -> for each token, its top-k words with
scores. `hidden_states` is what the model returns with `output_hidden_states=True` (embeddings first, then one
entry per layer), or a single tensor for the chosen layer.
"""
from __future__ import annotations

import re

import torch

from . import shapes


def _layer(hidden_states, layer: int) -> torch.Tensor:
    return hidden_states[layer] if isinstance(hidden_states, (tuple, list)) else hidden_states


class VocabularyLens:
    """Shared machinery of the lenses that score hidden states against the vocabulary."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.tokenizer = adapter.tokenizer

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def top_k(self, hidden_states, layer: int, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., k) token ids and their scores, for every token of the layer's hidden states."""
        hidden = _layer(hidden_states, layer)
        values, ids = self.scores(hidden).topk(k, dim=-1)
        return ids, values

    def describe(self, hidden_states, layer: int, k: int = 5) -> list:
        """Nested lists (as the input's leading dims) of [(word, score), ...] per token."""
        ids, values = self.top_k(hidden_states, layer, k)
        flat = [[(self.word(i), float(v)) for i, v in zip(row_ids, row_vals)]
                for row_ids, row_vals in zip(ids.reshape(-1, k).tolist(), values.reshape(-1, k).tolist())]
        return unflatten(flat, ids.shape[:-1])

    def word(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]).strip()


class LogitLens(VocabularyLens):
    """nostalgebraist's logit lens: the final norm and the unembedding applied to an intermediate state."""

    name = "LogitLens"

    def scores(self, hidden):
        norm, unembed = self.adapter.final_norm, self.adapter.unembedding
        logits = unembed(norm(hidden.to(unembed.weight.dtype)))
        return logits.float().softmax(-1)


class EmbeddingLens(VocabularyLens):
    """Cosine similarity to the input embedding matrix: which word's embedding is this state closest to?"""

    name = "EmbeddingLens"

    def __init__(self, adapter):
        super().__init__(adapter)
        emb = adapter.input_embeddings.weight.detach().float()
        self.normed = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def scores(self, hidden):
        h = hidden.float()
        return (h / h.norm(dim=-1, keepdim=True).clamp_min(1e-6)) @ self.normed.T


def unflatten(flat: list, shape) -> list:
    for size in reversed(list(shape)[1:]):
        flat = [flat[i:i + size] for i in range(0, len(flat), size)]
    return flat


# ---------------------------------------------------------------------------------------------- the judge

_WORD = re.compile(r"[a-z]+")


def normalize_word(word: str) -> str:
    """Lower-case letters only, plural 's' dropped: ' Circles' -> 'circle'."""
    letters = "".join(_WORD.findall(word.lower()))
    return letters[:-1] if letters.endswith("s") and letters[:-1] in _CONCEPT_WORDS else letters


_CONCEPT_WORDS = set(shapes.COLORS) | set(shapes.SHAPES) | {"colour", "color"}


def names_object(words, obj: shapes.ShapeObject) -> bool:
    """Do the words contain the object's colour or its shape?"""
    return any(normalize_word(w) in (obj.color, obj.shape) for w in words)


def names_any_object(words, scene: shapes.Scene) -> bool:
    return any(names_object(words, o) for o in scene.objects)


def names_background(words) -> bool:
    return any(normalize_word(w) in shapes.BACKGROUND_WORDS for w in words)
