"""The adapter on a tiny random Llava built in the tests (another grid, depth and width than shapes-llava)."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vlminterp_utils import models, shapes


def scenes(n, size=32):
    return [shapes.example(0, i, shapes.QUESTION_TYPES[i % 4], size=size) for i in range(n)]


def test_adapter_reads_grid_layers_and_pieces_from_the_config(tiny):
    model, processor, adapter = tiny
    assert adapter.family == "llava"
    assert adapter.grid == (4, 4) and adapter.n_visual_tokens == 16
    assert adapter.n_layers == 3 and len(adapter.layers) == 3
    assert adapter.final_norm is model.get_decoder().norm
    assert adapter.unembedding is model.lm_head
    assert adapter.input_embeddings is model.get_decoder().embed_tokens
    assert adapter.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert not any(p.requires_grad for p in model.parameters())


def test_visual_positions_come_from_input_ids_under_left_padding(tiny):
    _, _, adapter = tiny
    exs = scenes(3)
    questions = ["Is there a red circle?", "Describe the image in a long and detailed way please.", "Hi"]
    batch = adapter.inputs([e.scene.image for e in exs], questions)
    ids = batch["input_ids"]
    pos = adapter.visual_positions(ids)
    assert pos.shape == (3, 16)
    for row in range(3):
        expected = (ids[row] == adapter.image_token_id).nonzero().flatten()
        assert torch.equal(pos[row], expected)
        assert torch.equal(pos[row], torch.arange(pos[row, 0], pos[row, 0] + 16))  # one contiguous block
    assert len(set(pos[:, 0].tolist())) > 1  # padding shifts the block differently per row
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the last position


def test_prompt_ends_where_the_answer_begins(tiny):
    _, _, adapter = tiny
    prompt = adapter.prompt("What colour is the circle?")
    assert prompt.count("<image>") == 1 and prompt.endswith("assistant\n")


def test_generate_returns_one_string_per_image(tiny):
    _, _, adapter = tiny
    exs = scenes(2)
    out = adapter.generate([e.scene.image for e in exs], [e.question for e in exs], max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


def test_a_prompt_without_or_with_two_images_is_rejected(tiny):
    _, processor, adapter = tiny
    one = processor(text=["no image here"], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="image tokens"):
        adapter.visual_positions(one)
    img = scenes(1)[0].scene.image
    two = processor(images=[img, img], text=["<image><image> two"], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="grid"):
        adapter.visual_positions(two)


def test_images_must_be_rgb_and_counts_must_match(tiny):
    _, _, adapter = tiny
    gray = Image.new("L", (32, 32))
    with pytest.raises(ValueError, match="RGB"):
        adapter.inputs([gray], ["Hi"])
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        adapter.inputs([np.zeros((32, 32), np.uint8)], ["Hi"])
    with pytest.raises(TypeError, match="PIL image"):
        adapter.inputs(["a path.png"], ["Hi"])
    img = scenes(1)[0].scene.image
    with pytest.raises(ValueError, match="one question per image"):
        adapter.inputs([img, img], ["Hi"])


def test_inputs_a_reader_will_try_get_an_error_or_a_warning_that_says_the_fix(tiny):
    """#28: a non-square image (this processor squashes it), a 1 x 1 image, an empty question and a prompt
    longer than the LLM's context. Each note is said once per adapter, not once per image of a sweep."""
    model, processor, _ = tiny
    adapter = models.adapter_for(model, processor)  # a fresh adapter: it has said nothing yet
    wide = Image.new("RGB", (64, 32), (200, 200, 200))
    with pytest.warns(UserWarning, match=r"squashed image: .* 64x32 image to 32x32 .*pad_to_square"):
        adapter.inputs([wide], ["What is it?"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.inputs([wide], ["What is it?"])  # said once already
        adapter.inputs([models.pad_to_square(wide)], ["What is it?"])  # the fix: nothing to say
    with pytest.warns(UserWarning, match="tiny image: 1x1 px is smaller than one 8 px patch"):
        adapter.inputs([Image.new("RGB", (1, 1))], ["What is it?"])
    with pytest.raises(ValueError, match="question 1 is empty"):
        adapter.inputs([wide, wide], ["What is it?", "  "])
    context = adapter.text_config.max_position_embeddings
    with pytest.raises(ValueError, match=f"LLM's context is {context}: shorten the question"):
        adapter.inputs([wide], ["red " * (context + 10)])


def test_pad_to_square_centres_the_image_on_its_background():
    image = Image.new("RGB", (6, 2), (10, 20, 30))
    image.putpixel((3, 1), (255, 0, 0))
    square = models.pad_to_square(image)
    assert square.size == (6, 6) and square.getpixel((0, 0)) == (10, 20, 30)
    assert square.getpixel((3, 3)) == (255, 0, 0)  # moved down by (6 - 2) / 2 rows


def test_arrays_are_accepted(tiny):
    _, _, adapter = tiny
    arr = np.asarray(scenes(1)[0].scene.image)
    assert adapter.inputs([arr], ["Hi"])["pixel_values"].shape == (1, 3, 32, 32)


def test_bad_model_name_lists_what_is_available():
    with pytest.raises(ValueError, match="shapes-llava"):
        models.load_vlm("gpt-5")


def test_unsupported_family_names_the_supported_ones(tiny_llava_dir, tmp_path):
    config = json.loads((tiny_llava_dir / "config.json").read_text())["text_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))  # a plain Llama: not a VLM
    with pytest.raises(ValueError, match="supported families: llava"):
        models.load_vlm(str(tmp_path))
