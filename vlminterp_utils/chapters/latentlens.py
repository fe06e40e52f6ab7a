"""LatentLens (Krojer et al. 2026): read a visual token by its nearest contextual text embeddings.

Build once: run the LLM over a text corpus and store, at a few layers, the hidden state of every token occurrence
(at most `cap` random occurrences per token string), L2-normalised, in fp16, with who-said-it metadata. Then a
visual token's hidden state is described by the words whose *contextual* embeddings are nearest to it, searched
with faiss in every stored layer and merged across layers.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..core import shards
from ..core.neighbours import Searcher
from ..core.readout import pad_right, visual_hidden_states
from ..core.storage import atomic_path, cache_key, cached_artefact, data_path, weights_fingerprint
from .lenses import unflatten

FORMAT_VERSION = 2  # 2: the word's character span in its sentence (word_start, word_end) and skip_first
SKIP_FIRST = 2  # positions 0 and 1 of a sentence are never stored (the official extraction's position filter)
_LETTERS = re.compile(r"[A-Za-z0-9]")


def default_layers(n_layers: int) -> list[int]:
    """The paper's spread of contextual layers, scaled to depth: 1, 2, 4, 8, then n/2, 3n/4, n - 2 and n - 1.

    Krojer et al. store layers 1, 2, 4, 8, 16, 24, 30, 31 of 32-layer LLMs; this gives exactly that at depth 32,
    and for other depths keeps the early layers and scales the middle and late ones."""
    spread = [1, 2, 4, 8, n_layers // 2, 3 * n_layers // 4, n_layers - 2, n_layers - 1]
    return sorted({layer for layer in spread if 1 <= layer < n_layers})


def _word_span(text: str, start: int, end: int) -> tuple[int, int]:
    """The character span of the whole word around a token's span [start, end) (its leading space excluded)."""
    while start < end and text[start].isspace():
        start += 1
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    while end < len(text) and text[end].isalnum():
        end += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


