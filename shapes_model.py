"""The shapes base model: a small text-conditioned UNet that draws shapes.py's scenes, its
pretraining by flow matching, and the choice of its weights by held-out accuracy.

    python shapes_model.py train --steps 1000 --dir runs/shapes_pretrain     # resumes where it stopped
    python shapes_model.py select --dir runs/shapes_pretrain --out shapes_base.safetensors

`train` writes, every `--snapshot_every` steps, an fp16 snapshot of the EMA weights
(`ema_00200.safetensors`, ...) and a resumable state (`state.pt`: weights, EMA, optimizer, schedule,
random streams); killed and started again with the same arguments it continues from the last state.
`select` scores every snapshot with the strict GenEval-style reward on held-out prompts (ODE, 20
steps, guidance 4.5) and copies the best to `--out`. Scoring is a separate command so that a run
can be judged while it trains.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import rewards
import shapes
from shapes import COLORS, NUMBERS, SHAPES, SIZE

# ------------------------------------------------------------------------------------------------
# Model: a small convolutional UNet (diffusers' UNet2DConditionModel) on 32 px RGB pixels with
# cross-attention to a word-level text encoder; it predicts the flow-matching velocity
# ------------------------------------------------------------------------------------------------

# 32 px, shapes 25-45 % of the side (8-14 px). A conv UNet, not an MMDiT: patch-4 MMDiTs pretrained
# on a CPU for up to 70 minutes drew blobs with a patch-grid texture, a UNet of this size drew
# recognisable shapes after ~700 steps (shared/SHAPES-PRETRAINING-FACTS.md; RESULTS.md, Shapes).
VOCAB = ["<pad>", "<empty>", "a", "an", "photo", "of", "and", "left", "right", "above", "below"]
VOCAB += list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES] + list(NUMBERS)
MAX_WORDS = 12
EMBED = 64  # text token width
UNET = dict(
    sample_size=SIZE,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=EMBED,
    attention_head_dim=8,
    norm_num_groups=8,
)
# LoRA targets of the UNet's self- and cross-attention (attn1, attn2)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


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


class TextEncoder(nn.Module):
    """Word embeddings + learned positions -> (B, L, EMBED) tokens, padding zeroed."""

    def __init__(self):
        super().__init__()
        self.words = nn.Embedding(len(VOCAB), EMBED)
        self.positions = nn.Parameter(torch.zeros(MAX_WORDS, EMBED))

    def forward(self, ids):
        tokens = self.words(ids) + self.positions  # (B, L, E)
        return tokens * (ids > 0).float()[..., None]  # (B, L, E)


def build_model(seed: int = 0):
    """(unet, text encoder), randomly initialised from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**UNET), TextEncoder()


def predict_velocity(unet, x, sigma, embeds):
    """The network's velocity v = x1 - x0 at noise level sigma (scalar or (B,)); (B, 3, H, W)."""
    t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0]) * 1000  # (B,)
    return unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]


