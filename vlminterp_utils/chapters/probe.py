"""Positive controls for chapter 2's lenses: what could be read at a layer, at best.

A lens that reads nothing above chance leaves two explanations: the information is not in the visual tokens, or the
lens cannot read it. Two controls tell them apart:
  - a **linear probe** per layer, trained to name the colour (or the shape) of the object under an object patch on
    one set of scenes and scored on another: what a reader fitted to these very tokens gets out of them;
  - **text tokens**: the same lenses and the same judge on the hidden states of the words " red" and " circle" in a
    sentence, where every lens is on home ground.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ..core import shapes, stats
from ..core.readout import record_residual_stream, visual_hidden_states
from . import lenses

TARGETS = ("colour", "shape")


def object_patch_states(adapter, examples: list[shapes.Example],
                        batch_size: int = 8) -> tuple[torch.Tensor, pd.DataFrame]:
    """Hidden states of every object patch at every layer, (layers + 1, n_patches, d_model) in float32, and one
    label row per patch: its image (`example`), `patch`, and the `colour` and `shape` of the object it shows."""
    states, labels = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        hidden = visual_hidden_states(adapter, chunk).float().cpu()  # (layers + 1, batch, n_visual, d)
        for j, ex in enumerate(chunk):
            kinds, owner = lenses.patch_kinds(adapter, ex.scene)
            patches = np.flatnonzero(kinds == "object")
            states.append(hidden[:, j, patches])
            labels += [{"example": start + j, "patch": int(p), "colour": ex.scene.objects[owner[p]].color,
                        "shape": ex.scene.objects[owner[p]].shape} for p in patches]
    return torch.cat(states, dim=1), pd.DataFrame(labels, columns=["example", "patch", *TARGETS])


def fit_probe(features: np.ndarray, labels: np.ndarray, seed: int = 0):
    """A linear probe: standardised features, multinomial logistic regression (L2, C = 1).

    Fitted with one BLAS thread: on a 2-core machine beside torch, a fit of 1222 patches x 576 features took 2.9 s
    with two threads and 0.5 s with one (benchmarks/README.md, "linear probes")."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    with threadpool_limits(1, user_api="blas"):  # small matrices: threads cost more than they bring
        return probe.fit(features, labels)


def probe_accuracy(adapter, train: list[shapes.Example], test: list[shapes.Example], layers=None,
                   seed: int = 0) -> pd.DataFrame:
    """Per layer and target (colour, shape): the held-out accuracy of a linear probe trained on the object patches
    of `train` and scored on those of `test`, with an exact 95% interval widened for the patches of one image
    being one cluster, and `chance`, the accuracy of always naming the training set's commonest label."""
    train_states, train_labels = object_patch_states(adapter, train)
    test_states, test_labels = object_patch_states(adapter, test)
    layers = range(train_states.shape[0]) if layers is None else layers
    rows = []
    for layer in tqdm(layers, desc="linear probes", leave=False):
        for target in TARGETS:
            y_train, y_test = train_labels[target].to_numpy(), test_labels[target].to_numpy()
            probe = fit_probe(train_states[layer].numpy(), y_train, seed)
            right = probe.predict(test_states[layer].numpy()) == y_test  # (test patches,)
            accuracy, low, high = stats.clustered_share_ci(right, test_labels.example.to_numpy())
            commonest = pd.Series(y_train).mode().iloc[0]
            rows.append({"layer": layer, "target": target, "accuracy": accuracy, "ci_low": low, "ci_high": high,
                         "chance": float((y_test == commonest).mean()), "n": len(y_test)})
    return pd.DataFrame(rows)


def part_judge(part: str):
    """A judge of object patches only, for one part of the object: its colour or its shape (`lenses.shapes_judge`
    accepts either). Background and ring patches are not judged."""
    if part not in TARGETS:
        raise ValueError(f"unknown part {part!r}; choose one of {', '.join(TARGETS)}")

    def judge(row, scene) -> bool | None:
        if row.kind != "object":
            return None
        obj = scene.objects[row.object]
        word = obj.color if part == "colour" else obj.shape
        return any(lenses.normalize_word(w) == word for w in row.words)
    return judge


