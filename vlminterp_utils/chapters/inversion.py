"""MIMIC (Jain & Stergiou 2025): synthesise an image that makes a frozen VLM give a target answer.

Gradient descent on the pixels through the frozen model, with
  - cross-entropy of the target answer under teacher forcing (loss on the answer tokens only),
  - feature alignment: per-layer, per-channel mean and variance of the vision tower's tokens, matched to the same
    statistics averaged over real images of the concept,
  - a patch-boundary term: squared differences across the ViT's patch boundaries,
  - priors: TV-L1, TV-L2 (with diagonals) and L2,
and random jitter (optionally flips) every step, pixels clamped to [0, 1], Adam with betas (0.5, 0.9) and a cosine
schedule. The official code's initialisation (standard-normal pixels, clipped) and jitter (reflect-pad, then crop)
are options (`InversionConfig.init`, `.jitter_mode`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core import shapes, shards, stats as S
from ..core.readout import answer_token_losses, normalize_answer, pad_right
from ..core.storage import cache_key, cached_tensors
from . import classifier as clf

CONCEPT_SEED = 40_000
# The 15 concepts of the shapes world, split once. The recipe's weights, steps and learning rate were chosen on
# TUNING_CONCEPTS (`benchmarks/bench_mimic_recipe.py`); chapter 3 and its phenomenon test report only on
# HELD_OUT_CONCEPTS, so that no number on the page was used to choose the recipe. The first four are the chapter's
# (each differs from the next, cyclically, in colour and shape, as `crossed_pairs` needs).
TUNING_CONCEPTS = (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "square"),
                   ("purple", "circle"), ("red", "triangle"))
HELD_OUT_CONCEPTS = (("green", "circle"), ("purple", "square"), ("yellow", "triangle"), ("red", "square"),
                     ("blue", "circle"), ("purple", "triangle"), ("blue", "triangle"), ("yellow", "circle"),
                     ("green", "square"))


@dataclass
class InversionConfig:
    """Every weight and knob of one inversion. A weight of 0 switches its term off.

    The prior weights were first chosen by eye on shapes-llava: with TV-L2 2, patch 1 and L2 0.05 the images
    stayed high-frequency noise with visible patch seams; these remove most of both while the target's
    probability still reaches about 0.9 or more. They were then checked on the tuning concepts alone (6 concepts
    x 2 repeats, seed 0, images the classifier names; `benchmarks/bench_mimic_recipe.py --weights ...
    --only-all --repeats 2`): these weights 4 of 12; the three priors x0.5 1, x2 5, x4 5; feature x0.5 5,
    feature x2 3. No setting beat these by more than one image of 12, so they were kept; halving the priors
    lost. Steps and learning rate, measured on 6 concepts, seed 0 (images the independent
    classifier names, all terms vs CE only), when a batch still shared one jitter: 150 steps at lr 0.05, 2 vs 0 of
    6; 75 at 0.05, 1 vs 0; 75 at 0.1, 3 vs 0, in half the time of 150 steps. With each image's own jitter, 75 at
    0.1: 2 vs 0 on seed 0 and on seed 1 (`benchmarks/bench_mimic_recipe.py --seed S`).
    """

    steps: int = 75
    lr: float = 0.1
    ce: float = 1.0
    feature: float = 1.0
    patch: float = 30.0
    tv_l1: float = 0.0
    tv_l2: float = 100.0
    l2: float = 1.0
    jitter: int = 2  # pixels, each direction; every image of a batch draws its own shift
    jitter_mode: str = "roll"  # "roll" (wrap around) or "reflect" (the official code: reflect-pad, then crop)
    flip: bool = False
    init: str = "gray"  # "gray": mid-gray plus noise; "noise": the official N(0, 1) pixels, clipped; "blank": black
    init_std: float = 0.05  # the noise around mid-gray of the "gray" start
    betas: tuple[float, float] = (0.5, 0.9)
    seed: int = 0
    progress: bool = True


INITS = ("gray", "noise", "blank")
JITTER_MODES = ("roll", "reflect")
# The prompt-template ablation: the shapes world's caption prompt (shapes-llava's training prompt), MIMIC's own
# question (its data/prompts.json) and a question the model never saw in training.
TEMPLATES = (shapes.CAPTION_PROMPT, "What is depicted in the image?", "What do you see here?")

# The official code jitters by up to 16 pixels at 336 px (`run_mimic.py`); scaled to the model's image size.
OFFICIAL_JITTER_FRACTION = 16 / 336


def official_start(image_size: int) -> dict:
    """InversionConfig fields for the official code's start and jitter: N(0, 1) pixels clipped, reflect jitter."""
    return dict(init="noise", jitter_mode="reflect", jitter=max(1, round(OFFICIAL_JITTER_FRACTION * image_size)))


