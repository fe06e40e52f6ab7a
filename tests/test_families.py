"""Every supported llava-hf family, as a tiny random checkpoint saved by the test and loaded by `load_vlm(path)`,
goes through the same code: visual tokens found, mapped to the image, read, ablated and knocked out."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_models import FAMILIES, build_tiny_family
from vlminterp_utils import interventions as I
from vlminterp_utils import lenses, localization as L, models, readout, shapes

EXPECTED = {"llava-1.5": ("llava", (24, 24), 576), "llava-interleave": ("llava", (27, 27), 729),
            "llava-next": ("llava_next", (4, 4), None)}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, smol_tokenizer):
    model, processor = build_tiny_family(request.param, smol_tokenizer)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return request.param, path, models.load_vlm(str(path))


def test_the_adapter_reads_the_family_from_the_config(family):
    name, _, (_, _, adapter) = family
    kind, grid, n_visual = EXPECTED[name]
    assert adapter.family == kind and adapter.grid == grid
    scene = shapes.example(0, 0, "caption", size=adapter.image_size).scene
    batch = adapter.inputs([scene.image], ["Describe the image."])
    regions = adapter.token_regions(scene.image.size)
    assert adapter.visual_positions(batch["input_ids"]).shape[1] == len(regions)
    if n_visual:
        assert len(regions) == n_visual


@pytest.mark.parametrize("size", [(100, 50), (50, 100), (64, 64), (90, 61)])
def test_llava_next_regions_count_what_the_processor_expands(size, tmp_path, smol_tokenizer):
    """The tiles' unpadding and row-end tokens match the processor's count of image tokens, image size by size."""
    model, processor = build_tiny_family("llava-next", smol_tokenizer)
    adapter = models.adapter_for(model, processor)
    image = Image.new("RGB", size, (200, 30, 30))
    ids = adapter.inputs([image], ["Hi"])["input_ids"]
    regions = adapter.token_regions(size)
    assert int((ids == adapter.image_token_id).sum()) == len(regions)
    rows, cols = adapter.grid
    assert np.isnan(regions).any(1).sum() > 0 and not np.isnan(regions[:rows * cols]).any()


def test_objects_map_to_tokens_and_every_experiment_runs(family):
    name, _, (_, _, adapter) = family
    items = L.make_items("vqa", 2, 0, adapter.image_size)
    batch = adapter.inputs([it.example.scene.image for it in items], [it.example.question for it in items])
    for it in items:
        tokens = I.object_tokens(adapter, it.example.scene, 0, [it.target])
        assert 0 < tokens.sum() < len(tokens)
    mean = I.mean_visual_token(adapter, n_images=2, cache=False)
    rng = np.random.default_rng(0)
    masks = L.select_tokens(adapter, items, batch, "random", 1, rng, mean)
    with torch.no_grad():
        plain = readout.answer_logits(adapter, batch)
        with I.ablate(adapter, masks, "mean", mean_token=mean):
            ablated = readout.answer_logits(adapter, batch)
    assert (plain - ablated).abs().max() > 0
    blocks = L.knockout_blocks(adapter, items, batch)
    with torch.no_grad(), I.attention_knockout(adapter, blocks["object → last"], range(adapter.n_layers)):
        knocked = readout.answer_logits(adapter, batch)
    assert (plain - knocked).abs().max() > 0
    clean = I.CleanRun(adapter, batch)  # the fast knockout agrees with the full re-run on every family
    for block in blocks.values():
        with torch.no_grad(), I.attention_knockout(adapter, block, [1]):
            full = readout.answer_logits(adapter, batch)
        assert torch.allclose(clean.answer_logits(block, [1]), full, atol=1e-5)
    readings = lenses.patch_readings(adapter, lenses.LogitLens(adapter), [it.example for it in items], k=2,
                                     layers=[0, adapter.n_layers])
    kinds = set(readings.kind)
    assert "object" in kinds and ("none" in kinds) == (name == "llava-next")


def test_an_unsupported_family_names_the_supported_ones(tiny_llava_dir, tmp_path):
    config = json.loads((tiny_llava_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "paligemma"}))
    with pytest.raises(ValueError, match="supported families: llava, llava_next"):
        models.load_vlm(str(tmp_path))


def test_inversion_runs_through_each_familys_image_inputs(family):
    """MIMIC's loop on every family: LLaVA-NeXT gets its base image and tiles made differentiably."""
    from vlminterp_utils import inversion as V
    _, _, (_, _, adapter) = family
    stats = V.concept_stats(adapter, "red", "circle", n_images=2, cache=False)
    result = V.invert(adapter, "Describe the image.", "a red circle", stats,
                      V.InversionConfig(steps=2, progress=False))
    assert result.images[0].size == (adapter.image_size, adapter.image_size)
    assert np.isfinite(result.history.total).all() and 0 <= result.target_probability[0] <= 1


def test_llava_next_pixel_inputs_match_the_processor(smol_tokenizer):
    """The differentiable tiling gives the processor's tensor shapes and, on a flat image, its values."""
    model, processor = build_tiny_family("llava-next", smol_tokenizer)
    adapter = models.adapter_for(model, processor)
    side = adapter.image_size
    flat = Image.new("RGB", (side, side), (200, 30, 30))
    expected = processor.image_processor([flat], return_tensors="pt")["pixel_values"]
    pixels = torch.tensor([200 / 255, 30 / 255, 30 / 255])[None, :, None, None].expand(1, 3, side, side)
    got = adapter.pixel_inputs(pixels.contiguous())
    assert got["pixel_values"].shape == expected.shape
    assert torch.allclose(got["pixel_values"], expected, atol=1e-2)
