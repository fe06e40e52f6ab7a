"""LatentLens search at scale: exact vs approximate nearest neighbours on a real bank of 10^6 contextual embeddings.

The bank: SmolLM2's hidden states at one of the index's contextual layers (8 by default) for every token of a
real English text, the docstrings of the Python standard library and of the installed packages (their own
licences; used here only as text to embed, nothing is shipped). The queries: shapes-llava's visual tokens at the
same layer, 4,096 of them (64 images). Every method is timed in this one run, on sub-banks of growing size, and
its recall@5 is measured against exact search. The bank is cached (safetensors, fp16) so a second run is fast.

Run: python benchmarks/bench_latentlens_scale.py [--entries 1000000] [--layer 8]
"""
from __future__ import annotations

import argparse
import ast
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vlminterp_utils import load_vlm, readout, shapes
from vlminterp_utils.core import neighbours
from vlminterp_utils.core.storage import atomic_path, cache_dir


def docstrings(limit_chars: int) -> list[str]:
    """Paragraphs of the docstrings of the standard library and site-packages, in a fixed order."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    paragraphs, total = [], 0
    for path in sorted(p for root in roots for p in root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                for para in (doc or "").split("\n\n"):
                    text = " ".join(para.split())
                    if len(text) > 40 and text[0].isalpha():  # prose, not doctest or tables
                        paragraphs.append(text)
                        total += len(text)
        if total >= limit_chars:
            break
    return list(dict.fromkeys(paragraphs))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


@torch.no_grad()
def build_bank(adapter, layer: int, entries: int, batch_size: int = 32, max_len: int = 128) -> torch.Tensor:
    """(entries, hidden) fp16 unit vectors: the hidden state at `layer` of every token of the docstrings."""
    path = cache_dir() / "bench" / f"docstring_bank_l{layer}_{entries}.safetensors"
    path.parent.mkdir(exist_ok=True)
    if path.exists():
        return load_file(str(path))["bank"]
    tok = adapter.tokenizer
    texts = docstrings(limit_chars=entries * 6)  # about 4 characters per token, with room to spare
    ids = [x[:max_len] for x in tok(texts, add_special_tokens=False)["input_ids"] if len(x) > 1]
    bank = torch.empty(entries, adapter.text_config.hidden_size, dtype=torch.float16)
    filled, full_depth = 0, adapter.text_config.num_hidden_layers
    adapter.text_config.num_hidden_layers = layer  # the LLM stops at `layer`: the layers above are not needed
    try:
        progress = tqdm(total=entries, desc=f"bank at layer {layer}")
        for start in range(0, len(ids), batch_size):
            batch = readout.pad_right(ids[start:start + batch_size], tok.pad_token_id)
            hidden = adapter.language_model(**batch, output_hidden_states=True).hidden_states[layer]
            vectors = torch.nn.functional.normalize(hidden[batch["attention_mask"].bool()].float(), dim=-1)
            take = min(len(vectors), entries - filled)
            bank[filled:filled + take] = vectors[:take].half()
            filled += take
            progress.update(take)
            if filled == entries:
                break
    finally:
        adapter.text_config.num_hidden_layers = full_depth
    if filled < entries:
        sys.exit(f"the docstrings gave only {filled} tokens; ask for fewer --entries")
    with atomic_path(path) as tmp:
        save_file({"bank": bank}, str(tmp))
    return bank


def visual_queries(adapter, layer: int, n_images: int = 64) -> torch.Tensor:
    exs = shapes.make_examples(n_images, 7, "caption", size=adapter.image_size)
    states = torch.cat([readout.visual_hidden_states(adapter, exs[i:i + 16])[layer] for i in range(0, n_images, 16)])
    return torch.nn.functional.normalize(states.reshape(-1, states.shape[-1]).float(), dim=-1)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def recall(found: np.ndarray, threshold: np.ndarray, bank: torch.Tensor, queries: torch.Tensor) -> float:
    """recall@k that counts ties: a found entry is right when it scores at least the true k-th best score.

    The bank holds many identical vectors (a causal LM gives the same prefix the same state), so which of
    several equal entries a method returns is arbitrary and is not a miss."""
    scores = torch.einsum("qd,qkd->qk", queries, bank[torch.as_tensor(found).clamp_min(0)].float()).numpy()
    return float(np.mean((scores >= threshold[:, None] - 1e-4) & (found >= 0)))


def compare(bank: torch.Tensor, queries: torch.Tensor, k: int = 5) -> list[dict]:
    import faiss
    rows = []
    n, width = bank.shape

    def row(method, setting, seconds, found, build=0.0, memory=float("nan")):
        rows.append({"entries": n, "method": method, "setting": setting, "build_s": build, "search_s": seconds,
                     "recall@5": recall(found, threshold, bank, queries), "index_mib": memory})

    before = rss_mib()
    (flat, build) = timed(lambda: _flat(bank))
    flat_mib = rss_mib() - before
    (true_scores, truth), t_flat = timed(lambda: flat.search(queries.numpy(), k))
    threshold = true_scores[:, -1]
    row("faiss flat (fp32 copy)", "", t_flat, truth, build, flat_mib)
    del flat
    (_, found), t = timed(lambda: neighbours.exact_search(bank, queries, k))
    row("exact, fp16 bank in blocks", "block 16384", t, found, 0.0, 0.0)
    for kind, settings in (("ivf", (1, 4, 8, 16, 32, 64)), ("hnsw", (16, 64, 128, 256))):
        before = rss_mib()
        index, build = timed(lambda: neighbours.approximate_index(bank, kind))
        memory = rss_mib() - before
        for setting in settings:
            if kind == "ivf":
                index.nprobe = setting
            else:
                index.hnsw.efSearch = setting
            (_, found), t = timed(lambda: index.search(queries.numpy(), k))
            row(f"faiss {kind.upper()} fp16", f"{'nprobe' if kind == 'ivf' else 'efSearch'} {setting}", t, found,
                build, memory)
        del index
    return rows


def _flat(bank):
    import faiss
    index = faiss.IndexFlatIP(bank.shape[1])
    for start in range(0, len(bank), 65536):
        index.add(bank[start:start + 65536].float().numpy())
    return index


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--sizes", default="30000,100000,300000,1000000")
    args = parser.parse_args()
    torch.manual_seed(0)
    _, _, adapter = load_vlm("shapes-llava", device="cpu", dtype=torch.float32)
    bank = build_bank(adapter, args.layer, args.entries)
    queries = visual_queries(adapter, args.layer)
    print(f"bank {tuple(bank.shape)} fp16 ({bank.numel() * 2 / 2**20:.0f} MiB), {len(queries)} visual-token queries")
    import pandas as pd
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        results += compare(bank[:size], queries)
        table = pd.DataFrame(results)
        flat = table[table.method.str.startswith("faiss flat")].set_index("entries").search_s
        table["speed-up vs flat"] = flat.reindex(table.entries).values / table.search_s
        print(table.round(3).to_markdown(index=False), flush=True)


if __name__ == "__main__":
    main()
