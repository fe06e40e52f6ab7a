"""Models side by side: does tuning the LLM make visual tokens readable?

Chapter 1 finds the logit lens a poor reader of shapes-llava's visual tokens, whose LLM is frozen; LLaVA-1.5 tunes
its LLM. The comparison page runs the same measurements on each embedded model (or any `load_vlm` name): the three
lenses against their chance controls, per layer; chapter 1's ablation and knockout headlines; and, for a model
tuned by LoRA, how far the updates moved the LLM's weights.
"""
from __future__ import annotations

import gc
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


def lenses_above_chance(adapter, index: LL.ContextualIndex, examples: list[shapes.Example], k: int = 5,
                        seed: int = 0) -> pd.DataFrame:
    """Per lens, layer and patch kind: the share of patches read right, its strongest chance control, and the
    difference with a 95% interval over images (`lenses.above_chance`)."""
    judged = lenses.compare_with_chance(adapter, lens_list(adapter, index), examples, k=k, seed=seed)
    return lenses.above_chance(judged, seed=seed)


def headlines(adapter, n_items: int, seed: int = 0, batch_size: int = 16, **style) -> pd.DataFrame:
    """Chapter 1's headline numbers with 95% intervals: VQA answers flipped by mean-ablating the object's tokens
    and as many random tokens outside it (buffer 1), and the relative drop of the answer's probability when the
    answer position cannot attend to the object's tokens, or to all other visual tokens, in every layer."""
    flips = L.ablation_table(adapter, settings=("vqa",), methods=("object", "random_outside"), buffers=(1,), n=n_items,
                             seed=seed, batch_size=batch_size, **style)
    rows = [{"measure": f"ablation: {r.method}", "value": r.flip_rate, "ci_low": r.ci_low, "ci_high": r.ci_high,
             "n": r.initially_correct} for r in flips.itertuples()]
    items = L.make_items("vqa", n_items, seed + 1, adapter.image_size, **style)
    curve = L.knockout_curve(adapter, items, windows={"all": list(range(adapter.n_layers))}, knockouts=KNOCKOUTS)
    rows += [{"measure": f"knockout: {r.knockout}", "value": r.drop, "ci_low": r.ci_low, "ci_high": r.ci_high,
              "n": r.n} for r in curve.itertuples()]
    return pd.DataFrame(rows)


def compare_models(model_ids, n_images: int = 32, n_items: int = 24, corpus: str = "neutral",
                   corpus_limit: int | None = None, cap: int = 20, k: int = 5, seed: int = 0, device=None,
                   **style) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`lenses_above_chance` and `headlines` for each model, one model in memory at a time; both tables get a
    `model` column. Each model reads through its own LatentLens index (built once, then cached), since the
    contextual embeddings are the LLM's own and a tuned LLM has different ones."""
    sentences = LL.load_corpus(corpus, limit=corpus_limit)
    lens_rows, headline_rows = [], []
    for model_id in tqdm(model_ids, desc="models"):
        model, _, adapter = models.load_vlm(model_id, device=device)
        examples = shapes.make_examples(n_images, seed, "caption", size=adapter.image_size)
        index = LL.cached_index(adapter, sentences, cap=cap, seed=seed)
        lens_rows.append(lenses_above_chance(adapter, index, examples, k, seed).assign(model=model_id))
        headline_rows.append(headlines(adapter, n_items, seed, **style).assign(model=model_id))
        del model, adapter, index
        gc.collect()  # two LLMs' weights and indexes at once would double the peak memory for nothing
    return pd.concat(lens_rows, ignore_index=True), pd.concat(headline_rows, ignore_index=True)


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


def lora_file(model_id: str) -> Path | None:
    """The LoRA updates an embedded model ships (shapes-llava-tuned), or None (any other model)."""
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


