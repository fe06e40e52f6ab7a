"""The embedded model: it loads offline, answers held-out questions above the quality bar, and trains."""
import copy
import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tiny_models import build_tiny_llava
from vlminterp_utils import models
from vlminterp_utils.workshop import evaluation, train


def test_shapes_llava_is_a_real_llava_with_smollm2_inside(shapes_llava):
    model, processor, adapter = shapes_llava
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert adapter.grid == (8, 8) and adapter.n_layers == 30
    assert type(adapter.language_model).__name__ == "LlamaModel"
    batch = adapter.inputs([evaluation.held_out_set(1)["caption"][0].scene.image], ["Describe the image."])
    assert (batch["input_ids"] == adapter.image_token_id).sum() == 64


@pytest.mark.phenomenon
def test_shapes_llava_answers_held_out_questions(shapes_llava):
    """The first 40 held-out questions of each type, greedy (the model card reports 100 per type), meet the book's
    bar: captions >= 90%, polling, colour and shape >= 95%. The shipped weights measured 97.5% on each here (one wrong
    answer of 40). For polling, colour and shape, one more wrong answer (a float difference between machines) still
    passes, two more fail.
    """
    _, _, adapter = shapes_llava
    sets = evaluation.held_out_set(40)
    del sets["vqa_position"]  # reported in the model card, no bar
    accuracy, records = evaluation.accuracy_by_type(adapter, sets, progress=False)
    wrong = [r for r in records if not r["correct"]][:5]
    assert accuracy["caption"] >= 0.90, (accuracy, wrong)  # the bar
    assert accuracy["vqa_color"] >= 0.95, (accuracy, wrong)  # the bar
    assert accuracy["vqa_shape"] >= 0.95, (accuracy, wrong)  # the bar
    assert accuracy["polling"] >= 0.95, (accuracy, wrong)  # the bar


def test_two_training_steps_run_and_stay_finite(tmp_path):
    meta = train.main(["--out", str(tmp_path), "--steps", "2", "--pretrain-steps", "2", "--batch-size", "2",
                       "--eval-every", "2", "--eval-n", "1", "--ckpt-every", "1", "--loss-per", "answer",
                       "--max-turns", "6", "--qa-from", "1", "--mix", "polling=1,caption=1"])
    losses = [r["loss"] for r in meta["history"]]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    saved = load_file(str(tmp_path / "vision_projector.safetensors"))
    assert saved and all(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in saved)
    assert all(torch.isfinite(v).all() for v in saved.values())
    saved_meta = json.loads((tmp_path / "vision_projector.json").read_text())
    assert saved_meta["steps"] == 2 and saved_meta["mix"] == {"polling": 0.5, "caption": 0.5}
    # the checkpoint resumes: asking for the same number of steps does no more work
    again = train.main(["--out", str(tmp_path), "--steps", "2", "--batch-size", "2", "--eval-n", "1"])
    assert len(again["history"]) == 2


def test_per_answer_loss_weighs_a_short_answer_like_a_long_one():
    # row 0: a three-token answer then a one-token answer; row 1: one two-token answer (positions 1.. carry loss)
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    losses = torch.tensor([3.0, 3.0, 3.0, 0.0, 1.0, 2.0])
    assert train.mean_per_answer(losses, mask).item() == (3.0 + 0.0 + 1.5) / 3
    assert losses.mean().item() == 2.0  # per token, the long answer dominates


def test_a_question_mix_is_normalised_and_a_typo_is_named():
    assert train.parse_mix("polling=3,caption=1") == {"polling": 0.75, "caption": 0.25}
    assert train.parse_mix("binding=1")["binding"] == 1.0  # a training-only type
    with pytest.raises(ValueError, match="'pollng=1'.*polling"):
        train.parse_mix("pollng=1")
    with pytest.raises(ValueError, match=">= 0"):
        train.parse_mix("polling=0")


def test_trained_weights_assemble_into_the_cached_checkpoint(tmp_path):
    path = models.shapes_llava_checkpoint()
    assert (path / "config.json").exists() and (path / "processor_config.json").exists()
    assert not list(path.parent.glob(".partial-*"))


