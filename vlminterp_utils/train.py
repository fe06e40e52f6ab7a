"""Train shapes-llava's vision tower and projector through the frozen SmolLM2 (`python -m vlminterp_utils.train`).

Two stages, both on freshly sampled shapes-world scenes:
1. Vision warm-up (cheap, no LLM): the ViT's mean-pooled tokens predict colour, shape and quadrant of each object
   slot (left to right). This teaches the tower to see before it has to talk; it says nothing about *where* in the
   token grid the information should live.
2. LLaVA training: answer-token cross-entropy through the frozen LLM, on multi-turn conversations about one image
   (caption, polling, VQA turns), so the 64 visual tokens are paid for once per several supervised answers.
Checkpoints (safetensors + JSON, no pickle) allow resuming; the final weights go to `data/shapes_llava/`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import evaluation, models, shapes
from .weights import sha256_of

QTYPE_WEIGHTS = {"caption": 0.3, "polling": 0.25, "vqa_color": 0.15, "vqa_shape": 0.15, "vqa_position": 0.15}
# Curriculum: after `--qa-from` steps, questions that bind a word of the question to one object (polling, VQA)
# dominate. Captions are learned first; binding needs its own supervision through the frozen LLM.
QA_WEIGHTS = {"caption": 0.1, "polling": 0.35, "vqa_color": 0.2, "vqa_shape": 0.2, "vqa_position": 0.15}
TRAIN_SEED = 0  # scenes of step s, sequence i come from rng([TRAIN_SEED, stage, s, i]); held-out uses 10_000+


# ---------------------------------------------------------------------------------------------- stage 1

def slot_targets(scene: shapes.Scene) -> torch.Tensor:
    """Per slot (left to right, 3 slots): colour, shape and quadrant indices; the last index of each means 'none'."""
    colors, quads = list(shapes.COLORS), list(shapes.POSITIONS)
    out = []
    for k in range(3):
        if k < len(scene.objects):
            o = scene.objects[k]
            out += [colors.index(o.color), shapes.SHAPES.index(o.shape), quads.index(shapes.quadrant(o, scene.size))]
        else:
            out += [len(colors), len(shapes.SHAPES), len(quads)]
    return torch.tensor(out)


def pretrain_vision(adapter, steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = TRAIN_SEED):
    tower = adapter.vision_tower
    n_classes = [len(shapes.COLORS) + 1, len(shapes.SHAPES) + 1, len(shapes.POSITIONS) + 1] * 3
    head = nn.Linear(tower.config.hidden_size, sum(n_classes))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    tower.train()
    bar = tqdm(range(steps), desc="stage 1: vision warm-up")
    for step in bar:
        scenes = [shapes.random_scene(np.random.default_rng([seed, 1, step, i])) for i in range(batch_size)]
        pixels = adapter.processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
        tokens = tower(pixel_values=pixels).last_hidden_state[:, 1:]  # drop CLS, as LLaVA's "default" strategy
        logits = head(tokens.mean(1)).split(n_classes, dim=-1)
        targets = torch.stack([slot_targets(s) for s in scenes])
        loss = sum(F.cross_entropy(lg, targets[:, j]) for j, lg in enumerate(logits)) / len(logits)
        opt.zero_grad()
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, steps, warmup=20)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tower.eval()


# ---------------------------------------------------------------------------------------------- stage 2

def conversation(scene: shapes.Scene, rng: np.random.Generator, max_turns: int = 4,
                 weights: dict[str, float] = QTYPE_WEIGHTS) -> list[tuple[str, str]]:
    n_turns = int(rng.integers(1, max_turns + 1))
    qtypes = rng.choice(list(weights), size=n_turns, p=list(weights.values()))
    return [shapes.make_question(scene, str(q), rng) for q in qtypes]


def encode_conversation(adapter, image, turns: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of a multi-turn chat about one image, and a mask of the tokens that carry loss (the answers)."""
    tok = adapter.tokenizer
    first = adapter.processor(images=[image], text=[adapter.prompt(turns[0][0])], return_tensors="pt")
    ids, loss = [first["input_ids"][0]], [torch.zeros_like(first["input_ids"][0], dtype=torch.bool)]
    for t, (question, answer) in enumerate(turns):
        if t > 0:
            follow_up = [{"role": "user", "content": question}]
            p = tok(tok.apply_chat_template(follow_up, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            ids.append(p)
            loss.append(torch.zeros_like(p, dtype=torch.bool))
        a = tok(answer + "<|im_end|>", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        nl = tok("\n", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        ids += [a, nl]
        loss += [torch.ones_like(a, dtype=torch.bool), torch.zeros_like(nl, dtype=torch.bool)]
    return torch.cat(ids), torch.cat(loss)


def make_batch(adapter, step: int, batch_size: int, seed: int = TRAIN_SEED, max_turns: int = 4,
               weights: dict[str, float] = QTYPE_WEIGHTS) -> dict[str, torch.Tensor]:
    seqs, masks, images = [], [], []
    for i in range(batch_size):
        rng = np.random.default_rng([seed, 2, step, i])
        scene = shapes.random_scene(rng)
        ids, mask = encode_conversation(adapter, scene.image, conversation(scene, rng, max_turns, weights))
        seqs.append(ids)
        masks.append(mask)
        images.append(scene.image)
    length = max(len(s) for s in seqs)
    pad = adapter.tokenizer.pad_token_id
    input_ids = torch.full((batch_size, length), pad)
    loss_mask = torch.zeros((batch_size, length), dtype=torch.bool)
    attention = torch.zeros((batch_size, length), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, :len(s)], loss_mask[i, :len(s)], attention[i, :len(s)] = s, m, 1
    pixels = adapter.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return {"input_ids": input_ids, "attention_mask": attention, "pixel_values": pixels, "loss_mask": loss_mask}


def answer_token_losses(adapter, batch: dict[str, torch.Tensor],
                        pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every answer token, and the batch row of each; the unembedding runs at answer positions
    alone (it is 49k wide)."""
    hidden = adapter.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      pixel_values=pixel_values).last_hidden_state
    predicts = batch["loss_mask"][:, 1:]  # position t predicts token t + 1
    logits = adapter.unembedding(hidden[:, :-1][predicts]).float()
    losses = F.cross_entropy(logits, batch["input_ids"][:, 1:][predicts], reduction="none")
    return losses, predicts.nonzero()[:, 0]


def mean_per_answer(losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean over answers of each answer's mean token loss; answers are the runs of True in `loss_mask`, and
    `losses` holds one value per answer token, in the order of `loss_mask[:, 1:]` (as `answer_token_losses`)."""
    predicts = loss_mask[:, 1:]
    starts = predicts & ~F.pad(predicts[:, :-1], (1, 0), value=False)
    answer = (starts.flatten().cumsum(0) - 1)[predicts.flatten()]
    n = int(starts.sum())
    sums = torch.zeros(n, dtype=losses.dtype).index_add(0, answer, losses)
    counts = torch.zeros(n, dtype=losses.dtype).index_add(0, answer, torch.ones_like(losses))
    return (sums / counts).mean()


def answer_loss(adapter, batch: dict[str, torch.Tensor], per: str = "token") -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of the batch (`per="token"`), or over answers (`per="answer"`),
    so that a one-word "yes" weighs as much as a ten-token caption."""
    if per not in ("token", "answer"):
        raise ValueError(f"per must be 'token' or 'answer', not {per!r}")
    losses, _ = answer_token_losses(adapter, batch, batch["pixel_values"])
    return losses.mean() if per == "token" else mean_per_answer(losses, batch["loss_mask"])


def _cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------------------------------------- checkpoints

def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()
            if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}


def save_atomic(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    """safetensors + a JSON side file, each written to a temp name and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    side = path.with_suffix(".json")
    side.with_name(side.name + ".partial").write_text(json.dumps(meta, indent=2))
    os.replace(side.with_name(side.name + ".partial"), side)


def save_checkpoint(path: Path, model, optimizer, step: int, history: list) -> None:
    tensors = {f"param.{k}": v for k, v in trainable_state(model).items()}
    for i, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(value).contiguous()
    save_atomic(tensors, {"step": step, "history": history}, path)


def load_checkpoint(path: Path, model, optimizer) -> tuple[int, list]:
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("param.")}, strict=False)
    state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = value
    optimizer.load_state_dict(state)
    return meta["step"], meta["history"]


# ---------------------------------------------------------------------------------------------- main

def train(args) -> dict:
    qa_mix = parse_mix(args.mix) if args.mix else QA_WEIGHTS  # parsed before any work: a typo fails at once
    torch.manual_seed(args.seed)
    model, processor = models.build_shapes_llava()
    adapter = models.adapter_for(model, processor)
    model.requires_grad_(False)
    ckpt = Path(args.out) / "checkpoint.safetensors"
    started = time.time()
    if args.init and not ckpt.exists():  # continue from shipped weights (a fresh optimiser, no warm-up stage)
        unexpected = model.load_state_dict(load_file(args.init), strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{args.init} does not fit shapes-llava (unexpected weights {unexpected[:3]})")
        args.pretrain_steps = 0
        print(f"starting from {args.init}")
    if not ckpt.exists() and args.pretrain_steps:
        adapter.vision_tower.requires_grad_(True)
        pretrain_vision(adapter, args.pretrain_steps, seed=args.seed)
    trainable = list(adapter.vision_tower.parameters()) + list(adapter.projector.parameters())
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([
        {"params": list(adapter.vision_tower.parameters()), "lr": args.lr_vision},
        {"params": list(adapter.projector.parameters()), "lr": args.lr_projector}], weight_decay=0.01)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    step, history = (load_checkpoint(ckpt, model, optimizer) if ckpt.exists() else (0, []))
    if step:
        print(f"resumed from {ckpt} at step {step}")
        started -= history[-1]["elapsed_s"] if history else 0  # the wall clock continues across resumes
    held_out = {**evaluation.held_out_set(args.eval_n), "binding": evaluation.binding_set(args.eval_n)}
    bar = tqdm(range(step, args.steps), desc="stage 2: LLaVA training", initial=step, total=args.steps)
    for step in bar:
        model.train()
        mix = qa_mix if step >= args.qa_from else QTYPE_WEIGHTS
        batch = make_batch(adapter, step, args.batch_size, args.seed, args.max_turns, weights=mix)
        loss = answer_loss(adapter, batch, per=args.loss_per)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * _cosine(step, args.steps, warmup=50)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        record = {"step": step + 1, "loss": loss.item(), "elapsed_s": time.time() - started}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            record["eval"], _ = evaluation.accuracy_by_type(adapter, held_out, progress=False)
            print(json.dumps(record), flush=True)
        history.append(record)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt, model, optimizer, step + 1, history)
    model.eval()
    meta = {"vision_config": adapter.config.vision_config.to_dict(), "steps": args.steps, "qa_from": args.qa_from,
            "batch_size": args.batch_size, "pretrain_steps": args.pretrain_steps, "seed": args.seed,
            "lr_vision": args.lr_vision, "lr_projector": args.lr_projector, "max_turns": args.max_turns,
            "loss_per": args.loss_per, "mix": qa_mix, "history": history,
            "continued_from": _init_meta(args.init)}
    save_atomic(trainable_state(model), meta, Path(args.out) / "vision_projector.safetensors")
    return meta


def parse_mix(text: str) -> dict[str, float]:
    """`"polling=0.5,caption=0.1,..."` -> question-type weights summing to 1 (types left out get 0)."""
    weights = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in shapes.TRAINING_QUESTION_TYPES or not value:
            raise ValueError(f"--mix: {part!r} is not type=weight with a type among "
                             f"{', '.join(shapes.TRAINING_QUESTION_TYPES)}")
        weights[name] = float(value)
    total = sum(weights.values())
    if total <= 0 or min(weights.values()) < 0:
        raise ValueError(f"--mix: weights must be >= 0 and not all 0, got {weights}")
    return {q: w / total for q, w in weights.items()}


def _init_meta(init: str | None) -> dict | None:
    """The training record of the weights a run continued from, so the model card can tell the whole story."""
    side = Path(init).with_suffix(".json") if init else None
    if side is None or not side.exists():
        return None
    digest = sha256_of(Path(init))  # the path may be a temp copy; the hash is not
    return {"path": str(init), "sha256": digest, **json.loads(side.read_text())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(models.SHAPES_LLAVA_DIR), help="where checkpoints and weights go")
    parser.add_argument("--steps", type=int, default=1500, help="stage-2 optimisation steps")
    parser.add_argument("--qa-from", type=int, default=700, help="stage-2 step from which the QA-heavy mix is used")
    parser.add_argument("--pretrain-steps", type=int, default=1000, help="stage-1 vision warm-up steps (0: skip)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr-vision", type=float, default=3e-4)
    parser.add_argument("--lr-projector", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--eval-n", type=int, default=20, help="held-out examples per question type")
    parser.add_argument("--ckpt-every", type=int, default=50)
    parser.add_argument("--mix", default=None, help="question-type weights from --qa-from on, e.g. "
                        "'caption=0.1,polling=0.5,vqa_color=0.15,vqa_shape=0.15,vqa_position=0.1' (default QA_WEIGHTS)")
    parser.add_argument("--max-turns", type=int, default=4, help="turns per conversation: 1 to this many")
    parser.add_argument("--loss-per", choices=["token", "answer"], default="token",
                        help="average the cross-entropy over answer tokens, or over answers (short answers weigh more)")
    parser.add_argument("--seed", type=int, default=TRAIN_SEED)
    parser.add_argument("--init", default=None,
                        help="start stage 2 from these vision/projector weights (e.g. data/shapes_llava/"
                             "vision_projector.safetensors), skipping stage 1; use another --seed for new data")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return train(args)


if __name__ == "__main__":
    main()