def paired_difference(above: pd.DataFrame, lens: str, first: str, second: str, kind: str = "object") -> dict:
    """Layers where `second`'s above-chance share beats `first`'s with non-overlapping intervals, and the mean
    difference over layers (second minus first)."""
    part = above[(above.lens == lens) & (above.kind == kind)].pivot(index="layer", columns="model",
                                                                     values=["above", "ci_low", "ci_high"])
    if part.empty or not {first, second} <= set(part["above"].columns):  # a lens only one model was read with
        return {"mean_difference": float("nan"), "layers_clearly_higher": 0, "layers": 0,
                "best_difference_layer": -1, "best_difference": float("nan")}
    diff = part["above"][second] - part["above"][first]
    interval = {m: list(zip(part["ci_low"][m], part["ci_high"][m])) for m in (first, second)}
    clear = [stats.interval_order(b, a) == "higher" for a, b in zip(interval[first], interval[second])]
    return {"mean_difference": float(diff.mean()), "layers_clearly_higher": sum(clear),
            "layers": len(part), "best_difference_layer": int(diff.idxmax()),
            "best_difference": float(diff.max())}


# What tuning did, by a lens's verdict: "Tuning the LLM {outcome} the lens a reader of the visual tokens".
OUTCOMES = {"clearly better on most layers": "made",
            "clearly better on a few layers only": "made, on a few layers only,",
            "not clearly better on any layer": "did not make"}


def verdict(clear_layers: int, layers: int) -> str:
    """A sentence part for a count of layers where one model's interval lies clearly above the other's."""
    if layers and clear_layers * 2 >= layers:
        return "clearly better on most layers"
    return "clearly better on a few layers only" if clear_layers else "not clearly better on any layer"


def page_numbers(above: pd.DataFrame, heads: pd.DataFrame, model_ids, kind: str = "object") -> dict:
    """The numbers a comparison page quotes, flat, keyed `<slot>_<lens>_<field>` and `<slot>_<headline>[_low|_high]`
    with slot `a` for the first model and `b` for the second (NaN without one), and per lens the paired
    difference of the second over the first (`<lens>_difference`, `<lens>_clear_layers`, `<lens>_verdict`, and
    `<lens>_outcome`, its phrase in a sentence about what tuning did)."""
    table = side_by_side(above, kind).set_index(["model", "lens"])
    values = {}
    for slot, model in zip("ab", [*model_ids, None][:2]):
        for key, lens in LENS_KEYS.items():
            row = table.loc[(model, lens)] if (model, lens) in table.index else None
            for field in ("share", "chance", "above", "best_above"):
                values[f"{slot}_{key}_{field}"] = np.nan if row is None else float(row[field])
            for field in ("layers_above", "best_layer"):
                values[f"{slot}_{key}_{field}"] = -1 if row is None else int(row[field])
        rows = heads[heads.model == model].set_index("measure")
        for measure, key in HEADLINE_KEYS.items():
            for field, suffix in (("value", ""), ("ci_low", "_low"), ("ci_high", "_high")):
                values[f"{slot}_{key}{suffix}"] = rows[field].get(measure, np.nan)
    for key, lens in LENS_KEYS.items():
        second = model_ids[1] if len(model_ids) > 1 else None
        paired = paired_difference(above, lens, model_ids[0], second, kind)
        values[f"{key}_difference"] = paired["mean_difference"]
        values[f"{key}_clear_layers"] = paired["layers_clearly_higher"]
        values[f"{key}_verdict"] = verdict(paired["layers_clearly_higher"], paired["layers"])
        values[f"{key}_outcome"] = OUTCOMES[values[f"{key}_verdict"]]
    values["n_layers"] = int(above.layer.nunique())
    values["headlines_differ"] = headlines_differ(heads, model_ids)
    return values


def headlines_differ(heads: pd.DataFrame, model_ids) -> bool:
    """Whether the second model's interval lies wholly above or below the first's on any headline measure."""
    if len(model_ids) < 2:
        return False
    first, second = (heads[heads.model == m].set_index("measure") for m in model_ids[:2])
    return any(stats.interval_order(tuple(second.loc[m, ["ci_low", "ci_high"]]),
                                    tuple(first.loc[m, ["ci_low", "ci_high"]])) != "overlapping"
               for m in first.index.intersection(second.index))
