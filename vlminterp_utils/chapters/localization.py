"""Chapter 1's experiments (Neo et al. 2024): where object information lives and when the answer reads it.

Each function runs one experiment over a list of shapes-world items and returns plain numbers or a DataFrame; the
chapter shows them and the phenomenon tests assert on them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core import geometry, readout, shapes, shards, stats
from ..core.readout import first_answer_token, same_word
from . import interventions as I
from . import lenses

METHODS = ("object", "random", "high_norm", "high_gradient")
# The same controls drawn only from tokens whose patch does not show the target object: the plain controls may
# pick the object's own tokens (on a plain background its tokens are often the highest-norm, most-attributed ones).
OUTSIDE = "_outside"
CONTROLS_OUTSIDE = tuple(m + OUTSIDE for m in METHODS[1:])
METHODS_WITH_OUTSIDE = METHODS[:1] + tuple(x for m in METHODS[1:] for x in (m, m + OUTSIDE))  # twins side by side
SETTINGS = ("vqa", "polling", "generative")


@dataclass(frozen=True)
class AblationSpec:
    """One ablation experiment, described once: which questions, which token selections, how they are replaced.

    A chapter builds it from its parameters and hands it to `ablation_sweep`, `ablation_table` and
    `noise_filter_sweep`, which all make the same questions from it; `workshop.sweep` rebuilds it on every
    process of a sharded run. `outside_buffers`: the buffers at which the `..._outside` controls run (None: all
    of `buffers`; they cost as much as the plain ones)."""

    settings: tuple[str, ...] = SETTINGS
    methods: tuple[str, ...] = METHODS
    buffers: tuple[int, ...] = (0, 1, 2)
    modes: tuple[str, ...] = ("mean",)
    n: int = 64  # questions per setting
    seed: int = 0
    question_suffix: str = ""  # e.g. SHORT_ANSWER, LLaVA-1.5's short-answer prompt (see answer_style)
    answer_prefix: str = ""  # what the answer starts with, e.g. "It is a" (Neo et al.)
    batch_size: int = 16  # bounds memory: the high-gradient control backpropagates through the LLM
    ig_steps: int = 8  # Riemann steps of the integrated gradients the high-gradient control ranks tokens by
    outside_buffers: tuple[int, ...] | None = None

    def __post_init__(self):
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r}; known settings: {', '.join(SETTINGS)}")
        unknown = [m for m in self.methods if m not in METHODS_WITH_OUTSIDE]
        if unknown:
            raise ValueError(f"unknown token selection {unknown[0]!r}; known: {', '.join(METHODS_WITH_OUTSIDE)}")
        if self.n < 1 or self.batch_size < 1:
            raise ValueError(f"n and batch_size must be at least 1 (got n={self.n}, batch_size={self.batch_size})")

    def jobs(self) -> list[tuple]:
        """(method, buffer, mode) for every condition the spec asks for."""
        return [(m, b, mo) for b in self.buffers for mo in self.modes for m in self.methods
                if not (m.endswith(OUTSIDE) and self.outside_buffers is not None and b not in self.outside_buffers)]

    def items(self, setting: str, image_size: int) -> list["Item"]:
        """The questions of one setting, in the spec's answer style."""
        return make_items(setting, self.n, self.seed, image_size, self.question_suffix, self.answer_prefix)


@dataclass(frozen=True)
class KnockoutSpec:
    """One knockout experiment, described once: which questions, which edges are cut, in which layer windows.

    A chapter builds it from its parameters and hands it to `knockout_sweep` and `knockout_curve`;
    `workshop.sweep` rebuilds it on every process of a sharded run. `windows`: named layer lists (e.g.
    `interventions.depth_presets(n_layers)`), or None for sliding windows of `window` layers (fewer on a model
    with fewer layers). `knockouts`: the names of `knockout_blocks` to run (None: all)."""

    setting: str = "vqa"
    n: int = 64  # questions
    seed: int = 1  # the questions' seed (chapter 1 asks its knockout other questions than its ablation)
    window: int = 5
    windows: dict[str, list[int]] | None = None
    knockouts: tuple[str, ...] | None = None
    batch_size: int = 32
    question_suffix: str = ""
    answer_prefix: str = ""

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; known settings: {', '.join(SETTINGS)}")
        if min(self.n, self.batch_size, self.window) < 1:
            raise ValueError(f"n, batch_size and window must be at least 1 (got n={self.n}, "
                             f"batch_size={self.batch_size}, window={self.window})")

    def items(self, image_size: int) -> list["Item"]:
        """The questions, in the spec's answer style."""
        return make_items(self.setting, self.n, self.seed, image_size, self.question_suffix, self.answer_prefix)

    def layer_windows(self, n_layers: int) -> dict[str, list[int]]:
        """The named layer windows the knockouts run in, on a model of `n_layers` decoder layers."""
        return named_windows(self.windows or I.layer_windows(n_layers, min(self.window, n_layers)))


