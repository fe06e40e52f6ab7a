"""Nearest neighbours by inner product in a large bank of fp16 unit vectors: exact, or approximate with faiss.

The bank stays in fp16, as the contextual index stores it: exact search converts one block of rows at a time,
and the approximate indexes keep their own fp16 copy (faiss's fp16 scalar quantizer), so no fp32 copy of the
whole bank is ever made. Which is faster, and at what recall, is measured in `benchmarks/README.md`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

METHODS = ("auto", "exact", "ivf", "hnsw")
# From this many entries "auto" searches with IVF: on a real bank of SmolLM2 contextual embeddings queried with
# visual tokens, IVF reached recall@5 >= 0.95 x7.6 to x12.5 faster than exact faiss search at every size measured,
# 30k to 1M entries (benchmarks/README.md, "LatentLens search at scale"). Below it exact search takes < 1 s.
APPROXIMATE_FROM = 30_000
HNSW_EF_SEARCH = 256  # visual-token queries are far from the text entries: HNSW's recall stays low regardless


def exact_search(bank: torch.Tensor, queries: torch.Tensor, k: int,
                 block_rows: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of `bank` (n, d) by inner product with each query (q, d): (q, k) scores and row indices.

    One block of `block_rows` rows is converted to fp32 at a time and its top k merged into the running best,
    so memory holds the fp16 bank plus one block, never an fp32 copy of the whole bank."""
    queries = queries.float()
    best_scores = torch.full((len(queries), 0), -torch.inf)
    best_rows = torch.zeros((len(queries), 0), dtype=torch.long)
    for start in range(0, len(bank), block_rows):
        scores = queries @ bank[start:start + block_rows].float().T
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, top.values], dim=1)
        merged_rows = torch.cat([best_rows, top.indices + start], dim=1)
        keep = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1).indices
        best_scores, best_rows = merged_scores.gather(1, keep), merged_rows.gather(1, keep)
    return _padded(best_scores.numpy(), best_rows.numpy(), k)


def _padded(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss's convention when a bank has fewer than k rows: scores -inf, rows -1."""
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores, rows
    return (np.pad(scores, ((0, 0), (0, missing)), constant_values=-np.inf),
            np.pad(rows, ((0, 0), (0, missing)), constant_values=-1))


def _fp16_index(kind: str, width: int, n_entries: int):
    import faiss
    fp16 = faiss.ScalarQuantizer.QT_fp16
    if kind == "hnsw":
        index = faiss.IndexHNSWSQ(width, fp16, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index
    nlist = max(1, int(math.sqrt(n_entries)))
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(width), width, nlist, fp16, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = ivf_nprobe(nlist)
    return index


def ivf_nprobe(nlist: int) -> int:
    """Lists visited per query: 1/32 of them, at least 8. Measured recall@5 0.97-1.0 from 30k to 1M entries;
    a fixed nprobe loses recall as the bank grows (nprobe 16: 0.98 at 300k, 0.94 at 1M)."""
    return min(nlist, max(8, -(-nlist // 32)))


def approximate_index(bank: torch.Tensor, kind: str = "ivf", seed: int = 0, block_rows: int = 65_536):
    """A faiss IVF or HNSW index over `bank` storing fp16, trained on a sample and filled block by block."""
    index = _fp16_index(kind, bank.shape[1], len(bank))
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = rng.choice(len(bank), size=min(len(bank), 64 * index.nlist), replace=False)
        index.train(bank[np.sort(sample)].float().numpy())
    for start in tqdm(range(0, len(bank), block_rows), desc=f"{kind} index", leave=False,
                      disable=len(bank) <= block_rows):
        index.add(bank[start:start + block_rows].float().numpy())
    return index


def choose_method(method: str, n_entries: int) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r}: use one of {', '.join(METHODS)}")
    if method == "auto":
        return "ivf" if n_entries >= APPROXIMATE_FROM else "exact"
    return method


class Searcher:
    """Top-k search in one bank with the chosen method; an approximate index is built on first use."""

    def __init__(self, bank: torch.Tensor, method: str = "auto"):
        self.bank, self.method = bank, choose_method(method, len(bank))
        self._index = None

    def search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.method == "exact":
            return exact_search(self.bank, queries, k)
        if self._index is None:
            self._index = approximate_index(self.bank, self.method)
        scores, rows = self._index.search(np.ascontiguousarray(queries.float().numpy()), k)
        return scores, rows.astype(np.int64)