@dataclass
class ContextualIndex:
    """Contextual embeddings of corpus tokens at several layers, and the metadata of every entry."""

    model_name: str
    hidden_size: int
    layers: list[int]
    embeddings: dict[int, torch.Tensor]  # layer -> (n_entries, hidden) fp16, L2-normalised
    metadata: pd.DataFrame  # token_id, token, word, sentence, position
    cap: int
    seed: int
    search_method: str = "auto"  # "exact", "ivf", "hnsw", or "auto": exact below core.neighbours.APPROXIMATE_FROM
    skip_first: int = SKIP_FIRST  # sentence positions never stored

    def __post_init__(self):
        self._searchers = {}

    def __len__(self) -> int:
        return len(self.metadata)

    # ------------------------------------------------------------------------------------------ search
    def _searcher(self, layer: int) -> Searcher:
        if layer not in self._searchers:
            self._searchers[layer] = Searcher(self.embeddings[layer], self.search_method)
        return self._searchers[layer]

    def search(self, queries: torch.Tensor, k: int = 5, layers: list[int] | None = None,
               batch_size: int = 4096, merge: str = "official") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k entries over the chosen contextual layers, merged by cosine similarity (`merge`: "official", the
        paper's code, or "distinct"; see `MERGES`).

        `queries` is (n, hidden) in any float dtype. Returns (n, k) similarities, entry rows and the contextual
        layer each match came from.
        """
        if merge not in MERGES:
            raise ValueError(f"unknown merge {merge!r}; choose one of {', '.join(MERGES)}")
        if queries.shape[-1] != self.hidden_size:
            raise ValueError(f"queries have width {queries.shape[-1]} but the index was built for "
                             f"{self.hidden_size} ({self.model_name}); build an index for this model")
        return MERGES[merge](*self.candidates(queries, k, layers, batch_size), k)

    def candidates(self, queries: torch.Tensor, k: int = 5, layers: list[int] | None = None,
                   batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each contextual layer's top-k for each query, before the merge: (n, layers * k) similarities, entry
        rows and layers, the layers side by side in order."""
        q = queries.detach().float().cpu().reshape(-1, self.hidden_size)
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        layers = layers or self.layers
        sims, rows, from_layer = [], [], []
        for layer in layers:
            if layer not in self.embeddings:
                raise ValueError(f"layer {layer} is not in the index (layers {self.layers})")
            s, r = zip(*(self._searcher(layer).search(q[i:i + batch_size], k) for i in range(0, len(q), batch_size)))
            sims.append(np.concatenate(s))
            rows.append(np.concatenate(r))
            from_layer.append(np.full_like(rows[-1], layer))
        return tuple(np.concatenate(x, axis=1) for x in (sims, rows, from_layer))

    # ------------------------------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """A folder: embeddings.safetensors, metadata.parquet, index.json; written to a temp folder, then renamed."""
        with atomic_path(path, folder=True) as tmp:
            self.write(tmp)
        return Path(path)

    def write(self, folder: Path) -> None:
        """The three files of the index, into an existing folder (use `save` for an atomic write)."""
        save_file({f"layer_{layer}": self.embeddings[layer].contiguous() for layer in self.layers},
                  str(folder / "embeddings.safetensors"))
        self.metadata.to_parquet(folder / "metadata.parquet", index=False)
        (folder / "index.json").write_text(json.dumps({
            "format_version": FORMAT_VERSION, "model_name": self.model_name, "hidden_size": self.hidden_size,
            "layers": self.layers, "n_entries": len(self), "cap": self.cap, "seed": self.seed,
            "skip_first": self.skip_first}, indent=2))

    @classmethod
    def load(cls, path: str | Path, adapter=None, layers: list[int] | None = None,
             search_method: str = "auto") -> "ContextualIndex":
        """Load and check an index; with `adapter`/`layers`, also check that it fits that model and layer set."""
        path = Path(path)
        fix = f"rebuild it with build_index(...).save({str(path)!r})"
        try:
            meta = json.loads((path / "index.json").read_text())
            tensors = load_file(str(path / "embeddings.safetensors"))
            metadata = pd.read_parquet(path / "metadata.parquet")
        except (OSError, ValueError, SafetensorError, json.JSONDecodeError) as err:
            raise ValueError(f"the contextual index at {path} is missing or corrupt ({err}); {fix}") from err
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"index at {path} has format {meta.get('format_version')}, expected {FORMAT_VERSION}; "
                             f"{fix}")
        embeddings = {layer: tensors.get(f"layer_{layer}") for layer in meta["layers"]}
        for layer, e in embeddings.items():
            if e is None or e.shape != (meta["n_entries"], meta["hidden_size"]) or len(metadata) != meta["n_entries"]:
                raise ValueError(f"index at {path} is inconsistent at layer {layer} (embeddings "
                                 f"{None if e is None else tuple(e.shape)}, {len(metadata)} metadata rows, "
                                 f"{meta['n_entries']} entries declared); {fix}")
        if adapter is not None:
            width, name = adapter.text_config.hidden_size, adapter.config.name_or_path
            if width != meta["hidden_size"]:
                raise ValueError(f"index at {path} was built for hidden size {meta['hidden_size']} "
                                 f"({meta['model_name']}), the model has {width} ({name}); build one for this model")
        if layers is not None and sorted(layers) != sorted(meta["layers"]):
            raise ValueError(f"index at {path} holds layers {meta['layers']}, not the requested {sorted(layers)}")
        return cls(meta["model_name"], meta["hidden_size"], meta["layers"], embeddings, metadata, meta["cap"],
                   meta["seed"], search_method, meta["skip_first"])


def merge_official(sims: np.ndarray, rows: np.ndarray, from_layer: np.ndarray, k: int):
    """The paper's cross-layer merge (`ContextualIndex.search` in the official `latentlens` 0.1.0, `index.py`):
    per query, the k most similar of all layers' top-k candidates. An entry two layers both return counts twice.

    sims, rows, from_layer: (queries, layers * k), the layers' candidates side by side in layer order."""
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (queries, k) best first; ties: the earlier layer
    return tuple(np.take_along_axis(x, order, axis=1) for x in (sims, rows, from_layer))