ABLATIONS: dict[str, dict] = {
    "CE only": dict(feature=0.0, patch=0.0, tv_l1=0.0, tv_l2=0.0, l2=0.0),
    "CE + feature": dict(patch=0.0, tv_l1=0.0, tv_l2=0.0, l2=0.0),
    "CE + patch": dict(feature=0.0, tv_l1=0.0, tv_l2=0.0, l2=0.0),
    "CE + priors": dict(feature=0.0, patch=0.0),
    "all": dict(),
    "feature, no CE": dict(ce=0.0),
}


# ---------------------------------------------------------------------------------------------- statistics

def token_statistics(states: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, layers, channels) mean and variance over tokens, per image."""
    return (torch.stack([h.mean(1) for h in states], 1), torch.stack([h.var(1, unbiased=False) for h in states], 1))


def to_pixels(images, size: int) -> torch.Tensor:
    return clf.to_pixels(images, size, Image.BICUBIC)


@torch.no_grad()
def concept_stats(adapter, color: str, shape: str, n_images: int = 32, seed: int = CONCEPT_SEED,
                  cache: bool = True) -> dict[str, torch.Tensor]:
    """Per-layer token mean and variance of the vision tower, averaged over real images of one concept."""
    fingerprint = float(next(adapter.vision_tower.parameters()).double().sum())  # retrained weights: a new key
    key = cache_key(adapter.config.name_or_path, color, shape, n_images, seed, adapter.image_size, fingerprint)

    def build():
        rng = np.random.default_rng([seed, list(shapes.COLORS).index(color), shapes.SHAPES.index(shape)])
        images = [shapes.concept_scene(rng, color, shape, adapter.image_size).image for _ in range(n_images)]
        pixels = to_pixels(images, adapter.image_size).to(adapter.device)
        mean, var = token_statistics(adapter.vision_states(adapter.pixel_inputs(pixels)))
        return {"mean": mean.float().mean(0).cpu(), "var": var.float().mean(0).cpu()}

    return cached_tensors("concept_stats", key, build, cache=cache)


# ---------------------------------------------------------------------------------------------- loss terms

def feature_loss(states, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Squared error of per-layer channel means and variances, relative to the real images' spread of values."""
    mean, var = token_statistics(states)
    target_mean, target_var = stats["mean"].to(mean), stats["var"].to(var)
    scale = target_var.mean(-1, keepdim=True) + 1e-6  # per layer: makes layers of different scales comparable
    return (((mean - target_mean) ** 2 / scale).mean() + ((var - target_var) ** 2 / scale ** 2).mean())


