"""Lenses that read a hidden state as words, and the shapes-world rule for when a reading counts as right.

Every lens has one interface: `lens.describe(hidden_states, layer, k)` -> for each token, its top-k words with
scores. `hidden_states` is the residual stream by depth (`readout.record_residual_stream`: the input at depth 0,
the output of decoder layer d - 1 at depth d, the last before the final norm), or a single tensor for one depth.
"""
from __future__ import annotations

import re
from functools import lru_cache

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
        self._words: dict[int, str] = {}  # token id -> word: a page decodes the same ids hundreds of thousands of times

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
        if token_id not in self._words:
            self._words[token_id] = self.tokenizer.decode([token_id]).strip()
        return self._words[token_id]

    def chance_words(self) -> list[str]:
        """What this lens could say about any token: every vocabulary entry but the special tokens (the pool of
        its random-words control)."""
        special = set(self.tokenizer.all_special_ids)
        ids = [[i] for i in range(len(self.tokenizer)) if i not in special]
        return [w.strip() for w in self.tokenizer.batch_decode(ids)]


class LogitLens(VocabularyLens):
    """nostalgebraist's logit lens: the final norm and the unembedding applied to an intermediate state."""

    name = "LogitLens"

    def scores(self, hidden):
        return logit_lens(hidden, self.adapter.final_norm, self.adapter.unembedding)


def logit_lens(hidden: torch.Tensor, final_norm, unembedding) -> torch.Tensor:
    """(..., vocab) next-word probabilities read off residual-stream states (..., d_model) at any depth: the
    LLM's final norm, then its unembedding, then a softmax over the vocabulary, as if the state were the last."""
    logits = unembedding(final_norm(hidden.to(unembedding.weight.dtype)))  # (..., vocab)
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


@lru_cache(maxsize=1 << 16)
def normalize_word(word: str) -> str:
    """Lower-case letters only, plural 's' dropped: ' Circles' -> 'circle'."""
    letters = "".join(_WORD.findall(word.lower()))
    return letters[:-1] if letters.endswith("s") and letters[:-1] in _CONCEPT_WORDS else letters


_CONCEPT_WORDS = set(shapes.COLORS) | set(shapes.SHAPES) | {"colour", "color"}


def judge_words() -> list[str]:
    """Every word the shapes judge accepts for some patch: the colours, the shapes and the background words."""
    return [*shapes.COLORS, *shapes.SHAPES, *shapes.BACKGROUND_WORDS]


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
    return readings_of_lenses(adapter, [lens], examples, k, layers, batch_size)[0]


def readings_of_lenses(adapter, lens_list, examples: list[shapes.Example], k: int = 5, layers=None,
                       batch_size: int = 8) -> list[pd.DataFrame]:
    """`patch_readings` of several lenses, in their order, from one forward pass per batch of images (the hidden
    states are the same for every lens)."""
    layers = range(adapter.n_layers + 1) if layers is None else layers
    rows = [[] for _ in lens_list]
    names = ", ".join(getattr(lens, "name", "lens") for lens in lens_list)
    for start in tqdm(range(0, len(examples), batch_size), desc=f"{names} readings", leave=False):
        chunk = examples[start:start + batch_size]
        states = visual_hidden_states(adapter, chunk)
        info = [patch_kinds(adapter, ex.scene) for ex in chunk]
        for lens, out in zip(lens_list, rows):
            for layer in layers:
                words = lens.describe(states[layer], layer=layer, k=k)
                for j, (patch_words, (kinds, owner)) in enumerate(zip(words, info)):
                    for p, pw in enumerate(patch_words):
                        out.append((layer, start + j, p, kinds[p], owner[p], [w for w, _ in pw]))
    return [pd.DataFrame(out, columns=["layer", "example", "patch", "kind", "object", "words"]) for out in rows]


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