@dataclass
class Item:
    """A question about one target object of a scene, asked in a model's own answer style."""

    example: shapes.Example
    target: int  # index into example.scene.objects
    question_suffix: str = ""  # e.g. SHORT_ANSWER, LLaVA-1.5's short-answer prompt (see answer_style)
    answer_prefix: str = ""  # what the answer starts with, e.g. "It is a" (Neo et al.)

    @property
    def object(self) -> shapes.ShapeObject:
        return self.example.scene.objects[self.target]

    @property
    def question(self) -> str:
        return self.example.question + self.question_suffix


def batch_of(adapter, items: list[Item], prefixes: list[str] | None = None) -> dict:
    """The processor batch of some items: their images, questions and answer prefixes."""
    prefixes = prefixes if prefixes is not None else [it.answer_prefix for it in items]
    return adapter.inputs([it.example.scene.image for it in items], [it.question for it in items], prefixes)


def single_target(ex: shapes.Example) -> int:
    """The one object a VQA or positive polling question is about, as the example carries it."""
    if len(ex.targets) != 1:
        raise ValueError(f"question {ex.question!r} is about {len(ex.targets)} objects, not one; chapter 1 "
                         "ablates the tokens of one object per question (VQA, or polling whose answer is yes)")
    return ex.targets[0]


# The short-answer prompt of LLaVA-1.5's instruction data (Liu et al. 2023, "Improved Baselines with Visual
# Instruction Tuning", Table 7, "response format prompts"); evaluation suites ask Qwen-VL, SmolVLM and Gemma 3 for
# a one-word VQA answer with the same words.
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def answer_style(model_id: str, question_suffix: str | None = None, answer_prefix: str = "") -> dict:
    """How a chapter asks for the one word it scores: `question_suffix` as given, or by default none for the
    embedded models (trained to answer in one word) and `SHORT_ANSWER` for any other checkpoint."""
    from ..core.embedded import EMBEDDED_MODELS
    if question_suffix is None:
        question_suffix = "" if model_id in EMBEDDED_MODELS else SHORT_ANSWER
    return {"question_suffix": question_suffix, "answer_prefix": answer_prefix}


def make_items(setting: str, n: int, seed: int, image_size: int, question_suffix: str = "",
               answer_prefix: str = "") -> list[Item]:
    """`n` items for a setting: VQA (colour/shape questions), polling (present objects: 'yes'), generative.

    A real model answers in its own style ("The circle is red."): `question_suffix` and `answer_prefix` make it
    answer with the word the chapter scores (captions are generated whole, without them)."""
    items = _items(setting, n, seed, image_size)
    if setting != "generative":
        for it in items:
            it.question_suffix, it.answer_prefix = question_suffix, answer_prefix
    return items


def _items(setting: str, n: int, seed: int, image_size: int) -> list[Item]:
    if setting == "vqa":
        exs = shapes.make_examples(n, seed, ("vqa_color", "vqa_shape"), size=image_size)
    elif setting == "polling":
        exs = [shapes.example(seed, i, "polling", image_size, positive=True) for i in range(n)]
    elif setting == "generative":
        exs = shapes.make_examples(n, seed, "caption", size=image_size, n_objects=(1, 2))
        rng = np.random.default_rng(seed)  # a caption is about every object: pick one to ablate
        return [Item(e, e.targets[int(rng.integers(len(e.targets)))]) for e in exs]
    else:
        raise ValueError(f"unknown setting {setting!r}; known settings: {', '.join(SETTINGS)}")
    return [Item(e, single_target(e)) for e in exs]


def items_from_examples(examples: list[shapes.Example], question_suffix: str = "",
                        answer_prefix: str = "") -> list[Item]:
    """Items from ready-made examples that each name one target object, e.g. real photos
    (`core.photos.examples_from_dataset`)."""
    return [Item(e, single_target(e), question_suffix, answer_prefix) for e in examples]


def attribution_target(adapter, item: Item) -> tuple[str, int]:
    """(answer prefix, token) whose logit measures how much the answer depends on the target object.

    VQA and polling: the first answer token. Generative: the object's colour word at its place in the caption,
    after the caption's words before it (teacher-forced), since a caption's first token is just 'a'.
    """
    if item.example.qtype != "caption":
        return item.answer_prefix, first_answer_token(adapter, item.example.answer, item.answer_prefix)
    caption = item.example.answer
    start = caption.index(f"a {item.object.name}")
    colour_token = adapter.tokenizer(f"{caption[:start + 1]} {item.object.color}",
                                     add_special_tokens=False)["input_ids"][-1]
    return caption[:start + 1], colour_token


# ---------------------------------------------------------------------------------------------- ablation

