"""The contextual index and LatentLens: exactness against brute force, files, errors."""
import json

import numpy as np
import pytest
import torch

from tiny_models import build_tiny_llava
from vlminterp_utils import latentlens as LL, lenses, models, shapes


@pytest.fixture(scope="module")
def index(tiny):
    _, _, adapter = tiny
    return LL.build_index(adapter, LL.load_corpus(limit=400), layers=[1, 3], cap=5, seed=0)


def test_default_layers_spread_over_depth():
    assert LL.default_layers(32) == [1, 2, 4, 8, 16, 24, 30, 31]  # the paper's layers for its 32-layer LLMs
    assert LL.default_layers(30) == [1, 2, 4, 8, 15, 22, 28, 29]  # shapes-llava: scaled to depth
    assert LL.default_layers(4) == [1, 2, 3]  # a tiny model: every layer above the input


def test_search_equals_a_brute_force_matmul(index):
    torch.manual_seed(0)
    queries = torch.randn(20, index.hidden_size)
    sims, rows, layers = index.search(queries, k=4, merge="distinct")
    q = torch.nn.functional.normalize(queries, dim=-1)
    # brute force: every entry at every layer, best 4 distinct entries
    scores = torch.stack([q @ index.embeddings[layer].float().T for layer in index.layers])  # (layers, n, entries)
    best_score, best_layer = scores.max(0)
    top = best_score.topk(4, dim=-1)
    assert np.allclose(sims, top.values.numpy(), atol=1e-5)
    assert (rows == top.indices.numpy()).mean() > 0.95  # ties between equal scores may order differently
    expected_layer = np.take_along_axis(best_layer.numpy(), top.indices.numpy(), axis=1)
    chosen = np.array(index.layers)[expected_layer]
    assert (layers == chosen).mean() > 0.95


def test_cross_layer_merge_keeps_distinct_entries_at_their_best_layer():
    sims = np.array([[0.9, 0.5, 0.8, 0.95, 0.1, 0.0]])
    rows = np.array([[7, 3, 3, 7, 1, -1]])
    layers = np.array([[1, 1, 1, 4, 4, 4]])
    merged_sims, merged_rows, merged_layers = LL.merge_distinct(sims, rows, layers, k=3)
    assert merged_rows.tolist() == [[7, 3, 1]] and merged_layers.tolist() == [[4, 1, 4]]
    assert np.allclose(merged_sims, [[0.95, 0.8, 0.1]])
    # the paper's merge keeps entry 7 twice, once from each layer that returned it
    merged_sims, merged_rows, merged_layers = LL.merge_official(sims, rows, layers, k=3)
    assert merged_rows.tolist() == [[7, 7, 3]] and merged_layers.tolist() == [[4, 1, 1]]


def _shared_bank(n_entries=400, hidden=32, layers=(1, 3, 5), seed=0):
    """One random bank of contextual embeddings (fp16, as the book stores them), as the book's index and as the
    official package's (`latentlens.ContextualIndex`, the same values in float32)."""
    import latentlens
    import pandas as pd
    torch.manual_seed(seed)
    # correlated layers, as a residual stream is: each layer a small step from the one before
    base = torch.randn(n_entries, hidden)
    embeddings = {}
    for layer in layers:
        base = base + 0.5 * torch.randn(n_entries, hidden)
        embeddings[layer] = torch.nn.functional.normalize(base, dim=-1).half()
    words = [f"w{i % 50}" for i in range(n_entries)]
    meta = pd.DataFrame({"token_id": range(n_entries), "token": words, "word": words,
                         "sentence": ["s"] * n_entries, "position": range(n_entries)})
    ours = LL.ContextualIndex("random", hidden, list(layers), embeddings, meta, cap=1, seed=seed,
                              search_method="exact")
    theirs = latentlens.ContextualIndex({layer: {"embeddings": e.float(), "metadata": [
        {"token_str": w, "position": i} for i, w in enumerate(words)]} for layer, e in embeddings.items()})
    return ours, theirs