def patch_boundary_loss(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The patch prior of images (n, channels, h, w), a scalar: the mean squared difference between the pixels
    on either side of every patch boundary, columns and rows each averaged, then added."""
    h, w = pixels.shape[-2:]
    cols = torch.arange(patch_size, max(w, patch_size), patch_size, device=pixels.device)  # a patch's first column
    rows = torch.arange(patch_size, max(h, patch_size), patch_size, device=pixels.device)  # (none: smaller image)
    across = [pixels[..., :, cols] - pixels[..., :, cols - 1],  # (n, c, h, boundaries): to the left neighbour
              pixels[..., rows, :] - pixels[..., rows - 1, :]]  # (n, c, boundaries, w): to the one above
    return sum(((d ** 2).mean() for d in across if d.numel()), pixels.new_zeros(()))  # no boundary: 0, not NaN


def neighbour_differences(pixels: torch.Tensor) -> list[torch.Tensor]:
    """Each pixel of (n, c, h, w) images minus its neighbour to the left, above, and on the two diagonals."""
    return [pixels[..., :, 1:] - pixels[..., :, :-1],  # (n, c, h, w - 1)
            pixels[..., 1:, :] - pixels[..., :-1, :],  # (n, c, h - 1, w)
            pixels[..., 1:, 1:] - pixels[..., :-1, :-1],  # (n, c, h - 1, w - 1)
            pixels[..., 1:, :-1] - pixels[..., :-1, 1:]]  # (n, c, h - 1, w - 1)


def tv_l1(pixels: torch.Tensor) -> torch.Tensor:
    """Total variation, L1: mean absolute difference to the horizontal, vertical and diagonal neighbours."""
    return sum(d.abs().mean() for d in neighbour_differences(pixels))


def tv_l2(pixels: torch.Tensor) -> torch.Tensor:
    """Total variation, L2, of images (n, c, h, w), a scalar: the mean squared difference to the horizontal,
    vertical and diagonal neighbours (`neighbour_differences`), each direction averaged, then added."""
    return sum((d ** 2).mean() for d in neighbour_differences(pixels))


def l2_prior(pixels: torch.Tensor) -> torch.Tensor:
    """Mean squared distance from mid-gray."""
    return ((pixels - 0.5) ** 2).mean()


# ---------------------------------------------------------------------------------------------- inversion

@dataclass
class InversionResult:
    images: list[Image.Image]
    history: pd.DataFrame  # one row per step: every weighted term, the total and the learning rate
    target_probability: list[float]  # of the whole target answer, teacher-forced, on the final images
    config: InversionConfig


def _check_text(prompt, target_text, adapter) -> tuple[list[str], list[str]]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    targets = [target_text] if isinstance(target_text, str) else list(target_text)
    if len(prompts) == 1 and len(targets) > 1:
        prompts = prompts * len(targets)
    if len(prompts) != len(targets) or not targets:
        raise ValueError(f"got {len(prompts)} prompts for {len(targets)} target texts; give one prompt, or one "
                         "per target")
    image_token = adapter.processor.image_token
    for p in prompts:
        if not isinstance(p, str) or not p.strip() or image_token in p:
            raise ValueError(f"bad prompt {p!r}: give the question as plain text; the image placeholder "
                             f"({image_token}) is added by the chat template")
    for t in targets:
        if not isinstance(t, str) or not t.strip() or image_token in t:
            raise ValueError(f"bad target text {t!r}: give the answer the model should produce, as non-empty text")
    return prompts, targets


def teacher_forced_batch(adapter, prompts: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
    """Prompt + target answer per row (right-padded), with a mask of the answer tokens (the only loss)."""
    tok = adapter.tokenizer
    placeholder = Image.new("RGB", (adapter.image_size, adapter.image_size))
    sequences, masks = [], []
    for p, t in zip(prompts, targets):
        prompt_ids = adapter.processor(images=[placeholder], text=[adapter.prompt(p)],
                                       return_tensors="pt")["input_ids"][0]
        answer_ids = torch.tensor(tok(t.strip(), add_special_tokens=False)["input_ids"])
        sequences.append(torch.cat([prompt_ids, answer_ids]))
        masks.append(torch.arange(len(sequences[-1])) >= len(prompt_ids))
    return pad_right(sequences, tok.pad_token_id, masks)


def answer_cross_entropy(adapter, batch: dict, vision: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch,) summed cross-entropy of each row's answer tokens, given the image inputs `vision`."""
    losses, rows = answer_token_losses(adapter, batch, vision)
    return torch.zeros(len(batch["input_ids"]), device=losses.device).index_add_(0, rows, losses)


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def _shift(image: torch.Tensor, dy: int, dx: int, mode: str) -> torch.Tensor:
    if mode == "roll":
        return torch.roll(image, shifts=(dy, dx), dims=(1, 2))
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return image
    h, w = image.shape[-2:]
    padded = torch.nn.functional.pad(image[None], (pad, pad, pad, pad), mode="reflect")[0]
    return padded[:, pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def jittered(pixels: torch.Tensor, config: InversionConfig, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by its own random offset (and flipped with probability 1/2 when `config.flip`): no
    pixel-exact trick survives."""
    n = pixels.shape[0]
    shifts = torch.randint(-config.jitter, config.jitter + 1, (n, 2), generator=generator).tolist()
    flips = (torch.rand(n, generator=generator) < 0.5).tolist()
    views = []
    for image, (dy, dx), flip in zip(pixels, shifts, flips):
        view = _shift(image, dy, dx, config.jitter_mode)
        views.append(view.flip(2) if config.flip and flip else view)
    return torch.stack(views)


def initial_pixels(n: int, size: int, config: InversionConfig, generator: torch.Generator) -> torch.Tensor:
    """The starting images, (n, 3, size, size) in [0, 1]."""
    noise = torch.randn(n, 3, size, size, generator=generator)
    if config.init == "gray":
        return (0.5 + config.init_std * noise).clamp(0, 1)
    if config.init == "noise":  # the official code: torch.randn pixels, clipped to the valid range after a step
        return noise.clamp(0, 1)
    return torch.zeros(n, 3, size, size)


def _check_config(config: InversionConfig) -> None:
    if config.init not in INITS:
        raise ValueError(f"unknown init {config.init!r}; choose one of {', '.join(INITS)}")
    if config.jitter_mode not in JITTER_MODES:
        raise ValueError(f"unknown jitter_mode {config.jitter_mode!r}; choose one of {', '.join(JITTER_MODES)}")
    if config.jitter < 0 or config.steps < 1:
        raise ValueError(f"jitter must be >= 0 and steps >= 1 (got jitter={config.jitter}, steps={config.steps})")


def loss_terms(adapter, pixels: torch.Tensor, batch: dict, stats: dict | None, config: InversionConfig,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """MIMIC's weighted loss terms for one step; terms whose weight is 0 are not computed."""
    vision = adapter.pixel_inputs(jittered(pixels, config, generator))
    terms = {}
    if config.ce > 0:
        terms["ce"] = config.ce * answer_cross_entropy(adapter, batch, vision).mean()
    if config.feature > 0:
        terms["feature"] = config.feature * feature_loss(adapter.vision_states(vision), stats)
    if config.patch > 0:
        terms["patch"] = config.patch * patch_boundary_loss(pixels, adapter.patch_size)
    if config.tv_l1 > 0:
        terms["tv_l1"] = config.tv_l1 * tv_l1(pixels)
    if config.tv_l2 > 0:
        terms["tv_l2"] = config.tv_l2 * tv_l2(pixels)
    if config.l2 > 0:
        terms["l2"] = config.l2 * l2_prior(pixels)
    return terms


def inversion_step(adapter, pixels: torch.Tensor, optimizer, lr: float, batch: dict, stats: dict | None,
                   config: InversionConfig, generator: torch.Generator) -> dict[str, float]:
    """One step of MIMIC on `pixels` (n, 3, size, size), a leaf tensor in [0, 1] that `optimizer` updates: set the
    learning rate, compute the weighted loss on a jittered view (`loss_terms`), take one step on the pixels,
    and clamp them to [0, 1]. Returns the total and each weighted term, as numbers."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    terms = loss_terms(adapter, pixels, batch, stats, config, generator)  # name -> scalar tensor
    total = sum(terms.values())
    optimizer.zero_grad()  # gradients accumulate otherwise: the last step's would be added to this one's
    total.backward()  # d total / d pixels; the model's weights are frozen
    optimizer.step()
    with torch.no_grad():  # an in-place change of a leaf that requires grad must not be recorded
        pixels.clamp_(0, 1)
    return {"total": total.item(), **{k: v.item() for k, v in terms.items()}}


def invert(adapter, prompt, target_text, stats=None, config: InversionConfig | None = None) -> InversionResult:
    """Optimise images so that the frozen VLM answers `prompt` with `target_text` (str, or lists for a batch).

    `stats` are concept statistics (`concept_stats`), one dict or one per target; required when
    `config.feature > 0`. The model's weights are frozen for the run (no weight gradient is ever allocated)
    and their `requires_grad` flags restored afterwards.
    """
    config = config or InversionConfig()
    _check_config(config)
    model = adapter.model
    prompts, targets = _check_text(prompt, target_text, adapter)
    n = len(targets)
    if config.feature > 0:
        if stats is None:
            raise ValueError("feature alignment needs concept statistics: pass stats=concept_stats(adapter, colour, "
                             "shape), or set config.feature = 0")
        stats_list = [stats] * n if isinstance(stats, dict) else list(stats)
        stats = {k: torch.stack([s[k] for s in stats_list]) for k in ("mean", "var")}
    batch = {k: v.to(adapter.device) for k, v in teacher_forced_batch(adapter, prompts, targets).items()}
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    size = adapter.image_size
    pixels = initial_pixels(n, size, config, generator).to(adapter.device).requires_grad_(True)
    optimizer = torch.optim.Adam([pixels], lr=config.lr, betas=config.betas)
    history = []
    try:
        for step in tqdm(range(config.steps), desc="inverting", disable=not config.progress):
            lr = config.lr * _cosine(step, config.steps)
            terms = inversion_step(adapter, pixels, optimizer, lr, batch, stats, config, generator)
            history.append({"step": step, "lr": lr, **terms})
        with torch.no_grad():
            ce = answer_cross_entropy(adapter, batch, adapter.pixel_inputs(pixels))
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    arrays = (pixels.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return InversionResult([Image.fromarray(a) for a in arrays], pd.DataFrame(history),
                           torch.exp(-ce).tolist(), config)


# ---------------------------------------------------------------------------------------------- evaluation

def concept_target(color: str, shape: str) -> str:
    """The caption a one-object image of the concept gets in the shapes world."""
    return f"a {color} {shape}"


def _invert_and_judge(adapter, statistics_of, answers, prompt: str, config: InversionConfig, judge):
    """Invert one batch (feature alignment to the concepts `statistics_of`, the answers naming `answers`) and let
    the independent classifier name each image's colour and shape. Returns the result, targets, colours, shapes."""
    stats = None
    if config.feature > 0:  # once per concept, not per repeat: a lookup hashes the tower's weights, reads the cache
        unique = {concept: concept_stats(adapter, *concept) for concept in dict.fromkeys(statistics_of)}
        stats = [unique[concept] for concept in statistics_of]
    targets = [concept_target(c, s) for c, s in answers]
    result = invert(adapter, prompt, targets, stats, config)
    colors, kinds, _ = clf.predict(judge, clf.to_pixels(result.images))
    return result, targets, colors, kinds


def ablation_grid(adapter, concepts: list[tuple[str, str]], seeds=(0,), base: InversionConfig | None = None,
                  ablations: dict[str, dict] | None = None, classifier=None,
                  prompt: str = shapes.CAPTION_PROMPT, shard: str | None = None,
                  repeats: int = 1) -> tuple[pd.DataFrame, dict]:
    """Invert every concept `repeats` times under every ablation and seed; judge each image with the independent
    classifier, the target's probability under the VLM and the VLM's own re-caption. Returns the table and the
    images, keyed (ablation, seed, colour, shape, repeat).

    One (ablation, seed) setting is one batch of len(concepts) x repeats inversions, each from its own start
    and jitter. `shard="i/n"` runs every n-th setting (`core.shards`); concatenating the parts' tables in shard
    order and joining their images gives what one run gives, up to the order of the rows."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1 (got {repeats})")
    base = base or InversionConfig()
    ablations = ablations or ABLATIONS
    judge = classifier or clf.load()
    batch = [(concept, r) for r in range(repeats) for concept in concepts]
    batch_concepts = [concept for concept, _ in batch]
    rows, images = [], {}
    settings = [(name, seed) for name in ablations for seed in seeds]
    for name, seed in (settings[u] for u in shards.units(len(settings), shard)):
        config = replace(base, seed=seed, **ablations[name])
        result, targets, colors, kinds = _invert_and_judge(adapter, batch_concepts, batch_concepts, prompt,
                                                           config, judge)
        captions = adapter.generate(result.images, [prompt] * len(targets))
        for i, ((color, shape), r) in enumerate(batch):
            images[(name, seed, color, shape, r)] = result.images[i]
            rows.append({"ablation": name, "seed": seed, "repeat": r, "concept": f"{color} {shape}",
                         "classifier": f"{colors[i]} {kinds[i]}", "recognised": colors[i] == color and
                         kinds[i] == shape, "color_right": colors[i] == color, "shape_right": kinds[i] == shape,
                         "target_probability": result.target_probability[i], "recaption": captions[i],
                         "recaption_right": normalize_answer(captions[i]) == targets[i]})
    return pd.DataFrame(rows), images


def template_ablation(adapter, concepts: list[tuple[str, str]], templates=TEMPLATES,
                      base: InversionConfig | None = None, classifier=None,
                      repeats: int = 1) -> tuple[pd.DataFrame, dict]:
    """All terms under each prompt template: `ablation_grid`'s "all" row once per template, with a `template`
    column. Images keyed (template, colour, shape, repeat)."""
    tables, images = [], {}
    for template in templates:
        table, grid = ablation_grid(adapter, concepts, base=base, ablations={"all": ABLATIONS["all"]},
                                    classifier=classifier, prompt=template, repeats=repeats)
        tables.append(table.assign(template=template))
        images.update({(template, c, s, r): image for (_, _, c, s, r), image in grid.items()})
    return pd.concat(tables, ignore_index=True), images


def recipe_variants(adapter, concepts: list[tuple[str, str]], base: InversionConfig | None = None,
                    classifier=None, repeats: int = 1, templates=TEMPLATES[1:],
                    reference: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict]:
    """All terms, varied one thing at a time: each prompt template in `templates`, and the official code's start
    and jitter (`official_start`). A `variant` column names each; `reference` (e.g. the grid's "all" rows) joins
    the table as "this book's recipe". Images keyed (variant, colour, shape, repeat)."""
    base = base or InversionConfig()
    judge = classifier or clf.load()
    tables, images = [] if reference is None else [reference.assign(variant="this book's recipe")], {}
    by_template, template_images = template_ablation(adapter, concepts, templates, base, judge, repeats)
    tables.append(by_template.assign(variant="prompt: " + by_template.template))
    images.update({(f"prompt: {t}", c, s, r): image for (t, c, s, r), image in template_images.items()})
    official, official_images = ablation_grid(adapter, concepts, base=replace(base, **official_start(
        adapter.image_size)), ablations={"all": ABLATIONS["all"]}, classifier=judge, repeats=repeats)
    tables.append(official.assign(variant="official start and jitter"))
    images.update({("official start and jitter", c, s, r): image for (_, _, c, s, r), image in
                   official_images.items()})
    return pd.concat(tables, ignore_index=True), images


# What the judge is asked, per part of a concept ("red circle"): all of it, its colour, its shape.
PARTS = {"recognised": lambda concept: concept, "colour": lambda concept: concept.split()[0],
         "shape": lambda concept: concept.split()[-1]}


def judge_chance(table: pd.DataFrame, by: str = "ablation") -> pd.DataFrame:
    """The judge's chance rate, per group and target concept: how often it names the target (its colour, its
    shape) on the inversions of the same group aimed at concepts that differ there. The judge always names one of
    the world's 15 concepts, and on textures it prefers some; an image "recognised" no more often than this was
    not recognised. NaN where no inversion of the group aims elsewhere."""
    rows = []
    for name, group in table.groupby(by, sort=False):
        for concept in group.concept.unique():
            row = {by: name, "concept": concept}
            for part, of in PARTS.items():
                elsewhere = group.concept.map(of) != of(concept)
                said = group.classifier[elsewhere].map(of)
                row[f"{part}_chance"] = float((said == of(concept)).mean()) if elsewhere.any() else np.nan
            rows.append(row)
    return pd.DataFrame(rows, columns=[by, "concept", *(f"{p}_chance" for p in PARTS)])


def recognition_summary(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per group: the share of inversions the classifier recognises, with an exact 95% interval widened for the
    inversions of one concept being one cluster (`ci_low`, `ci_high`; `core.stats.clustered_share_ci`), and the
    judge's chance rate for the same targets (`chance`, `judge_chance`); the shares with the right colour and
    shape, each beside its chance rate; the VLM's mean probability of the target and its exact re-captions; n."""
    chance = table.merge(judge_chance(table, by), on=[by, "concept"], how="left")
    rows = {}
    for name, group in chance.groupby(by, sort=False):
        share, low, high = S.clustered_share_ci(group.recognised.to_numpy(float), group.concept.to_numpy())
        rows[name] = {"recognised": share, "ci_low": low, "ci_high": high, "chance": group.recognised_chance.mean(),
                      "colour_right": group.color_right.mean(), "colour_chance": group.colour_chance.mean(),
                      "shape_right": group.shape_right.mean(), "shape_chance": group.shape_chance.mean(),
                      "target_probability": group.target_probability.mean(),
                      "recaption_right": group.recaption_right.mean(), "n": len(group)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(by)


def judge_on_starts(judge, image_size: int, config: InversionConfig | None = None, n: int = 64,
                    seed: int = 0) -> pd.Series:
    """What the judge names on `n` starting images of the recipe (before any step): the share of each label. A
    judge that names one concept on these is that concept's chance hit."""
    config = config or InversionConfig()
    pixels = initial_pixels(n, image_size, config, torch.Generator().manual_seed(seed))  # (n, 3, size, size)
    pixels = torch.nn.functional.interpolate(pixels, size=clf.JUDGE_SIZE, mode="bilinear", antialias=True)
    colors, kinds, _ = clf.predict(judge, pixels)
    return pd.Series([f"{c} {k}" for c, k in zip(colors, kinds)]).value_counts(normalize=True)


def concept_names() -> list[str]:
    """The world's 15 concepts, "colour shape", colour by colour: the rows and columns of a confusion matrix."""
    return [f"{c} {k}" for c in shapes.COLORS for k in shapes.SHAPES]


def confusion(truth, said) -> pd.DataFrame:
    """A confusion matrix of concept names: per true (or aimed-at) concept, the share of images the judge named
    as each concept (rows sum to 1; a concept with no image is a row of NaN)."""
    names = concept_names()
    counts = pd.crosstab(pd.Categorical(list(truth), names), pd.Categorical(list(said), names), dropna=False)
    return counts.div(counts.sum(axis=1).replace(0, np.nan), axis=0).rename_axis(index="truth", columns="judge")


def judge_on_renders(judge, n: int = 300, seed: int = clf.HELD_OUT_SEED + 1) -> pd.DataFrame:
    """The judge's positive control: its `confusion` on `n` one-object renders of the world, never trained on
    (seeds past its held-out set). A judge that names renders right is one whose misses on inversions are the
    inversions', not its own."""
    scenes = clf.one_object_scenes(n, seed)
    colors, kinds, _ = clf.predict(judge, clf.to_pixels([s.image for s in scenes]))
    truth = [f"{s.objects[0].color} {s.objects[0].shape}" for s in scenes]
    return confusion(truth, [f"{c} {k}" for c, k in zip(colors, kinds)])


def paired_recipes(table: pd.DataFrame, first: str, second: str, column: str = "ablation",
                   outcome: str = "recognised") -> dict:
    """Recipe `first` against `second` on the inversions both ran from the same start (seed, concept, repeat): the
    difference of their recognised shares with a 95% interval that resamples whole concepts, and the verdict
    (`core.stats.paired_difference`). With few concepts that interval is wide, as it should be: a recipe's
    advantage on four concepts says little about a fifth."""
    if not {first, second} <= set(table[column]):
        raise ValueError(f"the table has no {column} {first!r} or {second!r}; it has {sorted(set(table[column]))}")
    wide = S.pairs(table, ["seed", "concept", "repeat"], column, outcome, first, second)
    return S.paired_difference(wide[first].to_numpy(float), wide[second].to_numpy(float),
                               clusters=wide.index.get_level_values("concept"))


def crossed_pairs(concepts: list[tuple[str, str]]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """(statistics' concept, answer's concept) pairs: each concept's statistics with the next concept's answer.

    Every pair must differ in colour *and* shape, so that the judge can say which of the two an image follows."""
    if len(concepts) < 2:
        raise ValueError("crossing statistics with answers needs at least two concepts")
    pairs = [(a, b) for a, b in zip(concepts, concepts[1:] + concepts[:1])]
    for (c1, s1), (c2, s2) in pairs:
        if c1 == c2 or s1 == s2:
            raise ValueError(f"{c1} {s1} and {c2} {s2} share a colour or a shape, so an image cannot say which it "
                             "follows: order the concepts so that neighbours differ in both")
    return pairs


def _follows(predicted: str, from_statistics: str, from_answer: str) -> str:
    return "statistics" if predicted == from_statistics else "answer" if predicted == from_answer else "neither"


def statistics_vs_answer(adapter, concepts: list[tuple[str, str]], config: InversionConfig | None = None,
                         classifier=None, prompt: str = shapes.CAPTION_PROMPT,
                         repeats: int = 1) -> tuple[pd.DataFrame, list]:
    """Feature alignment to one concept's statistics while the answer names another: does the image follow the
    statistics or the answer? One batch of inversions with all terms, each pair `repeats` times; the independent
    classifier says, for colour and shape apart, whose the image's are. Returns the table and the images."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1 (got {repeats})")
    pairs = crossed_pairs(concepts) * repeats
    result, _, colors, kinds = _invert_and_judge(adapter, [a for a, _ in pairs], [b for _, b in pairs], prompt,
                                                 config or InversionConfig(), classifier or clf.load())
    rows = [{"statistics_of": f"{sc} {ss}", "answer": f"{ac} {ash}", "classifier": f"{colors[i]} {kinds[i]}",
             "colour_from": _follows(colors[i], sc, ac), "shape_from": _follows(kinds[i], ss, ash),
             "target_probability": result.target_probability[i]}
            for i, ((sc, ss), (ac, ash)) in enumerate(pairs)]
    return pd.DataFrame(rows), result.images