def judge_readings(readings: pd.DataFrame, examples: list[shapes.Example], judge=shapes_judge,
                   also: dict | None = None) -> pd.DataFrame:
    """The judged readings (patches the judge has no rule for dropped), with a 0/1 `hit` column, and a column
    `hit_<name>` for each further judge in `also` (NaN where that judge has no rule)."""
    judges = {"hit": judge, **{f"hit_{name}": j for name, j in (also or {}).items()}}
    scenes = [examples[e].scene for e in readings.example]
    columns = {name: [j(row, scene) for row, scene in zip(readings.itertuples(), scenes)]
               for name, j in judges.items()}
    judged = readings.assign(**columns)
    return judged[judged.hit.notna()].astype({name: float for name in judges})


def interpretable_share(readings: pd.DataFrame, examples: list[shapes.Example], judge=shapes_judge,
                        by=("layer",)) -> pd.DataFrame:
    """Share of judged patches that a judge accepts, grouped by `by`, with a 95% interval clustered by image."""
    return share_table(judge_readings(readings, examples, judge), by)


def share_table(judged: pd.DataFrame, by=("layer",)) -> pd.DataFrame:
    """Share of hits among judged readings, grouped by `by`, with an exact 95% interval widened for the patches of
    one image being one cluster (`core.stats.clustered_share_ci`, clusters from the `example` column)."""
    rows = []
    for key, part in judged.groupby(list(by)):
        share, low, high = stats.clustered_share_ci(part.hit.to_numpy(), part.example.to_numpy())
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "share": share, "n": len(part),
                     "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=[*by, "share", "n", "ci_low", "ci_high"])


# ---------------------------------------------------------------------------------------------- chance controls
# A top-k word match can be right by luck: a lens that names colours everywhere hits every coloured object. Each
# control below reads the same patches with readings that carry no information about them; a lens is worth what
# it reads *above* its controls.

LENS, RANDOM_WORDS, SHUFFLED = "lens", "random words", "shuffled"


def random_word_readings(readings: pd.DataFrame, pool, k: int, seed: int = 0) -> pd.DataFrame:
    """The same patches, each read as `k` words drawn at random from `pool` (what the lens could ever say)."""
    pool = np.asarray(pool, dtype=object)
    draws = np.random.default_rng(seed).integers(0, len(pool), size=(len(readings), k))
    return readings.assign(words=[list(row) for row in pool[draws]])


