"""Shapes: synthetic scenes of solid shapes and GenEval-style prompts, for an image-level benchmark
that runs on a CPU. This file holds the prompt grammar and the scene renderer (numpy only); the
reward that judges an image against its prompt is `rewards.geneval_shapes`, and the base model
that draws the scenes is `shapes_model.py`.

Grammar (GenEval's categories and wording; COLOR in red, green, blue, yellow; SHAPE in circle,
square, triangle; NUMBER in two, three, four):

    single object   a photo of a COLOR SHAPE
    counting        a photo of NUMBER COLOR SHAPEs
    two objects     a photo of a COLOR SHAPE and a COLOR SHAPE
    position        a photo of a COLOR SHAPE RELATION a COLOR SHAPE    RELATION: left of, right of, above, below

Scenes: a plain background that is none of the four colours (black, white or a grey), solid
shapes of one of the four colours, sides 25-45 % of the image side (SIDE_RANGE), apart from each other;
squares are axis-aligned and triangles stand on a horizontal base.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 205, 40)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {"two": 2, "three": 3, "four": 4}
RELATIONS = ("left of", "right of", "above", "below")
SIZE = 32  # the benchmark's image side (pixels)
SIDE_RANGE = (0.25, 0.45)  # shape sides as fractions of the image side


@dataclasses.dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    count: int = 1


@dataclasses.dataclass(frozen=True)
class Scene:
    """What a prompt asks for: things (colour, shape, count), and maybe a relation of the first to
    the second. `counted`: the count is exact (counting prompts), else at least one."""

    things: tuple
    relation: str | None = None
    counted: bool = False


_COLOR, _SHAPE = "|".join(COLORS), "|".join(SHAPES)
_ONE = rf"an? ({_COLOR}) ({_SHAPE})"
_PATTERNS = [
    ("counting", re.compile(rf"a photo of ({'|'.join(NUMBERS)}) ({_COLOR}) ({_SHAPE})s")),
    ("position", re.compile(rf"a photo of {_ONE} ({'|'.join(RELATIONS)}) {_ONE}")),
    ("two objects", re.compile(rf"a photo of {_ONE} and {_ONE}")),
    ("single object", re.compile(rf"a photo of {_ONE}")),
]


def parse_prompt(prompt: str) -> tuple[str, Scene]:
    """(category, Scene) of a prompt of the grammar; a ValueError naming the prompt otherwise."""
    text = prompt.strip().lower()
    for category, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groups()
        if category == "counting":
            return category, Scene((Thing(g[1], g[2], NUMBERS[g[0]]),), counted=True)
        if category == "position":
            return category, Scene((Thing(g[0], g[1]), Thing(g[3], g[4])), relation=g[2])
        if category == "two objects":
            return category, Scene((Thing(g[0], g[1]), Thing(g[2], g[3])))
        return category, Scene((Thing(g[0], g[1]),))
    raise ValueError(f"prompt {prompt!r} is not in the shapes grammar (see shapes.py), e.g. 'a photo of a red circle'")


def prompt_of(scene: Scene) -> str:
    """The grammar's sentence for a Scene."""
    a = [f"a {t.color} {t.shape}" for t in scene.things]
    if scene.counted:
        t = scene.things[0]
        number = {v: k for k, v in NUMBERS.items()}[t.count]
        return f"a photo of {number} {t.color} {t.shape}s"
    if scene.relation:
        return f"a photo of {a[0]} {scene.relation} {a[1]}"
    return "a photo of " + " and ".join(a)


# ------------------------------------------------------------------------------------------------
# Renderer: a scene as an RGB image, shapes placed apart at random
# ------------------------------------------------------------------------------------------------


def draw_shape(image: np.ndarray, shape: str, cx: float, cy: float, side: float, rgb) -> None:
    """Fill one solid shape, centred at (cx, cy) with the given side (pixels), into image (H, W, 3)."""
    h, w = image.shape[:2]
    y, x = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    dx, dy, r = x - cx, y - cy, side / 2
    if shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif shape == "square":
        mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    else:  # upright triangle: apex at the top, base at the bottom, as wide as it is tall
        mask = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    image[mask] = rgb


