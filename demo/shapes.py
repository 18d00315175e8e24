"""Synthetic scenes of one or two coloured shapes, with questions and their exact answers.

Everything a scene looks like comes from one NumPy generator, so a seed gives the same image and the
same answers on every machine: training data, held-out evaluation and test images are all reproducible.
The vocabulary is chosen to be learnable by a tiny model yet checkable by a test: three shapes that
differ in outline, six saturated colours far apart in RGB (and from the light backgrounds), and five
positions (the four quadrants and the centre) with jitter. Two shapes in one scene always differ in
shape and position, so "the circle" and "the top left" each name exactly one object.

    scene = random_scene(np.random.default_rng(0))
    image = render(scene)                       # a 96x96 PIL image
    for question, answer in questions(scene): ...
    render_scene("circle", "red", "top left", also=[("square", "blue", "bottom right")])
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB; each drawn with a little jitter
    "red": (215, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 55, 175),
    "orange": (245, 130, 25),
}
# name -> centre (x, y) as fractions of the image: cells of a 3x3 grid, the corners and the centre,
# which is also the model's grid of image tokens (one token per cell), so that "where" is "which
# token". Listed in reading order, the order of descriptions.
POSITIONS = {
    "top left": (1 / 6, 1 / 6),
    "top right": (5 / 6, 1 / 6),
    "center": (1 / 2, 1 / 2),
    "bottom left": (1 / 6, 5 / 6),
    "bottom right": (5 / 6, 5 / 6),
}
NUMBERS = {1: "one", 2: "two"}
SCALE_RANGE = (0.18, 0.27)  # shape diameter as a fraction of the image side (a cell is 0.33)
JITTER = 0.03  # centre offset, fraction of the side, each axis: shapes stay inside their cell
COLOUR_JITTER = 12
NOISE_STD = 3.0
MARGIN = 0.04  # smallest gap between two shapes' boxes

# Question kinds and their wordings; the first wording is the canonical one. Training draws among
# them so that users' small rephrasings work too.
QUESTIONS = {
    "describe": ("What is in this image?", "Describe the image.", "What do you see?"),
    "count": ("How many shapes are there?",),
    "colour": ("What colour is the {shape}?", "What color is the {shape}?"),
    "where": ("Where is the {shape}?",),
    "shape": ("What shape is in the {position}?",),
}
KINDS = tuple(QUESTIONS)


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """One shape: its words (shape, colour, position) and how it is drawn (size, offset, exact RGB)."""

    shape: str
    colour: str
    position: str
    scale: float = 0.2
    dx: float = 0.0
    dy: float = 0.0
    rgb: tuple[int, int, int] | None = None  # None: the colour's reference RGB

    def __post_init__(self):
        if self.shape not in SHAPES or self.colour not in COLOURS or self.position not in POSITIONS:
            raise ValueError(f"unknown shape, colour or position: {self.shape!r}, {self.colour!r}, {self.position!r}")

    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) as fractions of the image."""
        cx, cy = POSITIONS[self.position]
        cx, cy, r = cx + self.dx, cy + self.dy, self.scale / 2
        return cx - r, cy - r, cx + r, cy + r

    def description(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} in the {self.position}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """The objects (in reading order), the background RGB and the seed of the pixel noise."""

    objects: tuple[ShapeSpec, ...]
    background: tuple[int, int, int] = (240, 240, 232)
    noise_seed: int = 0

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 2:
            raise ValueError("a scene has one or two shapes")
        if len({o.shape for o in self.objects}) != len(self.objects):
            raise ValueError("two shapes in a scene must differ in shape")
        if len({o.position for o in self.objects}) != len(self.objects):
            raise ValueError("two shapes in a scene must differ in position")
        order = list(POSITIONS)
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: order.index(o.position))))

    def find(self, shape: str) -> ShapeSpec:
        return next(o for o in self.objects if o.shape == shape)


class QA(NamedTuple):
    kind: str
    question: str
    answer: str


def _overlap(a: ShapeSpec, b: ShapeSpec) -> bool:
    (l1, t1, r1, b1), (l2, t2, r2, b2) = a.box(), b.box()
    return not (r1 + MARGIN <= l2 or r2 + MARGIN <= l1 or b1 + MARGIN <= t2 or b2 + MARGIN <= t1)


EASY_SCALE = 0.32  # a shape that fills its cell
EASY_BACKGROUND = (235, 235, 235)


