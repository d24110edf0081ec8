"""VGPO: Value-Anchored Group Policy Optimization for flow-matching models, in one file.

Paper: "Anchoring Values in Temporal and Group Dimensions for Flow Matching Model Alignment"
(Shao et al., arXiv 2512.12387; ICLR 2026 submission "Value-Anchored Group Policy Optimization
for Flow Models"). Equation numbers are those of the ICLR version. VGPO is Flow-GRPO
(Liu et al., arXiv 2505.05470) with two changes to the reward-to-advantage path:
TCRM (dense per-step values from one-step projections, Eqs. 9-11) and ADAE (a group advantage
with an absolute anchor, Eqs. 12-13). The file reads in the algorithm's order:

    config -> SDE step and log-prob -> projection and values (TCRM) -> advantages (ADAE)
    -> loss -> models (toy, SD3.5, shapes) -> rollout -> training loop -> CLI

Shape legend: N prompts per iteration, G samples per prompt (a group), B = N*G, T sampling
steps, D latent dims (C,H,W for SD3.5; 2 for the toy). Tensors with a group axis are (N, G, ...).

Step index: the paper counts t = T..1 downward; this file counts k = 0..T-1 in sampling order,
k = T - t. Step k moves the state x_k at sigma_k to x_{k+1} at sigma_{k+1}; sigma_0 = 1 (noise),
sigma_T = 0. Names: `x0` / `x0hat` always mean data (sigma = 0, the flow's x0); the sampler's
states are "x_k at sigma_k", and the first of them (pure noise) is never called x0.

Decisions where the paper is silent (each is a Config field; see README "Decisions"):
  1. gamma (discount of Eq. 10) = 0.9.                                          Config.gamma
  2. Eq. 11 weights fall back to 1 for a trajectory whose mean value is <= eps or
     that has a negative value, with a warning (the paper assumes non-negative
     rewards); so every weight lies in [0, T].                                  Config.eps
  3. Eq. 13 is reconstructed: alpha = kappa * std (App. B) simplifies the anchor to kappa*Q,
     which survives std = 0; the anchor is Q divided by its discount-weight sum, so it lives
     on the reward's scale. kappa = 1.0 (provisional).                          Config.kappa
  4. The anchor acts on the first T/2 sampling steps (App. A.2: 5 of 10).       Config.anchor_steps
  5. Group std is the population std (ddof 0), over all N*G samples by default. Config.global_std
  6. w can be switched apart from the dense values, to separate the two roles
     of TCRM (weights only, values only).                                       Config.weighting
  7. A deterministic step (noise level 0) has no density; its log-prob is reported as 0.
  8. KL to the reference follows Flow-GRPO (no |dt| in the denominator).        Config.beta
     With beta = 0 no reference forward runs and kl_ref is logged as NaN.
  9. The reference policy is the LoRA adapter disabled; training recomputes the guided
     velocity with gradients through both branches, as Flow-GRPO's train_sd3.py (SPEC 5
     says "detached"; the reference does not detach).  Config.train_cfg, cfg_detach_uncond
 10. The sigma schedule is diffusers' FlowMatchEulerDiscreteScheduler's, built from the
     loaded pipeline's scheduler config with the configured shift.             Config.shift
 11. Each batch draws distinct prompts while the prompt set has enough (Flow-GRPO's sampler).
 12. A sample whose advantage is 0 at every step is left out of the policy update
     (Flow-GRPO's train_sd3.py): the minibatches are split over the others.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange
from tqdm.auto import tqdm

import shapes
import shapes_model

# ------------------------------------------------------------------------------------------------
# Config: SD3.5-Medium defaults from the paper and Flow-GRPO (SPEC section 6); presets below.
# ------------------------------------------------------------------------------------------------


@dataclass(init=False)
class Config:
    """Config(model=X, **fields): the paper's defaults below, then PRESETS[X] when the model has a
    preset (toy, tiny, shapes), then the caller's fields; `python vgpo.py --model X --field v` builds the same."""

    # run
    model: str = "toy"  # toy | shapes | tiny | random-sd3.5-medium (random weights, offline) | hub id | directory
    reward: str = ""  # toy_mode|toy_region (toy), or a rewards.py spec "ocr:1,pickscore:0.5"; "": toy_mode|ocr
    eval_reward: str = ""  # the evaluations' reward (same specs); "": the training reward
    seed: int = 0  # seeds every torch.Generator of the run
    iterations: int = 100  # rollout + update rounds
    prompts_per_iteration: int = 8  # N, prompts (groups) per rollout batch
    group_size: int = 24  # G, samples per prompt (Flow-GRPO: 24)
    # sampler (Eq. 7)
    num_steps: int = 10  # T, SDE sampling steps in training (paper App. A.2: 10)
    eval_steps: int = 40  # ODE steps for evaluation (paper App. A.2: 40)
    noise_level: float = 0.7  # a, SDE noise level (Flow-GRPO: 0.7)
    shift: float = 3.0  # sigma-schedule shift (SD3.5 scheduler: 3)
    # TCRM (Eqs. 9-11)
    dense_values: bool = True  # TCRM values Q_k from one-step projections; False: Q_k = R_T
    reward_workers: int = 4  # threads scoring instant rewards while the sampler runs on; 0: score inline
    reward_threads: int = 0  # OCR threads (an engine each), one pool shared by concurrent calls; 0: one per core
    gamma: float = 0.9  # gamma, discount of Eq. 10 (decision 1: not in the paper)
    weighting: str = "auto"  # Eq. 11 weights w_k: auto (= dense_values) | on | off (decision 6)
    # ADAE (Eqs. 12-13)
    kappa: float = 1.0  # kappa, anchor strength, alpha = kappa * std (decision 3: provisional)
    anchor_steps: int | None = None  # steps with the anchor on; None: num_steps // 2 (decision 4)
    global_std: bool = True  # std over all N*G samples per step (Flow-GRPO default)
    eps: float = 1e-4  # eps in the advantage's denominator and Eq. 11 fallback (Flow-GRPO)
    adv_clip: float = 5.0  # advantages clamped to [-adv_clip, adv_clip] (Flow-GRPO)
    # policy objective (Eq. 8)
    timestep_fraction: float = 0.99  # train the first int(T * fraction) steps (Flow-GRPO)
    clip_range: float = 1e-4  # PPO clip range of the ratio (Flow-GRPO)
    beta: float = 0.04  # KL weight (Flow-GRPO: 0.04 OCR/GenEval, 0.01 PickScore)
    num_minibatches: int = 2  # optimizer steps per rollout batch (Flow-GRPO: 2)
    micro_batch: int = 0  # samples per forward/backward, gradients accumulated (memory only); 0: a whole minibatch
    lr: float = 3e-4  # AdamW learning rate (Flow-GRPO)
    weight_decay: float = 1e-4  # AdamW weight decay (Flow-GRPO)
    max_grad_norm: float = 1.0  # gradient-norm clip (Flow-GRPO)
    lora_rank: int = 32  # LoRA r (Flow-GRPO)
    lora_alpha: int = 64  # LoRA alpha (Flow-GRPO)
    # SD3.5 backend
    resolution: int = 512  # image side in pixels (Flow-GRPO)
    guidance_scale: float = 4.5  # classifier-free guidance, in rollout and training (Flow-GRPO); 1: none
    train_cfg: bool = True  # training recomputes the guided velocity (Flow-GRPO train.cfg); off: cond only
    cfg_detach_uncond: bool = True  # training CFG detaches o_u (Flow-GRPO ac4c86e train_sd3.py:190); off: both
    decode_batch: int = 0  # images per VAE decode call (bounds the decode's memory peak); 0: the whole batch
    prompt_file: str = ""  # one prompt per line, training = evaluation; empty: built-in OCR prompts (shapes: grammar)
    max_sequence_length: int = 128  # T5 tokens
    gradient_checkpointing: bool = False  # trade compute for activation memory
    offload_text_encoders: bool = False  # encode all prompts up front, then free the encoders
    # evaluation and output (boilerplate)
    eval_every: int = 0  # evaluate every this many iterations; 0: only before and after
    eval_samples: int = 64  # held-out samples per evaluation (toy: noise; SD3: prompts x 1)
    output_dir: str = ""  # LoRA weights, sample grids, metrics, curves, checkpoints; empty: nothing written
    tensorboard: bool = False  # also log scalars and eval grids to output_dir/tensorboard (needs tensorboard)
    ema: bool = True  # evaluate and export an EMA of the LoRA weights (Flow-GRPO: on); toy, tiny: off (README)
    ema_decay: float = 0.9  # EMA decay (Flow-GRPO: 0.9), warmed up as min((1 + n) / (10 + n), decay)
    ema_every: int = 8  # optimizer steps between EMA updates (Flow-GRPO: 8)
    checkpoint_every: int = 10  # also on SIGINT/SIGTERM and at the end; needs output_dir
    resume: str = ""  # a directory holding checkpoint.pt: continue that run exactly
    device: str = "auto"  # auto: cuda if available, else cpu
    # toy backend
    toy_conditions: int = 4  # conditions ("prompts") of the 2D toy
    toy_modes: int = 4  # modes of each condition's target mixture
    toy_spread: float = 0.15  # std of each mode of the toy's base distribution
    toy_pretrain_steps: int = 1500  # flow-matching steps of the base toy model
    # shapes backend
    shapes_weights: str = ""  # the pretrained shapes model (shapes.py); empty: shapes_base.safetensors here
    shapes_prompts: str = "grammar"  # grammar: all categories, held-out evaluation; "p1; p2": train = evaluate on them

    def __init__(self, **fields):
        names = [f.name for f in dataclasses.fields(Config)]
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise TypeError(f"Config got unknown fields {unknown}; see `python vgpo.py --help`")
        merged = {**PRESETS.get(fields.get("model", Config.model), {}), **fields}
        if fields.get("resume") and not fields.get("output_dir"):
            merged["output_dir"] = fields["resume"]  # a resumed run keeps writing where it was, not in a preset's
        for f in dataclasses.fields(Config):
            setattr(self, f.name, merged.get(f.name, f.default))
        self.__post_init__()

    def __post_init__(self):
        if not self.reward:
            self.reward = "toy_mode" if self.model == "toy" else "ocr"
        if self.resume and not self.output_dir:
            self.output_dir = self.resume  # a resumed run keeps writing where it was
        if self.anchor_steps is None:
            self.anchor_steps = self.num_steps // 2
        validate_config(self)

    @property
    def fixed_prompts(self) -> bool:
        """Training and evaluation on given prompts (a prompt_file, or a list of shapes_prompts), new noise."""
        return bool(self.prompt_file) or (self.model == "shapes" and self.shapes_prompts != "grammar")

    @property
    def use_weights(self) -> bool:
        return self.dense_values if self.weighting == "auto" else self.weighting == "on"