def test_the_default_merge_is_the_official_packages_search():
    """latentlens 0.1.0's own `ContextualIndex.search` (installed without its heavy dependencies) on the same bank
    and queries: the same entries, at the same contextual layers, in the same order, with the same similarity."""
    ours, theirs = _shared_bank()
    queries = torch.randn(64, ours.hidden_size)
    sims, rows, layers = ours.search(queries, k=5)
    expected = theirs.search(queries, top_k=5)
    assert rows.tolist() == [[n.position for n in hits] for hits in expected]
    assert layers.tolist() == [[n.contextual_layer for n in hits] for hits in expected]
    assert np.allclose(sims, [[n.similarity for n in hits] for hits in expected], atol=1e-5)


def test_the_distinct_merge_differs_from_the_official_one_where_layers_agree():
    """With correlated layers, an entry near a query at one layer is near it at the next: the official merge
    lists it once per layer, the distinct variant once. Top-1 agrees; the top-5 lists differ for many queries."""
    ours, _ = _shared_bank()
    queries = torch.randn(64, ours.hidden_size)
    official = ours.search(queries, k=5)[1]
    distinct = ours.search(queries, k=5, merge="distinct")[1]
    assert (official[:, 0] == distinct[:, 0]).all()
    repeats = np.array([len(set(r)) < 5 for r in official])
    assert repeats.mean() > 0.25 and not any(len(set(r)) < 5 for r in distinct)
    with pytest.raises(ValueError, match="official, distinct"):
        ours.search(queries, merge="best")


def test_cap_and_dedup(tiny):
    _, _, adapter = tiny
    sentences = ["The red circle is here."] * 5 + [f"Item {i} has a red square." for i in range(30)]
    index = LL.build_index(adapter, sentences, layers=[1], cap=3, seed=0, skip_first=0)
    meta = index.metadata
    counts = meta.groupby("token").size()
    assert counts.max() <= 3
    assert (meta.sentence == "The red circle is here.").sum() <= 4  # the repeated sentence is one sentence
    # identical prefixes are one context: "Item" opens 30 sentences, yet it is one context
    assert counts["Item"] == 1
    # " red" has 31 distinct contexts; the 3 kept are drawn at random, not the first 3 met
    red = meta[meta.token == " red"].sentence_id.tolist()
    first_met = sorted({s for s in range(31)})[:3]
    assert len(red) == 3 and red != first_met
    again = LL.build_index(adapter, sentences, layers=[1], cap=3, seed=0, skip_first=0).metadata
    assert again.equals(meta)  # seeded


def test_the_first_positions_of_a_sentence_are_not_stored(tiny):
    _, _, adapter = tiny
    sentences = [f"Item {i} has a red square." for i in range(10)]
    meta = LL.build_index(adapter, sentences, layers=[1], cap=50, seed=0).metadata
    assert meta.position.min() == LL.SKIP_FIRST and "Item" not in set(meta.token)
    spans_hold_the_word = [s[a:b] == w for s, a, b, w in zip(meta.sentence, meta.word_start, meta.word_end, meta.word)]
    assert all(spans_hold_the_word)


