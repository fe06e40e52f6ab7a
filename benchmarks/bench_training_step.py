"""How much the honest speed-ups of shapes-llava's training buy, as ratios measured in one run.

Compares, on the same batches of multi-turn conversations (batch 8), the time of one optimisation step of the
vision tower + projector:
  naive          : HF forward with labels (logits at every position), LLM weights trainable but not updated
  frozen LLM     : the same, with the LLM's weights frozen (no weight gradients are computed)
  answer logits  : frozen LLM, and the 49k-wide unembedding applied at answer positions only (what train.py does)
and the supervision rate: answer tokens per second with multi-turn conversations vs one question per image.

Run: python benchmarks/bench_training_step.py [--steps 6]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vlminterp_utils import models
from vlminterp_utils.workshop import train


def full_logits_loss(adapter, batch):
    labels = batch["input_ids"].masked_fill(~batch["loss_mask"], -100)
    logits = adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def time_steps(adapter, batches, loss_fn, trainable):
    opt = torch.optim.AdamW(trainable, lr=1e-6)
    loss_fn(adapter, batches[0]).backward()  # warm-up, not timed
    opt.zero_grad()
    start = time.perf_counter()
    for batch in batches:
        loss = loss_fn(adapter, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / len(batches)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, processor = models.build_shapes_llava()
    adapter = models.adapter_for(model, processor)
    model.train()
    batches = [train.make_batch(adapter, s, 8) for s in range(args.steps)]
    trainable = list(adapter.vision_tower.parameters()) + list(adapter.projector.parameters())

    model.requires_grad_(True)
    naive = time_steps(adapter, batches, full_logits_loss, trainable)
    model.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    frozen = time_steps(adapter, batches, full_logits_loss, trainable)
    ours = time_steps(adapter, batches, train.answer_loss, trainable)

    single = [train.make_batch(adapter, s, 8, max_turns=1) for s in range(args.steps)]
    ours_single = time_steps(adapter, single, train.answer_loss, trainable)
    rate = lambda bs, sec: sum(int(b["loss_mask"].sum()) for b in bs) / len(bs) / sec  # noqa: E731
    multi_rate, single_rate = rate(batches, ours), rate(single, ours_single)

    print(f"seconds per step (batch 8): naive {naive:.2f}, frozen LLM {frozen:.2f}, answer logits {ours:.2f}")
    print(f"speed-up over naive: frozen LLM x{naive / frozen:.2f}, answer logits x{naive / ours:.2f}")
    print(f"supervised answer tokens per second: multi-turn (1-4 turns) {multi_rate:.1f}, one question per "
          f"image {single_rate:.1f}: x{multi_rate / single_rate:.2f}")


if __name__ == "__main__":
    main()
