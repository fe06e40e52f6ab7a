"""Ablation, knockout and attribution on tiny random Llavas: exactness checks that can fail."""
import numpy as np
import pytest
import torch

from reference_knockout import reference_knockout_logits
from vlminterp_utils import interventions as I
from vlminterp_utils import shapes, stats
from vlminterp_utils.core.readout import answer_logits, visual_embeddings


def batch_for(adapter, n=3, questions=None, seed=0):
    exs = [shapes.example(seed, i, "caption", size=adapter.image_size) for i in range(n)]
    questions = questions or ["Hi", "Describe the image in detail please", "What?"][:n]
    return adapter.inputs([e.scene.image for e in exs], questions), exs


def positions(batch, adapter):
    ids = batch["input_ids"]
    visual = ids == adapter.image_token_id
    last = torch.zeros_like(visual)
    last[:, -1] = True
    return visual, last


def test_identity_ablation_leaves_logits_unchanged(tiny):
    _, _, adapter = tiny
    batch, _ = batch_for(adapter)
    with torch.no_grad():
        before = answer_logits(adapter, batch)
        real = visual_embeddings(adapter, batch)
        with I.replace_visual_tokens(adapter, torch.ones(real.shape[:2], dtype=torch.bool), real):
            after = answer_logits(adapter, batch)
    assert torch.equal(before, after)


def test_ablation_changes_only_chosen_tokens_and_only_inside_the_block(tiny):
    _, _, adapter = tiny
    batch, _ = batch_for(adapter)
    mean = I.mean_visual_token(adapter, n_images=8, cache=False)
    mask = torch.zeros(3, adapter.n_visual_tokens, dtype=torch.bool)
    mask[:, :5] = True
    real = visual_embeddings(adapter, batch)
    with torch.no_grad(), I.ablate(adapter, mask, "mean", mean_token=mean):
        ablated = visual_embeddings(adapter, batch)
    assert torch.allclose(ablated[:, :5], mean.expand(3, 5, -1))
    assert torch.equal(ablated[:, 5:], real[:, 5:])
    assert torch.equal(visual_embeddings(adapter, batch), real)  # hook gone after the block
    with torch.no_grad(), I.ablate(adapter, mask, "zero"):
        assert (visual_embeddings(adapter, batch)[:, :5] == 0).all()


def test_bad_ablation_arguments_are_rejected(tiny):
    _, _, adapter = tiny
    batch, _ = batch_for(adapter)
    with pytest.raises(ValueError, match="unknown ablation mode"):
        I.ablate(adapter, torch.zeros(3, 16, dtype=torch.bool), "median")
    with pytest.raises(ValueError, match="does not match the visual tokens"), I.ablate(
            adapter, torch.zeros(3, 64, dtype=torch.bool), "zero"):
        answer_logits(adapter, batch)