def shuffled_readings(readings: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Each patch gets the reading of another patch of the same image and layer.

    A derangement: patches are visited in a random order and each takes the reading of the next one in that
    order, so no patch keeps its own. What survives it is what the lens says about the image as a whole."""
    rng = np.random.default_rng(seed)
    words = readings.words.to_numpy()
    shuffled = np.empty_like(words)
    for rows in readings.groupby(["layer", "example"]).indices.values():
        order = rows[rng.permutation(len(rows))]
        shuffled[order] = words[np.roll(order, -1)]
    return readings.assign(words=list(shuffled))


def with_chance_controls(readings: pd.DataFrame, lens, k: int, seed: int = 0) -> pd.DataFrame:
    """The lens's readings and its two controls in one table, told apart by a `reading` column."""
    return pd.concat([readings.assign(reading=LENS),
                      random_word_readings(readings, lens.chance_words(), k, seed).assign(reading=RANDOM_WORDS),
                      shuffled_readings(readings, seed).assign(reading=SHUFFLED)], ignore_index=True)


def compare_with_chance(adapter, lens_list, examples: list[shapes.Example], k: int = 5, judge=shapes_judge,
                        seed: int = 0, layers=None, also: dict | None = None) -> pd.DataFrame:
    """Judged readings of every lens and of its chance controls: one row per (lens, reading, layer, example, patch)
    with its `kind` and 0/1 `hit` (and `hit_<name>` for each judge in `also`, e.g. colour and shape apart).
    `share_table` and `above_chance` summarise it."""
    tables = []
    for lens, readings in zip(lens_list, readings_of_lenses(adapter, lens_list, examples, k, layers)):
        controls = with_chance_controls(readings, lens, k, seed)
        judged = judge_readings(controls, examples, judge, also)
        tables.append(judged.assign(lens=lens.name).drop(columns="words"))
    return pd.concat(tables, ignore_index=True)


def above_chance(judged: pd.DataFrame, by=("lens", "layer", "kind"), n_boot: int = 1000,
                 seed: int = 0, hit: str = "hit") -> pd.DataFrame:
    """Each lens's share minus that of its strongest control, per group, with a 95% bootstrap interval over images.

    Patches of one image are not independent draws, so the bootstrap resamples whole images (the `example`
    column) and recomputes both shares from the resampled patches. `hit` names the judged column (e.g.
    `hit_colour` from `compare_with_chance(..., also=...)`)."""
    rng = np.random.default_rng(seed)
    per_image = judged.dropna(subset=[hit]).groupby([*by, "reading", "example"])[hit].agg(["sum", "count"])
    per_image = per_image.reset_index()
    rows = []
    for key, group in per_image.groupby(list(by)):
        table = group.pivot(index="example", columns="reading", values=["sum", "count"]).fillna(0)
        hits, counts = table["sum"], table["count"]
        share = hits.sum() / counts.sum()
        controls = share.drop(LENS)
        strongest = controls.idxmax()
        pick = rng.integers(0, len(table), size=(n_boot, len(table)))  # resampled images
        boot = {r: hits[r].to_numpy()[pick].sum(1) / np.maximum(counts[r].to_numpy()[pick].sum(1), 1)
                for r in (LENS, strongest)}
        low, high = np.quantile(boot[LENS] - boot[strongest], [0.025, 0.975])
        rows.append({**dict(zip(by, key)), "share": share[LENS], "chance": share[strongest], "control": strongest,
                     "above": share[LENS] - share[strongest], "ci_low": low, "ci_high": high,
                     "n": int(counts[LENS].sum())})
    return pd.DataFrame(rows)


def excess_over_chance(judged: pd.DataFrame, lens: str, kind: str = "object") -> pd.DataFrame:
    """Per layer and patch of `kind`: the lens's hit minus the hit of its strongest control at that layer (the
    control with the higher share, as in `above_chance`): 1, 0 or -1, indexed (layer, example, patch)."""
    part = judged[(judged.lens == lens) & (judged.kind == kind)]
    wide = part.pivot_table(index=["layer", "example", "patch"], columns="reading", values="hit", aggfunc="first")
    controls = wide.drop(columns=LENS)
    strongest = controls.groupby(level="layer").mean().idxmax(axis=1)  # (layers,) the stronger control's name
    chosen = strongest.reindex(wide.index.get_level_values("layer")).to_numpy()
    control_hit = controls.to_numpy()[np.arange(len(wide)), controls.columns.get_indexer(chosen)]
    return (wide[LENS] - control_hit).rename("excess")


def paired_lenses(judged: pd.DataFrame, first: str, second: str, kind: str = "object") -> pd.DataFrame:
    """Per layer: lens `first`'s gain over its strongest chance control minus lens `second`'s, paired on the same
    patches of the same scenes, with a 95% interval that resamples whole scenes and its verdict
    (`core.stats.paired_difference`)."""
    both = pd.concat({first: excess_over_chance(judged, first, kind),
                      second: excess_over_chance(judged, second, kind)}, axis=1).dropna()
    rows = []
    for layer, pairs in both.groupby(level="layer"):
        test = stats.paired_difference(pairs[first].to_numpy(), pairs[second].to_numpy(),
                                       clusters=pairs.index.get_level_values("example"))
        rows.append({"layer": layer, **stats.paired_row(test)})
    return pd.DataFrame(rows, columns=["layer", *stats.PAIRED_FIELDS])