# Overrides applied on top of the paper's defaults. The CPU toy is 2-D: its log-probs move
# much faster per update than an image's per-dimension mean, so it needs a wider clip range.
PRESETS = {
    "toy": dict(
        iterations=150,
        group_size=8,
        prompts_per_iteration=8,
        shift=1.0,
        clip_range=0.2,
        lr=3e-3,
        lora_rank=8,
        lora_alpha=16,
        beta=0.01,
        eval_samples=512,
        ema=False,  # measured: EMA hides VGPO's late drift on the toy; Results report the trained weights
    ),
    "tiny": dict(
        iterations=4,
        group_size=4,
        prompts_per_iteration=2,
        resolution=32,
        max_sequence_length=16,
        reward="jpeg_compressibility",
        eval_samples=4,
        eval_steps=10,
        lr=1e-3,
        lora_rank=4,
        lora_alpha=8,
        ema=False,  # random weights: nothing to smooth, one copy less
    ),
    "shapes": dict(  # the CPU image demo (README "Shapes")
        # one prompt, trained and evaluated on (new noise): the base model almost never draws a red
        # square (strict 0.02-0.06), so most groups score all 0: VGPO's case. Over the whole grammar
        # ("grammar", held-out prompts: the benchmark) nothing learns in 40 iterations
        shapes_prompts="a photo of a red square",
        resolution=32,  # the model's side (shapes.SIZE)
        shift=1.0,  # pixel space at 32 px: SD3's shift 3 is for 1024 px latents
        reward="geneval_shapes",  # GenEval's strict score: the benchmark's point is a binary reward
        iterations=40,  # ~13.5 s each alone on 2 cores here (rollout 6.9 s, update 6.6 s)
        group_size=8,  # paper: 24, three times the samples of a CPU iteration
        timestep_fraction=0.5,  # 5 steps (sigma 1 -> 0.56) for the CPU; paper: 0.99 (9: no better on the benchmark)
        lr=3e-3,  # paper: 3e-4; 40 it. on the demo prompt, 5 seeds: VGPO 0.045 -> 0.087, GRPO -> 0.011 (README)
        lora_rank=8,  # width 96: rank 32 would be a third of it
        lora_alpha=16,
        eval_steps=20,  # paper: 40; README measures 10, 20 and 40 on the trained policies
        eval_samples=128,  # the demo: its prompt, new noise; the benchmark: held-out prompts, categories interleaved
        eval_every=10,
        ema=False,  # as the toy: the trained weights are what is measured
        output_dir="runs/shapes",  # sample grids with prompts and rewards: samples_before.png, samples_00040.png
    ),
    "grpo": dict(dense_values=False, kappa=0.0),  # Flow-GRPO's advantage, same trainer
    "vgpo": dict(dense_values=True),
    "small-gpu": dict(
        group_size=8,
        prompts_per_iteration=2,
        micro_batch=4,  # 2 optimizer steps of 8 samples, each accumulated over 2 forwards of 4
        resolution=512,
        gradient_checkpointing=True,
        offload_text_encoders=True,
        decode_batch=4,  # a float32 decode of 16 images at 512 px peaks at 16 GiB; 4 at a time: 4 GiB
    ),
}


def toy_config(**overrides) -> Config:
    """The CPU toy's configuration: paper defaults, PRESETS['toy'], then `overrides`."""
    return Config(model="toy", **overrides)


class ConfigError(ValueError):
    """A field's value that cannot run, with the field, the value and what is allowed; the CLI
    prints it as one line naming the flag and exits with status 2."""

    def __init__(self, field: str, value, allowed: str):
        super().__init__(f"Config.{field}={value!r} is invalid: {allowed}")
        self.field, self.value, self.allowed = field, value, allowed


def _checker(c: Config):
    """need(ok, field, allowed): raise a ConfigError naming the field, its value and what is allowed."""

    def need(ok, name, allowed):
        if not ok:
            raise ConfigError(name, getattr(c, name), allowed)

    return need


def validate_config(c: Config) -> None:
    """Check every field before anything loads; errors name the field, value and what is allowed.
    Here the algorithm's fields; validate_run checks the model, reward, files and output."""
    need = _checker(c)
    need(c.group_size >= 2, "group_size", "must be >= 2 (a group statistic needs two samples)")
    need(c.prompts_per_iteration >= 1, "prompts_per_iteration", "must be >= 1")
    need(c.iterations >= 0, "iterations", "must be >= 0")
    need(c.num_steps >= 1, "num_steps", "must be >= 1")
    need(c.eval_steps >= 1, "eval_steps", "must be >= 1")
    need(0 <= c.anchor_steps <= c.num_steps, "anchor_steps", f"must be in [0, num_steps={c.num_steps}]")
    need(0 < c.timestep_fraction <= 1, "timestep_fraction", "must be in (0, 1]")
    need(int(c.num_steps * c.timestep_fraction) >= 1, "timestep_fraction", "trains no step at all")
    need(c.noise_level > 0, "noise_level", "training needs an SDE (> 0); a = 0 is the ODE")
    need(c.shift > 0, "shift", "must be > 0")
    need(0 <= c.gamma <= 1, "gamma", "must be in [0, 1]")
    need(c.kappa >= 0, "kappa", "must be >= 0")
    need(c.weighting in ("auto", "on", "off"), "weighting", "must be auto, on or off")
    need(c.eps > 0, "eps", "must be > 0")
    need(c.adv_clip > 0, "adv_clip", "must be > 0")
    need(c.clip_range > 0, "clip_range", "must be > 0")
    need(c.beta >= 0, "beta", "must be >= 0")
    need(c.lr > 0, "lr", "must be > 0")
    need(
        1 <= c.num_minibatches <= c.prompts_per_iteration * c.group_size,
        "num_minibatches",
        "must be in [1, prompts_per_iteration * group_size]",
    )
    need(c.micro_batch >= 0, "micro_batch", "must be >= 0 (0: a whole minibatch per forward)")
    need(c.lora_rank >= 1, "lora_rank", "must be >= 1")
    need(c.guidance_scale >= 1, "guidance_scale", "must be >= 1 (1: no guidance)")
    need(0 <= c.ema_decay < 1, "ema_decay", "must be in [0, 1)")
    need(c.ema_every >= 1, "ema_every", "must be >= 1")
    validate_run(c)


def validate_run(c: Config) -> None:
    """The model's limits, the reward spec, files, output and worker fields (see validate_config)."""
    need = _checker(c)
    need(c.resolution >= 16 and c.resolution % 16 == 0, "resolution", "must be a multiple of 16")
    if c.model == "shapes":
        need(c.resolution == shapes.SIZE, "resolution", f"the shapes model is {shapes.SIZE} px")
    if c.model == "tiny":
        import tiny

        top = tiny.max_resolution(tiny.TINY_SD3)
        need(c.resolution <= top, "resolution", f"the tiny model's position embedding covers at most {top} px")
    need(c.reward_workers >= 0, "reward_workers", "must be >= 0 (0: score inline)")
    need(c.reward_threads >= 0, "reward_threads", "must be >= 0 (0: one per CPU core)")
    need(
        not c.tensorboard or bool(c.output_dir), "tensorboard", "needs --output_dir (logs go to output_dir/tensorboard)"
    )
    if c.tensorboard:
        import importlib.util

        need(
            importlib.util.find_spec("tensorboard") is not None,
            "tensorboard",
            "needs the package: pip install tensorboard",
        )
    need(c.decode_batch >= 0, "decode_batch", "must be >= 0 (0: the whole batch in one call)")
    need(c.eval_every >= 0, "eval_every", "must be >= 0")
    need(c.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only on a signal and at the end)")
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", c.device) is not None, "device", "auto, cpu, cuda, cuda:N or mps")
    if c.resume:
        import os

        need(os.path.isfile(os.path.join(c.resume, "checkpoint.pt")), "resume", "the directory has no checkpoint.pt")
    need(c.eval_samples >= 1, "eval_samples", "must be >= 1")
    need(c.toy_conditions >= 1, "toy_conditions", "must be >= 1")
    need(c.toy_modes >= 1, "toy_modes", "must be >= 1")
    need(c.toy_spread > 0, "toy_spread", "must be > 0")
    need(c.max_sequence_length >= 1, "max_sequence_length", "must be >= 1")
    need(
        c.shapes_prompts == "grammar" or bool(shapes_prompt_list(c.shapes_prompts)),
        "shapes_prompts",
        "'grammar' or prompts separated by ';'",
    )
    if c.prompt_file:
        import os

        need(os.path.isfile(c.prompt_file), "prompt_file", "no such file")
        need(any(line.strip() for line in open(c.prompt_file, encoding="utf-8")), "prompt_file", "file has no prompt")
    for field in ("reward", "eval_reward") if c.eval_reward else ("reward",):
        spec = getattr(c, field)
        if c.model == "toy":
            need(spec in TOY_REWARDS, field, f"the toy's rewards are {sorted(TOY_REWARDS)}")
        else:
            import rewards

            try:
                rewards.parse_spec(spec)
            except ValueError as err:
                raise ConfigError(field, spec, str(err)) from None


# ------------------------------------------------------------------------------------------------
# SDE step with log-probability (Eq. 7, Flow-GRPO)
# ------------------------------------------------------------------------------------------------


def _per_sample(s, x: torch.Tensor) -> torch.Tensor:
    """A float or (B,) tensor of sigmas as float32 of shape (B, 1, ..., 1), broadcastable to x."""
    s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    return s.reshape(-1, *([1] * (x.ndim - 1)))  # (B or 1, 1, ...)


