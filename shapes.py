"""Shapes: synthetic scenes of solid shapes and GenEval-style prompts, for an image-level benchmark
that runs on a CPU. This file holds the prompt grammar and the scene renderer; the reward that
judges an image against its prompt is `rewards.geneval_shapes`.

Grammar (GenEval's categories and wording; COLOR in red, green, blue, yellow; SHAPE in circle,
square, triangle; NUMBER in two, three, four):

    single object   a photo of a COLOR SHAPE
    counting        a photo of NUMBER COLOR SHAPEs
    two objects     a photo of a COLOR SHAPE and a COLOR SHAPE
    position        a photo of a COLOR SHAPE RELATION a COLOR SHAPE    RELATION: left of, right of, above, below

Scenes: a plain background that is none of the four colours (black, white or a grey), solid
shapes of one of the four colours, sides 12-30 % of the image side, apart from each other;
squares are axis-aligned and triangles stand on a horizontal base.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch
import torch.nn as nn

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 205, 40)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {"two": 2, "three": 3, "four": 4}
RELATIONS = ("left of", "right of", "above", "below")


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
    scene: Scene, size: int, rng: np.random.Generator, side_range=(0.12, 0.30), color_jitter=25, background=None
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
        raise RuntimeError(f"could not place {prompt_of(scene)!r} at {size} px")
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


# ------------------------------------------------------------------------------------------------
# Model: a small MMDiT (diffusers' SD3Transformer2DModel) on 48 px RGB pixels, a word-level text
# encoder, flow-matching pretraining (predicting the clean image), held-out evaluation
# ------------------------------------------------------------------------------------------------

# 48 px, patch 4: 144 tokens of 4 x 4 pixels. Measured (README): patch 8 at 64 px (64 tokens) trained
# 6000 steps drew 8 x 8 blocks, not shapes; patch 4 at 64 px costs 3.2x a step of 48 px; the reward
# judges 97.8 % of random 48 px renders right (99.9 % at 64 px, 84.8 % at 32 px).
SIZE = 48
VOCAB = ["<pad>", "<empty>", "a", "an", "photo", "of", "and", "left", "right", "above", "below"]
VOCAB += list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES] + list(NUMBERS)
MAX_WORDS = 12
MODEL = dict(
    sample_size=SIZE,
    patch_size=4,
    in_channels=3,
    out_channels=3,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=3,  # width 96
    joint_attention_dim=64,
    caption_projection_dim=96,
    pooled_projection_dim=64,
    pos_embed_max_size=SIZE // 4,
)


def tokenize(prompts) -> torch.Tensor:
    """Word ids (B, MAX_WORDS), <pad>-filled; the empty prompt (classifier-free guidance) is <empty>."""
    index = {w: i for i, w in enumerate(VOCAB)}
    rows = []
    for p in prompts:
        words = p.lower().split() or ["<empty>"]
        unknown = [w for w in words if w not in index]
        if unknown or len(words) > MAX_WORDS:
            raise ValueError(
                f"prompt {p!r} is not in the shapes vocabulary (unknown {unknown}, or > {MAX_WORDS} words)"
            )
        rows.append([index[w] for w in words] + [0] * (MAX_WORDS - len(words)))
    return torch.tensor(rows)


def build_model(seed: int = 0):
    """(transformer, text encoder): the MMDiT and a word embedding with learned positions."""
    from diffusers import SD3Transformer2DModel

    class TextEncoder(nn.Module):
        """Word embeddings + learned positions -> (B, L, 64) tokens and a (B, 64) pooled mean."""

        def __init__(self):
            super().__init__()
            self.words = nn.Embedding(len(VOCAB), MODEL["joint_attention_dim"])
            self.positions = nn.Parameter(torch.zeros(MAX_WORDS, MODEL["joint_attention_dim"]))

        def forward(self, ids):
            tokens = self.words(ids) + self.positions  # (B, L, E)
            keep = (ids > 0).float()[..., None]  # (B, L, 1)
            return tokens * keep, (tokens * keep).sum(1) / keep.sum(1)  # (B, L, E), (B, E)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SD3Transformer2DModel(**MODEL), TextEncoder()


def predict_x0(transformer, x, sigma, embeds, pooled):
    """The network predicts the clean image; (B, 3, H, W) in [-1, 1] scale."""
    t = torch.as_tensor(sigma, dtype=torch.float32).expand(x.shape[0]) * 1000
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled)[0]


def velocity_from_x0(x, x0, sigma):
    """v = (x - x0) / sigma on the path x = (1 - sigma) x0 + sigma x1."""
    return (x - x0) / torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))


def training_batch(n: int, rng: np.random.Generator, held_out=None):
    """n random scenes (all categories, training combinations only) as ([-1, 1] images, prompts)."""
    scenes = []
    while len(scenes) < n:
        scene = random_scene(CATEGORIES[int(rng.integers(4))], rng)
        if held_out is None or prompt_of(scene) not in held_out:
            scenes.append(scene)
    images = torch.tensor(np.stack([render(s, SIZE, rng) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [prompt_of(s) for s in scenes]


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


@torch.no_grad()
def sample(transformer, encoder, prompts, steps: int = 20, guidance: float = 4.5, seed: int = 0):
    """ODE samples (Euler, shift 1) with classifier-free guidance: images (B, 3, H, W) in [0, 1]."""
    import vgpo

    sigmas = vgpo.sigma_schedule(steps, 1.0)  # (T+1,)
    x = torch.randn(len(prompts), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    cond, uncond = encoder(tokenize(prompts)), encoder(tokenize([""] * len(prompts)))
    for k in range(steps):
        x0c, x0u = (predict_x0(transformer, x, sigmas[k], *c) for c in (cond, uncond))
        x0 = x0u + guidance * (x0c - x0u)  # (B, 3, H, W); guiding x0 guides v alike
        x = x + velocity_from_x0(x, x0, sigmas[k].expand(len(x))) * (sigmas[k + 1] - sigmas[k])
    return ((x.clamp(-1, 1) + 1) / 2).float()


def evaluate(transformer, encoder, per_category: int = 32, steps: int = 20, seed: int = 0) -> dict:
    """Strict accuracy of ODE samples per category on held-out prompts (cycled), and overall."""
    import rewards

    reward = rewards.load_reward("geneval_shapes")
    out = {}
    for category, pool in held_out_prompts().items():
        prompts = [pool[i % len(pool)] for i in range(per_category)]
        out[category] = reward(sample(transformer, encoder, prompts, steps, seed=seed), prompts).mean().item()
    out["overall"] = sum(out.values()) / len(CATEGORIES)
    return out


def pretrain(
    steps: int,
    path: str,
    seed: int = 0,
    batch: int = 64,
    lr: float = 1e-3,
    eval_every: int = 1000,
    ema_decay: float = 0.999,
):
    """Flow matching on random scenes (training combinations), 10 % empty prompts for guidance; the
    network predicts the clean image (x0), loss = MSE on x0, sigma logit-normal (SD3's sampling of
    training noise levels). AdamW with 200 warm-up steps and a cosine decay to lr / 10; the EMA of
    the weights (`ema_decay`) is what is evaluated and saved. Every `eval_every` steps (0: never)
    evaluates held-out strict accuracy; saves fp16 safetensors to `path` then and at the end, and
    logs JSON lines to path + '.log.jsonl'."""
    import copy
    import json
    import math
    import time

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    transformer, encoder = build_model(seed)
    params = list(transformer.parameters()) + list(encoder.parameters())
    ema_transformer, ema_encoder = copy.deepcopy(transformer).eval(), copy.deepcopy(encoder).eval()
    ema_params = list(ema_transformer.parameters()) + list(ema_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    )
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    held = {p for c in ("two objects", "position") for p in held_out_prompts()[c]}
    start, log = time.perf_counter(), open(path + ".log.jsonl", "a")
    for step in tqdm(range(1, steps + 1), desc="pretrain", dynamic_ncols=True):
        x0, prompts = training_batch(batch, rng, held)  # (B, 3, H, W)
        prompts = ["" if rng.random() < 0.1 else p for p in prompts]
        sigma = torch.sigmoid(torch.randn(batch, generator=gen))  # (B,), logit-normal(0, 1)
        x1 = torch.randn(x0.shape, generator=gen)
        s = sigma[:, None, None, None]
        pred = predict_x0(transformer, (1 - s) * x0 + s * x1, sigma, *encoder(tokenize(prompts)))
        loss = (pred - x0).square().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if (eval_every and step % eval_every == 0) or step == steps:
            record = {"step": step, "loss": loss.item(), "minutes": (time.perf_counter() - start) / 60}
            record |= evaluate(ema_transformer, ema_encoder) if eval_every else {}
            log.write(json.dumps(record) + "\n")
            log.flush()
            tqdm.write(json.dumps(record))
            state = {f"transformer.{k}": v.half() for k, v in ema_transformer.state_dict().items()}
            state |= {f"encoder.{k}": v.half() for k, v in ema_encoder.state_dict().items()}
            save_file({k: v.contiguous() for k, v in state.items()}, path)


def load(path: str):
    """(transformer, encoder) in float32 from a pretrain() file, frozen, in eval mode."""
    from safetensors.torch import load_file

    transformer, encoder = build_model()
    state = load_file(path)
    transformer.load_state_dict({k[12:]: v.float() for k, v in state.items() if k.startswith("transformer.")})
    encoder.load_state_dict({k[8:]: v.float() for k, v in state.items() if k.startswith("encoder.")})
    return transformer.eval().requires_grad_(False), encoder.eval().requires_grad_(False)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Pretrain the shapes model by flow matching (CPU).")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--out", default="shapes_base.safetensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_every", type=int, default=1000)
    args = parser.parse_args()
    pretrain(args.steps, args.out, args.seed, eval_every=args.eval_every)