def merge_distinct(sims: np.ndarray, rows: np.ndarray, from_layer: np.ndarray, k: int):
    """A variant of the cross-layer merge: per query, the k best *distinct* entries over all layers, each at its
    best layer, so that one context is never shown twice.

    Vectorised over queries: sort each query's candidates by similarity, drop an entry seen at a better
    similarity (or faiss's -1 padding), keep the first k."""
    order = np.argsort(-sims, axis=1, kind="stable")
    sims, rows, from_layer = (np.take_along_axis(x, order, axis=1) for x in (sims, rows, from_layer))
    by_entry = np.argsort(rows, axis=1, kind="stable")  # equal entries side by side, the best one first
    grouped = np.take_along_axis(rows, by_entry, axis=1)
    repeated = np.zeros_like(grouped, dtype=bool)
    repeated[:, 1:] = grouped[:, 1:] == grouped[:, :-1]
    duplicate = np.empty_like(repeated)
    np.put_along_axis(duplicate, by_entry, repeated, axis=1)
    keep = ~duplicate & (rows >= 0)
    rank = np.cumsum(keep, axis=1) - 1
    query, column = np.nonzero(keep & (rank < k))
    out = [np.full((len(sims), k), fill, dtype) for fill, dtype in ((-np.inf, np.float32), (-1, np.int64),
                                                                     (-1, np.int64))]
    for target, source in zip(out, (sims, rows, from_layer)):
        target[query, rank[query, column]] = source[query, column]
    return tuple(out)


# The cross-layer merges a search can use: the paper's (the default) and the distinct-entries variant.
MERGES = {"official": merge_official, "distinct": merge_distinct}


# ---------------------------------------------------------------------------------------------- building

def choose_occurrences(tokenized: list[list[int]], tokenizer, cap: int, seed: int,
                       skip_first: int = SKIP_FIRST) -> pd.DataFrame:
    """At most `cap` occurrences per token string, drawn at random (seeded) from all of them, not first-come.

    Occurrences with the same prefix are one context (a causal LM gives them the same hidden state): kept once.
    The first `skip_first` positions of every sentence are left out, as in the official pipeline: there a token has
    almost no context, and the first position is an attention sink whose state looks like no word's.
    """
    skip = set(tokenizer.all_special_ids)
    by_token: dict[str, list[tuple[int, int, int]]] = {}
    seen_prefixes = set()
    for s, ids in enumerate(tokenized):
        for pos, tid in enumerate(ids):
            if pos < skip_first or tid in skip or tuple(ids[:pos + 1]) in seen_prefixes:
                continue
            seen_prefixes.add(tuple(ids[:pos + 1]))
            token = tokenizer.decode([tid])
            if _LETTERS.search(token):
                by_token.setdefault(token, []).append((s, pos, tid))
    rng = np.random.default_rng(seed)
    rows = []
    for token in sorted(by_token):
        occ = by_token[token]
        chosen = rng.choice(len(occ), size=min(cap, len(occ)), replace=False)
        rows += [(occ[i][0], occ[i][1], occ[i][2], token) for i in sorted(chosen)]
    return pd.DataFrame(rows, columns=["sentence_id", "position", "token_id", "token"])