def place(sides, size: int, rng: np.random.Generator, tries: int = 200):
    """Centres for squares of these sides inside the image, bounding boxes at least 2 px apart."""
    boxes = []
    for side in sides:
        for _ in range(tries):
            c = rng.uniform(side / 2 + 1, size - side / 2 - 1, size=2)
            if all(np.abs(c - b[:2]).max() > (side + b[2]) / 2 + 2 for b in boxes):
                boxes.append(np.array([*c, side]))
                break
        else:
            return None
    return [b[:2] for b in boxes]


def jitter_color(rgb, rng: np.random.Generator, amount: int) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def render(
    scene: Scene, size: int, rng: np.random.Generator, side_range=SIDE_RANGE, color_jitter=25, background=None
) -> np.ndarray:
    """A (size, size, 3) uint8 image of `scene`: its things at random places, apart; for a relation
    the first thing is placed on the right side of the second. Backgrounds: black, white or grey."""
    for _ in range(100):
        things = [t for t in scene.things for _ in range(t.count)]
        sides = rng.uniform(*side_range, size=len(things)) * size
        centres = place(sides, size, rng)
        if centres is None:
            continue
        if scene.relation and not relation_holds(scene.relation, centres[0], centres[1], size):
            continue
        break
    else:
        raise RuntimeError(f"could not place {scene} at {size} px")
    if background is None:
        background = [(0, 0, 0), (255, 255, 255), (int(rng.integers(60, 200)),) * 3][int(rng.integers(3))]
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    for thing, (cx, cy), side in zip(things, centres, sides, strict=True):
        draw_shape(image, thing.shape, cx, cy, side, jitter_color(COLORS[thing.color], rng, color_jitter))
    return image


def relation_holds(relation: str, a, b, size: int) -> bool:
    """Whether centre a stands `relation` centre b: offset along the axis > 5 % of the image side."""
    margin = 0.05 * size
    dx, dy = b[0] - a[0], b[1] - a[1]  # image y grows downwards
    return {"left of": dx > margin, "right of": -dx > margin, "above": dy > margin, "below": -dy > margin}[relation]


def random_scene(category: str, rng: np.random.Generator) -> Scene:
    """A random Scene of a grammar category (single object, counting, two objects, position)."""
    color = lambda: str(rng.choice(list(COLORS)))  # noqa: E731
    shape = lambda: str(rng.choice(SHAPES))  # noqa: E731
    if category == "single object":
        return Scene((Thing(color(), shape()),))
    if category == "counting":
        return Scene((Thing(color(), shape(), int(rng.integers(2, 5))),), counted=True)
    first = Thing(color(), shape())
    second = first
    while (second.color, second.shape) == (first.color, first.shape):
        second = Thing(color(), shape())
    if category == "two objects":
        return Scene((first, second))
    return Scene((first, second), relation=str(rng.choice(RELATIONS)))


CATEGORIES = ("single object", "counting", "two objects", "position")


def all_prompts() -> list[str]:
    """Every prompt of the grammar (12 single, 36 counting, 132 two-object, 528 position)."""
    things = [Thing(c, s) for c in COLORS for s in SHAPES]
    out = [prompt_of(Scene((t,))) for t in things]
    out += [prompt_of(Scene((Thing(t.color, t.shape, n),), counted=True)) for t in things for n in (2, 3, 4)]
    pairs = [(a, b) for a in things for b in things if a != b]
    out += [prompt_of(Scene(pair)) for pair in pairs]
    return out + [prompt_of(Scene(pair, relation=r)) for pair in pairs for r in RELATIONS]


def held_out_prompts() -> dict:
    """Evaluation prompts per category. Two objects and position: combinations never used in
    training (every prompt whose first thing's colour index equals its second thing's shape index,
    mod 3, is held out); single object and counting have too few prompts to hold any out."""
    out = {c: [] for c in CATEGORIES}
    colors, shapes_ = list(COLORS), list(SHAPES)
    for c1 in colors:
        for s1 in SHAPES:
            out["single object"].append(prompt_of(Scene((Thing(c1, s1),))))
            for n in (2, 3, 4):
                out["counting"].append(prompt_of(Scene((Thing(c1, s1, n),), counted=True)))
            for c2 in colors:
                for s2 in SHAPES:
                    if (c1, s1) == (c2, s2) or colors.index(c1) % 3 != shapes_.index(s2):
                        continue
                    out["two objects"].append(prompt_of(Scene((Thing(c1, s1), Thing(c2, s2)))))
                    for rel in RELATIONS:
                        out["position"].append(prompt_of(Scene((Thing(c1, s1), Thing(c2, s2)), relation=rel)))
    return out


