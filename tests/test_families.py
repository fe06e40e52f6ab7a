"""Every supported llava-hf family, as a tiny random checkpoint saved by the test and loaded by `load_vlm(path)`,
goes through the same code: visual tokens found, mapped to the image, read, ablated and knocked out."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_models import FAMILIES, build_tiny_family, build_tiny_qwen
from vlminterp_utils import interventions as I
from vlminterp_utils import lenses, localization as L, models, readout, shapes

EXPECTED = {"llava-1.5": ("llava", (24, 24), 576), "llava-interleave": ("llava", (27, 27), 729),
            "llava-next": ("llava_next", (4, 4), None), "qwen2-vl": ("qwen2_vl", (4, 4), None),
            "qwen2.5-vl": ("qwen2_5_vl", (4, 4), None), "qwen3-vl": ("qwen3_vl", (4, 4), None),
            "gemma3": ("gemma3", (4, 4), 16), "llava-onevision": ("llava_onevision", (4, 4), None),
            "idefics3": ("idefics3", (2, 2), None), "smolvlm": ("smolvlm", (2, 2), None)}


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
    assert "object" in kinds and ("none" in kinds) == (name in ("llava-next", "llava-onevision"))  # row ends


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


@pytest.mark.parametrize("name", ["llava-next", "llava-onevision"])
def test_llava_next_pixel_inputs_match_the_processor(name, smol_tokenizer):
    """The differentiable tiling gives the processor's tensor shapes and, on a flat image, its values."""
    model, processor = build_tiny_family(name, smol_tokenizer)
    adapter = models.adapter_for(model, processor)
    side = adapter.image_size
    flat = Image.new("RGB", (side, side), (200, 30, 30))
    expected = processor.image_processor([flat], return_tensors="pt")["pixel_values"]
    pixels = torch.tensor([200 / 255, 30 / 255, 30 / 255])[None, :, None, None].expand(1, 3, side, side)
    got = adapter.pixel_inputs(pixels.contiguous())
    assert got["pixel_values"].shape == expected.shape
    assert torch.allclose(got["pixel_values"], expected, atol=1e-2)


QWEN = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


@pytest.mark.parametrize("name", QWEN)
@pytest.mark.parametrize("size", [(112, 112), (100, 60), (60, 100), (30, 200), (97, 113)])
def test_qwen_regions_count_the_processors_tokens_and_partition_the_image(name, size, smol_tokenizer):
    """Dynamic resolution: as many boxes as the processor puts image tokens (`image_grid_thw` / 4), and the
    boxes tile the whole image once, without overlap (the resize keeps every pixel, unlike a crop)."""
    model, processor = build_tiny_family(name, smol_tokenizer)
    adapter = models.adapter_for(model, processor)
    width, height = size
    batch = adapter.inputs([Image.new("RGB", size, (200, 30, 30))], ["Hi"])
    regions = adapter.token_regions(size)
    t, gh, gw = batch["image_grid_thw"][0].tolist()
    assert int((batch["input_ids"] == adapter.image_token_id).sum()) == len(regions) == t * gh * gw // 4
    assert np.isclose(((regions[:, 2] - regions[:, 0]) * (regions[:, 3] - regions[:, 1])).sum(), width * height)
    assert regions[:, :2].min() == 0 and np.allclose(regions[:, 2].max(), width)
    assert np.allclose(regions[:, 3].max(), height)


@pytest.mark.parametrize("name", QWEN)
def test_qwen_tokens_follow_the_mergers_order(name, smol_tokenizer):
    """A toy layout: an image 8 tokens wide and 4 high (c = 28 px a token for Qwen2-VL, 32 for Qwen3-VL); a
    square painted on the token at row 1, column 5 touches that token alone, the 14th (1 * 8 + 5) in order."""
    model, processor = build_tiny_qwen(name, smol_tokenizer)
    c = models.adapter_for(model, processor).cell
    processor.image_processor.size = {"shortest_edge": 4 * c * c, "longest_edge": 8 * c * 4 * c}
    adapter = models.adapter_for(model, processor)
    batch = adapter.inputs([Image.new("RGB", (8 * c, 4 * c))], ["Hi"])
    patches = c // adapter.patch_size
    assert adapter.resized((8 * c, 4 * c)) == (4 * c, 8 * c)
    assert batch["image_grid_thw"][0].tolist() == [1, 4 * patches, 8 * patches]
    mask = np.zeros((4 * c, 8 * c), bool)
    mask[c + 4:2 * c - 4, 5 * c + 4:6 * c - 4] = True
    assert adapter.object_tokens(mask).nonzero()[0].tolist() == [13]


