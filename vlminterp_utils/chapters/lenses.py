"""Lenses that read a hidden state as words, and the shapes-world rule for when a reading counts as right.

Every lens has one interface: `lens.describe(hidden_states, layer, k)` -> for each token, its top-k words with
scores. `hidden_states` is what the model returns with `output_hidden_states=True` (embeddings first, then one
entry per layer), or a single tensor for the chosen layer.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core import shapes, stats
from ..core.readout import visual_hidden_states


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


def names_object(words, obj) -> bool:
    """Do the words contain a word that names the object (a shape's colour or shape, a photo object's label)?"""
    names = {normalize_word(w) for w in obj.words}
    return any(normalize_word(w) in names for w in words)


def names_any_object(words, scene: shapes.Scene) -> bool:
    return any(names_object(words, o) for o in scene.objects)


def names_background(words) -> bool:
    return any(normalize_word(w) in shapes.BACKGROUND_WORDS for w in words)


# ---------------------------------------------------------------------------------------------- readings

def patch_kinds(adapter, scene: shapes.Scene) -> tuple[np.ndarray, np.ndarray]:
    """Per visual token: 'object', 'ring' (within one token of an object), 'background', or 'none' (a token that
    shows no patch), and the index of the object an object token shows (-1 otherwise; where two objects share a
    token, the first)."""
    touched = [adapter.object_tokens(o.mask) for o in scene.objects]
    near = np.logical_or.reduce([adapter.object_tokens(o.mask, 1) for o in scene.objects])
    owner = np.full(len(near), -1)
    for i in reversed(range(len(touched))):
        owner[touched[i]] = i
    patch = adapter.patch_tokens(scene.image.size)
    kinds = np.where(~patch, "none", np.where(owner >= 0, "object", np.where(near, "ring", "background")))
    return kinds, owner


def patch_readings(adapter, lens, examples: list[shapes.Example], k: int = 5, layers=None,
                   batch_size: int = 8) -> pd.DataFrame:
    """What a lens reads at every visual token of every layer: one row per (layer, example, patch) with the
    patch's kind, its object and the lens's top-k words."""
    layers = range(adapter.n_layers + 1) if layers is None else layers
    rows = []
    for start in tqdm(range(0, len(examples), batch_size), desc=f"{getattr(lens, 'name', 'lens')} readings",
                      leave=False):
        chunk = examples[start:start + batch_size]
        states = visual_hidden_states(adapter, chunk)
        info = [patch_kinds(adapter, ex.scene) for ex in chunk]
        for layer in layers:
            words = lens.describe(states[layer], layer=layer, k=k)
            for j, (patch_words, (kinds, owner)) in enumerate(zip(words, info)):
                for p, pw in enumerate(patch_words):
                    rows.append((layer, start + j, p, kinds[p], owner[p], [w for w, _ in pw]))
    return pd.DataFrame(rows, columns=["layer", "example", "patch", "kind", "object", "words"])


def shapes_judge(row, scene: shapes.Scene) -> bool | None:
    """The book's rule: an object patch is read right when its words name the object's colour or shape, a
    background patch when they contain a background word; patches next to an object are not judged."""
    if row.kind == "object":
        return names_object(row.words, scene.objects[row.object])
    if row.kind == "background":
        return names_background(row.words)
    return None


def names_scene_judge(row, scene: shapes.Scene) -> bool | None:
    """Chapter 1's variant: object patches name their object; background patches 'name' any object (a false
    alarm rate rather than a hit rate)."""
    if row.kind == "object":
        return names_object(row.words, scene.objects[row.object])
    if row.kind == "background":
        return names_any_object(row.words, scene)
    return None


def string_match_judge(labels: list[set[str]]):
    """A judge for real images without patch ground truth: a patch is read right when a word matches one of its
    image's labels (e.g. nouns of a caption). `labels[i]` are the labels of example i."""
    def judge(row, scene) -> bool:
        return any(normalize_word(w) in labels[row.example] for w in row.words)
    return judge


def interpretable_share(readings: pd.DataFrame, examples: list[shapes.Example], judge=shapes_judge,
                        by=("layer",)) -> pd.DataFrame:
    """Share of judged patches that a judge accepts, grouped by `by`, with a normal-approximation 95% CI."""
    verdicts = [judge(row, examples[row.example].scene) for row in readings.itertuples()]
    judged = readings.assign(hit=verdicts)
    judged = judged[judged.hit.notna()].astype({"hit": float})
    out = judged.groupby(list(by)).hit.agg(["mean", "count"]).reset_index()
    low, high = stats.proportion_interval(out["mean"], out["count"])
    return out.rename(columns={"mean": "share", "count": "n"}).assign(ci_low=low, ci_high=high)


def compare_lenses(adapter, lens_list, examples: list[shapes.Example], k: int = 5,
                   judge=shapes_judge) -> pd.DataFrame:
    """Interpretable share per layer for each lens, one table with a `lens` column."""
    tables = []
    for lens in lens_list:
        readings = patch_readings(adapter, lens, examples, k)
        tables.append(interpretable_share(readings, examples, judge).assign(lens=lens.name))
    return pd.concat(tables, ignore_index=True)