def test_mean_visual_token_is_cached(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    _, _, adapter = tiny
    first = I.mean_visual_token(adapter, n_images=4)
    assert first.shape == (adapter.text_config.hidden_size,)
    assert len(list((tmp_path / "mean_tokens").glob("*.safetensors"))) == 1
    assert torch.equal(first, I.mean_visual_token(adapter, n_images=4))


@pytest.mark.parametrize("padded", [True, False])
def test_knockout_equals_the_minus_inf_reference(tiny_any_attention, padded):
    _, _, adapter = tiny_any_attention
    questions = None if padded else ["Hi", "Ho", "Ha"]
    batch, _ = batch_for(adapter, questions=questions)
    visual, last = positions(batch, adapter)
    block = I.block_matrix(batch["input_ids"].shape[1], last, visual)
    with torch.no_grad():
        plain = answer_logits(adapter, batch)
        with I.attention_knockout(adapter, block, [0, 2]):
            knocked = answer_logits(adapter, batch)
    reference = reference_knockout_logits(adapter, batch, block, [0, 2])
    assert (knocked - plain).abs().max() > 1e-3  # the knockout does something ...
    assert torch.allclose(knocked, reference, atol=1e-5)  # ... and exactly what -inf scores do


@pytest.mark.parametrize("padded", [True, False])
def test_knockout_from_a_clean_run_equals_the_full_re_run(tiny_any_attention, padded):
    """Cached prefix and replayed lower layers give what the full forward pass with the knockout gives."""
    _, _, adapter = tiny_any_attention
    batch, _ = batch_for(adapter, questions=None if padded else ["Hi", "Ho", "Ha"])
    visual, last = positions(batch, adapter)
    seq = batch["input_ids"].shape[1]
    late_visual = visual & (visual.cumsum(1) > 10)  # queries inside the image: the last-row kind of knockout
    blocks = {"visual → last": I.block_matrix(seq, last, visual),
              "early → late visual": I.block_matrix(seq, late_visual, visual & ~late_visual),
              "nothing": torch.zeros(3, seq, seq, dtype=torch.bool)}
    clean = I.CleanRun(adapter, batch)
    with torch.no_grad():
        assert torch.allclose(clean.logits, answer_logits(adapter, batch), atol=1e-5)
        for name, block in blocks.items():
            for layers in ([0], [1, 2], [2], [0, 1, 2]):
                with I.attention_knockout(adapter, block, layers):
                    full = answer_logits(adapter, batch)
                fast = clean.answer_logits(block, layers)
                assert torch.allclose(fast, full, atol=1e-5), (name, layers, (fast - full).abs().max())
    with torch.no_grad(), I.attention_knockout(adapter, blocks["visual → last"], [1, 2]):
        assert (answer_logits(adapter, batch) - clean.logits).abs().max() > 1e-3  # the check can fail
    assert all("forward" not in vars(layer) for layer in adapter.layers)  # replayed layers restored


def test_blocking_all_visual_to_text_edges_makes_the_answer_ignore_the_image(tiny_any_attention):
    _, _, adapter = tiny_any_attention
    a, _ = batch_for(adapter, questions=["Hi", "Hi", "Hi"], seed=0)
    b, _ = batch_for(adapter, questions=["Hi", "Hi", "Hi"], seed=1)
    visual, _ = positions(a, adapter)
    block = I.block_matrix(a["input_ids"].shape[1], ~visual, visual)
    with torch.no_grad():
        assert not torch.allclose(answer_logits(adapter, a), answer_logits(adapter, b))
        with I.attention_knockout(adapter, block, range(adapter.n_layers)):
            assert torch.allclose(answer_logits(adapter, a), answer_logits(adapter, b), atol=1e-6)


def test_blocking_non_causal_edges_changes_nothing(tiny_any_attention):
    _, _, adapter = tiny_any_attention
    batch, _ = batch_for(adapter)
    n = batch["input_ids"].shape[1]
    future = torch.ones(n, n, dtype=torch.bool).triu(1)[None].expand(3, n, n)
    with torch.no_grad():
        plain = answer_logits(adapter, batch)
        with I.attention_knockout(adapter, future, range(adapter.n_layers)):
            assert torch.equal(answer_logits(adapter, batch), plain)


def test_hooks_are_removed_after_an_exception(tiny):
    _, _, adapter = tiny
    batch, _ = batch_for(adapter)
    visual, last = positions(batch, adapter)
    modules = [adapter.model.base_model, adapter.language_model] + [adapter.attention(i)
                                                                    for i in range(adapter.n_layers)]
    count = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)  # noqa: E731
    before = count()
    with pytest.raises(RuntimeError, match="boom"):
        with I.ablate(adapter, visual[:, :0].new_ones(3, 16), "zero"), \
                I.attention_knockout(adapter, I.block_matrix(visual.shape[1], last, visual), range(3)):
            assert count() == before + 2 + 3  # ablation: two hooks; knockout: one per layer
            raise RuntimeError("boom")
    assert count() == before


def test_unsupported_attention_is_refused(tiny):
    _, _, adapter = tiny
    previous = adapter.text_config._attn_implementation
    adapter.text_config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="eager and sdpa"), I.attention_knockout(adapter, None, [0]):
            pass
    finally:
        adapter.text_config._attn_implementation = previous


def test_integrated_gradients_are_complete(tiny):
    """IG's completeness axiom: attributions sum to logit(real) - logit(baseline), up to the Riemann error."""
    _, _, adapter = tiny
    batch, _ = batch_for(adapter)
    baseline = I.mean_visual_token(adapter, n_images=8, cache=False)
    with torch.no_grad():
        logits = answer_logits(adapter, batch)
        answer = logits.argmax(-1)
        with I.replace_visual_tokens(adapter, torch.ones(3, 16, dtype=torch.bool), baseline):
            base_logits = answer_logits(adapter, batch)
    rows = torch.arange(3)
    attributions = I.integrated_gradients(adapter, batch, answer, baseline, steps=32)
    assert attributions.shape == (3, 16)
    gap = logits[rows, answer] - base_logits[rows, answer]
    # 32 midpoint steps on a smooth path: a few percent of the gap, plus float noise
    assert torch.allclose(attributions.sum(-1), gap, rtol=0.05, atol=1e-3)