def selection_scores(adapter, items: list[Item], batch: dict, method: str, baseline: torch.Tensor,
                     ig_steps: int = 8) -> torch.Tensor | None:
    """(batch, n_visual) scores a control ranks tokens by: norms (high-norm), |integrated gradients|
    (high-gradient); None for the object's tokens and random ones, which need no model. A control drawn outside
    the object ranks by the same scores."""
    method = method.removesuffix(OUTSIDE)
    if method in ("object", "random"):
        return None
    if method == "high_norm":
        return readout.visual_embeddings(adapter, batch).float().norm(dim=-1).cpu()
    if method == "high_gradient":
        prefixes, answers = zip(*(attribution_target(adapter, it) for it in items))
        target_batch = batch_of(adapter, items, list(prefixes))
        return I.integrated_gradients(adapter, target_batch, torch.tensor(answers), baseline, ig_steps).abs().cpu()
    raise ValueError(f"unknown token selection {method!r}; known: {', '.join(METHODS + CONTROLS_OUTSIDE)}")


def select_tokens(adapter, items: list[Item], batch: dict, method: str, buffer: int, rng: np.random.Generator,
                  baseline: torch.Tensor, ig_steps: int = 8, scores: torch.Tensor | None = None,
                  count: int | None = None) -> torch.Tensor:
    """(batch, n_visual) masks: the targets' tokens, or count-matched random / high-norm / high-gradient ones.

    A control named `..._outside` draws only from tokens that do not show the target object (its buffer-0
    tokens); where fewer such tokens exist than the selection needs, its row is all False (no count-matched
    control exists, and `ablation_records` leaves the item out of that condition).
    `scores` (from `selection_scores`) can be computed once and reused across buffers. With `count`, a control
    takes that many tokens whatever the object's size (the official code's fixed-count sweeps)."""
    if count is not None and method.removesuffix(OUTSIDE) == "object":
        raise ValueError("the object's tokens have the object's size; a fixed `count` applies to the controls only")
    if scores is None:
        scores = selection_scores(adapter, items, batch, method, baseline, ig_steps)
    objects = [I.object_tokens(adapter, it.example.scene, buffer, [it.target]) for it in items]
    patches = [adapter.patch_tokens(it.example.scene.image.size) for it in items]  # never a row-end token
    if method.endswith(OUTSIDE):
        touched = [I.object_tokens(adapter, it.example.scene, 0, [it.target]) for it in items]
        patches = [p & ~t for p, t in zip(patches, touched)]
    base = method.removesuffix(OUTSIDE)
    masks = []
    for i, (m, p) in enumerate(zip(objects, patches)):
        size = int(m.sum()) if count is None else count
        if base == "object":
            masks.append(m)
        elif size > p.sum():
            masks.append(np.zeros_like(m))
        elif base == "random":
            masks.append(I.random_tokens(len(m), size, rng, exclude=~p))
        else:
            masks.append(I.top_k_mask(scores[i].masked_fill(~torch.as_tensor(p), -torch.inf), size))
    return torch.as_tensor(np.stack(masks))


def overlap_with_object(adapter, items: list[Item], masks: torch.Tensor, buffer: int = 1) -> np.ndarray:
    """(batch,) share of each selection's tokens that lie in the target's buffer-`buffer` tokens (NaN if empty)."""
    objects = torch.as_tensor(np.stack([I.object_tokens(adapter, it.example.scene, buffer, [it.target])
                                        for it in items]))
    chosen = masks.sum(1).float()
    return ((masks & objects).sum(1).float() / chosen.where(chosen > 0, torch.tensor(float("nan")))).numpy()


