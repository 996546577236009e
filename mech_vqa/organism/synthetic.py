"""Synthetic VQA scenes whose answer region is known exactly.

Each image shows 2-4 (or 1, for training) flat objects on a light, plain or faintly textured
background. An object has a *shape*, a *colour* and a *fill pattern*; within one image all
colours and all patterns are distinct, so either attribute names an object uniquely.

Question families (``FAMILIES`` are the trained ones; ``ALL_FAMILIES`` adds ``shape``):

* ``color`` -- "What is the color of the striped object?" -> "The color of the striped object is red".
* ``pattern`` -- "What is the pattern of the red object?" -> "The pattern of the red object is striped".
* ``shape`` -- "What is the shape of the red object?" -> "The shape of the red object is circle".

Objects are named by colour or fill pattern because both show inside *every* patch of the
object, so matching the named attribute against the patches is patch-local. (Naming objects by
shape was tried first; at 8 px patches a shape only shows at an object's edges and binding it
stayed slow.) ``COPY_FAMILIES`` are training-only warm-up questions whose answer repeats the
named attribute.

For every family the answer depends on exactly one object, whose ``box`` and ``mask`` each
item carries: that is the ground truth patch-importance methods are scored against.

Objects are placed one per image quadrant (random size and offset inside it), so they never
overlap and always lie inside the image. Everything is drawn with numpy from a
``numpy.random.Generator``: the same seed gives the same items, bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 64
COLORS = {
    "red": (215, 35, 35),
    "green": (40, 165, 50),
    "blue": (40, 70, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 45, 175),
    "orange": (245, 130, 25),
}
SHAPES = ("square", "circle", "triangle", "cross")
PATTERNS = ("solid", "striped", "dotted", "checkered")
# Families drawn by default (training and evaluation); "shape" is available on request.
FAMILIES = ("color", "pattern")
ALL_FAMILIES = ("color", "pattern", "shape")
# Pattern pixels are the object colour scaled by this: still clearly that hue, but a texture.
SHADE = 0.55

QUESTION_TEMPLATES = {
    "color": ("What is the color of the {pattern} object?", "The color of the {pattern} object is {color}"),
    "pattern": ("What is the pattern of the {color} object?", "The pattern of the {color} object is {pattern}"),
    "shape": ("What is the shape of the {color} object?", "The shape of the {color} object is {shape}"),
    # Training-only warm-up: the answer repeats the named attribute. The answer position must then
    # attend to the attribute word, the first hop of retrieval; without it the named attribute
    # never reaches the answer position and multi-object accuracy stays at chance (see train.py).
    "color_copy": ("What is the color of the {color} object?", "The color of the {color} object is {color}"),
    "pattern_copy": ("What is the pattern of the {pattern} object?", "The pattern of the {pattern} object is {pattern}"),
}
COPY_FAMILIES = ("color_copy", "pattern_copy")


def vocabulary() -> list[str]:
    """Every (lower-case) word the questions and answers use, for the word-level tokenizer."""
    words = []
    for question, answer in QUESTION_TEMPLATES.values():
        for text in (question, answer):
            words += text.lower().replace("?", " ").split()
    words += [*COLORS, *SHAPES, *PATTERNS]
    return [w for i, w in enumerate(words) if "{" not in w and w not in words[:i]]


@dataclass
class SceneObject:
    """One drawn object; ``box`` is (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""

    shape: str
    color: str
    pattern: str
    box: tuple[int, int, int, int]

    def mask(self, image_size: int = IMAGE_SIZE) -> np.ndarray:
        """Boolean (H, W) mask of the object's pixels (the shape, whatever its fill)."""
        return shape_mask(self.shape, self.box, image_size)


@dataclass
class VQAItem:
    """One question about one image; ``box``/``mask`` locate the object the answer depends on."""

    image: Image.Image
    question: str
    answer: str
    answer_word: str
    box: tuple[int, int, int, int]
    mask: np.ndarray
    n_objects: int
    family: str
    objects: list[SceneObject] = field(default_factory=list)
    target: int = 0  # index of the answer object in ``objects``

    def to_row(self, image_path: str) -> dict:
        """JSON-serialisable row (the image itself is stored separately, at ``image_path``)."""
        return {
            "image": image_path,
            "question": self.question,
            "answer": self.answer,
            "answer_word": self.answer_word,
            "box": list(self.box),
            "n_objects": self.n_objects,
            "family": self.family,
            "objects": [
                {"shape": o.shape, "color": o.color, "pattern": o.pattern, "box": list(o.box)} for o in self.objects
            ],
            "target": self.target,
        }

    @classmethod
    def from_row(cls, row: dict, root: str | Path = ".") -> VQAItem:
        """Inverse of :meth:`to_row`; the mask is redrawn from the object description."""
        image = Image.open(Path(root) / row["image"]).convert("RGB")
        objects = [SceneObject(o["shape"], o["color"], o["pattern"], tuple(o["box"])) for o in row.get("objects", [])]
        target = row.get("target", 0)
        box = tuple(row["box"])
        mask = objects[target].mask(image.height) if objects else _box_mask(box, image.height)
        return cls(image, row["question"], row["answer"], row["answer_word"], box, mask,
                   row["n_objects"], row["family"], objects, target)


def _box_mask(box, image_size):
    mask = np.zeros((image_size, image_size), dtype=bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def shape_mask(shape: str, box, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Pixels of ``shape`` drawn to fill ``box`` (evaluated at pixel centres)."""
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[0:image_size, 0:image_size] + 0.5
    u, v = (xs - x0) / (x1 - x0), (ys - y0) / (y1 - y0)  # 0..1 across the box
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "square":
        return inside
    if shape == "circle":
        return inside & ((u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25)
    if shape == "triangle":  # apex at the top, base along the bottom edge
        return inside & (np.abs(u - 0.5) <= v / 2)
    if shape == "cross":  # a plus sign with arms a third of the box wide
        return inside & ((np.abs(u - 0.5) < 1 / 6) | (np.abs(v - 0.5) < 1 / 6))
    raise ValueError(f"unknown shape {shape!r}")


def pattern_mask(pattern: str, box, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Pixels drawn in the darker shade (period 4 px).

    The pattern is anchored to the image, not the object: 4 divides the 8 px patch, so every patch
    fully inside an object sees the very same pixels, and the patch embedding can recognise the
    pattern linearly (anchored at the object corner, its phase varied and learning was slower).
    """
    ys, xs = np.mgrid[0:image_size, 0:image_size]
    dx, dy = xs, ys
    if pattern == "solid":
        return np.zeros((image_size, image_size), dtype=bool)
    if pattern == "striped":  # horizontal stripes, 2 px dark / 2 px light
        return (dy // 2) % 2 == 1
    if pattern == "dotted":  # 2x2 dots on a 4 px grid
        return (dx % 4 >= 2) & (dy % 4 >= 2)
    if pattern == "checkered":  # 4 px checks
        return ((dx // 4) + (dy // 4)) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light background: plain, or (half the time) faint low-frequency mottling."""
    base = rng.uniform(200, 240) + rng.uniform(-12, 12, size=3)
    image = np.broadcast_to(base, (size, size, 3)).astype(np.float64)
    if rng.random() < 0.5:
        coarse = rng.uniform(-10, 10, size=(4, 4))
        fine = np.kron(coarse, np.ones((size // 4, size // 4)))  # blocky, then smoothed by a box blur
        kernel = np.ones(9) / 9
        fine = np.apply_along_axis(lambda r: np.convolve(np.pad(r, 4, mode="edge"), kernel, "valid"), 0, fine)
        fine = np.apply_along_axis(lambda r: np.convolve(np.pad(r, 4, mode="edge"), kernel, "valid"), 1, fine)
        image = image + fine[..., None]
    return image


def render(objects: list[SceneObject], rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``objects`` on a fresh background."""
    image = _background(rng, image_size)
    for obj in objects:
        color = np.array(COLORS[obj.color], dtype=np.float64)
        shape = obj.mask(image_size)
        dark = shape & pattern_mask(obj.pattern, obj.box, image_size)
        image[shape] = color
        image[dark] = color * SHADE
    return Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8), "RGB")


def random_scene(rng: np.random.Generator, n_objects: int, image_size: int = IMAGE_SIZE,
                 min_size: int = 16, max_size: int = 28) -> list[SceneObject]:
    """``n_objects`` objects in distinct quadrants, with distinct colours and patterns."""
    cell = image_size // 2
    max_size = min(max_size, cell - 2)
    quadrants = rng.choice(4, size=n_objects, replace=False)
    colors = rng.choice(len(COLORS), size=n_objects, replace=False)
    patterns = rng.choice(len(PATTERNS), size=n_objects, replace=False)
    objects = []
    for q, c, p in zip(quadrants.tolist(), colors.tolist(), patterns.tolist()):
        size = int(rng.integers(min_size, max_size + 1))
        x0 = (q % 2) * cell + int(rng.integers(1, cell - size))
        y0 = (q // 2) * cell + int(rng.integers(1, cell - size))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        objects.append(SceneObject(shape, list(COLORS)[c], PATTERNS[p], (x0, y0, x0 + size, y0 + size)))
    return objects


def generate_item(rng: np.random.Generator, n_objects: int | None = None, family: str | None = None,
                  image_size: int = IMAGE_SIZE, min_objects: int = 2, max_objects: int = 4) -> VQAItem:
    """One random item; ``n_objects``/``family`` are drawn uniformly when not given."""
    if n_objects is None:
        n_objects = int(rng.integers(min_objects, max_objects + 1))
    if family is None:
        family = FAMILIES[int(rng.integers(len(FAMILIES)))]
    objects = random_scene(rng, n_objects, image_size)
    target = int(rng.integers(n_objects))
    obj = objects[target]
    image = render(objects, rng, image_size)
    question, answer = (t.format(color=obj.color, shape=obj.shape, pattern=obj.pattern)
                        for t in QUESTION_TEMPLATES[family])
    answer_word = answer.split()[-1]
    return VQAItem(image, question, answer, answer_word, obj.box, obj.mask(image_size),
                   n_objects, family, objects, target)


def generate_items(n: int, seed: int = 0, min_objects: int = 2, max_objects: int = 4,
                   families: tuple[str, ...] | None = None, image_size: int = IMAGE_SIZE) -> list[VQAItem]:
    """``n`` items drawn from ``numpy.random.default_rng(seed)``; families alternate if several."""
    rng = np.random.default_rng(seed)
    families = tuple(families or FAMILIES)
    return [generate_item(rng, family=families[int(rng.integers(len(families)))], image_size=image_size,
                          min_objects=min_objects, max_objects=max_objects) for _ in range(n)]


EVAL_SEED = 20240601


def write_eval_split(out_dir: str | Path, n: int = 60, seed: int = EVAL_SEED) -> list[VQAItem]:
    """Write the fixed evaluation split: ``items.jsonl`` + ``images/NNN.png`` (2-4 objects)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    items = generate_items(n, seed=seed, min_objects=2, max_objects=4)
    with open(out_dir / "items.jsonl", "w") as f:
        for i, item in enumerate(items):
            rel = f"images/{i:03d}.png"
            item.image.save(out_dir / rel, optimize=True)
            f.write(json.dumps(item.to_row(rel)) + "\n")
    return items


def load_eval_split(path: str | Path | None = None) -> list[VQAItem]:
    """Read a split written by :func:`write_eval_split` (default: the shipped ``data/eval``)."""
    path = Path(path) if path is not None else Path(__file__).resolve().parents[2] / "data" / "eval"
    with open(path / "items.jsonl") as f:
        return [VQAItem.from_row(json.loads(line), path) for line in f if line.strip()]
