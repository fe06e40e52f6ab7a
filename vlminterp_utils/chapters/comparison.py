"""Models side by side: does tuning the LLM make visual tokens readable?

Chapter 1 finds the logit lens a poor reader of shapes-llava's visual tokens, whose LLM is frozen; LLaVA-1.5 tunes
its LLM. The comparison page runs the same measurements on each embedded model (or any `load_vlm` name): the three
lenses against their chance controls, per layer; chapter 1's ablation and knockout headlines; and, for a model
tuned by LoRA, how far the updates moved the LLM's weights.
"""
from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core import models, shapes, stats
from . import latentlens as LL
from . import lenses
from . import localization as L

KNOCKOUTS = ("object → last", "non-object → last")  # the answer position cut from the object, and its control
LENS_KEYS = {"logit": lenses.LogitLens.name, "embedding": lenses.EmbeddingLens.name, "latent": LL.LatentLens.name}
HEADLINE_KEYS = {"ablation: object": "abl_object", "ablation: random_outside": "abl_outside",
                 "knockout: object → last": "ko_object", "knockout: non-object → last": "ko_non"}


def lens_list(adapter, index: LL.ContextualIndex) -> list:
    """The three lenses of chapter 2, named alike for every model so that their rows line up."""
    return [lenses.EmbeddingLens(adapter), lenses.LogitLens(adapter), LL.LatentLens(index)]


# "Tuning did not make the lens a reader" is claimed only within this margin: a lens that reads 5 more object patches
# in 100 on the tuned model than on the base one is still no reader of them (chapter 2's LatentLens reads several
# times that above chance), and a tighter margin needs more scenes than a CPU run of the page affords.
MARGIN = 0.05


@dataclass(frozen=True)
class ModelComparison:
    """What `compare_models` measured, every table with a `model` column.

    above: per lens, layer and patch kind, the share read right against its strongest chance control
      (`lenses.above_chance`);
    hits: per lens, layer, image and patch, whether the lens read it right (the unit the models are paired on);
    headlines: chapter 1's headline measures with 95% intervals (`headline_summary`);
    headline_items: the per-item outcomes behind them (`headline_records`)."""

    above: pd.DataFrame
    hits: pd.DataFrame
    headlines: pd.DataFrame
    headline_items: pd.DataFrame