@torch.no_grad()
def test_each_entry_is_its_tokens_hidden_state_in_the_whole_sentence(tiny):
    """The build runs a sentence only up to its last chosen position (the LLM is causal): every stored entry must
    still be the normalised hidden state of its token in the whole, unpadded sentence."""
    _, _, adapter = tiny
    sentences = LL.load_corpus(limit=60)
    index = LL.build_index(adapter, sentences, layers=[1, 3], cap=5, seed=0, batch_size=7)
    cut = False
    for sentence_id, rows in index.metadata.groupby("sentence_id"):
        ids = adapter.tokenizer(rows.sentence.iloc[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
        cut |= rows.position.max() + 1 < ids.shape[1]
        hidden = adapter.language_model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in (1, 3):
            want = torch.nn.functional.normalize(hidden[layer][0, rows.position.to_numpy()].float(), dim=-1)
            got = index.embeddings[layer][rows.index.to_numpy()].float()
            # stored in fp16: unit vectors agree to fp16's rounding (about 1e-3 per coordinate at most)
            torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert cut  # some sentence was run only in part: the case under test arises


def test_words_are_whole_words(index):
    sample = index.metadata.sample(50, random_state=0)
    for token, word, sentence in zip(sample.token, sample.word, sample.sentence):
        assert token.strip() in word and word in sentence and " " not in word


def test_save_load_round_trip_gives_identical_results(index, tmp_path, tiny):
    _, _, adapter = tiny
    index.save(tmp_path / "idx")
    loaded = LL.ContextualIndex.load(tmp_path / "idx", adapter=adapter, layers=[1, 3])
    q = torch.randn(10, index.hidden_size)
    for a, b in zip(index.search(q, 5), loaded.search(q, 5)):
        assert np.array_equal(a, b)
    assert loaded.metadata.equals(index.metadata)
    assert not list(tmp_path.glob(".idx.partial-*"))
    index.save(tmp_path / "idx")  # overwriting an index works and leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_corrupt_and_mismatched_indexes_are_rejected(index, tmp_path, tiny, smol_tokenizer):
    _, _, adapter = tiny
    path = index.save(tmp_path / "idx")
    with pytest.raises(ValueError, match="not the requested"):
        LL.ContextualIndex.load(path, layers=[1, 2])
    other, processor = build_tiny_llava(hidden=48, tokenizer=smol_tokenizer)
    with pytest.raises(ValueError, match="hidden size 32"):
        LL.ContextualIndex.load(path, adapter=models.adapter_for(other, processor))
    meta = json.loads((path / "index.json").read_text())
    (path / "index.json").write_text(json.dumps({**meta, "n_entries": meta["n_entries"] + 1}))
    with pytest.raises(ValueError, match="inconsistent"):
        LL.ContextualIndex.load(path)
    (path / "index.json").write_text(json.dumps(meta))
    blob = (path / "embeddings.safetensors").read_bytes()
    (path / "embeddings.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        LL.ContextualIndex.load(path)
    with pytest.raises(ValueError, match="missing or corrupt"):
        LL.ContextualIndex.load(tmp_path / "nothing-here")


def test_queries_of_the_wrong_width_are_rejected(index):
    with pytest.raises(ValueError, match="build an index for this model"):
        index.search(torch.randn(2, 7))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_queries_work(index, dtype):
    q = torch.randn(8, index.hidden_size)
    sims, rows, _ = index.search(q.to(dtype), 3)
    ref_sims, _, _ = index.search(q.to(dtype).float(), 3)
    assert np.allclose(sims, ref_sims)
    assert rows.shape == (8, 3)


@pytest.mark.parametrize("method", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_exact_nearest_neighbours_mostly(index, method):
    approx = LL.ContextualIndex(index.model_name, index.hidden_size, index.layers, index.embeddings,
                                index.metadata, index.cap, index.seed, search_method=method)
    q = index.embeddings[1][:50].float() + 0.05 * torch.randn(50, index.hidden_size)  # near real entries
    exact_rows, approx_rows = index.search(q, 1)[1], approx.search(q, 1)[1]
    # approximate by design; a small index with queries near its entries is nearly exact (~1.0 measured)
    assert (exact_rows == approx_rows).mean() > 0.8


def merge_by_loop(sims, rows, from_layer, k):
    """The cross-layer merge written the obvious way: the reference the vectorised one is tested against."""
    out = [np.full((len(sims), k), fill, dtype) for fill, dtype in ((-np.inf, np.float32), (-1, np.int64),
                                                                     (-1, np.int64))]
    for q in range(len(sims)):
        seen, j = set(), 0
        for c in np.argsort(-sims[q], kind="stable"):
            if rows[q, c] < 0 or rows[q, c] in seen or j == k:
                continue
            seen.add(rows[q, c])
            out[0][q, j], out[1][q, j], out[2][q, j] = sims[q, c], rows[q, c], from_layer[q, c]
            j += 1
    return out


def test_the_vectorised_merge_equals_the_loop():
    rng = np.random.default_rng(0)
    sims = rng.random((200, 12)).astype(np.float32)
    rows = rng.integers(-1, 6, (200, 12))  # few entries: many repeats, and faiss's -1 padding
    layers = rng.integers(0, 4, (200, 12))
    for k in (1, 3, 8):
        for got, want in zip(LL.merge_distinct(sims, rows, layers, k), merge_by_loop(sims, rows, layers, k)):
            assert np.array_equal(got, want)


def test_exact_search_in_blocks_equals_one_matmul():
    from vlminterp_utils.core import neighbours
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(1000, 16), dim=-1).half()
    queries = torch.randn(7, 16)
    scores, rows = neighbours.exact_search(bank, queries, k=5, block_rows=64)
    want = (queries @ bank.float().T).topk(5, dim=1)
    assert np.array_equal(rows, want.indices.numpy()) and np.allclose(scores, want.values.numpy())
    few_scores, few_rows = neighbours.exact_search(bank[:3], queries, k=5)
    assert (few_rows[:, 3:] == -1).all() and np.isinf(few_scores[:, 3:]).all()  # faiss's padding
    with pytest.raises(ValueError, match="unknown search method"):
        neighbours.Searcher(bank, "annoy")


def test_latent_lens_describes_like_the_other_lenses(index, tiny):
    _, _, adapter = tiny
    hidden = torch.randn(2, 3, index.hidden_size)
    for lens in (LL.LatentLens(index), lenses.LogitLens(adapter), lenses.EmbeddingLens(adapter)):
        out = lens.describe(hidden, layer=0, k=4)
        assert len(out) == 2 and len(out[0]) == 3 and len(out[0][0]) == 4
        assert all(isinstance(w, str) and isinstance(s, float) for w, s in out[1][2])
    assert LL.LatentLens(index).matched_layers(hidden, 0, k=2).shape == (2, 3, 2)


@pytest.mark.phenomenon
def test_latentlens_reads_object_patches_above_its_random_entries_on_most_layers(shapes_llava):
    """Krojer et al.'s claim, chance-controlled: 16 fixed scenes (seed 0), top-5, an index of the neutral corpus's
    first 1500 sentences (the chapter uses them all; this keeps the build near a minute)."""
    _, _, adapter = shapes_llava
    index = LL.cached_index(adapter, LL.load_corpus("neutral", limit=1500), cap=20)
    examples = shapes.make_examples(16, 0, "caption")
    judged = lenses.compare_with_chance(adapter, [LL.LatentLens(index), lenses.LogitLens(adapter)], examples, k=5)
    objects = judged[judged.kind == "object"]
    shares = objects.groupby(["lens", "reading", "layer"]).hit.mean().unstack(["lens", "reading"])
    margin = shares[("LatentLens", lenses.LENS)] - shares[("LatentLens", lenses.RANDOM_WORDS)]
    # About 320 object patches per layer: a share near 25% has a standard error near 2.4 points, and random entries
    # of this corpus name the object for well under 1% of them; a 10-point margin is about four standard errors.
    # Measured on this seed: at least 17 points at layers 0-24, under 6 at 25-29. "Most": more than half the layers.
    assert (margin >= 0.10).mean() > 0.5, margin
    above = lenses.above_chance(objects).set_index(["lens", "layer"])
    assert (above.loc["LatentLens"].ci_low > 0).mean() > 0.5  # above the stronger control too, interval included
    # and above the logit lens, each above its own chance, paired on the same patches (scenes resampled)
    paired = lenses.paired_lenses(judged, "LatentLens", "LogitLens")
    assert (paired.verdict == "higher").mean() > 0.5, paired



def test_contexts_mark_the_matched_word_in_its_sentence(index):
    lens = LL.LatentLens(index)
    hidden = torch.randn(3, index.hidden_size)
    table = lens.contexts(hidden, layer=1, k=4)
    assert len(table) == 12 and table.groupby("token")["rank"].apply(list).tolist() == [[1, 2, 3, 4]] * 3
    assert all(f"«{w}»" in c for w, c in zip(table.word, table.context))
    assert set(table.contextual_layer) <= set(index.layers)
    words = [w for row in lens.describe(hidden, layer=1, k=4) for w, _ in row]
    assert table.word.tolist() == words  # the same neighbours as describe, with their sentences
    assert len(lens.chance_words()) == len(index)


def test_corpus_profile_counts_the_judges_words_and_the_cap(tiny):
    _, _, adapter = tiny
    sentences = [f"Item {i} has a red square." for i in range(8)] + ["We went out for a long walk today."]
    index = LL.build_index(adapter, sentences, layers=[1], cap=5, seed=0)
    profile = LL.corpus_profile(index, ["red", "square"])
    meta = index.metadata
    assert profile["entries"] == len(meta) and profile["sentences"] == 9
    assert profile["judge_word_entries"] == pytest.approx(meta.word.isin(["red", "square"]).mean())
    at_cap = meta.groupby("token").size() >= 5  # " has", " a", " red", " square", "." recur in all 8 items
    assert profile["token_strings_at_cap"] == pytest.approx(at_cap.mean()) and 0 < at_cap.mean() < 1
