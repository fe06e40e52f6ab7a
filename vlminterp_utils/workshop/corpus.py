"""The default text corpus of LatentLens: sentences about objects, colours, shapes and places, plus distractors.

Generated from templates with a seeded RNG (`python -m vlminterp_utils.workshop.corpus` rewrites
`data/corpus/`), so the corpus is reproducible and its licence is the project's. Chapter 2 reads it with
`latentlens.load_corpus`, which also takes any text file or `datasets` dataset instead.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..chapters.latentlens import DEFAULT_CORPUS
from ..core import shapes
from ..core.storage import data_path, write_text

_PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the corner", "near the edge",
           "in the middle", "next to the frame", "above the line", "below the label"]
_ARTICLES = ["A", "The", "One", "This"]
_BACKGROUND = ["The background is plain white.", "Most of the picture is empty gray space.",
               "Behind the shapes there is only a blank background.", "The rest of the image is nothing but grey.",
               "The corner is empty and white.", "There is nothing in that part of the picture, only background.",
               "A light gray background fills the frame.", "The empty area around it is white."]
_DISTRACTORS = [
    "The train leaves the station at noon every day.", "She wrote a long letter to her brother in the city.",
    "Rain is expected over the mountains tomorrow.", "He poured coffee and read the morning paper.",
    "The committee will meet again next week to vote.", "Children played football in the park after school.",
    "The recipe needs two cups of flour and an egg.", "A river runs through the old town.",
    "The software update fixed several bugs.", "They walked along the beach at sunset.",
    "The library closes early on Sundays.", "Music drifted from the open window.",
    "The price of bread went up again this year.", "He forgot his keys at the office.",
    "The museum opened a new exhibition on ancient coins.", "Our neighbours adopted a small dog.",
]
_OTHER_NOUNS = ["car", "house", "flower", "shirt", "ball", "door", "book", "apple", "bird", "lamp"]


def generate_sentences(n: int = 3000, seed: int = 0) -> list[str]:
    """`n` sentences: two thirds about coloured shapes and places, the rest background and distractor text."""
    rng = np.random.default_rng(seed)
    colors, shape_names = list(shapes.COLORS), list(shapes.SHAPES)
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    templates = [
        lambda: f"{pick(_ARTICLES)} {pick(colors)} {pick(shape_names)} is {pick(_PLACES)}.",
        lambda: f"There is a {pick(colors)} {pick(shape_names)} {pick(_PLACES)} of the picture.",
        lambda: f"I see a {pick(colors)} {pick(shape_names)} and a {pick(colors)} {pick(shape_names)}.",
        lambda: f"The {pick(shape_names)} {pick(_PLACES)} is painted {pick(colors)}.",
        lambda: f"Draw a {pick(shape_names)} and colour it {pick(colors)}.",
        lambda: f"Her {pick(_OTHER_NOUNS)} is {pick(colors)}, like a {pick(colors)} {pick(shape_names)}.",
        lambda: f"The {pick(colors)} one is a {pick(shape_names)}, not a {pick(shape_names)}.",
        lambda: f"A {pick(shape_names)} drawn in {pick(colors)} ink sits {pick(_PLACES)}.",
    ]
    out = []
    for i in range(n):
        r = rng.random()
        if r < 2 / 3:
            out.append(pick(templates)())
        elif r < 5 / 6:
            out.append(pick(_BACKGROUND))
        else:
            out.append(pick(_DISTRACTORS))
    return out


def write_default_corpus(path: Path | None = None, n: int = 3000, seed: int = 0) -> Path:
    return write_text(path or data_path(*DEFAULT_CORPUS), "\n".join(generate_sentences(n, seed)) + "\n")


if __name__ == "__main__":
    print(write_default_corpus())
