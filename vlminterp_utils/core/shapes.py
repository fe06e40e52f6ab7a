"""The shapes world: synthetic scenes with exact ground truth, the test bed of every chapter.

A scene holds 1 to 3 coloured shapes on a light background. Every object knows its pixel mask and its box; a model's
adapter maps the mask to the visual tokens that show it (`VLMAdapter.object_tokens`), so that "the tokens at the
object's position" is a fact, not a guess.
Everything is seeded: example ``i`` of a dataset with seed ``s`` is the same on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 195, 20),
    "purple": (145, 50, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
QUESTION_TYPES: tuple[str, ...] = ("caption", "polling", "vqa_color", "vqa_shape", "vqa_position")
# "binding" is a training and diagnostic type (polling that needs colour and shape bound to one object); the
# held-out bar is stated on QUESTION_TYPES alone.
TRAINING_QUESTION_TYPES: tuple[str, ...] = QUESTION_TYPES + ("binding",)
CAPTION_PROMPT = "Describe the image."
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
# Words a lens may use for an empty patch; the rule of chapter 2 counts any of them as "background".
BACKGROUND_WORDS = ("background", "white", "gray", "grey", "empty", "nothing", "blank", "plain")


@dataclass
class ShapeObject:
    color: str
    shape: str
    mask: np.ndarray  # (H, W) bool
    box: tuple[int, int, int, int]  # x0, y0, x1, y1, exclusive ends

    @property
    def center(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean()), float(ys.mean())

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def words(self) -> tuple[str, ...]:
        """The words that name this object (what a lens's reading is judged against)."""
        return self.color, self.shape


@dataclass
class Scene:
    image: Image.Image
    objects: list[ShapeObject]  # in canonical reading order: left to right
    background: tuple[int, int, int]
    seed: tuple[int, ...] = field(default=())

    @property
    def size(self) -> int:
        return self.image.size[0]


def _shape_mask(shape: str, size: int, x0: int, y0: int, s: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        r = s / 2
        return (xx - (x0 + r)) ** 2 + (yy - (y0 + r)) ** 2 <= r * r
    if shape == "square":
        return (xx >= x0) & (xx < x0 + s) & (yy >= y0) & (yy < y0 + s)
    if shape == "triangle":  # apex up, base at the bottom of its box
        t = (yy - y0) / s  # 0 at the apex, 1 at the base
        half = t * s / 2
        cx = x0 + s / 2
        return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= half)
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def render_scene(specs: list[tuple[str, str, int, int, int]], size: int = 64,
                 background: tuple[int, int, int] = (240, 240, 240), texture: float = 0.0,
                 rng: np.random.Generator | None = None) -> Scene:
    """Draw objects given as (color, shape, x0, y0, side) on a background; `texture` is noise amplitude."""
    rng = rng or np.random.default_rng(0)
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = background
    if texture > 0:
        canvas += rng.normal(0, texture, (size, size, 1))
    objects = []
    for color, shape, x0, y0, s in specs:
        if color not in COLORS:
            raise ValueError(f"unknown colour {color!r}; known colours: {', '.join(COLORS)}")
        mask = _shape_mask(shape, size, x0, y0, s)
        canvas[mask] = COLORS[color]
        ys, xs = np.nonzero(mask)
        objects.append(ShapeObject(color, shape, mask, (int(xs.min()), int(ys.min()),
                                                        int(xs.max()) + 1, int(ys.max()) + 1)))
    objects.sort(key=lambda o: o.center[0])
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    return Scene(image, objects, background)


def random_scene(rng: np.random.Generator, size: int = 64, n_objects: int | tuple[int, int] = (1, 3)) -> Scene:
    """Sample a scene: distinct (colour, shape) pairs, no overlaps, centres well apart left to right."""
    lo, hi = (n_objects, n_objects) if isinstance(n_objects, int) else n_objects
    if not 1 <= lo <= hi <= 3:
        raise ValueError(f"n_objects must lie in 1..3, got {n_objects}")
    n = int(rng.integers(lo, hi + 1))
    min_side, max_side = round(0.22 * size), round(0.40 * size)
    # Centres at least this far apart in x, so that "left to right" is never a coin toss.
    min_dx = 0.16 * size
    while True:  # rejection sampling; three objects fit easily, so this ends after a few tries
        pairs = rng.choice(len(COLORS) * len(SHAPES), size=n, replace=False)
        specs, boxes = [], []
        for p in pairs:
            color, shape = list(COLORS)[p // len(SHAPES)], SHAPES[p % len(SHAPES)]
            s = int(rng.integers(min_side, max_side + 1))
            x0, y0 = (int(v) for v in rng.integers(1, size - s, size=2))
            specs.append((color, shape, x0, y0, s))
            boxes.append((x0, y0, x0 + s, y0 + s))
        if _well_separated(boxes, min_dx):
            break
    gray = int(rng.integers(215, 250))
    tint = rng.integers(-8, 9, size=3)
    background = tuple(int(np.clip(gray + t, 0, 255)) for t in tint)
    texture = float(rng.choice([0.0, 0.0, 4.0]))  # one scene in three lightly textured
    return render_scene(specs, size, background, texture, rng)


def concept_scene(rng: np.random.Generator, color: str, shape: str, size: int = 64) -> Scene:
    """One object of the given colour and shape, at a random size and place, on a random light background."""
    side = int(rng.integers(round(0.22 * size), round(0.40 * size) + 1))
    x0, y0 = (int(v) for v in rng.integers(1, size - side, size=2))
    gray = int(rng.integers(215, 250))
    background = tuple(int(np.clip(gray + t, 0, 255)) for t in rng.integers(-8, 9, size=3))
    return render_scene([(color, shape, x0, y0, side)], size, background, float(rng.choice([0.0, 0.0, 4.0])), rng)


def _well_separated(boxes: list[tuple[int, int, int, int]], min_dx: float, gap: int = 2) -> bool:
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap = not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])
            if overlap or abs((a[0] + a[2]) - (b[0] + b[2])) / 2 < min_dx:
                return False
    return True