def _randn(shape, generator, device) -> torch.Tensor:
    """Standard normal noise from one generator, or from one generator per sample (a list)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def sde_step_with_logprob(v, x, sigma, sigma_next, noise_level, x_next=None, generator=None):
    """Eq. 7 (Flow-GRPO): one SDE step x_k -> x_{k+1} and the per-dimension mean log-density.

    std_k = a sqrt(sig_k / (1 - sig_k));  mean = x (1 + std_k^2 dt / (2 sig_k))
    + v (1 + std_k^2 (1 - sig_k) / (2 sig_k)) dt;  x_{k+1} = mean + std_k sqrt(-dt) eps.
    Paper <-> code: v_theta <-> v, x_t <-> x, sigma_t <-> sigma, a <-> noise_level.
    At sigma == 1 the denominator uses sigma_next (= sig_1 on the first step, as Flow-GRPO).
    With x_next given, that action is scored instead of sampled. Float32 throughout.
    noise_level = 0 is the Euler step x + v dt: no noise is drawn and the log-prob is 0 (decision 7).
    Returns x_next (B, D...), log_prob (B,), mean (B, D...), std_k (B, 1...).
    """
    x, v = x.float(), v.float()
    sig, sig_next = _per_sample(sigma, x), _per_sample(sigma_next, x)  # (B|1, 1...)
    dt = sig_next - sig  # (B|1, 1...), < 0
    if noise_level == 0:  # the ODE: nothing random, no density
        mean = x + v * dt  # (B, D...)
        zero = torch.zeros(x.shape[0], device=x.device)  # (B,)
        return (mean if x_next is None else x_next.float()), zero, mean, zero.reshape(-1, *sig.shape[1:])
    denom = 1 - torch.where(sig == 1, sig_next, sig)
    std = noise_level * torch.sqrt(sig / denom)  # (B|1, 1...)
    mean = x * (1 + std**2 / (2 * sig) * dt) + v * (1 + std**2 * (1 - sig) / (2 * sig)) * dt
    step_std = std * torch.sqrt(-dt)  # (B|1, 1...), std of the transition
    if x_next is None:
        x_next = mean + step_std * _randn(x.shape, generator, x.device)  # (B, D...)
    x_next = x_next.float()
    log_density = (
        -((x_next.detach() - mean) ** 2) / (2 * step_std**2) - torch.log(step_std) - 0.5 * math.log(2 * math.pi)
    )  # (B, D...)
    log_prob = log_density.mean(dim=tuple(range(1, x.ndim)))  # (B,)
    log_prob = torch.where(step_std.flatten().expand_as(log_prob) > 0, log_prob, 0.0)  # decision 7
    return x_next, log_prob, mean, std.expand(x.shape[0], *std.shape[1:])


# ------------------------------------------------------------------------------------------------
# TCRM: one-step projection, cumulative values, timestep weights (Eqs. 9-11)
# ------------------------------------------------------------------------------------------------


def project_x0(x, v, sigma):
    """Eq. 9: one Euler step from sigma to 0, x0hat = x - sigma * v.

    Paper <-> code: x_{t-1} <-> x (the state after step k), sigma_{t-1} <-> sigma, and v is the
    velocity the sampler computes at that state anyway (no extra forward). (B, D...) -> (B, D...)
    """
    return x - _per_sample(sigma, x) * v  # (B, D...)


def cumulative_values(rewards, gamma):
    """Eq. 10: Q_k = R_k + gamma * Q_{k+1}, Q_T = 0, along one sampled trajectory.

    Paper <-> code: r_t <-> rewards[..., k] (instant reward of step k), gamma <-> gamma.
    (..., T) instant rewards -> (..., T) values.
    """
    values = torch.zeros_like(rewards, dtype=torch.float32)  # (..., T)
    running = torch.zeros_like(rewards[..., 0], dtype=torch.float32)  # (...)
    for k in reversed(range(rewards.shape[-1])):
        running = rewards[..., k].float() + gamma * running
        values[..., k] = running
    return values


def weight_fallback(values, eps=1e-4) -> torch.Tensor:
    """Decision 2: the trajectories whose Eq. 11 weights fall back to 1, a mean value <= eps or a
    negative value. (..., T) -> (..., 1) bool."""
    return (values.float().mean(dim=-1, keepdim=True) <= eps) | (values < 0).any(dim=-1, keepdim=True)


def timestep_weights(values, eps=1e-4):
    """Eq. 11: w_k = Q_k / mean_j Q_j over the T steps of the same trajectory.

    Decision 2: the paper assumes non-negative rewards. A trajectory whose mean value is <= eps,
    or that has a negative value, gets weights 1 instead (`weight_fallback`; the trainer logs their
    share as weight_fallback_frac): a negative weight would flip that step's advantage, and a mean
    near 0 would make the weights huge. All-zero trajectories are normal under a binary reward;
    negative values are a misuse and warn. Otherwise each weight lies in [0, T].
    (..., T) -> (..., T), each row averaging 1.
    """
    mean = values.float().mean(dim=-1, keepdim=True)  # (..., 1)
    if (values < 0).any():
        warnings.warn(  # constant text: Python's default filter shows it once per place
            "timestep_weights: a trajectory has a negative value; its weights fall back to 1 (decision 2). "
            "Eq. 11 assumes rewards >= 0: rewards should lie in roughly [0, 1].",
            stacklevel=2,
        )
    ones = torch.ones_like(values, dtype=torch.float32)
    return torch.where(weight_fallback(values, eps), ones, values / mean.clamp_min(eps))  # (..., T)


# ------------------------------------------------------------------------------------------------
# ADAE: group-relative term plus absolute anchor (Eqs. 12-13), and the GRPO baseline
# ------------------------------------------------------------------------------------------------


def relative_advantage(values, global_std=True, eps=1e-4):
    """Eq. 12 (GRPO's group normalisation, per step): (Q_k - mean_G Q_k) / (std Q_k + eps).

    std is the population std (ddof 0) within each group, or over all N*G samples of the
    batch at that step when global_std (Flow-GRPO's default). (N, G, T) -> (N, G, T).
    Decision 15: a group whose values are all equal at a step gets exactly 0 there (its std is 0);
    float rounding of the mean would leave ~1e-7 (24 values of 0.8) and keep it in decision 12's mask.
    """
    values = values.float()
    mu = values.mean(dim=1, keepdim=True)  # (N, 1, T)
    if global_std:
        std = rearrange(values, "n g t -> (n g) t").std(dim=0, correction=0)  # (T,)
    else:
        std = values.std(dim=1, correction=0, keepdim=True)  # (N, 1, T)
    flat = (values == values[:, :1]).all(dim=1, keepdim=True)  # (N, 1, T)
    return torch.where(flat, 0.0, (values - mu) / (std + eps))  # (N, G, T)


def anchor_advantage(values, kappa, anchor_steps, gamma):
    """Eq. 13's absolute term (reconstruction, decision 3): kappa * Q_k / sum_j gamma^j, on k < anchor_steps.

    alpha * Q / std with alpha = kappa * std (App. B) is kappa * Q; dividing Q_k by the sum of
    its T-k discount weights puts it on the reward's scale. (N, G, T) -> (N, G, T).
    """
    T = values.shape[-1]
    powers = gamma ** torch.arange(T, dtype=torch.float64)  # (T,), gamma^j, float64
    disc_sum = powers.cumsum(0).flip(0).float().to(values.device)  # (T,), sum_{j < T-k} gamma^j
    on = (torch.arange(T, device=values.device) < anchor_steps).float()  # (T,)
    return kappa * on * values.float() / disc_sum  # (N, G, T)


def vgpo_advantages(values, kappa, anchor_steps, gamma, global_std=True, eps=1e-4, adv_clip=5.0, weights=None):
    """Eq. 13 (ADAE): A_k = clamp(w_k * (relative_k + on_k * kappa * anchor_k), -adv_clip, adv_clip).

    Paper <-> code: Q <-> values (N, G, T), w <-> weights (default: Eq. 11 of values),
    kappa <-> kappa, gamma: the discount that formed the values (0 for a terminal reward).
    kappa = 0 (or anchor_steps = 0) leaves the per-step group-relative advantage.
    (N, G, T) -> (N, G, T).
    """
    if weights is None:
        weights = timestep_weights(values, eps)  # (N, G, T)
    inner = relative_advantage(values, global_std, eps) + anchor_advantage(values, kappa, anchor_steps, gamma)
    return (weights * inner).clamp(-adv_clip, adv_clip)  # (N, G, T)


def grpo_advantages(rewards, num_steps, global_std=True, eps=1e-4, adv_clip=5.0):
    """Flow-GRPO: A = (R_T - mean_G R_T) / (std R_T + eps), the same for every step.

    (N, G) terminal rewards -> (N, G, T) advantages.
    """
    adv = relative_advantage(rewards[..., None], global_std, eps)  # (N, G, 1)
    return adv.expand(*rewards.shape, num_steps).clamp(-adv_clip, adv_clip)  # (N, G, T)


# ------------------------------------------------------------------------------------------------
# Policy objective (Eq. 8): clipped ratio per step plus KL to the reference
# ------------------------------------------------------------------------------------------------


def clipped_policy_loss(log_prob, old_log_prob, advantages, clip_range):
    """Eq. 8, one step: mean_i max(-A r, -A clip(r, 1 - eps_c, 1 + eps_c)), r = exp(logp - logp_old).

    (B,) inputs -> scalar loss and info: clipfrac = share of |r - 1| > clip_range,
    approx_kl = 0.5 mean (logp - logp_old)^2 (Flow-GRPO).
    """
    diff = log_prob.float() - old_log_prob.float()  # (B,)
    ratio = torch.exp(diff)  # (B,)
    unclipped = -advantages * ratio  # (B,)
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)  # (B,)
    loss = torch.maximum(unclipped, clipped).mean()
    info = {
        "clipfrac": ((ratio - 1).abs() > clip_range).float().mean().item(),
        "approx_kl": 0.5 * (diff.detach() ** 2).mean().item(),
        "ratio_err": (ratio.detach() - 1).abs().max().item(),
    }
    return loss, info


def kl_to_reference(mean, ref_mean, std):
    """KL term of Eq. 8 (Flow-GRPO convention): mean_dims (mean - mean_ref)^2 / (2 std_k^2).

    The exact Gaussian KL is this divided by |dt|; beta is tuned to this form (decision 8).
    mean, ref_mean (B, D...), std (B, 1...) or a float -> (B,).
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    sq = (mean.float() - ref_mean.float()) ** 2 / (2 * std**2)  # (B, D...)
    return sq.mean(dim=tuple(range(1, sq.ndim)))  # (B,)


# ------------------------------------------------------------------------------------------------
# Models. The trainer sees a model only through this interface (a "backend"):
#   sigmas(T) -> (T+1,)      prompts(n, generator) -> list      encode(prompts) -> cond
#   noise(B, generator) -> the state at sigma_0 = 1      decode(x0) -> reward input (x0: data)
#   velocity(x, sigma, cond, train=False) -> v (train: the policy's training forward)
#   reference() -> context where the LoRA adapter is off    parameters() -> trainable tensors
# cond is a dict of tensors with the batch first, so minibatches index it.
# ------------------------------------------------------------------------------------------------


def sigma_schedule(num_steps: int, shift: float, scheduler_config=None) -> torch.Tensor:
    """sig_0 = 1 > ... > sig_T = 0, exactly as diffusers' FlowMatchEulerDiscreteScheduler (SD3.5).

    scheduler_config: a loaded pipeline's `scheduler.config` (its other settings are kept, its
    shift replaced by `shift`); None: the scheduler's defaults (decision 10).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if scheduler_config is None:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config, shift=shift)
    if scheduler.config.get("use_dynamic_shifting"):
        raise ConfigError(
            "shift", shift, "the pipeline's scheduler shifts by resolution (dynamic); vgpo runs SD3's fixed shift"
        )
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.float().cpu()  # (T+1,)


def draw_prompts(pool: list, n: int, generator) -> list:
    """n prompts from `pool`, distinct while the pool has enough (Flow-GRPO's sampler, decision 11):
    whole random permutations of the pool, concatenated, cut to n."""
    if n == 0:
        return []
    order = torch.cat([torch.randperm(len(pool), generator=generator) for _ in range(math.ceil(n / len(pool)))])
    return [pool[i] for i in order[:n]]


def add_lora(module: nn.Module, rank: int, alpha: int, targets: list[str], seed: int):
    """Wrap `module` in a peft LoRA adapter (gaussian init from `seed`, as Flow-GRPO); base frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    with torch.random.fork_rng(devices=[]):  # the init depends on the seed alone, not on the global RNG
        torch.manual_seed(seed)
        return get_peft_model(module, config)


# --- toy: a conditional 2-D flow on per-condition mixtures of Gaussians --------------------------


def toy_modes(num_conditions: int, num_modes: int, radius: float = 2.0) -> torch.Tensor:
    """Mode centres on a circle, rotated per condition. (conditions, modes, 2)."""
    j = torch.arange(num_modes)[None, :]  # (1, M)
    c = torch.arange(num_conditions)[:, None]  # (C, 1)
    angle = 2 * math.pi * (j + c / num_conditions) / num_modes  # (C, M)
    return radius * torch.stack([angle.cos(), angle.sin()], dim=-1)  # (C, M, 2)


class ToyVelocity(nn.Module):
    """MLP velocity field v(x, sigma, c) for 2-D points under a discrete condition c."""

    def __init__(self, num_conditions: int, width: int = 128):
        super().__init__()
        self.embed = nn.Embedding(num_conditions, 16)
        self.net = nn.Sequential(
            nn.Linear(2 + 16 + 16, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, 2),
        )

    def forward(self, x, sigma, c):
        freqs = torch.arange(1, 9, device=x.device, dtype=torch.float32)  # (8,), smooth in sigma
        s = sigma.reshape(-1, 1).expand(x.shape[0], 1) * freqs  # (B, 8)
        h = torch.cat([x, s.sin(), s.cos(), self.embed(c)], dim=-1)  # (B, 34)
        return self.net(h)  # (B, 2)


@functools.lru_cache(maxsize=8)
def pretrain_toy(num_conditions: int, num_modes: int, spread: float, steps: int, seed: int = 0):
    """Flow matching on x_s = (1-s) x0 + s x1, target v = x1 - x0; returns the base state dict.

    Cached per process, so tests and experiments pretrain once. Takes seconds on a CPU.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the base model depends on the seed alone
        torch.manual_seed(seed)
        net = ToyVelocity(num_conditions)
    modes = toy_modes(num_conditions, num_modes)  # (C, M, 2)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        c = torch.randint(num_conditions, (512,), generator=g)  # (512,)
        m = torch.randint(num_modes, (512,), generator=g)  # (512,)
        x0 = modes[c, m] + spread * torch.randn(512, 2, generator=g)  # (512, 2)
        x1 = torch.randn(512, 2, generator=g)  # (512, 2)
        s = torch.rand(512, 1, generator=g)  # (512, 1)
        loss = ((net((1 - s) * x0 + s * x1, s, c) - (x1 - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def toy_targets(num_conditions: int, num_modes: int) -> torch.Tensor:
    """The rewarded mode of each condition: mode c % M of condition c. (conditions, 2)."""
    c = torch.arange(num_conditions)
    return toy_modes(num_conditions, num_modes)[c, c % num_modes]  # (C, 2)


def toy_mode_reward(num_conditions: int, num_modes: int, width: float = 0.5):
    """Continuous toy reward in [0, 1]: exp(-|x - m_c|^2 / (2 width^2)), m_c the target mode of c."""
    target = toy_targets(num_conditions, num_modes)  # (C, 2)

    def reward_fn(points, prompts):
        d2 = ((points.float() - target[torch.as_tensor(prompts)].to(points.device)) ** 2).sum(-1)  # (B,)
        return torch.exp(-d2 / (2 * width**2))

    return reward_fn


def toy_region_reward(num_conditions: int, num_modes: int, radius: float = 0.5):
    """Saturating toy reward in {0, 1}: success when x lies within `radius` of the target mode."""
    target = toy_targets(num_conditions, num_modes)  # (C, 2)

    def reward_fn(points, prompts):
        d = (points.float() - target[torch.as_tensor(prompts)].to(points.device)).norm(dim=-1)  # (B,)
        return (d < radius).float()

    return reward_fn


TOY_REWARDS = {"toy_mode": toy_mode_reward, "toy_region": toy_region_reward}


class ToyBackend:
    """The 2-D toy behind the backend interface; the policy is the MLP with a peft LoRA adapter."""

    def __init__(self, config: Config):
        self.config = config
        net = ToyVelocity(config.toy_conditions)
        c = config
        net.load_state_dict(pretrain_toy(c.toy_conditions, c.toy_modes, c.toy_spread, c.toy_pretrain_steps))
        targets = ["net.0", "net.2", "net.4", "net.6"]
        self.model = add_lora(net, config.lora_rank, config.lora_alpha, targets, config.seed).eval()
        self.device = torch.device("cpu")

    def load_reward(self, spec: str, field: str = "reward"):
        c = self.config
        if spec not in TOY_REWARDS:
            raise ConfigError(field, spec, f"the toy's rewards are {sorted(TOY_REWARDS)}")
        return TOY_REWARDS[spec](c.toy_conditions, c.toy_modes)

    def sigmas(self, num_steps):
        return sigma_schedule(num_steps, self.config.shift)

    def prompts(self, n, generator):
        return draw_prompts(list(range(self.config.toy_conditions)), n, generator)

    def eval_prompts(self, n):
        return [i % self.config.toy_conditions for i in range(n)]

    def encode(self, prompts):
        return {"c": torch.as_tensor(prompts, dtype=torch.long)}

    def noise(self, batch, generator):
        return _randn((batch, 2), generator, self.device)  # (B, 2)

    def velocity(self, x, sigma, cond, train=False):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(x.shape[0])  # (B,)
        return self.model(x, sigma, cond["c"])  # (B, 2)

    def decode(self, x0):
        return x0  # the toy reward reads points

    def reference(self):
        return self.model.disable_adapter()

    def parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, directory: str):
        self.model.save_pretrained(directory)  # the peft adapter


# --- SD3.5: diffusers pipeline, peft LoRA on the transformer, guided velocity -------------------

# Flow-GRPO's targets. The "attn." prefix matters: the bare names also match the second attention
# (attn2) of SD3.5-Medium's dual-attention blocks (243 modules instead of Flow-GRPO's 191).
SD3_LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]
OCR_WORDS = (
    "hello world open close coffee bakery garden river summer winter north south market library museum "
    "station harbor sunset forest music dance pizza books repair studio"
).split()
OCR_EVAL_WORDS = "welcome exit theatre orchard quiet".split()
OCR_TEMPLATES = ['a sign that says "{}"', 'a storefront with the word "{}" painted on it', 'a poster reading "{}"']


def ocr_prompts(words) -> list[str]:
    """Built-in OCR prompts, `a sign that says "WORD"` style; rewards.ocr reads the quoted word."""
    return [template.format(word.upper()) for word in words for template in OCR_TEMPLATES]


def check_resolution(pipe, resolution: int) -> None:
    """Raise a ConfigError naming the largest resolution the transformer's position embedding covers."""
    cfg = pipe.transformer.config
    top = cfg.pos_embed_max_size * cfg.patch_size * pipe.vae_scale_factor if cfg.pos_embed_max_size else None
    if top and resolution > top:
        raise ConfigError("resolution", resolution, f"too large for this model: at most {top} px")


def read_prompts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def load_sd3_pipeline(model: str, resolution: int, dtype, device="cpu"):
    """A hub id or local directory of an SD3(.5) pipeline; offline with random weights: `tiny`, or
    `random-sd3.5-medium` (SD3.5-Medium's published architecture, built directly on `device`)."""
    if model in ("tiny", "random-sd3.5-medium"):
        import tiny

        if model == "tiny":
            return tiny.tiny_sd3_pipeline(resolution)
        return tiny.sd3_pipeline_from_configs(tiny.SD35_MEDIUM, resolution, device=device, dtype=dtype)
    from diffusers import StableDiffusion3Pipeline

    try:
        return StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise RuntimeError(
            f"could not load the SD3 pipeline {model!r}: {err}\nSD3.5 is gated: accept its licence on the hub and "
            "log in (`hf auth login`), or pass a local directory, or pre-download into the Hugging Face cache "
            "and set HF_HUB_OFFLINE=1. `--model tiny` runs the same code offline with random weights."
        ) from err


def model_dtype(device: torch.device) -> torch.dtype:
    """The frozen transformer's and text encoders' dtype: bf16 on GPU, float32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class SD3Backend:
    """SD3(.5) behind the backend interface: frozen VAE and text encoders, LoRA on the transformer.

    The guided velocity v = v_u + g (v_c - v_u) drives the sampler; training recomputes it with the
    unconditional branch detached, as Flow-GRPO (ac4c86e, scripts/train_sd3.py:190; decision 9).
    Prompt embeddings are cached off the accelerator and moved per batch. With offload_text_encoders
    every prompt is encoded, and the encoders freed, before the transformer reaches the accelerator,
    so the two never share its memory (SD3.5-Medium: 15.4 GiB together in bf16).
    """

    encode_batch = 64  # prompts per text-encoder call: bounds the encoders' activation memory

    def __init__(self, config: Config):
        self.config = config
        self.device = torch.device(
            config.device if config.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        )
        self.dtype = model_dtype(self.device)
        pipe = load_sd3_pipeline(config.model, config.resolution, self.dtype, self.device)
        check_resolution(pipe, config.resolution)
        for part in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            part.requires_grad_(False).eval().to(self.device, self.dtype)  # eval: no dropout anywhere
        self.pipe, self.cache, self.negative = pipe, {}, None
        if config.prompt_file:  # evaluation uses the same file
            self.train_prompts = self.held_out = read_prompts(config.prompt_file)
        else:
            self.train_prompts, self.held_out = ocr_prompts(OCR_WORDS), ocr_prompts(OCR_EVAL_WORDS)
        if config.offload_text_encoders:
            self.free_text_encoders()
        pipe.transformer.requires_grad_(False).eval().to(self.device, self.dtype)
        pipe.vae.requires_grad_(False).eval().to(self.device, torch.float32)  # the reward's pixels: float32
        if config.gradient_checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        self.model = add_lora(
            pipe.transformer, config.lora_rank, config.lora_alpha, SD3_LORA_TARGETS, config.seed
        ).eval()
        for p in self.parameters():
            p.data = p.data.float()  # LoRA weights and their optimizer state in float32

    def free_text_encoders(self):
        """Encode every training and evaluation prompt now, then free the text encoders' memory."""
        self.encode(self.train_prompts + self.held_out, keep=False)
        self.pipe.text_encoder = self.pipe.text_encoder_2 = self.pipe.text_encoder_3 = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def load_reward(self, spec: str, field: str = "reward"):
        import rewards

        return rewards.load_reward(spec, self.device, self.config.reward_threads)

    def sigmas(self, num_steps):
        return sigma_schedule(num_steps, self.config.shift, self.pipe.scheduler.config)

    def prompts(self, n, generator):
        return draw_prompts(self.train_prompts, n, generator)

    def eval_prompts(self, n):
        return [self.held_out[i % len(self.held_out)] for i in range(n)]

    @torch.no_grad()
    def _encode_new(self, prompts) -> list:
        """[(embeds (L, E), pooled (E',))] of prompts, on the CPU, `encode_batch` prompts per call."""
        if self.pipe.text_encoder is None:
            raise RuntimeError(f"prompt {prompts[0]!r} was not encoded before the text encoders were freed")
        rows = []
        for i in range(0, len(prompts), self.encode_batch):
            part = prompts[i : i + self.encode_batch]
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                part, part, part, device=self.device, do_classifier_free_guidance=False,
                max_sequence_length=self.config.max_sequence_length,
            )  # fmt: skip
            rows += list(zip(embeds.cpu(), pooled.cpu(), strict=True))  # (L, E), (E',) each
        return rows

    def encode(self, prompts, keep=True):
        """Prompt embeddings of a batch on the device: embeds (B, L, E), pooled (B, E') and the empty
        prompt's (classifier-free guidance), expanded. Each distinct prompt is encoded once and cached
        on the CPU; one negative embedding for all. keep=False only fills the cache."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if self.negative is None:
            new = ["", *new] if "" not in new else new
        for p, row in zip(new, self._encode_new(new) if new else [], strict=True):
            self.cache[p] = row
        self.negative = self.cache[""] if self.negative is None else self.negative
        if not keep:
            return None
        embeds = torch.stack([self.cache[p][0] for p in prompts]).to(self.device)  # (B, L, E)
        pooled = torch.stack([self.cache[p][1] for p in prompts]).to(self.device)  # (B, E')
        neg_embeds, neg_pooled = (t.to(self.device).expand(len(prompts), *t.shape) for t in self.negative)
        return {"embeds": embeds, "pooled": pooled, "neg_embeds": neg_embeds, "neg_pooled": neg_pooled}

    def noise(self, batch, generator):
        side = self.config.resolution // self.pipe.vae_scale_factor
        shape = (batch, self.pipe.transformer.config.in_channels, side, side)
        return _randn(shape, generator, self.device)  # (B, C, H, W)

    def velocity(self, x, sigma, cond, train=False):
        """SD3 predicts the velocity: the guided output itself (see `guided`)."""
        return self.guided(x, sigma, cond, train)

    def guided(self, x, sigma, cond, train=False):
        """The network's guided output, float32: o_u + g (o_c - o_u), both branches in one batched forward.

        The conditional branch alone at guidance 1, and in training when train_cfg is off
        (Flow-GRPO's train.cfg = False). Training detaches o_u only when cfg_detach_uncond (decision 9).
        """
        c = self.config
        guided = c.guidance_scale != 1 and (c.train_cfg or not train)
        branches = ["neg_", ""] if guided else [""]
        inputs = {key: torch.cat([cond[b + key] for b in branches]) for key in self.cond_keys}  # (2B|B, ...)
        t = torch.as_tensor(sigma, dtype=torch.float32, device=self.device) * 1000
        x_in = torch.cat([x] * len(branches)).to(self.dtype)  # (2B|B, C, H, W)
        out = self.network(x_in, t.expand(len(x_in)), inputs).float()  # (2B|B, C, H, W)
        if not guided:
            return out  # (B, C, H, W)
        o_uncond, o_cond = out.chunk(2)  # (B, C, H, W) each
        if train and c.cfg_detach_uncond:
            o_uncond = o_uncond.detach()
        return o_uncond + c.guidance_scale * (o_cond - o_uncond)  # (B, C, H, W)

    cond_keys = ("embeds", "pooled")  # the conditioning tensors of one branch; "neg_" + key: the unconditional

    def network(self, x, t, cond):
        """One forward of the transformer: x (b, C, H, W), t (b,) in [0, 1000], cond of `cond_keys`."""
        return self.model(
            hidden_states=x, timestep=t, encoder_hidden_states=cond["embeds"], pooled_projections=cond["pooled"],
            return_dict=False,
        )[0]  # fmt: skip

    @torch.no_grad()
    def decode(self, x0):
        """Latents of data x0 -> images (B, 3, H, W) in [0, 1]. The VAE runs in float32 (Flow-GRPO),
        decode_batch images per call (0: all in one call)."""
        vae, size = self.pipe.vae, self.config.decode_batch or len(x0)
        latents = (x0.float() / vae.config.scaling_factor + vae.config.shift_factor).to(self.device)  # (B, C, h, w)
        images = torch.cat([vae.decode(part, return_dict=False)[0] for part in latents.split(size)])  # (B, 3, H, W)
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def reference(self):
        return self.model.disable_adapter()

    def parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, directory: str):
        """LoRA weights in the diffusers format: StableDiffusion3Pipeline.load_lora_weights(directory)."""
        from diffusers import StableDiffusion3Pipeline
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model)  # keys start with the PeftModel's "base_model.model."
        layers = {key.removeprefix("base_model.model."): value for key, value in state.items()}
        metadata = self.model.peft_config["default"].to_dict()  # lora_alpha: without it loaders assume alpha = r
        StableDiffusion3Pipeline.save_lora_weights(
            directory, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
        )


# --- shapes: a small UNet on 32 px scenes (shapes_model.py), predicting the velocity, guided ----


def shapes_prompt_list(spec: str) -> list[str]:
    """shapes_prompts "p1; p2" -> ["p1", "p2"] (the grammar has no ';')."""
    return [p.strip() for p in spec.split(";") if p.strip()]


class ShapesBackend(SD3Backend):
    """The shapes model behind the backend interface (prompts, rewards, reference and parameters as
    SD3Backend's): shapes_model.py's UNet in pixel space, LoRA on its self- and cross-attention
    projections, classifier-free guidance as SD3Backend's. The network predicts the velocity, as
    SD3's; decode only rescales pixels from [-1, 1] to [0, 1] (VGPO's T decodes cost nothing)."""

    def __init__(self, config: Config):
        path = config.shapes_weights or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "shapes_base.safetensors"
        )
        if not os.path.isfile(path):
            raise ConfigError("shapes_weights", path, "no such file; `python shapes_model.py train` pretrains one")
        unet, self.encoder = shapes_model.load(path)
        self.config, self.device, self.dtype = config, torch.device("cpu"), torch.float32
        self.model = add_lora(unet, config.lora_rank, config.lora_alpha, shapes_model.LORA_TARGETS, config.seed).eval()
        held = shapes.held_out_prompts()  # evaluation: the categories interleaved
        self.held_out = [p for group in itertools.zip_longest(*held.values()) for p in group if p]
        self.train_prompts = sorted(set(shapes.all_prompts()) - set(held["two objects"] + held["position"]))
        self.by_category = {c: [p for p in self.train_prompts if shapes.parse_prompt(p)[0] == c] for c in held}
        if config.fixed_prompts:  # as SD3Backend: training and evaluation on the given prompts (new noise)
            field = "prompt_file" if config.prompt_file else "shapes_prompts"
            self.train_prompts = self.held_out = (
                read_prompts(config.prompt_file) if config.prompt_file else shapes_prompt_list(config.shapes_prompts)
            )
            for p in self.train_prompts:
                try:
                    shapes.parse_prompt(p)
                except ValueError as e:
                    raise ConfigError(field, getattr(config, field), str(e)) from None

    def prompts(self, n, generator):
        """Category-balanced, as the evaluation: the i-th prompt from category i mod 4, drawn without
        repeats within a category (72 % of the grammar's training prompts are positions).
        With a prompt_file or a list of shapes_prompts: distinct prompts of it (decision 11)."""
        if self.config.fixed_prompts:
            return draw_prompts(self.train_prompts, n, generator)
        cats = list(self.by_category)
        per = {c: draw_prompts(self.by_category[c], len(range(i, n, len(cats))), generator) for i, c in enumerate(cats)}
        return [per[cats[i % len(cats)]][i // len(cats)] for i in range(n)]

    def sigmas(self, num_steps):
        return sigma_schedule(num_steps, self.config.shift)

    cond_keys = ("embeds",)

    @torch.no_grad()
    def encode(self, prompts):
        embeds = self.encoder(shapes_model.tokenize(prompts))  # (B, L, E)
        return {"embeds": embeds, "neg_embeds": self.encoder(shapes_model.tokenize([""] * len(prompts)))}

    def noise(self, batch, generator):
        return _randn((batch, 3, shapes.SIZE, shapes.SIZE), generator, self.device)  # (B, 3, H, W)

    def network(self, x, t, cond):
        return self.model(x, t, encoder_hidden_states=cond["embeds"], return_dict=False)[0]  # (b, 3, H, W)

    @torch.no_grad()
    def decode(self, x0):
        return ((x0.float().clamp(-1, 1) + 1) / 2).clamp(0, 1)  # pixels in [0, 1]

    def save(self, directory: str):
        self.model.save_pretrained(directory)  # the peft adapter


# ------------------------------------------------------------------------------------------------
# Rollout: SDE sampling with log-probs (Eq. 7) and instant rewards of the projections (Eq. 9)
# ------------------------------------------------------------------------------------------------


def checked_reward(reward_fn, name: str):
    """Wrap a reward so that a wrong shape or a non-finite value raises an error naming it."""
    warned = []

    def fn(inputs, prompts):
        r = reward_fn(inputs, prompts)
        if not isinstance(r, torch.Tensor) or r.shape != (len(prompts),):
            got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"reward {name!r} returned {got}; expected a tensor of shape ({len(prompts)},)")
        if not r.is_floating_point():
            raise ValueError(f"reward {name!r} returned dtype {r.dtype}; expected a float tensor")
        if r.device != inputs.device:
            raise ValueError(f"reward {name!r} returned a tensor on {r.device}; its inputs are on {inputs.device}")
        if not torch.isfinite(r).all():
            raise ValueError(f"reward {name!r} returned non-finite values: {r[~torch.isfinite(r)][:4].tolist()}")
        if (r < 0).any() and not warned:
            warned.append(True)
            warnings.warn(f"reward {name!r} returned negative values; Eq. 11 assumes rewards >= 0", stacklevel=2)
        return r.float()

    return fn


@dataclass
class Rollout:
    prompts: list  # B prompts, group-major: (n g)
    cond: dict  # conditioning tensors, batch first
    latents: torch.Tensor  # (B, T+1, D...) the states at sigma_0 (noise) .. sigma_T (the samples)
    log_probs: torch.Tensor  # (B, T) log p(x_{k+1} | x_k) under the sampling policy
    rewards: torch.Tensor  # (B, T) instant rewards R_k (Eq. 9), or (B, 1) terminal only


def reward_pool(workers: int):
    """Boilerplate: a thread pool that scores rewards while the sampler runs on; with 0 workers a
    stand-in that scores inline. Either way `submit(fn, *args)` returns a Future."""
    from concurrent.futures import Future, ThreadPoolExecutor

    class Inline(contextlib.AbstractContextManager):
        def __exit__(self, *exc):
            return None

        def submit(self, fn, *args):
            done = Future()
            done.set_result(fn(*args))
            return done

    return ThreadPoolExecutor(workers, thread_name_prefix="reward") if workers else Inline()


@torch.no_grad()
def rollout(backend, prompts, sigmas, noise_level, reward_fn, generator, instant=True, workers=0) -> Rollout:
    """Sample B trajectories with Eq. 7 and score each state's one-step projection (Eq. 9).

    The velocity that step k+1 needs is computed once and also projects x_{k+1} (TCRM costs
    no extra forward). Per step at most one decode and one reward call for the whole batch;
    with instant=False only the final state is decoded and scored (Flow-GRPO's cost). With
    workers > 0 a step's reward is scored in a thread while the sampler computes the next steps;
    all are gathered, in step order, before returning.
    """
    cond = backend.encode(prompts)
    x = backend.noise(len(prompts), generator)  # (B, D...)
    T = len(sigmas) - 1
    latents, log_probs, pending = [x], [], []
    v = backend.velocity(x, sigmas[0], cond)  # (B, D...)
    with reward_pool(workers if instant else 0) as pool:
        for k in range(T):
            x, log_prob, _, _ = sde_step_with_logprob(v, x, sigmas[k], sigmas[k + 1], noise_level, generator=generator)
            last = k == T - 1
            if not last:
                v = backend.velocity(x, sigmas[k + 1], cond)  # (B, D...), reused by step k+1
            if instant or last:
                x0hat = x if last else project_x0(x, v, sigmas[k + 1])  # (B, D...), Eq. 9
                pending.append(pool.submit(reward_fn, backend.decode(x0hat), prompts))  # (B,) when done
            latents.append(x)
            log_probs.append(log_prob)
        rewards = torch.stack([p.result() for p in pending], 1)  # (B, T|1)
    return Rollout(prompts, cond, torch.stack(latents, 1), torch.stack(log_probs, 1), rewards)


@torch.no_grad()
def evaluate(backend, reward_fn, prompts, num_steps, generator, chunk=64):
    """Mean reward of ODE samples (noise level 0: Eq. 7 reduces to Euler), in chunks.

    Returns every sample's reward (B,) and the decoded samples of the first chunk.
    """
    sigmas = backend.sigmas(num_steps)
    scores, first = [], None
    for i in range(0, len(prompts), chunk):
        p = prompts[i : i + chunk]
        cond, x = backend.encode(p), backend.noise(len(p), generator)  # x: (b, D...)
        for k in range(num_steps):
            x = sde_step_with_logprob(backend.velocity(x, sigmas[k], cond), x, sigmas[k], sigmas[k + 1], 0.0)[0]
        samples = backend.decode(x)
        first = samples if first is None else first
        scores.append(reward_fn(samples, p))
    return torch.cat(scores), first  # (B,), (chunk, ...)


# ------------------------------------------------------------------------------------------------
# Advantages of one rollout batch: TCRM values (Eq. 10-11) -> ADAE (Eq. 13) or GRPO
# ------------------------------------------------------------------------------------------------


def batch_advantages(rewards, config: Config):
    """Instant rewards (B, T) or terminal (B, 1) -> advantages (B, T) and diagnostics.

    dense_values: Q = Eq. 10 of the instant rewards; else Q_k = R_T for every k, whose anchor
    is R_T itself (discount 0). Weights w (Eq. 11) come from the dense values when enabled.
    dense_values=False, kappa=0, weighting=auto is exactly Flow-GRPO's advantage.
    """
    c, T = config, config.num_steps
    R = rearrange(rewards, "(n g) t -> n g t", g=c.group_size)  # (N, G, T|1)
    terminal = R[..., -1]  # (N, G)
    dense = cumulative_values(R, c.gamma) if R.shape[-1] == T else None  # (N, G, T)
    values, anchor_gamma = (dense, c.gamma) if c.dense_values else (terminal[..., None].expand(-1, -1, T), 0.0)
    weights = timestep_weights(dense, c.eps) if c.use_weights else torch.ones_like(values)  # (N, G, T)
    adv = vgpo_advantages(values, c.kappa, c.anchor_steps, anchor_gamma, c.global_std, c.eps, c.adv_clip, weights)
    rel = weights * relative_advantage(values, c.global_std, c.eps)  # (N, G, T), diagnostics only
    anc = weights * anchor_advantage(values, c.kappa, c.anchor_steps, anchor_gamma)  # (N, G, T)
    info = {
        "reward_mean": terminal.mean().item(),
        "value_mean": values.mean().item(),
        "zero_std_ratio": (terminal == terminal[:, :1]).all(dim=1).float().mean().item(),
        "adv_rel_abs": rel.abs().mean().item(),
        "adv_anchor_abs": anc.abs().mean().item(),
        "weight_fallback_frac": weight_fallback(dense, c.eps).float().mean().item() if c.use_weights else 0.0,
    }
    return rearrange(adv, "n g t -> (n g) t"), info


# ------------------------------------------------------------------------------------------------
# Policy update: per-step clipped loss (Eq. 8) + KL, minibatches, per-step backward
# ------------------------------------------------------------------------------------------------


def step_loss(backend, batch: Rollout, advantages, idx, k, sigmas, config: Config):
    """Loss of sampling step k on the samples idx: recompute log p of the stored action, Eq. 8 + KL."""
    cond = {name: t[idx] for name, t in batch.cond.items()}
    x, x_next = batch.latents[idx, k], batch.latents[idx, k + 1]  # (b, D...)
    v = backend.velocity(x, sigmas[k], cond, train=True)  # (b, D...), with grad
    _, log_prob, mean, std = sde_step_with_logprob(v, x, sigmas[k], sigmas[k + 1], config.noise_level, x_next=x_next)
    loss, info = clipped_policy_loss(log_prob, batch.log_probs[idx, k], advantages[idx, k], config.clip_range)
    kl = torch.full((len(idx),), float("nan"), device=loss.device)  # (b,), not computed at beta = 0 (decision 8)
    if config.beta > 0:
        with torch.no_grad(), backend.reference():
            v_ref = backend.velocity(x, sigmas[k], cond, train=True)  # (b, D...)
            ref_mean = sde_step_with_logprob(v_ref, x, sigmas[k], sigmas[k + 1], config.noise_level, x_next=x_next)[2]
        kl = kl_to_reference(mean, ref_mean, std)  # (b,)
        loss = loss + config.beta * kl.mean()
    return loss, {**info, "kl_ref": kl.mean().item(), "loss": loss.item()}


def has_signal(advantages) -> torch.Tensor:
    """Decision 12 (Flow-GRPO's mask, ac4c86e scripts/train_sd3.py:797): the samples whose advantage is
    non-zero at some step of `advantages` (pass the trained steps' columns), (B, T') -> (B,) bool.
    Only these carry a policy gradient."""
    return advantages.abs().sum(dim=1) != 0


def minibatches(advantages, trained: int, num_minibatches: int, generator) -> list:
    """Decision 12, as Flow-GRPO (ac4c86e, scripts/train_sd3.py:797-808, 826-836): the samples with a
    signal in the first `trained` steps, padded with randomly chosen samples without one up to a
    multiple of num_minibatches (when there are enough), in random order, split into num_minibatches
    equal parts. A padded sample adds no policy gradient, only its KL term. Decision 13: with no
    signal at all, no minibatch (the reference would fail on an empty batch): no optimizer step.
    (B, T) advantages -> list of (b,) index tensors."""
    keep = has_signal(advantages[:, :trained]).cpu()  # (B,)
    if not keep.any():
        return []
    short, idle = -int(keep.sum()) % num_minibatches, torch.nonzero(~keep).flatten()
    if 0 < short <= len(idle):
        keep[idle[torch.randperm(len(idle), generator=generator)[:short]]] = True
    kept = torch.nonzero(keep).flatten()
    order = kept[torch.randperm(len(kept), generator=generator)]
    return [mb for mb in order.tensor_split(num_minibatches) if len(mb)]


def policy_update(
    backend, batch: Rollout, advantages, optimizer, sigmas, config: Config, generator, offset=0, total=None, ema=None
):
    """One rollout batch -> num_minibatches optimizer steps (`minibatches`), each accumulating the
    gradients of micro-batches of `micro_batch` samples, backward per step (one graph alive).

    Each step's loss is weighed by the micro-batch's share of the minibatch and divided by the number
    of trained steps, so the accumulated gradient is that of the mean of L_k over trained steps and
    minibatch samples, whatever micro_batch is (memory only, as Flow-GRPO's gradient accumulation).
    Minibatches are drawn over all `total` samples of every rank; this rank holds samples
    offset..offset+B-1 and trains its part, and gradients are summed over ranks (data parallel).
    `advantages` are every rank's (total, T).
    """
    trained, local_size = int(config.num_steps * config.timestep_fraction), len(batch.prompts)
    parts = minibatches(advantages, trained, config.num_minibatches, generator)
    local_adv = advantages[offset : offset + local_size]  # (B_rank, T)
    sums, count, onpolicy_err = dict.fromkeys(("clipfrac", "approx_kl", "kl_ref", "loss"), 0.0), 0, 0.0
    grad_norm = torch.tensor(float("nan"))
    for j, mb in enumerate(parts):
        local = mb[(mb >= offset) & (mb < offset + local_size)] - offset  # this rank's part of the minibatch
        optimizer.zero_grad(set_to_none=False)
        for micro in local.split(config.micro_batch or len(local)) if len(local) else ():  # a rank may hold none
            for k in range(trained):
                loss, info = step_loss(backend, batch, local_adv, micro, k, sigmas, config)
                (loss * len(micro) / len(mb) / trained).backward()
                sums = {key: sums[key] + info[key] * len(micro) for key in sums}
                if j == 0:  # the first minibatch runs before any update: its ratio must be 1
                    onpolicy_err = max(onpolicy_err, info["ratio_err"])
        count += len(local) * trained
        all_reduce_gradients(backend.parameters())  # sum over ranks; nothing when alone
        grad_norm = torch.nn.utils.clip_grad_norm_(backend.parameters(), config.max_grad_norm)
        optimizer.step()
        if ema is not None:
            ema.update(backend.parameters())  # decision 14: once per optimizer step
    device = advantages.device  # nccl reduces GPU tensors only
    totals = all_reduce_(torch.tensor([*sums.values(), count], dtype=torch.float64, device=device))
    err = all_reduce_(torch.tensor(onpolicy_err, device=device), op="max")
    means = {key: (totals[i] / totals[-1]).item() if totals[-1] else float("nan") for i, key in enumerate(sums)}
    signal = has_signal(advantages[:, :trained]).float().mean().item()
    return {
        **means,
        "grad_norm": grad_norm.item(),
        "onpolicy_ratio_err": err.item(),
        "trained_frac": signal,
        "optimizer_steps": len(parts),
    }


# ------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------


def make_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for one purpose, seeded from (seed, stream...), so runs are reproducible."""
    return torch.Generator().manual_seed(hash((seed, *stream)) % 2**63)


def rank_and_world() -> tuple[int, int]:
    """Boilerplate: (rank, world size) under torch.distributed, else (0, 1)."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed(config: Config) -> bool:
    """Boilerplate: under torchrun (WORLD_SIZE > 1) join the process group: nccl on GPUs, else gloo.
    Returns whether this call created the group (and so must destroy it)."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return False
    if config.prompts_per_iteration % world:
        raise ConfigError("prompts_per_iteration", config.prompts_per_iteration, f"must divide by {world} ranks")
    cuda = torch.cuda.is_available() and config.device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def close_distributed() -> None:
    """Boilerplate: wait for every rank (rank 0 evaluates and saves last), then leave the group;
    a gloo group left to the interpreter's exit can abort the process."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def all_reduce_(t: torch.Tensor, op="sum") -> torch.Tensor:
    """Boilerplate: in-place all-reduce (sum or max) over ranks; the tensor itself when alone."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_reduce_gradients(params) -> None:
    """Boilerplate: sum the LoRA gradients over ranks in one flat all-reduce (zeros where a rank
    had no sample in the minibatch)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_(torch.cat([g.flatten() for g in grads]))
    for p, part in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = part.view_as(p).clone()


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Boilerplate: concatenate every rank's rows, in rank order; the tensor itself when alone."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def build_backend(config: Config):
    """The model behind the backend interface: the CPU toy, the shapes MMDiT, or SD3.5 (tiny, hub
    id or directory)."""
    if config.model == "toy":
        return ToyBackend(config)
    if config.model == "shapes":
        return ShapesBackend(config)
    return SD3Backend(config)


def train_iteration(backend, reward_fn, optimizer, sigmas, config: Config, iteration: int, ema=None) -> dict:
    """Algorithm 1, one iteration: sample groups, values and advantages, clipped update.

    Each rank samples whole groups; noise comes from one generator per (seed, iteration, global
    sample index), so samples do not depend on the number of ranks.
    """
    start = time.perf_counter()
    rank, world = rank_and_world()
    gen = make_generator(config.seed, 1, iteration)  # the same on every rank
    groups = backend.prompts(config.prompts_per_iteration, gen)  # (N,)
    per_rank = config.prompts_per_iteration // world
    prompts = [p for p in groups[rank * per_rank : (rank + 1) * per_rank] for _ in range(config.group_size)]
    offset = rank * len(prompts)  # global index of this rank's first sample
    noise = [make_generator(config.seed, 3, iteration, offset + i) for i in range(len(prompts))]
    instant = config.dense_values or config.use_weights  # GRPO scores the final state only
    batch = rollout(backend, prompts, sigmas, config.noise_level, reward_fn, noise, instant, config.reward_workers)
    rewards = all_gather_rows(batch.rewards)  # (N*G, T|1), every rank's groups in order
    advantages, info = batch_advantages(rewards, config)  # (N*G, T), every rank's samples
    info |= policy_update(backend, batch, advantages, optimizer, sigmas, config, gen, offset, len(rewards), ema)
    return {"iteration": iteration, **info, "seconds": time.perf_counter() - start}


def format_metrics(record: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def image_grid(samples):
    """Boilerplate: decoded images (B, 3, H, W) in [0, 1] as one (3, H', W') grid; None for other samples."""
    if samples is None or samples.ndim != 4:
        return None
    cols = math.ceil(math.sqrt(len(samples)))
    grid = torch.ones(3, samples.shape[2] * math.ceil(len(samples) / cols), samples.shape[3] * cols)
    for i, image in enumerate(samples.float().cpu()):
        r, c = divmod(i, cols)
        grid[:, r * image.shape[1] : (r + 1) * image.shape[1], c * image.shape[2] : (c + 1) * image.shape[2]] = image
    return grid  # (3, H', W')


def save_samples(samples, path: str, prompts=None, scores=None, limit: int = 24) -> None:
    """Boilerplate: a PNG grid of decoded images (B, 3, H, W) in [0, 1]; other samples are skipped.
    With prompts (and scores), the first `limit` images, each under its prompt and reward."""
    if samples is None or samples.ndim != 4:
        return
    if prompts is None:
        from PIL import Image

        grid = image_grid(samples)
        Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
        return
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(limit, len(samples))
    cols = min(6, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.3 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(samples[i].float().cpu().permute(1, 2, 0).numpy(), interpolation="nearest")
            title = textwrap.fill(prompts[i].removeprefix("a photo of "), 24)
            if scores is not None:
                title += f"\nreward {float(scores[i]):.2f}"
            ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class EMA:
    """Boilerplate: Flow-GRPO's EMA of the LoRA weights. After optimizer step n (1, 2, ...), when
    (n + 1) % every == 0: ema += (1 - d_n) (p - ema), d_n = min((1 + n) / (10 + n), decay)."""

    def __init__(self, params, decay: float, every: int):
        self.shadow = [p.detach().clone() for p in params]
        self.decay, self.every, self.steps = decay, every, 0

    @torch.no_grad()
    def update(self, params) -> None:
        self.steps += 1
        n = self.steps
        if (n + 1) % self.every == 0:
            d = min((1 + n) / (10 + n), self.decay)
            for shadow, p in zip(self.shadow, params, strict=True):
                shadow.add_((1 - d) * (p.detach() - shadow))

    @contextlib.contextmanager
    def applied(self, params):
        """The EMA weights in place of `params` inside the block; the trained ones restored after."""
        params = list(params)
        kept = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, shadow in zip(params, self.shadow, strict=True):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(params, kept, strict=True):
                    p.copy_(k)

    def state_dict(self) -> dict:
        return {"shadow": [t.cpu() for t in self.shadow], "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for shadow, saved in zip(self.shadow, state["shadow"], strict=True):
            shadow.copy_(saved)
        self.steps = state["steps"]


def append_metrics(path: str, records: list, rewrite: bool = False) -> None:
    """Boilerplate: one JSON object per iteration in output_dir/metrics.jsonl, flushed to disk at
    once. `rewrite` replaces the file (on resume: exactly the checkpoint's iterations, so an
    iteration finished after the last checkpoint is neither lost nor written twice)."""
    import json
    import os

    with open(path, "w" if rewrite else "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


CURVES = ("reward_mean", "eval_reward", "zero_std_ratio", "adv_rel_abs", "adv_anchor_abs", "kl_ref", "clipfrac")


def plot_curves(run_dirs: list, path: str) -> None:
    """Boilerplate: the CURVES metrics of one or several runs (their metrics.jsonl) in one PNG."""
    import json
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    for run in run_dirs:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        for ax, key in zip(axes.flat, CURVES, strict=False):
            points = [(r["iteration"] + 1, r[key]) for r in records if r.get(key) is not None]
            if key == "eval_reward" and records and records[0].get("eval_reward_before") is not None:
                points.insert(0, (0, records[0]["eval_reward_before"]))
            xs, ys = [x for x, _ in points], [y for _, y in points]
            ax.plot(xs, ys, label=os.path.basename(os.path.normpath(run)), marker="." if len(points) < 30 else "")
            ax.set_title(key)
            ax.set_xlabel("iteration")
    axes.flat[-1].axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def open_tensorboard(config: Config):
    """Boilerplate: a SummaryWriter in output_dir/tensorboard, or None when not asked for."""
    import os

    if not config.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(config.output_dir, "tensorboard"))


def save_outputs(backend, config: Config, history: list) -> None:
    """Boilerplate: the trained LoRA weights, the config and the history in config.output_dir."""
    import json
    import os

    backend.save(os.path.join(config.output_dir, "lora"))
    with open(os.path.join(config.output_dir, "history.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(config), "history": history}, f, indent=1)


# Fields a resumed run may change; any other difference from the checkpoint's config is an error.
RESUMABLE_FIELDS = {
    "iterations",
    "resume",
    "output_dir",
    "checkpoint_every",
    "eval_every",
    "device",
    "tensorboard",
    "reward_workers",
    "reward_threads",
    "decode_batch",
}


def lora_state(backend) -> dict:
    """Boilerplate: the trainable (LoRA) tensors of a backend by parameter name, CPU copies."""
    return {n: p.detach().cpu().clone() for n, p in backend.model.named_parameters() if p.requires_grad}


@torch.no_grad()
def set_lora(backend, state: dict) -> None:
    """Boilerplate: copy a lora_state() into a backend built with the same LoRA settings."""
    params = dict(backend.model.named_parameters())
    for name, value in state.items():
        params[name].copy_(value)


def save_checkpoint(path: str, backend, optimizer, config: Config, history: list, ema=None) -> None:
    """Boilerplate: LoRA weights, optimizer, iteration, RNG, config and history, written atomically
    (temporary file, then rename), so a crash while saving keeps the last good checkpoint."""
    import os

    state = {
        "lora": lora_state(backend),
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "iteration": len(history),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "config": dataclasses.asdict(config),
        "history": history,
    }
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str, backend, optimizer, config: Config, ema=None) -> list:
    """Boilerplate: restore a checkpoint into backend, optimizer and EMA; returns the history so far."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved_config = state["config"]
    except Exception as err:  # truncated, not a checkpoint, unreadable: all say the same to the user
        why = f"cannot read {path} ({type(err).__name__}: {err}): truncated, or not a vgpo checkpoint"
        raise ConfigError("resume", config.resume, why) from None
    for name, saved in saved_config.items():
        if name not in RESUMABLE_FIELDS and hasattr(config, name) and getattr(config, name) != saved:
            raise ConfigError(name, getattr(config, name), f"differs from the checkpoint's {saved!r} (--resume)")
    set_lora(backend, state["lora"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["history"]


class StopSignal:
    """Boilerplate: SIGINT/SIGTERM set `requested`; the loop checkpoints after the current
    iteration and stops. A second signal stops at once."""

    def __enter__(self):
        import signal
        import threading

        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.requested:
            signal.signal(signum, self.previous[signum])
            signal.raise_signal(signum)
        self.requested = True
        tqdm.write(f"signal {signum}: stopping after this iteration, with a checkpoint")

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def setup(config: Config, reward_fn=None):
    """The backend, the checked training and evaluation rewards and AdamW (Flow-GRPO's settings)."""
    backend = build_backend(config)
    name = getattr(reward_fn, "__name__", "reward_fn") if reward_fn else config.reward
    reward_fn = checked_reward(reward_fn or backend.load_reward(config.reward), name)
    eval_fn = reward_fn
    if config.eval_reward:
        eval_fn = checked_reward(backend.load_reward(config.eval_reward, "eval_reward"), config.eval_reward)
    optimizer = torch.optim.AdamW(
        backend.parameters(), lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay, eps=1e-8
    )
    return backend, reward_fn, eval_fn, optimizer


class RunFiles:
    """Boilerplate: what a run writes in output_dir as it goes: metrics.jsonl (one line per
    iteration, flushed), sample grids, TensorBoard scalars and images, curves.png at the end."""

    def __init__(self, config: Config):
        import os

        self.dir = config.output_dir
        os.makedirs(self.dir, exist_ok=True)
        self.metrics = os.path.join(self.dir, "metrics.jsonl")
        self.writer = open_tensorboard(config)

    def start(self, history: list) -> None:
        append_metrics(self.metrics, history, rewrite=True)  # a resumed run: the checkpoint's iterations

    def record(self, record: dict) -> None:
        append_metrics(self.metrics, [record])
        if self.writer:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self.writer.add_scalar(key, value, record["iteration"] + 1)
            self.writer.flush()

    def samples(self, samples, tag: str, step: int, prompts=None, scores=None) -> None:
        import os

        save_samples(samples, os.path.join(self.dir, f"samples_{tag}.png"), prompts, scores)
        grid = image_grid(samples)
        if self.writer and grid is not None:
            self.writer.add_image("eval_samples", grid, step)

    def finish(self) -> None:
        import os

        plot_curves([self.dir], os.path.join(self.dir, "curves.png"))
        if self.writer:
            self.writer.close()


def summary(history: list, config: Config, seconds: float) -> str:
    """End-of-run lines: eval before -> after, the best eval and its iteration, wall time, files."""
    evals = [(h["iteration"] + 1, h["eval_reward"]) for h in history if h.get("eval_reward") is not None]
    lines = [f"{len(history)} iterations, {seconds:.0f} s wall in this call"]
    if evals and history[0].get("eval_reward_before") is not None:
        before, after = history[0]["eval_reward_before"], evals[-1][1]
        weights = "EMA weights" if config.ema else "trained weights"
        where = "the training prompts, new noise" if config.fixed_prompts else "held-out"
        lines.insert(
            0, f"eval reward (ODE, {config.eval_steps} steps, {where}, {weights}): {before:.4f} -> {after:.4f}"
        )
    if evals:
        best = max(evals, key=lambda e: e[1])
        lines.append(f"best eval reward {best[1]:.4f} at iteration {best[0]}")
    if config.output_dir:
        lines.append(f"files in {config.output_dir}: metrics.jsonl, curves.png, samples_*.png, lora/, checkpoint.pt")
        if evals:
            lines.append(f"sample grids before -> after: samples_before.png -> samples_{evals[-1][0]:05d}.png")
    return "\n".join(lines)


def evaluate_run(backend, reward_fn, config: Config, weights, files, tag: str, step: int) -> float:
    """Boilerplate: the run's evaluation (held-out prompts and noise, with `weights()` applied, in
    chunks of a rank's rollout batch); its sample grid goes to `files`. Returns the mean reward."""
    prompts, gen = backend.eval_prompts(config.eval_samples), make_generator(config.seed, 2)
    chunk = config.prompts_per_iteration * config.group_size // rank_and_world()[1]
    with weights():
        scores, samples = evaluate(backend, reward_fn, prompts, config.eval_steps, gen, chunk)
    if files:
        captions = prompts if isinstance(prompts[0], str) else None  # the toy's prompts are indices
        files.samples(samples, tag, step, captions, scores)
    return scores.mean().item()


def train(config: Config, reward_fn=None) -> list[dict]:
    """Train the configured model with VGPO (or GRPO); returns one metrics dict per iteration.

    reward_fn(inputs, prompts) -> (B,) replaces the configured reward. With reward_workers > 0 it is
    called from worker threads, several calls at once: it must be thread-safe (the rewards of
    rewards.py are). The first record holds `eval_reward_before`, and records of evaluated
    iterations (every eval_every, and the last) hold `eval_reward`: ODE samples on held-out noise
    and prompts, with the EMA weights when `ema`. With output_dir, metrics stream to
    metrics.jsonl and checkpoints are written every checkpoint_every iterations, on SIGINT/SIGTERM
    and at the end. Under torchrun, rank 0 alone evaluates, logs and writes.
    """
    import os

    start = time.perf_counter()
    owns_group = init_distributed(config)
    backend, reward_fn, eval_fn, optimizer = setup(config, reward_fn)
    ema = EMA(backend.parameters(), config.ema_decay, config.ema_every) if config.ema else None
    sigmas, lead = backend.sigmas(config.num_steps), rank_and_world()[0] == 0  # sigmas: (T+1,)
    files = RunFiles(config) if lead and config.output_dir else None
    checkpoint = os.path.join(config.output_dir, "checkpoint.pt") if files else ""
    weights = (lambda: ema.applied(backend.parameters())) if ema else contextlib.nullcontext
    run_eval = functools.partial(evaluate_run, backend, eval_fn, config, weights, files)

    resume = os.path.join(config.resume, "checkpoint.pt") if config.resume else ""
    history = load_checkpoint(resume, backend, optimizer, config, ema) if resume else []
    if files:
        files.start(history)
    before = run_eval("before", 0) if lead and not history else None
    with StopSignal() as stop:
        for it in tqdm(range(len(history), config.iterations), desc="vgpo", dynamic_ncols=True, disable=not lead):
            record = train_iteration(backend, reward_fn, optimizer, sigmas, config, it, ema)
            if it == 0:
                record["eval_reward_before"] = before
            last = it == config.iterations - 1
            if lead and (last or (config.eval_every and (it + 1) % config.eval_every == 0)):
                record["eval_reward"] = run_eval(f"{it + 1:05d}", it + 1)
            history.append(record)
            if lead:
                tqdm.write(format_metrics(record))
            if files:
                files.record(record)
            due = last or stop.requested or (config.checkpoint_every and (it + 1) % config.checkpoint_every == 0)
            if checkpoint and due:
                save_checkpoint(checkpoint, backend, optimizer, config, history, ema)
            if stop.requested:
                raise KeyboardInterrupt(
                    f"stopped by a signal after iteration {it}; resume with --resume {config.output_dir}"
                )
    if files:
        with weights():  # the exported LoRA is the EMA when on
            save_outputs(backend, config, history)
        files.finish()
    if lead:
        tqdm.write(summary(history, config, time.perf_counter() - start))
    if owns_group:
        close_distributed()
    return history


# ------------------------------------------------------------------------------------------------
# CLI (boilerplate): every Config field is a flag; help text is the field's comment
# ------------------------------------------------------------------------------------------------


def _field_help() -> dict:
    import inspect

    helps = {}
    for line in inspect.getsource(Config).splitlines():
        head, _, comment = line.partition("#")
        if ":" in head and "=" in head and comment:
            helps[head.split(":")[0].strip()] = comment.strip().replace("%", "%%")
    return helps


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag, value or combination in one line, with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def cli_error(err: ConfigError):
    """A ConfigError as argparse reports a bad flag: one line naming the flag, exit status 2."""
    OneLineParser(prog="vgpo.py").error(f"argument --{err.field}: invalid value {err.value!r}: {err.allowed}")


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    """Defaults: the paper's, then PRESETS[model] (toy, tiny), --preset, --method; explicit flags win."""
    import typing

    pre = OneLineParser(add_help=False)
    pre.add_argument("--model", default=Config.model, help=_field_help()["model"])
    pre.add_argument("--preset", default=None, choices=["small-gpu"], help="settings for one 24 GB GPU")
    pre.add_argument("--method", default="vgpo", choices=["vgpo", "grpo"], help="grpo: dense_values off, kappa 0")
    known, _ = pre.parse_known_args(argv)
    defaults = dict(PRESETS.get(known.model, {}))  # the toy and tiny models have presets of their own
    defaults |= PRESETS.get(known.preset, {}) | PRESETS[known.method]

    parser = OneLineParser(description=__doc__.split("\n")[0], parents=[pre])
    types, helps = typing.get_type_hints(Config), _field_help()
    for f in dataclasses.fields(Config):
        if f.name == "model":  # already on the pre-parser
            continue
        kind = types[f.name]
        default = defaults.get(f.name, f.default)
        if kind is bool:
            kwargs = dict(action=argparse.BooleanOptionalAction)
        else:
            kwargs = dict(type={int | None: int}.get(kind, kind))
        parser.add_argument(f"--{f.name}", default=default, help=helps.get(f.name), **kwargs)
    args = parser.parse_args(argv)
    if args.resume and not any(a == "--output_dir" or a.startswith("--output_dir=") for a in argv or sys.argv[1:]):
        args.output_dir = args.resume  # not a preset's output_dir
    try:
        config = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    except ConfigError as err:
        cli_error(err)
    return config, args


def main(argv=None):
    config, _ = parse_args(argv)
    try:
        train(config)
    except ConfigError as err:  # found while loading: a model's limits, a checkpoint that cannot be read
        cli_error(err)
    except KeyboardInterrupt as stop:
        raise SystemExit(f"{stop}") from None


if __name__ == "__main__":
    main()
