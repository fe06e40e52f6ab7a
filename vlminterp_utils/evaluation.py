"""Scoring a VLM's answers on the shapes world: exact match per question type, greedy decoding."""
from __future__ import annotations

from collections import defaultdict

from tqdm.auto import tqdm

from . import shapes

# Held-out scenes come from seeds far from the training stream (which uses seeds below 1000).
HELD_OUT_SEED = 10_000


def normalize(answer: str) -> str:
    return answer.strip().lower().rstrip(".").strip()


def held_out_set(n_per_type: int = 50, seed: int = HELD_OUT_SEED) -> dict[str, list[shapes.Example]]:
    """The fixed held-out examples the quality bar is stated on: captions on 1-2 object scenes, the rest on 1-3."""
    sets = {}
    for i, qtype in enumerate(shapes.QUESTION_TYPES):
        n_objects = (1, 2) if qtype == "caption" else (1, 3)
        sets[qtype] = shapes.make_examples(n_per_type, seed + i, qtype, n_objects=n_objects)
    return sets


def accuracy_by_type(adapter, sets: dict[str, list[shapes.Example]], batch_size: int = 16,
                     progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    """Exact-match accuracy per question type, and every (question, answer, prediction) for inspection."""
    correct, records = defaultdict(list), []
    todo = [(qtype, ex) for qtype, exs in sets.items() for ex in exs]
    for start in tqdm(range(0, len(todo), batch_size), desc="evaluating", disable=not progress):
        chunk = todo[start:start + batch_size]
        max_new = 24 if any(q == "caption" for q, _ in chunk) else 4
        preds = adapter.generate([ex.scene.image for _, ex in chunk], [ex.question for _, ex in chunk], max_new)
        for (qtype, ex), pred in zip(chunk, preds):
            ok = normalize(pred) == normalize(ex.answer)
            correct[qtype].append(ok)
            records.append({"qtype": qtype, "question": ex.question, "answer": ex.answer, "prediction": pred,
                            "correct": ok, "index": ex.index})
    return {q: sum(v) / len(v) for q, v in correct.items()}, records