# ------------------------------------------------------------------------------------------------
# Images built to fool a shapes reward: drawings in the prompt's colour that are no shape of the grammar
# ------------------------------------------------------------------------------------------------

FOOLING_FAMILIES = ("blocks", "fringed blocks", "bars", "ragged blobs", "L", "plus", "T", "specks", "noise", "empty")


def fooling_image(family: str, size: int, rgb, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) uint8 image of one FOOLING_FAMILIES member in colour `rgb` on a black,
    white or grey background. blocks: 3-6 squares of 4 px (a patch of the first shapes model);
    fringed blocks: the same inside a 1 px border blending colour and background; bars: 2-3.5 times
    as long as wide; ragged blobs: a disk whose radius swings +-30 % in 2-5 lobes; L, plus, T: strokes
    a third of a shape's side; specks: 30 dots of 1-2 px; noise: uniform pixel noise; empty: the
    background alone."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = [(0, 0, 0), (255, 255, 255), (128, 128, 128)][int(rng.integers(3))]
    rgb = np.array(rgb)
    lo, hi = (int(f * size) for f in SIDE_RANGE)
    s = int(rng.integers(lo, hi + 1))  # a shape's side
    t, (y, x) = max(2, s // 3), rng.integers(0, size - s, 2)
    if family in ("blocks", "fringed blocks"):
        for _ in range(int(rng.integers(3, 7))):
            by, bx = rng.integers(1, size - 5, 2)
            if family == "fringed blocks":
                image[by - 1 : by + 5, bx - 1 : bx + 5] = (rgb + image[0, 0]) // 2
            image[by : by + 4, bx : bx + 4] = rgb
    elif family == "bars":
        w = int(rng.integers(lo // 2, lo))
        n = int(min(size - 2, w * rng.uniform(2, 3.5)))
        y, x = rng.integers(0, size - n, 2)
        image[y : y + w, x : x + n] = rgb
        if rng.random() < 0.5:
            image = image.transpose(1, 0, 2).copy()
    elif family == "ragged blobs":
        r0 = s / 2
        cy, cx = rng.uniform(1.4 * r0, size - 1.4 * r0, 2)
        yy, xx = np.mgrid[0:size, 0:size] + 0.5
        angle = np.arctan2(yy - cy, xx - cx)
        radius = r0 * (1 + 0.3 * np.sin(int(rng.integers(2, 6)) * angle + rng.uniform(0, 2 * np.pi)))
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = rgb
    elif family in ("L", "plus", "T"):
        mid = slice(x + (s - t) // 2, x + (s + t) // 2)
        if family == "L":
            image[y : y + s, x : x + t] = rgb
            image[y + s - t : y + s, x : x + s] = rgb
        elif family == "plus":
            image[y + (s - t) // 2 : y + (s + t) // 2, x : x + s] = rgb
            image[y : y + s, mid] = rgb
        else:
            image[y : y + t, x : x + s] = rgb
            image[y : y + s, mid] = rgb
    elif family == "specks":
        for _ in range(30):
            (dy, dx), d = rng.integers(0, size - 2, 2), int(rng.integers(1, 3))
            image[dy : dy + d, dx : dx + d] = rgb
    elif family == "noise":
        image = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
    elif family == "empty":
        pass
    else:
        raise ValueError(f"unknown fooling family {family!r}; choose from {FOOLING_FAMILIES}")
    return image


def fooling_images(size: int, rng: np.random.Generator, per_family: int = 10) -> list:
    """(family, image, prompt) for `per_family` images of each family, each with a single-object prompt
    of its colour (a random shape): the strict reward must give every one 0."""
    out = []
    for family in FOOLING_FAMILIES:
        for _ in range(per_family):
            color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
            out.append((family, fooling_image(family, size, COLORS[color], rng), f"a photo of a {color} {shape}"))
    return out