def test_token_selections(grid_adapter):
    scene = shapes.render_scene([("red", "square", 8, 8, 8)])
    assert np.flatnonzero(I.object_tokens(grid_adapter, scene)).tolist() == [9]
    near = I.object_tokens(grid_adapter, scene, buffer=1)
    assert near.sum() == 9
    rng = np.random.default_rng(0)
    random = I.random_tokens(64, 9, rng, exclude=near)
    assert random.sum() == 9 and not (random & near).any()
    assert np.array_equal(random, I.random_tokens(64, 9, np.random.default_rng(0), exclude=near))
    emb = torch.ones(64, 4)
    emb[7] *= 100
    assert np.flatnonzero(I.high_norm_tokens(emb)).tolist() == [7]
    assert I.high_norm_tokens(emb, count=3).sum() == 3
    emb[8] *= 50
    not_seven = np.arange(64) != 7  # e.g. a row-end token that shows no patch
    assert np.flatnonzero(I.high_norm_tokens(emb, count=1, candidates=not_seven)).tolist() == [8]
    with pytest.raises(ValueError, match="cannot draw"):
        I.random_tokens(4, 5, rng)


def test_visual_tokens_are_read_where_the_llm_receives_them(tiny):
    """The hook on the LLM's input gives exactly the projector's output at the image-token positions."""
    _, _, adapter = tiny
    batch, _ = batch_for(adapter)
    captured = []
    handle = adapter.projector.register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        with torch.no_grad():
            adapter.model(**batch)
    finally:
        handle.remove()
    assert torch.equal(visual_embeddings(adapter, batch), captured[0])


def test_layer_windows_and_presets():
    assert I.layer_windows(5, 2) == [[0, 1], [1, 2], [2, 3], [3, 4], [4]]
    assert I.depth_presets(32) == {name: list(range(a, b)) for name, (a, b) in I.OFFICIAL_PRESETS.items()}
    presets = I.depth_presets(30)  # shapes-llava: the same shares of the depth
    assert presets["early"] == list(range(9)) and presets["late"] == list(range(20, 30))
    assert presets["all"] == list(range(30)) and presets["mid"] == list(range(10, 20))
    assert all(len(layers) >= 1 for layers in I.depth_presets(2).values())  # a tiny model keeps every preset
    with pytest.raises(ValueError):
        I.layer_windows(5, 0)


def test_flip_rate_and_its_exact_interval():
    before = [True] * 10 + [False] * 5
    after = [False] * 4 + [True] * 6 + [False] * 5
    assert stats.flip_rate(before, after) == 0.4
    mean, lo, hi = stats.flip_ci(before, after)
    assert mean == 0.4 and (lo, hi) == pytest.approx((0.1216, 0.7376), abs=1e-4)  # Clopper-Pearson, 4 of 10


def test_a_visual_selection_goes_to_its_sequence_positions(tiny):
    """`on_sequence` turns the ablation's (batch, n_visual) selection into the knockout's (batch, seq) one, item
    by item under left padding; a mask of the wrong shape is an error that says which shapes."""
    _, _, adapter = tiny
    examples = [shapes.example(0, i, "caption", size=adapter.image_size) for i in range(2)]
    batch = adapter.inputs([e.scene.image for e in examples], ["Hi", "Describe the image in detail, please."])
    positions = adapter.visual_positions(batch["input_ids"])
    visual = torch.zeros(positions.shape, dtype=torch.bool)
    visual[0, 0], visual[1, -1] = True, True
    seq = I.on_sequence(adapter, batch["input_ids"], visual)
    assert seq.shape == batch["input_ids"].shape and seq.sum() == 2
    assert seq[0, positions[0, 0]] and seq[1, positions[1, -1]] and positions[0, 0] != positions[1, 0]
    with pytest.raises(ValueError, match="does not match the visual tokens"):
        I.on_sequence(adapter, batch["input_ids"], visual[:, 1:])