def random_scene(rng: np.random.Generator, p_two: float = 0.5, difficulty: float = 1.0) -> Scene:
    """One shape, or two with probability ``p_two``: distinct shapes and positions, random colours, sizes,
    offsets and a light background; placements are redrawn until the shapes do not touch.

    ``difficulty`` < 1 (a curriculum's first steps) draws bigger shapes on a less varied background:
    at 0 every shape fills its cell on plain light grey."""
    n = 2 if rng.random() < p_two else 1
    shapes = [str(s) for s in rng.choice(SHAPES, n, replace=False)]
    positions = [str(p) for p in rng.choice(list(POSITIONS), n, replace=False)]
    colours = [str(c) for c in rng.choice(list(COLOURS), n)]
    rgbs = [tuple(int(v) for v in np.clip(np.asarray(COLOURS[c]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3),
                                          0, 255)) for c in colours]
    while True:
        scale = [EASY_SCALE + (v - EASY_SCALE) * difficulty for v in SCALE_RANGE]
        objects = [ShapeSpec(s, c, p, float(rng.uniform(*scale)), float(rng.uniform(-JITTER, JITTER)),
                             float(rng.uniform(-JITTER, JITTER)), rgb)
                   for s, c, p, rgb in zip(shapes, colours, positions, rgbs)]
        if n == 1 or not _overlap(*objects):
            break
    background = tuple(int(round(e + (v - e) * difficulty)) for e, v in zip(EASY_BACKGROUND, rng.integers(200, 251, 3)))
    return Scene(tuple(objects), background, int(rng.integers(0, 2**31)))


SPLITS = {"train": 0, "eval": 1, "test": 2}


def scene_for(index: int, split: str = "train", seed: int = 0, p_two: float = 0.5, difficulty: float = 1.0) -> Scene:
    """The ``index``-th scene of a split and seed. Splits draw from disjoint seed streams, so held-out
    scenes ("eval" or "test", any seed and index) are never training scenes."""
    return random_scene(np.random.default_rng([SPLITS[split], seed, index]), p_two, difficulty)


def render(scene: Scene, image_size: int | None = None) -> Image.Image:
    """The scene as an RGB image: shapes drawn at 4x and downsampled (smooth edges), plus faint noise."""
    image_size = image_size or IMAGE_SIZE
    big = image_size * 4
    canvas = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(canvas)
    for o in scene.objects:
        left, top, right, bottom = (v * big for v in o.box())
        fill = o.rgb or COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif o.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    image = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.LANCZOS), np.float32)
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, NOISE_STD, image.shape)
    return Image.fromarray(np.clip(np.rint(image + noise), 0, 255).astype(np.uint8))


def describe(scene: Scene) -> str:
    return " and ".join(o.description() for o in scene.objects)


def question_set(scene: Scene, rng: np.random.Generator | None = None) -> list[QA]:
    """Every question the scene answers, one per kind and object: describe, count, and colour, where and
    shape for each object. With ``rng`` each question takes a random wording, else the canonical one."""

    def wording(kind: str, **fields) -> str:
        options = QUESTIONS[kind]
        return options[0 if rng is None else int(rng.integers(len(options)))].format(**fields)

    out = [QA("describe", wording("describe"), describe(scene)),
           QA("count", wording("count"), NUMBERS[len(scene.objects)])]
    for o in scene.objects:
        out.append(QA("colour", wording("colour", shape=o.shape), o.colour))
        out.append(QA("where", wording("where", shape=o.shape), o.position))
        out.append(QA("shape", wording("shape", position=o.position), o.shape))
    return out


def questions(scene: Scene) -> list[tuple[str, str]]:
    """(question, exact answer) pairs, canonical wordings, only about shapes that are in the scene."""
    return [(qa.question, qa.answer) for qa in question_set(scene)]


def make_scene(*objects: ShapeSpec | tuple[str, str, str], background=(240, 240, 232), noise_seed: int = 0) -> Scene:
    """A scene from (shape, colour, position) triples or ShapeSpecs, at the default size and no offset."""
    return Scene(tuple(o if isinstance(o, ShapeSpec) else ShapeSpec(*o) for o in objects), tuple(background),
                 noise_seed)


def render_scene(shape: str = "circle", colour: str = "red", position: str = "top left", *,
                 also: tuple | list = (), background=(240, 240, 232), noise_seed: int = 0,
                 image_size: int = IMAGE_SIZE) -> Image.Image:
    """A specific image for tests and examples, e.g. ``render_scene("circle", "red", "top left",
    also=[("square", "blue", "bottom right")])``."""
    return render(make_scene((shape, colour, position), *also, background=background, noise_seed=noise_seed),
                  image_size)


# The bundled demo/example.png (what the README asks about); rewrite it with ``python -m demo.shapes``.
EXAMPLE = make_scene(("circle", "red", "top left"), ("square", "blue", "bottom right"), background=(236, 240, 228))
EXAMPLE_QUESTION = "What is in this image?"
EXAMPLE_ANSWER = describe(EXAMPLE)  # "a red circle in the top left and a blue square in the bottom right"


if __name__ == "__main__":
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "example.png")
    render(EXAMPLE).save(path, optimize=True)
    print(f"wrote {path}: {EXAMPLE_QUESTION!r} -> {EXAMPLE_ANSWER!r}")