def part_judges() -> dict:
    """The colour and shape judges by name, for `lenses.compare_with_chance(..., also=part_judges())`."""
    return {part: part_judge(part) for part in TARGETS}


def lens_against_probe(judged: pd.DataFrame, probes: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per lens, layer and target, on object patches: how far the lens reads above its strongest chance control
    (`lenses.above_chance` on the `hit_<target>` column), how far the probe reads above its own chance, and the
    lens's gain as a fraction of the probe's (the probe is the most a linear reader gets from these tokens)."""
    objects = judged[judged.kind == "object"]
    rows = []
    for target in TARGETS:
        above = lenses.above_chance(objects, seed=seed, hit=f"hit_{target}").assign(target=target)
        rows.append(above[["lens", "layer", "target", "above", "ci_low", "ci_high"]])
    out = pd.concat(rows, ignore_index=True).merge(probes[["layer", "target", "accuracy", "chance"]],
                                                   on=["layer", "target"])
    out["probe_above"] = out.accuracy - out.chance
    out["fraction_of_probe"] = out.above / out.probe_above
    return out.drop(columns=["accuracy", "chance"])


# ---------------------------------------------------------------------------------------------- text tokens

TEXT_TEMPLATE = "There is a {color} {shape} in the picture."


@torch.no_grad()
def text_word_states(adapter, concepts=None) -> tuple[torch.Tensor, pd.DataFrame]:
    """Hidden states of the colour word and the shape word of `TEXT_TEMPLATE` for every concept (default: the whole
    shapes world), text only, at every layer: (layers + 1, 2 * n_concepts, d_model), and per row its concept,
    its `part` (which of the two words was read; its last sub-token is the one read), `colour` and `shape`."""
    concepts = concepts or [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]
    tok, states, rows = adapter.tokenizer, [], []
    for color, shape in concepts:
        sentence = TEXT_TEMPLATE.format(color=color, shape=shape)
        ids = tok(sentence, return_tensors="pt", add_special_tokens=False)["input_ids"].to(adapter.device)
        with record_residual_stream(adapter) as hidden:  # depth 0 .. n_layers, none after the final norm
            adapter.language_model(input_ids=ids)
        for part, word in (("colour", color), ("shape", shape)):
            end = sentence.index(f" {word} ") + len(word) + 1  # the word's last character
            position = len(tok(sentence[:end], add_special_tokens=False)["input_ids"]) - 1
            states.append(torch.stack([h[0, position] for h in hidden]).float().cpu())  # (layers + 1, d)
            rows.append({"concept": f"{color} {shape}", "part": part, "colour": color, "shape": shape})
    return torch.stack(states, dim=1), pd.DataFrame(rows)


def text_token_shares(adapter, lens_list, concepts=None, k: int = 5, layers=None) -> pd.DataFrame:
    """The text positive control: per lens, layer and part, the share of colour (shape) words of a sentence whose
    top-k readings name the phrase's colour or shape, the rule the judge applies to an object patch, with its
    exact 95% interval. (Read at the colour word, a next-word reader such as the logit lens may name the shape.)"""
    states, rows = text_word_states(adapter, concepts)
    layers = range(states.shape[0]) if layers is None else layers
    out = []
    for lens in lens_list:
        for layer in layers:
            read = lens.describe(states[layer].to(adapter.device), layer, k)  # one [(word, score)] per row
            hits = np.array([any(lenses.normalize_word(w) in (colour, shape) for w, _ in words)
                             for words, colour, shape in zip(read, rows["colour"], rows["shape"])])
            for part in TARGETS:
                share, low, high = stats.share_ci(hits[(rows.part == part).to_numpy()])
                out.append({"lens": lens.name, "layer": layer, "part": part, "share": share, "ci_low": low,
                            "ci_high": high})
    return pd.DataFrame(out)