def _correct(adapter, items: list[Item], batch: dict, setting: str) -> list[bool]:
    """VQA and polling: the first answer token (one forward pass). Generative: the caption names the object."""
    if setting == "generative":
        captions = adapter.model.generate(**batch, max_new_tokens=24, do_sample=False,
                                          pad_token_id=adapter.tokenizer.pad_token_id)
        texts = adapter.tokenizer.batch_decode(captions[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [it.object.name in t.lower() for it, t in zip(items, texts)]
    with torch.no_grad():
        predicted = readout.answer_logits(adapter, batch).argmax(-1).tolist()
    return [same_word(adapter, p, first_answer_token(adapter, it.example.answer, it.answer_prefix))
            for p, it in zip(predicted, items)]


def ablation_records(adapter, items: list[Item], setting: str, jobs: list[tuple], seed: int = 0,
                     batch_size: int = 16, mean_token: torch.Tensor | None = None,
                     shard: str | None = None, ig_steps: int = 8) -> pd.DataFrame:
    """Per item and (method, buffer, mode) job: is the answer right before, and after ablating?

    A job (method, buffer, mode, count) selects a fixed number of tokens instead of as many as the object's
    (`fixed_count` in the records; 0 means count-matched). The work the jobs share is done once per batch: the
    un-ablated answers, and the norms and attributions a control ranks tokens by (reused across buffers and
    counts). The random control draws from a generator seeded by (`seed`, batch), so a record depends neither on
    the other jobs nor on the shard (`core.shards`) that computes it."""
    mean_token = I.mean_visual_token(adapter) if mean_token is None else mean_token
    records = []
    for b, chunk in shards.batches(items, batch_size, shard):
        batch = batch_of(adapter, chunk)
        before = _correct(adapter, chunk, batch, setting)
        # Once per batch and ranking: a control and its twin outside the object share their scores.
        scores = {m: selection_scores(adapter, chunk, batch, m, mean_token, ig_steps)
                  for m in dict.fromkeys(j[0].removesuffix(OUTSIDE) for j in jobs)}
        for method, buffer, mode, *fixed in jobs:
            count = fixed[0] if fixed else None
            rng = np.random.default_rng([seed, b])
            masks = select_tokens(adapter, chunk, batch, method, buffer, rng, mean_token,
                                  scores=scores[method.removesuffix(OUTSIDE)], count=count)
            overlap = overlap_with_object(adapter, chunk, masks)
            with I.ablate(adapter, masks, mode, mean_token=mean_token):
                after = _correct(adapter, chunk, batch, setting)
            records += [{"setting": setting, "method": method, "buffer": buffer, "mode": mode,
                         "fixed_count": count or 0, "item": b * batch_size + j, "before": x, "after": y,
                         "overlap": o}
                        for j, (x, y, o, drawn) in enumerate(zip(before, after, overlap, masks.any(1).tolist()))
                        if drawn]  # no count-matched control outside the object: the item sits this one out
    return pd.DataFrame(records, columns=["setting", "method", "buffer", "mode", "fixed_count", "item", "before",
                                          "after", "overlap"])


def flip_table(records: pd.DataFrame, seed: int = 0, by=("setting", "method", "buffer", "mode")) -> pd.DataFrame:
    """Per (setting, method, buffer, mode), or the columns `by`: the flip rate among initially correct items, with
    its exact (Clopper-Pearson) 95% interval, and `overlap`, the mean share of the selected tokens in the target's
    buffer-1 tokens. `seed` is kept for callers; exact intervals draw nothing."""
    rows = []
    for key, part in records.groupby(list(by), sort=False):
        flip, lo, hi = stats.flip_ci(part.before.to_numpy(bool), part.after.to_numpy(bool))
        rows.append({**dict(zip(by, key)), "n": len(part), "initially_correct": int(part.before.sum()),
                     "flip_rate": flip, "ci_low": lo, "ci_high": hi, "overlap": part.overlap.mean()})
    # no records (e.g. no question kept by a filter): an empty table that still has its columns
    return pd.DataFrame(rows, columns=[*by, "n", "initially_correct", "flip_rate", "ci_low", "ci_high", "overlap"])


CONDITION = ("setting", "buffer", "mode", "fixed_count")  # what one common item set is shared within


def common_items(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The records of the items that every token selection of their (setting, buffer, mode, count) has, and per
    such condition how many items left every selection because one of them had no room (an `_outside` control
    for a large object): `(records, dropped)`. Compared flip rates then come from one common item set."""
    methods = records.groupby(list(CONDITION)).method.transform("nunique")
    per_item = records.groupby([*CONDITION, "item"]).method.transform("nunique")
    kept = records[per_item == methods]
    totals = records.groupby(list(CONDITION)).item.nunique()
    dropped = (totals - kept.groupby(list(CONDITION)).item.nunique().reindex(totals.index, fill_value=0))
    return kept, dropped.rename("dropped").reset_index()


pick = stats.pick  # a row of a paired table, by its columns (the chapter's page picks rows by name)


def paired_flips(records: pd.DataFrame, first: str = "object", margin: float | None = None) -> pd.DataFrame:
    """`first` against every other selection, paired on the items both were run on and answered right before:
    both flip rates, their difference with its paired bootstrap 95% interval, the exact McNemar p-value and the
    verdict (`core.stats.compare_binary`: higher, lower, equivalent within `margin`, or cannot tell)."""
    rows = []
    for key, part in records[records.before].groupby(list(CONDITION), sort=False):
        if first not in set(part.method):
            continue
        for control in [m for m in part.method.unique() if m != first]:
            both = stats.pairs(part, "item", "method", "after", first, control).astype(bool)
            a, b = ~both[first].to_numpy(), ~both[control].to_numpy()  # flipped: wrong after ablation
            test = stats.paired_difference(a, b, margin=margin)
            rows.append({**dict(zip(CONDITION, key)), "first": first, "control": control, "n": len(both),
                         "first_flips": a.mean() if len(a) else np.nan,
                         "control_flips": b.mean() if len(b) else np.nan,
                         **{k: test[k] for k in ("difference", "ci_low", "ci_high", "p_value", "verdict")}})
    return pd.DataFrame(rows, columns=[*CONDITION, "first", "control", "n", "first_flips", "control_flips",
                                       "difference", "ci_low", "ci_high", "p_value", "verdict"])


def object_sizes(adapter, spec: AblationSpec) -> pd.DataFrame:
    """Per setting and question of `spec`: how many visual tokens the target object touches (buffer 0) and the
    share of the image's patch tokens that is (`records.merge(sizes)` adds them to the sweep's records)."""
    rows = []
    for setting in spec.settings:
        for i, it in enumerate(spec.items(setting, adapter.image_size)):
            touched = int(I.object_tokens(adapter, it.example.scene, 0, [it.target]).sum())
            patches = int(adapter.patch_tokens(it.example.scene.image.size).sum())
            rows.append({"setting": setting, "item": i, "object_tokens": touched, "object_share": touched / patches})
    return pd.DataFrame(rows, columns=["setting", "item", "object_tokens", "object_share"])


def flips_by_size(records: pd.DataFrame, sizes: pd.DataFrame, bins: int = 3) -> pd.DataFrame:
    """Flip rates (exact intervals) per setting, selection, buffer and mode, split into `bins` groups of the
    object's size in tokens (equal-count bins over the questions; the `size` column names each by its range)."""
    sized = records.merge(sizes, on=["setting", "item"])
    edges = np.unique(np.quantile(sized.object_tokens, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:  # every object the same size: one group
        sized["size"] = f"{int(edges[0])} tokens"
    else:
        labels = [f"{int(a)}-{int(b)} tokens" for a, b in zip(edges[:-1], edges[1:])]
        sized["size"] = pd.cut(sized.object_tokens, edges, labels=labels, include_lowest=True).astype(str)
    table = flip_table(sized, by=("setting", "method", "buffer", "mode", "size"))
    smallest_first = table["size"].str.extract(r"^(\d+)")[0].astype(int)
    return table.iloc[np.argsort(smallest_first.to_numpy(), kind="stable")].reset_index(drop=True)


def fixed_count_sweep(adapter, items: list[Item], setting: str, counts, methods=("random", "high_gradient"),
                      seed: int = 0, batch_size: int = 16, mean_token: torch.Tensor | None = None,
                      mode: str = "mean", ig_steps: int = 8) -> pd.DataFrame:
    """The official code's sweep: flip rates of ablating a fixed number of tokens, chosen at random or by
    attribution, over a range of counts; the object's own tokens (count-matched) as a reference row per item set.

    Attributions are computed once per batch and reused for every count."""
    jobs = [("object", 1, mode)] + [(m, 1, mode, c) for m in methods for c in counts]
    records = ablation_records(adapter, items, setting, jobs, seed, batch_size, mean_token, ig_steps=ig_steps)
    return flip_table(records, seed, by=("setting", "method", "fixed_count"))


def ablation_flips(adapter, items: list[Item], setting: str, method: str, buffer: int = 1, mode: str = "mean",
                   seed: int = 0, batch_size: int = 16, mean_token: torch.Tensor | None = None) -> dict:
    """Correct before and after ablating the selected tokens, with the flip rate and its exact 95% interval."""
    records = ablation_records(adapter, items, setting, [(method, buffer, mode)], seed, batch_size, mean_token)
    if not records.before.any():
        warnings.warn(unanswered_note(setting, len(items)), stacklevel=2)
    return flip_table(records, seed).iloc[0].to_dict()


def unanswered_note(setting: str, n: int) -> str:
    return (f"no {setting} question of {n} was answered correctly before the intervention, so no flip can be "
            "measured (NaN). Look at a few answers with adapter.generate(...): a real model may answer in "
            "sentences. Set question_suffix (e.g. ' Answer with one word.') or answer_prefix (e.g. 'It is'), or use "
            "more items.")


def explain_unanswered(table: pd.DataFrame) -> str:
    """A plain sentence for every setting whose rows are NaN because nothing was answered right to begin with."""
    empty = table[table.initially_correct == 0]
    return "\n".join(unanswered_note(s, int(g.n.iloc[0])) for s, g in empty.groupby("setting", sort=False))


def ablation_sweep(adapter, spec: AblationSpec, shard: str | None = None) -> pd.DataFrame:
    """The per-item records behind `ablation_table`, for every setting of `spec`; `shard="i/n"` computes one part
    of them (`core.shards`)."""
    mean_token = I.mean_visual_token(adapter)
    parts = []
    for setting in tqdm(spec.settings, desc="ablations"):
        parts.append(ablation_records(adapter, spec.items(setting, adapter.image_size), setting, spec.jobs(),
                                      spec.seed, spec.batch_size, mean_token, shard, spec.ig_steps))
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------------------------------------- noise filter

def noised_object(adapter, item: Item, rng: np.random.Generator) -> Image.Image:
    """The item's image with every patch that shows the target object (buffer 0) filled with uniform noise, as the
    official code's filter does (`replace_image_regions_with_patches`), through the model's own patch boxes."""
    image = item.example.scene.image.convert("RGB")
    regions = adapter.token_regions(image.size)
    pixels = np.array(image)
    h, w = pixels.shape[:2]
    for x0, y0, x1, y1 in regions[adapter.object_tokens(item.object.mask, 0)]:
        # the pixels whose centres lie in the box, as `geometry.tokens_touching` counts them
        xs, ys = slice(*geometry.pixel_edge([x0, x1], w)), slice(*geometry.pixel_edge([y0, y1], h))
        pixels[ys, xs] = rng.integers(0, 256, pixels[ys, xs].shape)
    return Image.fromarray(pixels)


def noise_filter(adapter, items: list[Item], setting: str, seed: int = 0, batch_size: int = 16) -> pd.DataFrame:
    """Neo et al.'s filter, per item: answered right on the image (`clean`) and on the image with the object's
    patches noised (`noised`); `kept` when the first holds and the second does not, so that the answer is known
    to need the object's pixels rather than the question's priors or the rest of the scene."""
    rows = []
    for b, chunk in shards.batches(items, batch_size):
        rng = np.random.default_rng([seed, b])
        noised = [noised_object(adapter, it, rng) for it in chunk]
        clean = _correct(adapter, chunk, batch_of(adapter, chunk), setting)
        broken = adapter.inputs(noised, [it.question for it in chunk], [it.answer_prefix for it in chunk])
        after = _correct(adapter, chunk, broken, setting)
        rows += [{"setting": setting, "item": b * batch_size + j, "clean": x, "noised": y, "kept": x and not y}
                 for j, (x, y) in enumerate(zip(clean, after))]
    return pd.DataFrame(rows, columns=["setting", "item", "clean", "noised", "kept"])


def noise_filter_sweep(adapter, spec: AblationSpec) -> pd.DataFrame:
    """`noise_filter` on the questions `ablation_sweep` makes from the same `spec`, so that its `kept` rows select
    records of the sweep: `records.merge(kept[kept.kept][["setting", "item"]])`."""
    return pd.concat([noise_filter(adapter, spec.items(s, adapter.image_size), s, spec.seed, spec.batch_size)
                      for s in tqdm(spec.settings, desc="noise filter")], ignore_index=True)


def ablation_table(adapter, spec: AblationSpec) -> pd.DataFrame:
    """Flip rates with exact 95% intervals for every setting, token selection, buffer and ablation mode of `spec`,
    on one common set of questions per condition (`common_items`)."""
    records, _ = common_items(ablation_sweep(adapter, spec))
    table = flip_table(records, spec.seed)
    if note := explain_unanswered(table):
        warnings.warn(note, stacklevel=2)
    return table


# ---------------------------------------------------------------------------------------------- knockout

def knockout_blocks(adapter, items: list[Item], batch: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """The edges of Neo et al.'s knockouts, as (batch, seq, seq) block matrices: the answer position from the
    object's tokens and, as its control, from every other visual token; the image's last row from the object's
    tokens and, as its controls, from every other visual token, and from as many random visual tokens as the
    object has (count-matched; neither side the object's, nor the row itself; seeded by `seed`)."""
    rng = np.random.default_rng(seed)
    ids = batch["input_ids"]
    seq = ids.shape[1]
    obj = I.on_sequence(adapter, ids, np.stack([I.object_tokens(adapter, it.example.scene, 1, [it.target])
                                                for it in items]))
    last_row = I.on_sequence(adapter, ids, np.stack([geometry.bottom_row(adapter.token_regions(
        it.example.scene.image.size)) for it in items]))
    visual = ids == adapter.image_token_id
    others = visual & ~obj & ~last_row
    matched = torch.zeros_like(obj)
    for b in range(len(items)):  # as many random others as the object has tokens (fewer if fewer exist)
        pool = others[b].nonzero().flatten().cpu().numpy()
        matched[b, rng.choice(pool, size=min(int(obj[b].sum()), len(pool)), replace=False)] = True
    last = torch.zeros_like(obj)
    last[:, -1] = True
    return {"object → last": I.block_matrix(seq, last, obj),
            "non-object → last": I.block_matrix(seq, last, visual & ~obj),
            "object → last row": I.block_matrix(seq, last_row & ~obj, obj),
            "random → last row": I.block_matrix(seq, last_row & ~obj, matched),
            "other visual → last row": I.block_matrix(seq, last_row & ~obj, others)}


def answer_probability(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Probability of each item's answer token under its answer logits (batch, vocab)."""
    probs = logits.float().softmax(-1)
    return probs[torch.arange(len(answers), device=probs.device), answers.to(probs.device)]


def models_own_answer(adapter, logits: torch.Tensor, items: list[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item, the answer token to follow: the model's own top token where it says the answer (" Red" for
    "red"), the canonical one elsewhere; and whether the model is right. `logits`: the clean answer logits."""
    top = logits.argmax(-1)
    canonical = [first_answer_token(adapter, it.example.answer, it.answer_prefix) for it in items]
    right = torch.tensor([same_word(adapter, int(t), c) for t, c in zip(top, canonical)], device=top.device)
    return torch.where(right, top, torch.tensor(canonical, device=top.device)), right


def named_windows(windows) -> dict[str, list[int]]:
    """Layer windows by name: a dict is kept (e.g. `interventions.depth_presets`), a list is named "first-last"."""
    if isinstance(windows, dict):
        return {str(name): list(w) for name, w in windows.items()}
    return {f"{w[0]}-{w[-1]}": list(w) for w in windows}


def knockout_records(adapter, items: list[Item], window: int = 5, batch_size: int = 32,
                     windows: list[list[int]] | dict[str, list[int]] | None = None,
                     shard: str | None = None, knockouts: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Per knockout, layer window and item: the relative drop of the answer's probability, and whether the model
    answered the item right without intervention. `windows` is a list of layer lists or a dict of named ones
    (default: sliding windows of `window` layers). `shard="i/n"` computes every n-th batch (`core.shards`);
    `knockouts` names the ones to run (default: all of `knockout_blocks`)."""
    windows = named_windows(windows or I.layer_windows(adapter.n_layers, window))
    records = []
    for b, chunk in shards.batches(items, batch_size, shard):
        batch = batch_of(adapter, chunk)
        clean = I.CleanRun(adapter, batch)
        answers, correct = models_own_answer(adapter, clean.logits, chunk)
        base = answer_probability(clean.logits, answers)
        blocks = knockout_blocks(adapter, chunk, batch, seed=b)  # the random control seeded per batch (shards)
        for name, block in chosen_knockouts(blocks, knockouts).items():
            for label, w in tqdm(windows.items(), desc=f"knockout {name}", leave=False):
                drop = (base - answer_probability(clean.answer_logits(block, w), answers)) / base
                records += [{"knockout": name, "window": label, "first_layer": w[0], "item": b * batch_size + j,
                             "drop": float(d), "correct": bool(c)} for j, (d, c) in enumerate(zip(drop, correct))]
        del clean  # its keys, values and layer outputs are the largest thing this loop holds
    return pd.DataFrame(records, columns=["knockout", "window", "first_layer", "item", "drop", "correct"])


def chosen_knockouts(blocks: dict, names: tuple[str, ...] | None) -> dict:
    if names is None:
        return blocks
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise ValueError(f"unknown knockout {unknown[0]!r}; choose among {', '.join(blocks)}")
    return {n: blocks[n] for n in names}


def knockout_summary(records: pd.DataFrame) -> pd.DataFrame:
    """Per knockout and window: the mean drop over the items answered right, with a 95% CI."""
    rows = []
    for (name, window), part in records.groupby(["knockout", "window"], sort=False):
        d = part[part.correct].sort_values("item")["drop"].to_numpy()
        mean, lo, hi = stats.mean_interval(d)
        rows.append({"knockout": name, "window": window, "first_layer": part.first_layer.iloc[0], "n": len(d),
                     "drop": mean, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def paired_knockouts(records: pd.DataFrame, first: str, second: str, margin: float | None = None) -> pd.DataFrame:
    """Per window: the mean drop of knockout `first` minus that of `second`, on the items answered right that both
    ran on, with its paired bootstrap 95% interval and verdict (`core.stats.paired_difference`)."""
    rows = []
    for window, part in records[records.correct].groupby("window", sort=False):
        if not {first, second} <= set(part.knockout):
            continue
        both = stats.pairs(part, "item", "knockout", "drop", first, second)
        test = stats.paired_difference(both[first].to_numpy(), both[second].to_numpy(), margin=margin)
        rows.append({"window": window, "first": first, "second": second, **stats.paired_row(test)})
    return pd.DataFrame(rows, columns=["window", "first", "second", *stats.PAIRED_FIELDS])


def paired_windows(records: pd.DataFrame, knockout: str, first: str, second: str) -> dict:
    """Knockout `knockout` in window `first` against the same knockout in window `second`: the mean difference of
    the drops on the items answered right that both ran on, with its paired bootstrap 95% interval and verdict."""
    windows = set(records.window[records.knockout == knockout])
    if not {first, second} <= windows:
        raise ValueError(f"no window {first!r} or {second!r} for {knockout!r}; windows: {sorted(windows)}")
    part = records[records.correct & (records.knockout == knockout)]
    both = stats.pairs(part, "item", "window", "drop", first, second)  # empty when nothing was answered right
    return stats.paired_difference(both[first].to_numpy(), both[second].to_numpy())


def knockout_sweep(adapter, spec: KnockoutSpec, shard: str | None = None) -> pd.DataFrame:
    """`knockout_records` of the experiment `spec` describes: its questions, knockouts and layer windows."""
    return knockout_records(adapter, spec.items(adapter.image_size), batch_size=spec.batch_size,
                            windows=spec.layer_windows(adapter.n_layers), shard=shard, knockouts=spec.knockouts)


def knockout_curve(adapter, spec: KnockoutSpec) -> pd.DataFrame:
    """Per layer window and knockout: the mean relative drop of the answer's probability, with a 95% CI.

    Only items the model answers correctly without intervention count, as in Neo et al. Each knockout re-runs
    only the positions and layers it changes (`interventions.CleanRun`). Named windows (e.g.
    `interventions.depth_presets(n_layers)`, the official presets) keep their names in the `window` column.
    """
    records = knockout_sweep(adapter, spec)
    if not records.correct.any():
        warnings.warn(unanswered_note("knockout", spec.n), stacklevel=2)
    return knockout_summary(records)


def knockout_peak(curve: pd.DataFrame, n_layers: int, window: int, knockout: str = "object → last") -> dict:
    """Where a knockout curve peaks: the window start with the largest drop, that drop, the span of window starts
    with at least half of it, and the peak window's centre as a share of the depth (NaN and -1 without data)."""
    part = curve[curve.knockout == knockout].dropna(subset=["drop"])
    if part.empty:
        return {"peak_layer": -1, "peak_drop": float("nan"), "strong_from": -1, "strong_to": -1,
                "peak_depth": float("nan")}
    peak = part.loc[part["drop"].idxmax()]
    strong = part[part["drop"] >= peak["drop"] / 2].first_layer
    return {"peak_layer": int(peak.first_layer), "peak_drop": float(peak["drop"]),
            "strong_from": int(strong.min()), "strong_to": int(strong.max()),
            "peak_depth": (peak.first_layer + window / 2) / n_layers}


# ---------------------------------------------------------------------------------------------- logit lens

def lens_hits(adapter, lens, examples: list[shapes.Example], k: int = 5) -> pd.DataFrame:
    """Per layer and patch: does the lens's top-k name the patch's object (object patches), or some object of the
    scene (background patches, outside a 1-cell buffer around every object: a false-alarm rate)? A 0/1 `hit`."""
    readings = lenses.patch_readings(adapter, lens, examples, k)
    return lenses.judge_readings(readings, examples, judge=lenses.names_scene_judge)


def lens_shares(adapter, lens, examples: list[shapes.Example], k: int = 5) -> pd.DataFrame:
    """Per layer and patch kind: the share of `lens_hits`, with its interval clustered by image."""
    return lenses.share_table(lens_hits(adapter, lens, examples, k), by=("layer", "kind"))


def later_vs_earlier(hits: pd.DataFrame, kind: str = "object", part: float = 1 / 3) -> dict:
    """Does a lens read more in later layers? Per patch of `kind`, its hit rate over the last `part` of the layers
    minus over the first `part`, paired on the same patches, with an interval that resamples whole images
    (`core.stats.paired_difference`)."""
    layers = np.sort(hits.layer.unique())
    n = max(1, int(round(len(layers) * part)))
    objects = hits[hits.kind == kind]
    rate = {name: objects[objects.layer.isin(chosen)].groupby(["example", "patch"]).hit.mean()
            for name, chosen in (("late", layers[-n:]), ("early", layers[:n]))}
    both = pd.concat(rate, axis=1).dropna()
    return stats.paired_difference(both.late.to_numpy(), both.early.to_numpy(),
                                   clusters=both.index.get_level_values("example"))


def word_token_ids(tokenizer, word: str) -> list[int]:
    """Ids of the single-token spellings of a word (' red', 'red', ' Red', 'Red'), whichever the vocabulary has."""
    ids = []
    for variant in (f" {word}", word, f" {word.capitalize()}", word.capitalize()):
        encoded = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


@torch.no_grad()
def lens_views(adapter, example: shapes.Example, word: str, lens=None) -> tuple[np.ndarray, list[list[str]]]:
    """For one image: per layer, each visual token's logit-lens probability of `word` (layers + 1, n_visual),
    and each token's top-1 word per layer (for the explorer and the HTML viewer)."""
    lens = lens or lenses.LogitLens(adapter)
    states = readout.visual_hidden_states(adapter, [example])[:, 0]
    ids = word_token_ids(adapter.tokenizer, word)
    maps, tops = [], []
    for h in states:
        probs = lens.scores(h)
        maps.append(probs[:, ids].sum(-1).cpu().numpy())
        tops.append([lens.word(i) for i in probs.argmax(-1).tolist()])
    return np.stack(maps), tops