def test_the_frozen_llm_twin_shares_shapes_llavas_llm_and_its_cache_entries(shapes_llava):
    """<image>'s embedding row is a weight nothing trained: drawn from a fixed seed, shapes-llava and its twin
    (LLM frozen) have the same LLM, so a LatentLens index built for one serves the other; LoRA makes another."""
    from vlminterp_utils.core.storage import weights_fingerprint
    _, _, adapter = shapes_llava
    twin = models.load_vlm("shapes-llava-twin", device="cpu")[2]
    tuned = models.load_vlm("shapes-llava-tuned", device="cpu")[2]
    image_row = adapter.model.config.image_token_id
    for other in (twin, tuned):  # the row is the same in every embedded model, whatever was drawn before it
        torch.testing.assert_close(other.input_embeddings.weight[image_row], adapter.input_embeddings.weight[image_row],
                                   rtol=0, atol=0)
    assert weights_fingerprint(twin.language_model) == weights_fingerprint(adapter.language_model)
    assert weights_fingerprint(tuned.language_model) != weights_fingerprint(adapter.language_model)


def test_lora_updates_merged_into_the_llm_give_the_lora_models_outputs(tmp_path, smol_tokenizer):
    """shapes-llava-tuned ships LoRA updates and merges them on load: the merged plain model must compute what the
    model with LoRA layers computed, and the vision tower must stay as it was (LoRA goes into the LLM only)."""
    model, processor = build_tiny_llava(tokenizer=smol_tokenizer)
    adapter = models.adapter_for(model, processor)
    batch = adapter.inputs([Image.new("RGB", (32, 32), "red")], ["What colour is the circle?"])
    before = model(**batch).logits
    base = copy.deepcopy(model)
    targets = train.lora_targets(adapter)
    assert set(targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    params = train.add_lora(adapter, rank=2, alpha=4.0, targets=targets)
    assert torch.equal(model(**batch).logits, before)  # B starts at zero: LoRA changes nothing yet
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.2)
    tuned = model(**batch).logits
    assert not torch.allclose(tuned, before, atol=1e-3)
    state = train.lora_state(model)
    assert state and all(".language_model." in k and k.endswith((".lora_A", ".lora_B")) for k in state)
    train.save_atomic(state, {"rank": 2, "alpha": 4.0}, tmp_path / models.LORA_FILE)
    models.merge_lora(base, tmp_path / models.LORA_FILE)
    assert torch.allclose(base(**batch).logits, tuned, atol=1e-5)
    assert not any("lora" in name for name, _ in base.named_modules())
    with pytest.raises(ValueError, match="has no layer"):
        train.save_atomic({"model.nowhere.lora_A": torch.zeros(2, 2), "model.nowhere.lora_B": torch.zeros(2, 2)},
                          {"rank": 2, "alpha": 4.0}, tmp_path / "bad.safetensors")
        models.merge_lora(base, tmp_path / "bad.safetensors")
    # a checkpoint with LoRA weights does not silently resume into a run without LoRA
    optimizer = torch.optim.AdamW(params)
    train.save_checkpoint(tmp_path / "checkpoint.safetensors", model, optimizer, 1, [])
    with pytest.raises(ValueError, match="another --lora-rank"):
        train.load_checkpoint(tmp_path / "checkpoint.safetensors", base, torch.optim.AdamW(base.parameters()))


def test_a_lora_run_trains_the_llm_too_and_saves_its_updates_apart(tmp_path):
    args = ["--out", str(tmp_path), "--steps", "1", "--pretrain-steps", "0", "--batch-size", "1",
            "--eval-every", "5", "--eval-n", "1", "--max-turns", "1"]
    meta = train.main(args + ["--lora-rank", "2", "--lr-lora", "0.01"])
    assert meta["lora_rank"] == 2 and math.isfinite(meta["history"][0]["loss"])
    lora = load_file(str(tmp_path / models.LORA_FILE))
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if k.endswith(".lora_B"))  # B left zero
    side = json.loads((tmp_path / models.LORA_FILE).with_suffix(".json").read_text())
    assert side["rank"] == 2 and "q_proj" in side["targets"]
    # the vision file stays what shapes-llava ships: no LoRA weight in it
    assert all(k.startswith(("model.vision_tower.", "model.multi_modal_projector."))
               for k in load_file(str(tmp_path / models.VISION_FILE)))
