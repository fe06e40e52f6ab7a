"""Train shapes-llava's vision tower and projector through the frozen SmolLM2.

`python -m vlminterp_utils.workshop.train --help`; every option is a field of `TrainConfig`.

Two stages, both on freshly sampled shapes-world scenes:
1. Vision warm-up (cheap, no LLM): the ViT's mean-pooled tokens predict colour, shape and quadrant of each object
   slot (left to right). This teaches the tower to see before it has to talk; it says nothing about *where* in the
   token grid the information should live.
2. LLaVA training: answer-token cross-entropy through the frozen LLM, on multi-turn conversations about one image
   (caption, polling, VQA turns), so the 64 visual tokens are paid for once per several supervised answers.
Checkpoints (safetensors + JSON, no pickle) allow resuming; the final weights go to `data/shapes_llava/`.

With `--lora-rank r` the LLM is tuned too, by LoRA (`peft`) on every linear layer of its decoder layers, as in
shapes-llava-tuned (`--init data/shapes_llava/vision_projector.safetensors --out data/shapes_llava_tuned`); the
updates are saved apart (`lora.safetensors`) and merged into the LLM when the model is loaded
(`core.embedded.merge_lora`), so loading needs no peft.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..core import models, shapes
from ..core.readout import answer_token_losses, pad_right
from ..core.storage import atomic_path, sha256_of, write_json
from . import evaluation

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
    return [shapes.make_question(scene, str(q), rng)[:2] for q in qtypes]


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
    pixels = adapter.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return {**pad_right(seqs, adapter.tokenizer.pad_token_id, masks), "pixel_values": pixels}


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
    losses, _ = answer_token_losses(adapter, batch)
    return losses.mean() if per == "token" else mean_per_answer(losses, batch["loss_mask"])


def _cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------------------------------------- checkpoints

def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The vision tower's and projector's weights: what shapes-llava ships."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()
            if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}


def lora_targets(adapter) -> list[str]:
    """The names of the linear layers inside the LLM (found in the model, not written down per family)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in adapter.language_model.named_modules()
                   if isinstance(m, nn.Linear)})