def read_lenses(adapter, index: LL.ContextualIndex, examples: list[shapes.Example], k: int = 5,
                seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`(above, hits)`: per lens, layer and patch kind the share of patches read right, its strongest chance
    control and the difference with a 95% interval over images (`lenses.above_chance`); and the lens's own
    per-patch hits, the unit on which two models reading the same scenes are paired."""
    judged = lenses.compare_with_chance(adapter, lens_list(adapter, index), examples, k=k, seed=seed)
    hits = judged[judged.reading == lenses.LENS][["lens", "layer", "kind", "example", "patch", "hit"]]
    return lenses.above_chance(judged, seed=seed), hits.reset_index(drop=True)


def headline_records(adapter, n_items: int, seed: int = 0, batch_size: int = 16, **style) -> pd.DataFrame:
    """Chapter 1's headline measures, per item: on VQA (buffer 1), whether mean-ablating the object's tokens, or as
    many random tokens outside it, flips an answer that was right (`value` 1 or 0); and the relative drop of the
    answer's probability when the answer position cannot attend to the object's tokens, or to all other visual
    tokens, in every layer (on the items answered right). Items are numbered alike on every model."""
    spec = L.AblationSpec(settings=("vqa",), methods=("object", "random_outside"), buffers=(1,), n=n_items,
                          seed=seed, batch_size=batch_size, **style)
    records = L.ablation_sweep(adapter, spec)
    records, _ = L.common_items(records)
    right = records[records.before]
    if right.empty:  # a model that answers nothing right has no flip to measure: say why the rows are NaN
        warnings.warn(L.unanswered_note("vqa", n_items), stacklevel=2)
    rows = [right.assign(measure="ablation: " + right.method, value=(~right.after).astype(float))]
    knockout = L.KnockoutSpec(n=n_items, seed=seed + 1, windows={"all": list(range(adapter.n_layers))},
                              knockouts=KNOCKOUTS, **style)
    drops = L.knockout_sweep(adapter, knockout)
    drops = drops[drops.correct]
    rows.append(drops.assign(measure="knockout: " + drops.knockout, value=drops["drop"]))
    return pd.concat([r[["measure", "item", "value"]] for r in rows], ignore_index=True)


def headline_summary(records: pd.DataFrame) -> pd.DataFrame:
    """Per measure (and model, if the records have one): the flip rate with its exact interval, or the mean drop
    with its t interval, and the number of items."""
    by = [c for c in ("model", "measure") if c in records]
    rows = []
    for key, part in records.groupby(by, sort=False):
        values = part.value.to_numpy()
        if part.measure.iloc[0].startswith("ablation"):
            value, low, high = stats.share_ci(values.astype(bool))
        else:
            value, low, high = stats.mean_interval(values)
        rows.append({**dict(zip(by, key)), "value": value, "ci_low": low, "ci_high": high, "n": len(values)})
    return pd.DataFrame(rows, columns=[*by, "value", "ci_low", "ci_high", "n"])


def compare_models(model_ids, n_images: int = 32, n_items: int = 24, corpus: str = "neutral",
                   corpus_limit: int | None = None, cap: int = 20, k: int = 5, seed: int = 0, device=None,
                   **style) -> ModelComparison:
    """`read_lenses` and `headline_records` for each model, on the same scenes and questions, one model in memory
    at a time. Each model reads through its own LatentLens index (built once, then cached), since the contextual
    embeddings are the LLM's own and a tuned LLM has different ones."""
    repeated = sorted({m for m in model_ids if list(model_ids).count(m) > 1})
    if repeated:
        raise ValueError(f"{', '.join(repeated)} appears more than once among the models to compare; a model "
                         "paired with itself has nothing to compare: list each model once (compared_with must not "
                         "repeat model_id)")
    sentences = LL.load_corpus(corpus, limit=corpus_limit)
    above, hits, items = [], [], []
    for model_id in tqdm(model_ids, desc="models"):
        model, _, adapter = models.load_vlm(model_id, device=device)
        examples = shapes.make_examples(n_images, seed, "caption", size=adapter.image_size)
        index = LL.cached_index(adapter, sentences, cap=cap, seed=seed)
        lens_above, lens_hits = read_lenses(adapter, index, examples, k, seed)
        above.append(lens_above.assign(model=model_id))
        hits.append(lens_hits.assign(model=model_id))
        items.append(headline_records(adapter, n_items, seed, **style).assign(model=model_id))
        del model, adapter, index
        gc.collect()  # two LLMs' weights and indexes at once would double the peak memory for nothing
    items = pd.concat(items, ignore_index=True)
    # every model and measure gets a row: NaN with n = 0 where a model answered nothing right (a random model)
    every = pd.MultiIndex.from_product([list(model_ids), list(HEADLINE_KEYS)], names=["model", "measure"])
    summary = headline_summary(items).set_index(["model", "measure"]).reindex(every)
    summary = summary.fillna({"n": 0}).astype({"n": int}).reset_index()
    return ModelComparison(pd.concat(above, ignore_index=True), pd.concat(hits, ignore_index=True), summary, items)


@torch.no_grad()
def lora_update_sizes(model, lora_file: Path) -> pd.DataFrame:
    """How far LoRA moved each tuned weight of `model` (the model *before* merging): the Frobenius norm of the
    update `alpha / rank * B @ A` over that of the weight, per LLM layer and linear module."""
    rows = []
    for name, update in models.lora_updates(lora_file):
        weight = model.get_submodule(name).weight.float()
        layer = next((int(part) for part in name.split(".") if part.isdigit()), -1)
        rows.append({"layer": layer, "module": name.rsplit(".", 1)[-1],
                     "relative_update": float(update.norm() / weight.norm())})
    if not rows:
        raise ValueError(f"{lora_file} holds no LoRA update (no '.lora_A' keys): is it a lora.safetensors?")
    return pd.DataFrame(rows).sort_values(["layer", "module"], ignore_index=True)


def lora_rank(model_id: str) -> int | None:
    """The LoRA rank of an embedded model's LLM (0: frozen), or None for any other model (rank unknown)."""
    return models.embedded_lora_rank(model_id) if model_id in models.EMBEDDED_DIRS else None


def lora_file(model_id: str) -> Path | None:
    """The LoRA updates an embedded model ships (one trained with LoRA, `lora_rank` > 0), or None (any other)."""
    if model_id not in models.EMBEDDED_DIRS:
        return None
    path = models.shapes_llava_dir(model_id) / models.LORA_FILE
    return path if path.exists() else None


def lora_sizes(model_ids) -> pd.DataFrame:
    """`lora_update_sizes` of every model in `model_ids` that ships LoRA updates, with a `model` column (no rows
    when none does). The updates were trained on SmolLM2 as shapes-llava holds it, so that is the base."""
    files = {m: f for m in model_ids if (f := lora_file(m)) is not None}
    if not files:
        return pd.DataFrame(columns=["layer", "module", "relative_update", "model"])
    base, _, _ = models.load_vlm("shapes-llava", device="cpu")
    return pd.concat([lora_update_sizes(base, f).assign(model=m) for m, f in files.items()], ignore_index=True)


def side_by_side(above: pd.DataFrame, kind: str = "object") -> pd.DataFrame:
    """Per model and lens, on `kind` patches: the mean share, chance and above-chance over layers, how many layers
    have their interval above 0, and the best layer's above-chance share."""
    part = above[above.kind == kind]
    summary = part.groupby(["model", "lens"], sort=False).agg(
        share=("share", "mean"), chance=("chance", "mean"), above=("above", "mean"),
        layers_above=("ci_low", lambda low: int((low > 0).sum())), layers=("layer", "nunique"))
    best = part.loc[part.groupby(["model", "lens"], sort=False).above.idxmax()].set_index(["model", "lens"])
    return summary.assign(best_layer=best.layer, best_above=best.above).reset_index()


def paired_lens_difference(hits: pd.DataFrame, lens: str, first: str, second: str, kind: str = "object",
                           margin: float = MARGIN) -> pd.DataFrame:
    """Per layer: the share of `kind` patches `lens` reads right on model `second` minus on model `first`, paired on
    the same patches of the same scenes, with a 95% interval that resamples whole scenes, and its verdict
    (`core.stats.compare`: higher, lower, equivalent within `margin`, or cannot tell)."""
    part = hits[(hits.lens == lens) & (hits.kind == kind)]
    both = stats.pairs(part, ["layer", "example", "patch"], "model", "hit", first, second)
    rows = []
    for layer, pairs in both.groupby(level="layer"):  # none for a lens only one model was read with
        test = stats.paired_difference(pairs[second].to_numpy(float), pairs[first].to_numpy(float),
                                       clusters=pairs.index.get_level_values("example"), margin=margin)
        rows.append({"layer": layer, **stats.paired_row(test)})
    return pd.DataFrame(rows, columns=["layer", *stats.PAIRED_FIELDS])


def dose_response(hits: pd.DataFrame, lens: str, base: str, model_ids, kind: str = "object",
                  margin: float = MARGIN) -> pd.DataFrame:
    """Per model of `model_ids` (each against `base`, the frozen-LLM twin): the share of `kind` patches `lens` reads
    right, averaged over layers, minus the same on `base`, paired patch by patch, with a 95% interval that
    resamples whole scenes and its verdict against `margin`; with the model's LoRA rank (`lora_rank`), the dose."""
    rows = []
    part = hits[(hits.lens == lens) & (hits.kind == kind)]
    for model in [m for m in model_ids if m != base]:
        both = stats.pairs(part, ["layer", "example", "patch"], "model", "hit", base, model)
        if both.empty:  # a lens only one of the two models was read with
            continue
        per_patch = both.groupby(level=["example", "patch"]).mean()  # (patches, 2): share of layers read right
        test = stats.paired_difference(per_patch[model].to_numpy(), per_patch[base].to_numpy(),
                                       clusters=per_patch.index.get_level_values("example"), margin=margin)
        rows.append({"model": model, "rank": lora_rank(model), "lens": lens, **stats.paired_row(test)})
    columns = ["model", "rank", "lens", *stats.PAIRED_FIELDS]
    return pd.DataFrame(rows, columns=columns).sort_values("rank", ignore_index=True, na_position="last")


def dose_verdict(doses: pd.DataFrame) -> str:
    """One phrase for a dose-response table: within the margin at every rank, clearly higher at some ranks (named),
    or cannot tell (some rank neither higher nor within the margin)."""
    if doses.empty:
        return stats.CANNOT_TELL
    higher = doses[doses.verdict == stats.HIGHER]
    if len(higher):
        names = [str(m if pd.isna(r) else int(r)) for m, r in zip(higher.model, higher["rank"])]
        return ("higher at rank " if len(names) == 1 else "higher at ranks ") + ", ".join(names)
    if (doses.verdict == stats.EQUIVALENT).all():
        return "within the margin at every rank"
    return stats.CANNOT_TELL


# What tuning did, by a lens's verdict: "Tuning the LLM {outcome} the lens a reader of the visual tokens".
OUTCOMES = {"higher on most layers": "made",
            "within the margin on most layers": "did not make, on most of its layers,",
            "higher on a few layers only": "made, on a few layers only,",
            "cannot tell": "may or may not have made (this run cannot tell which)"}


def verdict(per_layer: pd.DataFrame) -> str:
    """One phrase for a lens's per-layer verdicts: clearly higher on most layers; else equivalent within the margin
    on most layers; else higher on a few; else cannot tell. The page gives the counts beside it."""
    counts = per_layer.verdict.value_counts()
    layers = len(per_layer)
    higher, equivalent = counts.get(stats.HIGHER, 0), counts.get(stats.EQUIVALENT, 0)
    if layers and higher * 2 >= layers:
        return "higher on most layers"
    if layers and equivalent * 2 > layers:
        return "within the margin on most layers"
    return "higher on a few layers only" if higher else "cannot tell"


def page_numbers(result: ModelComparison, model_ids, kind: str = "object", margin: float = MARGIN) -> dict:
    """The numbers a comparison page quotes, flat, keyed `<slot>_<lens>_<field>` and `<slot>_<headline>[_low|_high]`
    with slot `a` for the first model and `b` for the second (NaN without one); per lens the paired comparison of
    the second over the first (`<lens>_difference`, `<lens>_higher_layers`, `<lens>_equivalent_layers`,
    `<lens>_verdict`, and `<lens>_outcome`, its phrase in a sentence about what tuning did); and per headline the
    paired difference (`<headline>_difference[_low|_high]`, `<headline>_verdict`)."""
    table = side_by_side(result.above, kind).set_index(["model", "lens"])
    values = {"margin": margin}
    for slot, model in zip("ab", [*model_ids, None][:2]):
        for key, lens in LENS_KEYS.items():
            row = table.loc[(model, lens)] if (model, lens) in table.index else None
            for field in ("share", "chance", "above", "best_above"):
                values[f"{slot}_{key}_{field}"] = np.nan if row is None else float(row[field])
            for field in ("layers_above", "best_layer"):
                values[f"{slot}_{key}_{field}"] = -1 if row is None else int(row[field])
        rows = result.headlines[result.headlines.model == model].set_index("measure")
        for measure, key in HEADLINE_KEYS.items():
            for field, suffix in (("value", ""), ("ci_low", "_low"), ("ci_high", "_high")):
                values[f"{slot}_{key}{suffix}"] = rows[field].get(measure, np.nan)
    second = model_ids[1] if len(model_ids) > 1 else None
    for key, lens in LENS_KEYS.items():
        per_layer = paired_lens_difference(result.hits, lens, model_ids[0], second, kind, margin)
        values[f"{key}_difference"] = float(per_layer.difference.mean()) if len(per_layer) else np.nan
        values[f"{key}_higher_layers"] = int((per_layer.verdict == stats.HIGHER).sum())
        values[f"{key}_equivalent_layers"] = int((per_layer.verdict == stats.EQUIVALENT).sum())
        values[f"{key}_verdict"] = verdict(per_layer)
        values[f"{key}_outcome"] = OUTCOMES[values[f"{key}_verdict"]]
    heads = paired_headlines(result.headline_items, model_ids[0], second)
    for measure, key in HEADLINE_KEYS.items():
        row = stats.pick(heads, measure=measure)
        for field, suffix in (("difference", ""), ("ci_low", "_low"), ("ci_high", "_high")):
            values[f"{key}_difference{suffix}"] = row[field]
        values[f"{key}_verdict"] = row.verdict
    for key, lens in LENS_KEYS.items():  # every further model against the first: the dose-response
        doses = dose_response(result.hits, lens, model_ids[0], model_ids[1:], kind, margin)
        values[f"dose_{key}_verdict"] = dose_verdict(doses)
        top = doses.loc[doses.difference.idxmax()] if len(doses) else None
        for field in ("difference", "ci_low", "ci_high"):
            values[f"dose_{key}_max_{field}"] = np.nan if top is None else float(top[field])
        values[f"dose_{key}_max_rank"] = -1 if top is None or pd.isna(top["rank"]) else int(top["rank"])
    doses = sorted(model_ids[1:], key=lambda m: (lora_rank(m) is None, lora_rank(m) or 0))  # by rank, then others
    values["dose_ranks"] = ", ".join(m if lora_rank(m) is None else str(lora_rank(m)) for m in doses)
    values["n_layers"] = int(result.above.layer.nunique())
    values["headlines_differ"] = bool(heads.verdict.isin([stats.HIGHER, stats.LOWER]).any())
    return values


def paired_headlines(items: pd.DataFrame, first: str, second: str | None) -> pd.DataFrame:
    """Per headline measure: the second model's value minus the first's on the items both models answered right
    (flips: exact McNemar; drops: paired bootstrap), with the verdict; no rows without a second model."""
    rows = []
    if second is not None:
        both = stats.pairs(items, ["measure", "item"], "model", "value", first, second)
        for measure, pairs in both.groupby(level="measure", sort=False):
            a, b = pairs[second].to_numpy(), pairs[first].to_numpy()
            if measure.startswith("ablation"):
                a, b = a.astype(bool), b.astype(bool)
            rows.append({"measure": measure, **stats.paired_row(stats.paired_difference(a, b))})
    return pd.DataFrame(rows, columns=["measure", *stats.PAIRED_FIELDS])
