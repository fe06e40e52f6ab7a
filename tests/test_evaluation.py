"""The model card tells the whole training story, including runs that continued from shipped weights."""
from vlminterp_utils.workshop import evaluation

VISION = {"image_size": 64, "patch_size": 8, "num_hidden_layers": 6, "hidden_size": 192}


def _run(steps, hours, **extra):
    history = [{"step": i + 1, "loss": 0.5, "elapsed_s": hours * 3600 * (i + 1) / steps} for i in range(steps)]
    return {"vision_config": VISION, "steps": steps, "batch_size": 8, "pretrain_steps": 0, "history": history,
            **extra}


def test_model_card_adds_up_a_chain_of_runs():
    first = _run(10, 1.0, pretrain_steps=1000, qa_from=7)
    second = _run(4, 0.5, seed=1, qa_from=0, lr_vision=2e-4, lr_projector=6e-4, continued_from=first)
    assert [r["steps"] for r in evaluation.training_runs(second)] == [10, 4]
    accuracy = {"caption": 0.93, "polling": 0.96, "vqa_color": 0.9, "vqa_shape": 0.97, "vqa_position": 0.8}
    records = [{"qtype": "vqa_color", "question": "What colour is the circle?", "answer": "red",
                "prediction": "blue", "correct": False}]
    card = evaluation.model_card(second, accuracy, 100, records)
    assert "Vision warm-up**, 1000 steps" in card and "LLaVA training**, 10 steps" in card
    assert "3. **Continued training** (`--init`, seed 1: new scenes), 4 more steps" in card
    assert "Wall time: 1.50 h in all" in card  # both runs counted
    assert "1 to 4 turns per image" in card and "averaged per answer token" in card
    assert "vqa_color is below the bar" in card and "-> *blue* (truth: red)" in card


def test_model_card_tells_how_a_later_run_weighed_its_loss():
    first = _run(10, 1.0, pretrain_steps=1000, qa_from=7)
    second = _run(4, 0.5, seed=1, qa_from=0, continued_from=first)
    third = _run(6, 0.5, seed=2, qa_from=0, max_turns=6, loss_per="answer", continued_from=second,
                 mix={"polling": 0.75, "caption": 0.25})
    accuracy = {"caption": 0.93, "polling": 0.96, "vqa_color": 0.96, "vqa_shape": 0.97, "vqa_position": 0.8}
    records = [{"qtype": "polling", "question": "Is there a red circle?", "answer": a, "prediction": b,
                "correct": False} for a, b in [("no", "yes"), ("no", "Yes."), ("yes", "no")]]
    card = evaluation.model_card(third, dict(accuracy, polling=0.9), 100, records)
    assert 'Of the 3 polling errors, 2 are a false "yes"' in card
    card = evaluation.model_card(third, accuracy, 100, [])
    assert "4. **Continued training** (`--init`, seed 2: new scenes), 6 more steps" in card
    assert "1 to 6 turns per image" in card and "averaged per answer, so a one-word" in card
    assert "a mix of polling 75%, caption 25% throughout" in card
    assert "Wall time: 2.00 h in all" in card and "Every question type meets its bar." in card


def test_a_resumed_run_counts_every_clock_segment():
    # a resume that restarted the clock: 0.5 h, then a new segment of 0.25 h
    history = [{"elapsed_s": 900.0}, {"elapsed_s": 1800.0}, {"elapsed_s": 300.0}, {"elapsed_s": 900.0}]
    assert abs(evaluation.wall_hours(history) - 0.75) < 1e-9


def test_model_card_explains_binding_turns_and_reports_the_diagnostic():
    run = _run(4, 0.5, seed=4, qa_from=0, continued_from=_run(10, 1.0, pretrain_steps=1000, qa_from=7),
               mix={"polling": 0.5, "binding": 0.5})
    accuracy = {"caption": 0.93, "polling": 0.96, "vqa_color": 0.96, "vqa_shape": 0.97, "vqa_position": 0.8}
    records = [{"qtype": "binding", "question": "Is there a red square?", "answer": "no", "prediction": p,
                "correct": p == "no"} for p in ("yes", "no", "no")]
    card = evaluation.model_card(run, dict(accuracy, binding=0.87), 100, records)
    assert "a mix of polling 50%, binding 50% throughout" in card and "Binding turns are polling questions" in card
    assert "| polling, swapped attributes (diagnostic) | 87.0% | none |" in card
    assert 'answers "yes" to 1 of its 3 negatives' in card
    assert "swapped attributes" not in evaluation.model_card(run, accuracy, 100, [])  # no measurement, no row


def test_the_tuned_models_card_says_its_llm_was_tuned_by_lora_and_ships_the_updates():
    first = _run(10, 1.0, pretrain_steps=1000, qa_from=7)
    tuned = _run(4, 0.5, seed=5, qa_from=0, lora_rank=8, lr_lora=3e-4, continued_from=first)
    accuracy = {"caption": 0.93, "polling": 0.96, "vqa_color": 0.96, "vqa_shape": 0.97, "vqa_position": 0.8}
    lora = {"rank": 8, "alpha": 16.0, "targets": ["down_proj", "q_proj"]}
    card = evaluation.model_card(tuned, accuracy, 100, [], "shapes-llava-tuned", lora)
    assert card.startswith("# shapes-llava-tuned") and "**tuned by LoRA** (rank 8)" in card
    assert "LoRA of rank 8 (alpha 16, learning rate 0.0003) on every linear layer" in card
    assert "(down_proj, q_proj)" in card and '`lora.safetensors`' in card and 'load_vlm("shapes-llava-tuned")' in card
    assert "**frozen**" not in card and "never tuned" not in card
    assert "workshop.evaluation --model shapes-llava-tuned --n 100" in card  # the command that re-scores this model
    base = evaluation.model_card(first, accuracy, 100, [])
    assert "**frozen**" in base and "LoRA" not in base and "never tuned" in base
    assert "workshop.evaluation --n 100" in base