# ---------------------------------------------------------------------------------------------- questions

def caption(scene: Scene) -> str:
    """The canonical caption: objects left to right, e.g. 'a red circle and a blue square'."""
    names = [f"a {o.name}" for o in scene.objects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def quadrant(obj: ShapeObject, size: int) -> str:
    x, y = obj.center
    return f"{'top' if y < size / 2 else 'bottom'} {'left' if x < size / 2 else 'right'}"


class Question(NamedTuple):
    """A question about a scene, its answer, and the objects (indices into `scene.objects`) it is about.

    `targets` is the ground truth that chapter 1 ablates: the object a VQA or positive polling question names,
    every object for a caption, the two objects that lend a swapped pair its colour and shape for a binding
    negative, and none for an ordinary polling negative (the object asked about is absent).
    """

    question: str
    answer: str
    targets: tuple[int, ...]


def make_question(scene: Scene, qtype: str, rng: np.random.Generator,
                  positive: bool | None = None) -> Question:
    """A question of the given type about the scene. Answers are short lower-case words.

    `positive` fixes a polling (or binding) question's answer (yes/no); by default it is a coin toss.
    """
    if qtype == "caption":
        return Question(CAPTION_PROMPT, caption(scene), tuple(range(len(scene.objects))))
    if qtype in ("polling", "binding"):
        positive = rng.random() < 0.5 if positive is None else positive
        return (_polling if qtype == "polling" else _binding)(scene, rng, positive)
    if qtype in ("vqa_color", "vqa_shape"):
        return _attribute_question(scene, qtype, rng)
    if qtype == "vqa_position":
        by_quadrant: dict[str, list[ShapeObject]] = {}
        for o in scene.objects:
            by_quadrant.setdefault(quadrant(o, scene.size), []).append(o)
        lone = sorted(q for q, objs in by_quadrant.items() if len(objs) == 1)
        if not lone:  # every quadrant shared: fall back to a colour question
            return make_question(scene, "vqa_color", rng)
        q = lone[rng.integers(len(lone))]
        obj = by_quadrant[q][0]
        return Question(f"What shape is at the {q}?", obj.shape, _indices(scene, obj))
    raise ValueError(f"unknown question type {qtype!r}; known types: {', '.join(TRAINING_QUESTION_TYPES)}")


def _indices(scene: Scene, *objects: ShapeObject) -> tuple[int, ...]:
    return tuple(sorted({next(i for i, o in enumerate(scene.objects) if o is obj) for obj in objects}))


def _attribute_question(scene: Scene, qtype: str, rng: np.random.Generator) -> Question:
    """Ask the colour of a uniquely-shaped object, or the shape of a uniquely-coloured one.

    Among at most three distinct (colour, shape) pairs either some shape or some colour is unique, so when the
    asked-for kind has no unambiguous object the other kind is asked instead.
    """
    unique_shape = [o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1]
    unique_color = [o for o in scene.objects if sum(p.color == o.color for p in scene.objects) == 1]
    if (qtype == "vqa_color" and unique_shape) or not unique_color:
        o = unique_shape[rng.integers(len(unique_shape))]
        return Question(f"What colour is the {o.shape}?", o.color, _indices(scene, o))
    o = unique_color[rng.integers(len(unique_color))]
    return Question(f"What shape is the {o.color} object?", o.shape, _indices(scene, o))


def _polling(scene: Scene, rng: np.random.Generator, positive: bool) -> Question:
    present = {(o.color, o.shape) for o in scene.objects}
    if positive:
        color, shape = sorted(present)[rng.integers(len(present))]
        named = [o for o in scene.objects if (o.color, o.shape) == (color, shape)]
        return Question(f"Is there a {color} {shape}?", "yes", _indices(scene, *named))
    # Hard negatives: share the colour or the shape of an object that is there.
    absent = sorted({(c, s) for c in COLORS for s in SHAPES} - present)
    near = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
    pool = near if near and rng.random() < 0.7 else absent
    color, shape = pool[rng.integers(len(pool))]
    return Question(f"Is there a {color} {shape}?", "no", ())


def _binding(scene: Scene, rng: np.random.Generator, positive: bool) -> Question:
    """Polling that a bag of words cannot answer. The negative is a swapped pair: absent, although its colour and
    its shape are both in the scene, on different objects ("a red square?" beside a red circle and a blue square).
    The positive is an object that lends a swapped pair its colour or shape ("a red circle?"). Scenes without a
    swapped pair (one object, or one colour or one shape throughout) get an ordinary polling question."""
    present = {(o.color, o.shape) for o in scene.objects}
    swapped = sorted({(a.color, b.shape) for a in scene.objects for b in scene.objects} - present)
    if not swapped:
        return _polling(scene, rng, positive)
    color, shape = swapped[rng.integers(len(swapped))]
    donors = [o for o in scene.objects if o.color == color or o.shape == shape]
    if not positive:
        return Question(f"Is there a {color} {shape}?", "no", _indices(scene, *donors))
    named = sorted(donors, key=lambda o: o.name)[rng.integers(len(donors))]
    return Question(f"Is there a {named.name}?", "yes", _indices(scene, named))


# ---------------------------------------------------------------------------------------------- datasets

@dataclass
class Example:
    """A scene, a question about it with its answer, and the objects the question is about (`Question`)."""

    scene: Scene
    question: str
    answer: str
    qtype: str
    index: int
    targets: tuple[int, ...] = ()

    @property
    def target_objects(self) -> list[ShapeObject]:
        return [self.scene.objects[i] for i in self.targets]


def example(seed: int, index: int, qtype: str, size: int = 64,
            n_objects: int | tuple[int, int] = (1, 3), positive: bool | None = None) -> Example:
    """Example `index` of the stream with `seed`: the same on every machine."""
    if qtype not in TRAINING_QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}; known types: {', '.join(TRAINING_QUESTION_TYPES)}")
    rng = np.random.default_rng([seed, index])
    scene = random_scene(rng, size, n_objects)
    scene.seed = (seed, index)
    question, answer, targets = make_question(scene, qtype, rng, positive)
    return Example(scene, question, answer, qtype, index, targets)


def make_examples(n: int, seed: int = 0, qtypes: str | tuple[str, ...] = QUESTION_TYPES, size: int = 64,
                  n_objects: int | tuple[int, int] = (1, 3)) -> list[Example]:
    """`n` examples; question types cycle through `qtypes` and polling answers alternate yes/no (balanced)."""
    qtypes = (qtypes,) if isinstance(qtypes, str) else tuple(qtypes)
    return [example(seed, i, qtypes[i % len(qtypes)], size, n_objects, positive=(i // len(qtypes)) % 2 == 0)
            for i in range(n)]


def to_hf_dataset(examples: list[Example]):
    """The examples as a `datasets.Dataset`, with ground truth as plain columns (boxes in pixels, the question's
    target objects as indices into them)."""
    import datasets

    def rows():
        for ex in examples:
            yield {
                "image": ex.scene.image, "question": ex.question, "answer": ex.answer, "qtype": ex.qtype,
                "index": ex.index, "colors": [o.color for o in ex.scene.objects],
                "shapes": [o.shape for o in ex.scene.objects], "boxes": [list(o.box) for o in ex.scene.objects],
                "targets": list(ex.targets),
            }
    return datasets.Dataset.from_generator(rows)