@torch.no_grad()
def sample(unet, encoder, prompts, steps: int = 20, guidance: float = 4.5, seed: int = 0):
    """ODE samples (Euler, shift 1) with classifier-free guidance: images (B, 3, H, W) in [0, 1]."""
    sigmas = torch.linspace(1, 0, steps + 1)  # (T+1,)
    x = torch.randn(len(prompts), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    cond, uncond = encoder(tokenize(prompts)), encoder(tokenize([""] * len(prompts)))
    for k in range(steps):
        v = predict_velocity(unet, torch.cat([x, x]), sigmas[k], torch.cat([uncond, cond]))  # (2B, 3, H, W)
        v_u, v_c = v.chunk(2)
        x = x + (v_u + guidance * (v_c - v_u)) * (sigmas[k + 1] - sigmas[k])
    return ((x.clamp(-1, 1) + 1) / 2).float()


def training_batch(n: int, rng: np.random.Generator, held_out=None):
    """n random scenes (all categories, training combinations only) as ([-1, 1] images, prompts)."""
    scenes = []
    while len(scenes) < n:
        scene = shapes.random_scene(shapes.CATEGORIES[int(rng.integers(4))], rng)
        if held_out is None or shapes.prompt_of(scene) not in held_out:
            scenes.append(scene)
    images = np.stack([shapes.render(s, SIZE, rng) for s in scenes])
    return torch.tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1, [shapes.prompt_of(s) for s in scenes]


def state_dict(unet, encoder) -> dict:
    """One flat fp16 state of both networks (unet.*, encoder.*), as saved to a .safetensors file."""
    state = {f"unet.{k}": v.half() for k, v in unet.state_dict().items()}
    state |= {f"encoder.{k}": v.half() for k, v in encoder.state_dict().items()}
    return {k: v.contiguous() for k, v in state.items()}


def load(path: str):
    """(unet, encoder) in float32 from a file of `state_dict`, frozen, in eval mode."""
    unet, encoder = build_model()
    state = load_file(path)
    if not any(k.startswith("unet.") for k in state):
        raise ValueError(f"{path} holds no shapes UNet (keys unet.*): pretrain one with `python shapes_pretrain.py`")
    unet.load_state_dict({k[5:]: v.float() for k, v in state.items() if k.startswith("unet.")})
    encoder.load_state_dict({k[8:]: v.float() for k, v in state.items() if k.startswith("encoder.")})
    return unet.eval().requires_grad_(False), encoder.eval().requires_grad_(False)


def evaluate(unet, encoder, per_category: int = 128, steps: int = 20, seed: int = 0, chunk: int = 64) -> dict:
    """Strict accuracy of ODE samples per category on held-out prompts (cycled), and their mean ('overall')."""
    reward = rewards.load_reward("geneval_shapes")
    out = {}
    for category, pool in shapes.held_out_prompts().items():
        prompts = [pool[i % len(pool)] for i in range(per_category)]
        scores = []
        for i in range(0, per_category, chunk):
            part = prompts[i : i + chunk]
            scores.append(reward(sample(unet, encoder, part, steps, seed=seed + i), part))
        out[category] = torch.cat(scores).mean().item()
    out["overall"] = sum(out.values()) / len(shapes.CATEGORIES)
    return out


def flow_matching_loss(unet, encoder, x0, prompts, generator) -> torch.Tensor:
    """Velocity loss ||v_theta(x_s, s) - (x1 - x0)||^2 at s ~ logit-normal(0, 1) (SD3's training noise levels)."""
    sigma = torch.sigmoid(torch.randn(len(x0), generator=generator))  # (B,)
    x1 = torch.randn(x0.shape, generator=generator)  # (B, 3, H, W)
    s = sigma[:, None, None, None]
    v = predict_velocity(unet, (1 - s) * x0 + s * x1, sigma, encoder(tokenize(prompts)))
    return (v - (x1 - x0)).square().mean()


def train(
    steps: int,
    directory: str,
    seed: int = 0,
    batch: int = 64,
    lr: float = 1e-3,
    warmup: int = 100,
    ema_decay: float = 0.999,
    snapshot_every: int = 100,
):
    """Flow matching on random scenes of the training combinations (held-out two-object and position
    prompts never seen), 10 % empty prompts for guidance. AdamW, linear warm-up then cosine to lr / 10;
    an EMA of the weights (warmed up as min(decay, (1 + n) / (10 + n))) is what is snapshotted."""
    os.makedirs(directory, exist_ok=True)
    unet, encoder = build_model(seed)
    params = list(unet.parameters()) + list(encoder.parameters())
    ema_unet, ema_encoder = copy.deepcopy(unet).eval(), copy.deepcopy(encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    curve = lambda i: min(1.0, (i + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, curve)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    state_path, done = os.path.join(directory, "state.pt"), 0
    if os.path.exists(state_path):
        state = torch.load(state_path, weights_only=False)
        for module, key in ((unet, "unet"), (encoder, "encoder"), (ema_unet, "ema_unet"), (ema_encoder, "ema_encoder")):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        schedule.load_state_dict(state["schedule"])
        rng.bit_generator.state, done = state["rng"], state["step"]
        gen.set_state(state["gen"])
        print(f"resumed {directory} at step {done}")
    held = {p for c in ("two objects", "position") for p in shapes.held_out_prompts()[c]}
    log_path = os.path.join(directory, "log.jsonl")
    if os.path.exists(log_path):  # keep the lines of the steps the state holds: later ones are run again
        lines = [line for line in open(log_path) if json.loads(line)["step"] <= done]
        open(log_path, "w").writelines(lines)
    log = open(log_path, "a")
    start = time.perf_counter()
    for step in tqdm(range(done + 1, steps + 1), desc="pretrain", initial=done, total=steps, dynamic_ncols=True):
        x0, prompts = training_batch(batch, rng, held)  # (B, 3, H, W)
        prompts = ["" if rng.random() < 0.1 else p for p in prompts]
        loss = flow_matching_loss(unet, encoder, x0, prompts, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - min(ema_decay, (1 + step) / (10 + step)))
        log.write(json.dumps({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - start}) + "\n")
        if step % snapshot_every == 0 or step == steps:
            log.flush()
            save_file(state_dict(ema_unet, ema_encoder), os.path.join(directory, f"ema_{step:05d}.safetensors"))
            state = dict(unet=unet.state_dict(), encoder=encoder.state_dict(), ema_unet=ema_unet.state_dict())
            state |= dict(ema_encoder=ema_encoder.state_dict(), opt=opt.state_dict(), schedule=schedule.state_dict())
            state |= dict(rng=rng.bit_generator.state, gen=gen.get_state(), step=step)
            torch.save(state, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)  # a kill mid-write leaves the previous state
    log.close()


def select(directory: str, out: str, per_category: int = 128, every: int = 1) -> dict:
    """Score the snapshots (every `every`-th, and the last) and copy the best overall to `out`;
    scores are kept in directory/select.json, so a snapshot is scored once."""
    paths = sorted(glob.glob(os.path.join(directory, "ema_*.safetensors")))
    paths = [p for i, p in enumerate(paths) if i % every == every - 1 or p == paths[-1]]
    record_path = os.path.join(directory, "select.json")
    scores = json.load(open(record_path)) if os.path.exists(record_path) else {}
    for path in tqdm(paths, desc="select"):
        key = f"{os.path.basename(path)}@{per_category}"
        if key not in scores:
            scores[key] = evaluate(*load(path), per_category=per_category)
            json.dump(scores, open(record_path, "w"), indent=1)
            tqdm.write(f"{key}: {json.dumps({k: round(v, 3) for k, v in scores[key].items()})}")
    best = max((k for k in scores if k.endswith(f"@{per_category}")), key=lambda k: scores[k]["overall"])
    shutil.copyfile(os.path.join(directory, best.split("@")[0]), out)
    print(f"best {best}: {scores[best]} -> {out}")
    return scores[best]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="pretrain (resumes from DIR/state.pt)")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--snapshot_every", type=int, default=100)
    s = sub.add_parser("select", help="score the snapshots on held-out prompts, copy the best to --out")
    s.add_argument("--out", default="shapes_base.safetensors")
    s.add_argument("--per_category", type=int, default=128)
    s.add_argument("--every", type=int, default=1, help="score every n-th snapshot (and the last)")
    for p in (t, s):
        p.add_argument("--dir", default="runs/shapes_pretrain")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "train":
        train(args.steps, args.dir, args.seed, args.batch, args.lr, snapshot_every=args.snapshot_every)
    else:
        select(args.dir, args.out, args.per_category, args.every)


if __name__ == "__main__":
    main()