@torch.no_grad()
def build_index(adapter, sentences: list[str], layers: list[int] | None = None, cap: int = 20, seed: int = 0,
                batch_size: int = 32, search_method: str = "auto", shard: str | None = None,
                skip_first: int = SKIP_FIRST) -> ContextualIndex:
    """Run the adapter's LLM over `sentences` and keep the chosen occurrences' hidden states at `layers`.

    Streaming: only the chosen entries of each batch are kept (fp16), so memory grows with the index, not with
    the corpus. `shard="i/n"` embeds every n-th batch of sentences and returns a part holding only their entries
    (with their `entry` row in the whole index); `merge_parts` joins the parts into the index one run builds.
    """
    layers = sorted(layers or default_layers(adapter.n_layers))
    if not all(0 <= layer <= adapter.n_layers for layer in layers):
        raise ValueError(f"layers must lie in 0..{adapter.n_layers}, got {layers}")
    sentences = list(dict.fromkeys(s.strip() for s in sentences if s.strip()))  # dedup identical contexts
    if not sentences:
        raise ValueError("the corpus is empty: give at least one non-blank sentence")
    tok = adapter.tokenizer
    encoded = tok(sentences, add_special_tokens=False, return_offsets_mapping=True)
    chosen = choose_occurrences(encoded["input_ids"], tok, cap, seed, skip_first)
    spans = [_word_span(sentences[s], *encoded["offset_mapping"][s][p])
             for s, p in zip(chosen.sentence_id, chosen.position)]
    chosen["sentence"] = [sentences[s] for s in chosen.sentence_id]
    chosen["word_start"], chosen["word_end"] = [a for a, _ in spans], [b for _, b in spans]
    chosen["word"] = [text[a:b] for text, (a, b) in zip(chosen.sentence, spans)]
    width = adapter.text_config.hidden_size
    store = {layer: torch.empty(len(chosen), width, dtype=torch.float16) for layer in layers}
    by_sentence = chosen.groupby("sentence_id").indices
    # the LLM is causal: a position's hidden state depends on the tokens up to it, so each sentence is run only up
    # to its last chosen position (a tenth fewer tokens on the neutral corpus, the same states)
    ids = {s: encoded["input_ids"][s][:chosen.position.values[rows].max() + 1] for s, rows in by_sentence.items()}
    # sentences of similar length share a batch: less padding to run through the LLM (right padding leaves every
    # real position's hidden state as it is, so the order changes nothing stored)
    needed = sorted(by_sentence, key=lambda s: (len(ids[s]), s))
    language_model = adapter.language_model
    mine = shards.units(-(-len(needed) // batch_size), shard)
    for start in tqdm([b * batch_size for b in mine], desc="contextual embeddings"):
        batch = pad_right([ids[s] for s in needed[start:start + batch_size]], tok.pad_token_id)
        hidden = language_model(**{k: v.to(adapter.device) for k, v in batch.items()},
                                output_hidden_states=True).hidden_states
        for i, s in enumerate(needed[start:start + batch_size]):
            rows = by_sentence[s]
            positions = torch.as_tensor(chosen.position.values[rows])
            for layer in layers:
                h = hidden[layer][i, positions].float()
                store[layer][rows] = (h / h.norm(dim=-1, keepdim=True).clamp_min(1e-6)).half().cpu()
    metadata = chosen[["token_id", "token", "word", "sentence", "sentence_id", "position", "word_start",
                       "word_end"]].reset_index(drop=True)
    if shard is not None:
        kept = np.concatenate([by_sentence[s] for b in mine for s in needed[b * batch_size:(b + 1) * batch_size]]
                              + [np.zeros(0, int)])
        kept.sort()
        store = {layer: e[kept] for layer, e in store.items()}
        metadata = metadata.iloc[kept].assign(entry=kept).reset_index(drop=True)
    return ContextualIndex(adapter.config.name_or_path, adapter.text_config.hidden_size, layers, store, metadata,
                           cap, seed, search_method, skip_first)


def merge_parts(parts: list[ContextualIndex]) -> ContextualIndex:
    """The whole index from the parts that `build_index(..., shard="i/n")` built, one per shard."""
    if not parts or any("entry" not in p.metadata for p in parts):
        raise ValueError("merge_parts takes the parts built with build_index(..., shard='i/n'), one per shard")
    first = parts[0]
    build = lambda p: (p.model_name, p.layers, p.cap, p.seed, p.skip_first)  # noqa: E731
    if any(build(p) != build(first) for p in parts):
        raise ValueError("the parts come from different builds (model, layers, cap, seed or skip_first differ)")
    entries = np.concatenate([p.metadata.entry.to_numpy() for p in parts])
    order = np.argsort(entries)
    if not np.array_equal(entries[order], np.arange(len(entries))):
        raise ValueError(f"the parts hold {len(entries)} entries that are not each entry of one index once: "
                         "give every shard of one split, each once")
    metadata = pd.concat([p.metadata for p in parts], ignore_index=True).iloc[order].drop(columns="entry")
    embeddings = {layer: torch.cat([p.embeddings[layer] for p in parts])[order] for layer in first.layers}
    return ContextualIndex(first.model_name, first.hidden_size, first.layers, embeddings,
                           metadata.reset_index(drop=True), first.cap, first.seed, first.search_method,
                           first.skip_first)


class LatentLens:
    """A lens whose vocabulary is the contextual index: `describe(hidden_states, layer, k)` like the others."""

    name = "LatentLens"

    def __init__(self, index: ContextualIndex, name: str | None = None, merge: str = "official"):
        if merge not in MERGES:
            raise ValueError(f"unknown merge {merge!r}; choose one of {', '.join(MERGES)}")
        self.index, self.merge = index, merge
        self.name = name or self.name  # e.g. "LatentLens (shapes corpus)" beside the default one

    def search(self, hidden_states, layer: int, k: int = 5):
        hidden = hidden_states[layer] if isinstance(hidden_states, (tuple, list)) else hidden_states
        sims, rows, from_layer = self.index.search(hidden.reshape(-1, hidden.shape[-1]), k, merge=self.merge)
        return hidden.shape[:-1], sims, rows, from_layer

    def describe(self, hidden_states, layer: int, k: int = 5) -> list:
        """Nested lists (as the input's leading dims) of [(word, similarity), ...] per token."""
        shape, sims, rows, _ = self.search(hidden_states, layer, k)
        words = self.index.metadata.word.values
        flat = [[(words[r], float(s)) for r, s in zip(rr, ss)] for rr, ss in zip(rows, sims)]
        return unflatten(flat, shape)

    def chance_words(self) -> np.ndarray:
        """The pool of the random-entries control: the word of every index entry, each entry equally likely."""
        return self.index.metadata.word.to_numpy()

    def contexts(self, hidden_states, layer: int, k: int = 5) -> pd.DataFrame:
        """What LatentLens shows a person: for each token, its k nearest contexts, the matched word marked «so» in
        its sentence, with the similarity and the contextual layer it matched at."""
        shape, sims, rows, from_layer = self.search(hidden_states, layer, k)
        meta = self.index.metadata.iloc[rows.ravel()]
        marked = [f"{s[:a]}«{s[a:b]}»{s[b:]}" for s, a, b in zip(meta.sentence, meta.word_start, meta.word_end)]
        return pd.DataFrame({"token": np.repeat(np.arange(len(rows)), k), "rank": np.tile(np.arange(1, k + 1),
                             len(rows)), "word": meta.word.to_numpy(), "context": marked,
                             "similarity": sims.ravel().round(3), "contextual_layer": from_layer.ravel()})

    def matched_layers(self, hidden_states, layer: int, k: int = 1) -> np.ndarray:
        """The contextual layer of each token's top-k matches, (..., k)."""
        shape, _, _, from_layer = self.search(hidden_states, layer, k)
        return from_layer.reshape(*shape, k)


def matched_layer_counts(adapter, lens: LatentLens, examples, query_layers=None) -> pd.DataFrame:
    """For visual tokens read at each query layer (default: every layer from 0, the projector's output as the
    LLM receives it): how often the top-1 match comes from each contextual layer."""
    return count_matched_layers(lens, visual_hidden_states(adapter, examples), query_layers)


def merge_agreement(index: ContextualIndex, states, query_layers, k: int = 5) -> pd.DataFrame:
    """Per query layer: how often the official and the distinct merge agree on the same queries (`states` indexed
    by layer first, (layers + 1, ..., d_model)): the same top-1 entry, and the same top-k list."""
    rows = []
    for layer in query_layers:
        queries = states[layer].reshape(-1, states.shape[-1])
        official = index.search(queries, k, merge="official")[1]
        distinct = index.search(queries, k, merge="distinct")[1]
        rows.append({"query_layer": layer, "same_top1": float((official[:, 0] == distinct[:, 0]).mean()),
                     f"same_top{k}": float((official == distinct).all(1).mean()),
                     "queries": len(queries)})
    return pd.DataFrame(rows)


def count_matched_layers(lens: LatentLens, states, query_layers=None) -> pd.DataFrame:
    """The same count for any hidden states indexed by layer first, (layers + 1, ..., d_model): e.g. text tokens
    (`probe.text_word_states`), the baseline a visual token's matched layers are read against."""
    query_layers = range(len(states)) if query_layers is None else query_layers
    rows = []
    for layer in query_layers:
        matched = lens.matched_layers(states[layer], layer, k=1).ravel()
        for contextual, count in zip(*np.unique(matched, return_counts=True)):
            rows.append({"query_layer": layer, "contextual_layer": int(contextual), "count": int(count)})
    return pd.DataFrame(rows)


def corpus_profile(index: ContextualIndex, words) -> dict:
    """How an index's corpus looks to a word-match judge: its size, how many token strings reached the cap, and
    the share of entries whose word is one of `words` (the judge's words: a random entry names them that often)."""
    meta = index.metadata
    per_token = meta.groupby("token").size()
    judged = meta.word.str.lower().isin({w.lower() for w in words})
    return {"sentences": int(meta.sentence_id.nunique()), "entries": len(meta), "token_strings": len(per_token),
            "token_strings_at_cap": float((per_token >= index.cap).mean()),
            "entries_at_cap": float(per_token[per_token >= index.cap].sum() / len(meta)),
            "judge_word_entries": float(judged.mean())}


def cached_index(adapter, sentences: list[str], layers: list[int] | None = None, cap: int = 20,
                 seed: int = 0, skip_first: int = SKIP_FIRST) -> ContextualIndex:
    """Load the index for this model, corpus, layers, cap and seed from the cache, or build and save it."""
    layers = sorted(layers or default_layers(adapter.n_layers))
    # keyed by the LLM's weights, not the model's name: the index is the LLM's own, whatever vision tower feeds it
    key = cache_key(FORMAT_VERSION, weights_fingerprint(adapter.language_model), adapter.text_config.hidden_size,
                    layers, cap, seed, skip_first, sentences)
    build = lambda: build_index(adapter, sentences, layers, cap, seed, skip_first=skip_first)  # noqa: E731
    return cached_artefact("latentlens", key, build,
                           lambda index, folder: index.write(folder),
                           lambda path: ContextualIndex.load(path, adapter=adapter, layers=layers), folder=True)


# ---------------------------------------------------------------------------------------------- corpora

CORPORA = {"shapes": ("corpus", "default_corpus.txt"),  # written around the shapes world (workshop.corpus)
           "neutral": ("corpus", "neutral_corpus.txt")}  # everyday English by SmolLM2 (workshop.neutral_corpus)
DEFAULT_CORPUS = CORPORA["shapes"]


def load_corpus(source: str | Path | None = None, column: str = "text", limit: int | None = None) -> list[str]:
    """Sentences from one of the book's corpora ("shapes", the default, or "neutral"), a text file (one sentence
    per line) or a `datasets.Dataset` column."""
    if source is None or source in CORPORA:
        source = data_path(*(CORPORA[source] if source else DEFAULT_CORPUS))
    if hasattr(source, "column_names"):  # a datasets.Dataset
        if column not in source.column_names:
            raise ValueError(f"the dataset has no column {column!r}; its columns: {source.column_names}")
        lines = [str(t) for t in source[column][:limit]]
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no corpus at {path}: give a text file with one sentence per line")
        lines = path.read_text().splitlines()
    lines = [line.strip() for line in lines if line.strip()]
    return lines[:limit] if limit else lines