def add_lora(adapter, rank: int, alpha: float, targets: list[str]) -> list[nn.Parameter]:
    """Inject trainable LoRA layers (peft) into the LLM's linear layers named `targets` (`lora_targets`, found
    before injecting: afterwards they are LoRA layers); returns their parameters. Their B matrices start at zero,
    so the model starts out exactly as it was."""
    from peft import LoraConfig, inject_adapter_in_model
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    inject_adapter_in_model(config, adapter.language_model)
    params = [p for n, p in adapter.language_model.named_parameters() if ".lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights keyed as `models.merge_lora` reads them: `<linear layer's path>.lora_A` and `.lora_B`."""
    out = {}
    for key, value in model.state_dict().items():
        for part in ("lora_A", "lora_B"):
            if key.endswith(f".{part}.default.weight"):
                out[key.removesuffix(f".{part}.default.weight") + f".{part}"] = value.detach().contiguous()
    return out


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything a run trains, under the model's own keys (LoRA layers included, as peft names them)."""
    lora = {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}
    return {**trainable_state(model), **lora}


def save_atomic(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    """safetensors + a JSON side file, each written to a temp name and renamed into place."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    write_json(path.with_suffix(".json"), meta)


def save_checkpoint(path: Path, model, optimizer, step: int, history: list) -> None:
    tensors = {f"param.{k}": v for k, v in checkpoint_state(model).items()}
    for i, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(value).contiguous()
    save_atomic(tensors, {"step": step, "history": history}, path)


def load_checkpoint(path: Path, model, optimizer) -> tuple[int, list]:
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    unexpected = model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("param.")},
                                       strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{path} holds weights this run has no place for ({unexpected[0]}, ...): it was made with "
                         "another --lora-rank; resume with the same options, or start in a new --out folder")
    state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = value
    optimizer.load_state_dict(state)
    return meta["step"], meta["history"]


# ---------------------------------------------------------------------------------------------- main

def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """One training run. Each field is also a command-line option (`--qa-from` for `qa_from`)."""

    out: str = _option("", "where checkpoints and weights go (default: the shipped data/shapes_llava/)")
    steps: int = _option(1500, "stage-2 optimisation steps")
    qa_from: int = _option(700, "stage-2 step from which the QA-heavy mix is used")
    pretrain_steps: int = _option(1000, "stage-1 vision warm-up steps (0: skip)")
    batch_size: int = 8
    lr_vision: float = 3e-4
    lr_projector: float = 1e-3
    eval_every: int = 200
    eval_n: int = _option(20, "held-out examples per question type")
    ckpt_every: int = 50
    mix: str | None = _option(None, "question-type weights from qa_from on, e.g. "
                              "'caption=0.1,polling=0.5,vqa_color=0.4' (default QA_WEIGHTS)")
    max_turns: int = _option(4, "turns per conversation: 1 to this many")
    loss_per: str = _option("token", "average the loss over answer tokens ('token') or over answers ('answer')")
    seed: int = TRAIN_SEED
    init: str | None = _option(None, "start stage 2 from these vision/projector weights, skipping stage 1")
    threads: int = _option(0, "torch threads (0: leave torch's default)")
    lora_rank: int = _option(0, "LoRA rank of the LLM's linear layers (0: the LLM stays frozen, as in shapes-llava)")
    lora_alpha: float = _option(16.0, "LoRA scale numerator: updates are scaled by alpha / rank")
    lr_lora: float = 2e-4

    def __post_init__(self):
        if self.loss_per not in ("token", "answer"):
            raise ValueError(f"loss_per must be 'token' or 'answer', not {self.loss_per!r}")
        self.qa_mix = parse_mix(self.mix) if self.mix else QA_WEIGHTS  # parsed before any work: a typo fails at once
        if self.init:  # continue from shipped weights: a fresh optimiser, no warm-up stage
            self.pretrain_steps = 0
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, not {self.lora_rank}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else models.shapes_llava_dir()


def train(config: TrainConfig) -> dict:
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    model, processor = models.build_shapes_llava()
    adapter = models.adapter_for(model, processor)
    model.requires_grad_(False)
    ckpt = config.out_dir / "checkpoint.safetensors"
    started = time.time()
    if config.init and not ckpt.exists():
        unexpected = model.load_state_dict(load_file(config.init), strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{config.init} does not fit shapes-llava (unexpected weights {unexpected[:3]})")
        print(f"starting from {config.init}")
    if not ckpt.exists() and config.pretrain_steps:
        adapter.vision_tower.requires_grad_(True)
        pretrain_vision(adapter, config.pretrain_steps, seed=config.seed)
    groups = [{"params": list(adapter.vision_tower.parameters()), "lr": config.lr_vision},
              {"params": list(adapter.projector.parameters()), "lr": config.lr_projector}]
    targets = lora_targets(adapter) if config.lora_rank else []
    if config.lora_rank:
        groups.append({"params": add_lora(adapter, config.lora_rank, config.lora_alpha, targets),
                       "lr": config.lr_lora})
    trainable = [p for g in groups for p in g["params"]]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    step, history = (load_checkpoint(ckpt, model, optimizer) if ckpt.exists() else (0, []))
    if step:
        print(f"resumed from {ckpt} at step {step}")
        started -= history[-1]["elapsed_s"] if history else 0  # the wall clock continues across resumes
    held_out = {**evaluation.held_out_set(config.eval_n), "binding": evaluation.binding_set(config.eval_n)}
    bar = tqdm(range(step, config.steps), desc="stage 2: LLaVA training", initial=step, total=config.steps)
    for step in bar:
        model.train()
        mix = config.qa_mix if step >= config.qa_from else QTYPE_WEIGHTS
        batch = make_batch(adapter, step, config.batch_size, config.seed, config.max_turns, weights=mix)
        loss = answer_loss(adapter, batch, per=config.loss_per)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * _cosine(step, config.steps, warmup=50)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        record = {"step": step + 1, "loss": loss.item(), "elapsed_s": time.time() - started}
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            model.eval()
            record["eval"], _ = evaluation.accuracy_by_type(adapter, held_out, progress=False)
            print(json.dumps(record), flush=True)
        history.append(record)
        if (step + 1) % config.ckpt_every == 0 or step + 1 == config.steps:
            save_checkpoint(ckpt, model, optimizer, step + 1, history)
    model.eval()
    meta = {"vision_config": adapter.config.vision_config.to_dict(), "steps": config.steps,
            "qa_from": config.qa_from, "batch_size": config.batch_size, "pretrain_steps": config.pretrain_steps,
            "seed": config.seed, "lr_vision": config.lr_vision, "lr_projector": config.lr_projector,
            "max_turns": config.max_turns, "loss_per": config.loss_per, "mix": config.qa_mix, "history": history,
            "continued_from": _init_meta(config.init), "lora_rank": config.lora_rank, "lr_lora": config.lr_lora}
    if config.lora_rank:  # first, so that a folder with new vision weights always has their LoRA beside them
        save_atomic(lora_state(model), {"rank": config.lora_rank, "alpha": config.lora_alpha,
                                        "targets": targets}, config.out_dir / models.LORA_FILE)
    save_atomic(trainable_state(model), meta, config.out_dir / models.VISION_FILE)
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


def main(argv=None) -> dict:
    """The command line: one option per `TrainConfig` field, with the field's default."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(TrainConfig):
        default = f.default
        kind = type(default) if default not in (None, "") else str
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                            help=f.metadata.get("help"))
    return train(TrainConfig(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