@pytest.mark.parametrize("name", QWEN)
def test_qwen_pixel_inputs_equal_the_processors(name, smol_tokenizer):
    """MIMIC's differentiable path gives the processor's patches, in its order, and its grid."""
    from vlminterp_utils.chapters.inversion import to_pixels
    model, processor = build_tiny_family(name, smol_tokenizer)
    adapter = models.adapter_for(model, processor)
    scene = shapes.example(0, 3, "caption", size=adapter.image_size).scene
    expected = adapter.inputs([scene.image], ["Hi"])
    got = adapter.pixel_inputs(to_pixels([scene.image], adapter.image_size))
    assert torch.equal(got["image_grid_thw"], expected["image_grid_thw"])
    assert torch.allclose(got["pixel_values"], expected["pixel_values"], atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2-vl", "llava-onevision", "smolvlm"])
def test_a_processor_with_a_video_part_saved_here_loads_without_torchvision(name, tmp_path, smol_tokenizer):
    """`load_processor` rebuilds the family's processor without its video part, with the settings it saved (a
    default in their place would expand the image to another number of tokens); its output is the saved one's."""
    from vlminterp_utils.core.processors import load_processor
    model, processor = build_tiny_family(name, smol_tokenizer)
    processor.save_pretrained(tmp_path)
    loaded = load_processor(str(tmp_path))
    assert type(loaded).__name__ == type(processor).__name__
    adapter = models.adapter_for(model, processor)
    image, text = [[Image.new("RGB", (90, 61), (10, 200, 30))]], [adapter.prompt("Hi")]
    a, b = processor(images=image, text=text, return_tensors="pt"), loaded(images=image, text=text,
                                                                           return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qwen3_vl_ablation_reaches_every_place_the_llm_receives_the_image(smol_tokenizer):
    """DeepStack adds visual features after LLM layers 0 and 1. Zero-ablating every visual token must remove the
    image at all three entry points: two different scenes then give the same answer logits. (Replacing the input
    tokens alone leaves the image in the DeepStack features: the logits still differ.)"""
    from vlminterp_utils.core.readout import edit_visual_inputs
    model, processor = build_tiny_qwen("qwen3-vl", smol_tokenizer)
    adapter = models.adapter_for(model, processor)
    assert adapter.deepstack_levels == 2
    scenes = [shapes.example(0, i, "caption", size=adapter.image_size).scene.image for i in range(2)]
    batch = adapter.inputs(scenes, ["Describe the image."] * 2)
    everything = torch.ones(adapter.visual_positions(batch["input_ids"]).shape, dtype=torch.bool)
    with torch.no_grad():
        with I.ablate(adapter, everything, "zero"):
            ablated = readout.answer_logits(adapter, batch)
        with edit_visual_inputs(adapter, torch.zeros_like):  # the input only
            input_only = readout.answer_logits(adapter, batch)
    assert torch.allclose(ablated[0], ablated[1], atol=1e-5)
    assert not torch.allclose(input_only[0], input_only[1], atol=1e-3)


def test_qwen3_vl_residual_stream_holds_the_deepstack_features(smol_tokenizer):
    """Depth 1 is what layer 1 reads: layer 0's output plus DeepStack level 0 at the visual tokens."""
    from vlminterp_utils.core import sites
    model, processor = build_tiny_qwen("qwen3-vl", smol_tokenizer)
    adapter = models.adapter_for(model, processor)
    scene = shapes.example(0, 0, "caption", size=adapter.image_size).scene.image
    batch = adapter.inputs([scene], ["Hi"])
    outputs = []
    with torch.no_grad(), readout.record_residual_stream(adapter) as stream, \
            sites.hook(adapter, "layer_output", lambda layer, h, call: outputs.append(h), [0]):
        adapter.model(**batch, logits_to_keep=1)
    _, call = sites.capture(adapter, "llm_input", batch, with_call=True)
    pos = adapter.visual_positions(batch["input_ids"])[0]
    added = stream[1][0, pos] - outputs[0][0, pos]
    assert torch.allclose(added, call["deepstack_visual_embeds"][0], atol=1e-5)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_gemma3_knockout_keeps_the_image_tokens_bidirectional_block(attention, smol_tokenizer):
    """Gemma 3's image tokens attend to each other both ways. The knockout closes only its edges: it equals a
    from-scratch -inf reference that has the block, padded batch, eager and sdpa; a reference without the block
    gives other logits, so the block is really there."""
    from reference_knockout import reference_knockout_logits
    model, processor = build_tiny_family("gemma3", smol_tokenizer)
    model.set_attn_implementation(attention)
    adapter = models.adapter_for(model, processor)
    scenes = [shapes.example(0, i, "caption", size=adapter.image_size).scene.image for i in range(2)]
    batch = adapter.inputs(scenes, ["Hi", "Describe the image in detail, please."])
    ids, seq = batch["input_ids"], batch["input_ids"].shape[1]
    visual = ids == adapter.image_token_id
    late = visual & (visual.cumsum(1) > 8)  # the image's second half reading its first half
    last = torch.zeros_like(visual)
    last[:, -1] = True
    for block in (I.block_matrix(seq, last, visual), I.block_matrix(seq, late, visual & ~late)):
        with torch.no_grad(), I.attention_knockout(adapter, block, [0, 2]):
            knocked = readout.answer_logits(adapter, batch)
        reference = reference_knockout_logits(adapter, batch, block, [0, 2], image_block=True)
        assert torch.allclose(knocked, reference, atol=1e-5)
    causal_only = reference_knockout_logits(adapter, batch, block, [0, 2], image_block=False)
    assert not torch.allclose(knocked, causal_only, atol=1e-4)


WIDE_IMAGE_NOTE = {"llava-1.5": "cropped image", "llava-interleave": "squashed image", "llava-next": None,
                   "llava-onevision": None,
                   "qwen2-vl": None, "qwen2.5-vl": None, "qwen3-vl": None, "gemma3": "squashed image",
                   "idefics3": None, "smolvlm": None}


def test_inputs_a_reader_will_try_on_every_family(family):
    """A wide image gets the note its processor deserves (a crop or a squash says the fix; tiling and dynamic
    resolution keep the aspect ratio and say nothing), a 1 x 1 image a warning, an empty question and a prompt
    longer than the context an error that says the fix."""
    import warnings
    name, _, (model, processor, _) = family
    adapter = models.adapter_for(model, processor)  # a fresh adapter: it has said nothing yet
    wide = Image.new("RGB", (3 * adapter.image_size // 2, adapter.image_size // 2), (200, 200, 200))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        adapter.inputs([wide], ["What is it?"])
    notes = [str(w.message) for w in said if issubclass(w.category, UserWarning)]
    expected = WIDE_IMAGE_NOTE[name]
    assert (notes == []) if expected is None else (len(notes) == 1 and notes[0].startswith(expected)), notes
    with pytest.warns(UserWarning, match="tiny image: 1x1 px is smaller than one"):
        adapter.inputs([Image.new("RGB", (1, 1))], ["What is it?"])
    with pytest.raises(ValueError, match="question 1 is empty"):
        adapter.inputs([wide, wide], ["What is it?", "  "])
    context = adapter.text_config.max_position_embeddings
    with pytest.raises(ValueError, match=f"LLM's context is {context}: shorten the question"):
        adapter.inputs([wide], ["red " * (context + 10)])


SMOL = ("idefics3", "smolvlm")


@pytest.mark.parametrize("name", SMOL)
@pytest.mark.parametrize("size", [(32, 32), (64, 64), (100, 60), (60, 100), (20, 90), (97, 113)])
def test_smolvlm_regions_count_the_processors_tokens_and_tile_the_image(name, size, smol_tokenizer):
    """Tiles and the global image: as many boxes as the processor puts `<image>` tokens (the text between tiles
    is not counted), the tiles' boxes tile the whole image once, and so do the global image's."""
    model, processor = build_tiny_family(name, smol_tokenizer)
    adapter = models.adapter_for(model, processor)
    width, height = size
    batch = adapter.inputs([Image.new("RGB", size, (200, 30, 30))], ["Hi"])
    regions = adapter.token_regions(size)
    assert int((batch["input_ids"] == adapter.image_token_id).sum()) == len(regions)
    n_views = batch["pixel_values"].shape[1]
    assert len(regions) == n_views * adapter.side ** 2
    area = (regions[:, 2] - regions[:, 0]) * (regions[:, 3] - regions[:, 1])
    global_grid = adapter.display_tokens(size)
    assert np.isclose(area[global_grid].sum(), width * height)
    if n_views > 1:
        assert np.isclose(area[~global_grid].sum(), width * height)


def test_smolvlm_tokens_follow_the_tiles_and_the_pixel_shuffle(smol_tokenizer):
    """A toy layout: a 64 px square image is 2 x 2 tiles of 2 x 2 tokens, then the global image's 2 x 2. A
    square inside the 16 px cell at row 1, column 2 of the image (tile row 0, column 1; its token row 1, column
    0) is token 4 + 1 * 2 + 0 = 6 among the tiles, and, in the global image's 32 px cells, row 0, column 1:
    global token 1, the 18th of all (16 tile tokens before it)."""
    model, processor = build_tiny_family("idefics3", smol_tokenizer)
    adapter = models.adapter_for(model, processor)
    mask = np.zeros((64, 64), bool)
    mask[16 + 3:32 - 3, 32 + 3:48 - 3] = True
    touched = adapter.object_tokens(mask).nonzero()[0].tolist()
    assert touched == [6, 16 + 1]


@pytest.mark.parametrize("name", SMOL)
def test_smolvlm_pixel_inputs_match_the_processor(name, smol_tokenizer):
    """The differentiable tiling gives the processor's tensor shapes and, on a flat image, its values (the
    resampling filters differ only at edges)."""
    model, processor = build_tiny_family(name, smol_tokenizer)
    adapter = models.adapter_for(model, processor)
    side = adapter.image_size
    flat = Image.new("RGB", (side, side), (200, 30, 30))
    expected = adapter.inputs([flat], ["Hi"])["pixel_values"]
    pixels = torch.tensor([200 / 255, 30 / 255, 30 / 255])[None, :, None, None].expand(1, 3, side, side)
    got = adapter.pixel_inputs(pixels.contiguous())
    assert got["pixel_values"].shape == expected.shape
    assert torch.allclose(got["pixel_values"], expected, atol=1e-2)


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (100, 60), (60, 100), (20, 90), (200, 200), (97, 113)])
def test_llava_onevision_regions_count_the_processors_tokens_after_the_shrink(size, smol_tokenizer):
    """anyres_max: a kept grid over the limit is shrunk by the model's interpolation; the boxes still count
    what the processor expands, one row-end token per shrunk row, and the shrunk boxes cover the kept region
    (within one patch of the image on each side, as unpadding works in whole patches)."""
    model, processor = build_tiny_family("llava-onevision", smol_tokenizer)
    adapter = models.adapter_for(model, processor)
    ids = adapter.inputs([Image.new("RGB", size, (200, 30, 30))], ["Hi"])["input_ids"]
    regions = adapter.token_regions(size)
    assert int((ids == adapter.image_token_id).sum()) == len(regions)
    rows, cols = adapter.grid
    tiles = regions[rows * cols:]
    boxes = tiles[~np.isnan(tiles).any(1)]
    width, height = size
    slack = adapter.patch_size * max(width, height) / adapter.image_size  # one patch, in original pixels
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
    assert abs(area - width * height) <= slack * (width + height)
    assert np.isnan(tiles).any(1).sum() == len(np.unique(boxes[:, 1]))  # one row end per row of boxes


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name", FAMILIES)
def test_the_knockout_equals_the_minus_inf_reference_on_every_family(name, attention, smol_tokenizer):
    """On every family, padded batch, eager and sdpa: the knockout gives what a from-scratch attention with -inf
    scores gives (Gemma 3's reference keeps its image tokens' bidirectional block), and it does something."""
    from reference_knockout import reference_knockout_logits
    model, processor = build_tiny_family(name, smol_tokenizer)
    model.set_attn_implementation(attention)
    adapter = models.adapter_for(model, processor)
    scenes = [shapes.example(0, i, "caption", size=adapter.image_size).scene.image for i in range(2)]
    batch = adapter.inputs(scenes, ["Hi", "Describe the image in detail, please."])
    visual = batch["input_ids"] == adapter.image_token_id
    last = torch.zeros_like(visual)
    last[:, -1] = True
    block = I.block_matrix(batch["input_ids"].shape[1], last, visual)
    with torch.no_grad():
        plain = readout.answer_logits(adapter, batch)
        with I.attention_knockout(adapter, block, [0, 2]):
            knocked = readout.answer_logits(adapter, batch)
    reference = reference_knockout_logits(adapter, batch, block, [0, 2], image_block=name == "gemma3")
    assert (knocked - plain).abs().max() > 1e-4
    assert torch.allclose(knocked, reference, atol=1e-5), (knocked - reference).abs().max()


@pytest.mark.parametrize("size", [(64, 64), (150, 60), (60, 150), (200, 40), (90, 70)])
def test_gemma3_pan_and_scan_crops_count_and_tile_the_image(size, smol_tokenizer):
    """With pan-and-scan on, a wide or tall image adds 2 to 4 crops of 16 tokens each: the boxes count what the
    processor expands, the whole image's grid covers it once, and so do the crops' grids together."""
    model, processor = build_tiny_family("gemma3", smol_tokenizer)
    adapter = models.adapter_for(model, processor)
    adapter.pan_and_scan = True
    adapter.pan_and_scan_overrides = {"pan_and_scan_min_crop_size": 16}  # the default, 256 px, exceeds these
    width, height = size
    batch = adapter.inputs([Image.new("RGB", size, (200, 30, 30))], ["Hi"])
    regions = adapter.token_regions(size)
    assert int((batch["input_ids"] == adapter.image_token_id).sum()) == len(regions)
    assert len(regions) == 16 * batch["pixel_values"].shape[0]  # the image and its crops, 16 tokens each
    area = (regions[:, 2] - regions[:, 0]) * (regions[:, 3] - regions[:, 1])
    assert np.isclose(area[:16].sum(), width * height)
    if len(regions) > 16:
        assert np.isclose(area[16:].sum(), width * height)
    assert (len(regions) > 16) == (max(size) / min(size) >= 1.2)
