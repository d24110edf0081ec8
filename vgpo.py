"""VGPO (Value-Anchored Group Policy Optimization) for flow-matching models: the algorithm, then its trainer.

Paper: Shao et al., arXiv 2512.12387 (ICLR 2026 submission); equation numbers are the ICLR version's. VGPO is
Flow-GRPO (Liu et al., arXiv 2505.05470) with two changes to the reward-to-advantage path: TCRM (dense per-step
values from one-step projections, Eqs. 9-11) and ADAE (a group advantage with an absolute anchor, Eqs. 12-13).
The equation block comes first (Eq. 7 -> Eqs. 9-11 -> Eqs. 12-13 -> Eq. 8): pure tensor functions that need
torch, einops, math and warnings only, to copy alone. Below its end marker, the trainer: rollout -> batch
advantages -> update -> training loop -> Config and CLI. Models are in backends.py, bookkeeping in runs.py.
"Decision N" is item N of README's "Decisions where the paper is silent"; "as Flow-GRPO" means
yifan123/flow_grpo at commit ac4c86e, scripts/train_sd3.py.

Shapes: N prompts, G samples per prompt (a group), B = N*G, T sampling steps, D latent dims (C,H,W for
SD3.5; 2 for the toy); tensors with a group axis are (N, G, ...). Steps: the paper counts t = T..1 downward,
this file k = 0..T-1 in sampling order (k = T - t). Step k moves x_k at sigma_k to x_{k+1} at sigma_{k+1};
sigma_0 = 1 (noise), sigma_T = 0; `x0` and `x0hat` always mean data (sigma = 0).
"""

from __future__ import annotations

import math
import warnings

import torch
from einops import rearrange

# ------------------------------------------------------------------------------------------------
# SDE step with log-probability (Eq. 7, Flow-GRPO)
# ------------------------------------------------------------------------------------------------


def _per_sample(s, x: torch.Tensor) -> torch.Tensor:
    """A float or (B,) tensor of sigmas as float32 of shape (B, 1, ..., 1), broadcastable to x."""
    s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    return s.reshape(-1, *([1] * (x.ndim - 1)))  # (B or 1, 1, ...)


def sde_step_with_logprob(v, x, sigma, sigma_next, noise_level, x_next=None, generator=None, noise=None):
    """Eq. 7 (Flow-GRPO): one SDE step x_k -> x_{k+1} and the per-dimension mean log-density.

    std_k = a sqrt(sig_k / (1 - sig_k));  mean = x (1 + std_k^2 dt / (2 sig_k))
    + v (1 + std_k^2 (1 - sig_k) / (2 sig_k)) dt;  x_{k+1} = mean + std_k sqrt(-dt) eps.
    Paper <-> code: v_theta <-> v, x_t <-> x, sigma_t <-> sigma, a <-> noise_level.
    At sigma == 1 the denominator uses sigma_next (= sig_1 on the first step, as Flow-GRPO).
    With x_next given, that action is scored instead of sampled; else eps is `noise` (B, D...) when
    given, or drawn by torch.randn from `generator` (a torch.Generator, or None: the global one).
    Float32 throughout. noise_level = 0 is the Euler step x + v dt: no noise is drawn and the log-prob
    is 0 (decision 7).
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
        if noise is None:
            device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=device)  # (B, D...)
        x_next = mean + step_std * noise.to(x.device)  # (B, D...)
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
    float rounding of the mean would leave ~1e-7 before the division by std + eps (24 values of 0.8; ~1e-3
    after it without global_std) and keep the group in decision 12's mask.
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


def adae(relative, anchor, weights, adv_clip=5.0):
    """Eq. 13's combination: A_k = clamp(w_k * (relative_k + a_k), -adv_clip, adv_clip).

    Paper <-> code: w <-> weights (Eq. 11), relative <-> `relative_advantage`, and a <-> `anchor_advantage`,
    which already holds on_k * kappa * Q_k / sum_j gamma^j (pass its output, not Q). All (N, G, T) -> (N, G, T).
    """
    return (weights * (relative + anchor)).clamp(-adv_clip, adv_clip)  # (N, G, T)


def vgpo_advantages(values, kappa, anchor_steps, gamma, global_std=True, eps=1e-4, adv_clip=5.0, weights=None):
    """Eq. 13 (ADAE): A_k = clamp(w_k * (relative_k + on_k * kappa * anchor_k), -adv_clip, adv_clip).

    Paper <-> code: Q <-> values (N, G, T), w <-> weights (default: Eq. 11 of values),
    kappa <-> kappa, gamma: the discount that formed the values (0 for a terminal reward).
    kappa = 0 (or anchor_steps = 0) leaves the per-step group-relative advantage.
    (N, G, T) -> (N, G, T).
    """
    if weights is None:
        weights = timestep_weights(values, eps)  # (N, G, T)
    relative = relative_advantage(values, global_std, eps)  # (N, G, T)
    return adae(relative, anchor_advantage(values, kappa, anchor_steps, gamma), weights, adv_clip)  # (N, G, T)


def grpo_advantages(rewards, num_steps, global_std=True, eps=1e-4, adv_clip=5.0):
    """Flow-GRPO: A = clamp((R_T - mean_G R_T) / (std R_T + eps), -adv_clip, adv_clip), the same for every step.

    (N, G) terminal rewards -> (N, G, T) advantages.
    """
    adv = relative_advantage(rewards[..., None], global_std, eps)  # (N, G, 1)
    return adv.expand(*rewards.shape, num_steps).clamp(-adv_clip, adv_clip)  # (N, G, T)


# ------------------------------------------------------------------------------------------------
# Policy objective (Eq. 8): clipped ratio per step plus KL to the reference
# ------------------------------------------------------------------------------------------------


def clipped_policy_loss(log_prob, old_log_prob, advantages, clip_range):
    """Eq. 8, one step: mean_i max(-A r, -A clip(r, 1 - eps_c, 1 + eps_c)), r = exp(logp - logp_old).

    (B,) inputs -> scalar loss and info of detached scalar tensors (no device synchronisation):
    clipfrac = share of |r - 1| > clip_range, approx_kl = 0.5 mean (logp - logp_old)^2 (Flow-GRPO),
    ratio_err = max |r - 1|.
    """
    diff = log_prob.float() - old_log_prob.float()  # (B,)
    ratio = torch.exp(diff)  # (B,)
    unclipped = -advantages * ratio  # (B,)
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)  # (B,)
    loss = torch.maximum(unclipped, clipped).mean()
    ratio, diff = ratio.detach(), diff.detach()
    info = {
        "clipfrac": ((ratio - 1).abs() > clip_range).float().mean(),
        "approx_kl": 0.5 * (diff**2).mean(),
        "ratio_err": (ratio - 1).abs().max(),
    }
    return loss, info


def kl_to_reference(mean, ref_mean, std):
    """KL term of Eq. 8 (Flow-GRPO convention): mean_dims (mean - mean_ref)^2 / (2 std_k^2).

    The exact Gaussian KL is this divided by |dt|; beta is tuned to this form (decision 8).
    mean, ref_mean (B, D...), std (B, 1...) or a float -> (B,). std is Eq. 7's std_k (the 4th return of
    `sde_step_with_logprob`), not the transition's std_k sqrt(-dt).
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    sq = (mean.float() - ref_mean.float()) ** 2 / (2 * std**2)  # (B, D...)
    return sq.mean(dim=tuple(range(1, sq.ndim)))  # (B,)


# ================================================================================================
# End of the equation block. Everything above runs with torch, einops, math and warnings alone
# (tested): copy it into another trainer as it is. Below, the trainer: it calls the models of
# backends.py through their interface (backends.Backend) and the bookkeeping of runs.py.
# ================================================================================================

# The trainer's imports (pyproject.toml allows imports below code in this file, E402).
import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import os
import re
import sys
import time
import typing
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from tqdm.auto import tqdm

import backends
from backends import ConfigError, build_backend, randn
from runs import (
    EMA,
    RunFiles,
    StopSignal,
    all_gather_rows,
    all_reduce_,
    all_reduce_gradients,
    close_distributed,
    format_metrics,
    init_distributed,
    load_checkpoint,
    rank_and_world,
    save_checkpoint,
    save_outputs,
    summary,
)

# ------------------------------------------------------------------------------------------------
# Rollout: SDE sampling with log-probs (Eq. 7) and instant rewards of the projections (Eq. 9).
# `backend` is a backends.Backend: the toy, SD3.5 or the shapes model.
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

    class Inline(contextlib.AbstractContextManager):
        def __exit__(self, *exc):
            return None

        def submit(self, fn, *args):
            done = Future()
            done.set_result(fn(*args))
            return done

    return ThreadPoolExecutor(workers, thread_name_prefix="reward") if workers else Inline()


def ode_completion(backend, x, v, sigma, cond, steps: int = 1):
    """The data estimate x0hat of a state x at sigma whose velocity v is known: `steps` Euler steps of
    the (guided) ODE on a uniform grid from sigma to 0, the first with v. steps = 1 is Eq. 9's one-step
    projection (TCRM, no extra forward); steps = n is DenseGRPO's n-step completion (arXiv 2601.20218),
    n - 1 extra velocity calls. (B, D...) -> (B, D...)."""
    if steps == 1:
        return project_x0(x, v, sigma)  # (B, D...)
    grid = torch.linspace(float(sigma), 0.0, steps + 1)  # (n+1,)
    for j in range(steps):
        v = v if j == 0 else backend.velocity(x, grid[j], cond)  # (B, D...)
        x = x + v * (grid[j + 1] - grid[j])
    return x  # (B, D...)


@torch.no_grad()
def rollout(
    backend, prompts, sigmas, noise_level, reward_fn, generator, instant=True, workers=0, value_steps=1
) -> Rollout:
    """Sample B trajectories with Eq. 7 and score each state's one-step projection (Eq. 9).

    The velocity that step k+1 needs is computed once and also projects x_{k+1} (TCRM costs
    no extra forward; value_steps = n > 1 completes the state in n ODE steps instead, n - 1 extra
    forwards per step). Per step at most one decode and one reward call for the whole batch;
    with instant=False only the final state is decoded and scored (Flow-GRPO's cost). With
    workers > 0 a step's reward is scored in a thread while the sampler computes the next steps;
    all are gathered, in step order, before returning. sigmas (T+1,); generator: one torch.Generator
    or a list of them, one per sample (a sample's noise then does not depend on its batch).
    """
    cond = backend.encode(prompts)
    x = backend.noise(len(prompts), generator)  # (B, D...)
    T = len(sigmas) - 1
    latents, log_probs, pending = [x], [], []
    v = backend.velocity(x, sigmas[0], cond)  # (B, D...)
    with reward_pool(workers if instant else 0) as pool:
        for k in range(T):
            eps = randn(x.shape, generator, x.device) if noise_level else None  # (B, D...), eps of Eq. 7
            x, log_prob, _, _ = sde_step_with_logprob(v, x, sigmas[k], sigmas[k + 1], noise_level, noise=eps)
            last = k == T - 1
            if not last:
                v = backend.velocity(x, sigmas[k + 1], cond)  # (B, D...), reused by step k+1
            if instant or last:
                x0hat = x if last else ode_completion(backend, x, v, sigmas[k + 1], cond, value_steps)  # Eq. 9
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
# Advantages of one rollout batch: TCRM values (Eqs. 10-11) -> ADAE (Eq. 13) or GRPO
# ------------------------------------------------------------------------------------------------


def batch_advantages(rewards, config: Config):
    """Instant rewards (B, T) or terminal (B, 1) -> advantages (B, T) and diagnostics (scalar tensors).

    dense_values: Q = Eq. 10 of the instant rewards; else Q_k = R_T for every k, whose anchor
    is R_T itself (discount 0). Weights w (Eq. 11) come from the dense values when enabled.
    dense_values=False, kappa=0, weighting=auto is exactly Flow-GRPO's advantage (`vgpo_advantages`
    step by step: the two terms are computed once, and the logged ones are those that train).
    """
    c, T = config, config.num_steps
    R = rearrange(rewards, "(n g) t -> n g t", g=c.group_size)  # (N, G, T|1)
    terminal = R[..., -1]  # (N, G)
    dense = cumulative_values(R, c.gamma) if R.shape[-1] == T else None  # (N, G, T)
    values, anchor_gamma = (dense, c.gamma) if c.dense_values else (terminal[..., None].expand(-1, -1, T), 0.0)
    weights = timestep_weights(dense, c.eps) if c.use_weights else torch.ones_like(values)  # (N, G, T)
    relative = relative_advantage(values, c.global_std, c.eps)  # (N, G, T), Eq. 12
    anchor = anchor_advantage(values, c.kappa, c.anchor_steps, anchor_gamma)  # (N, G, T), Eq. 13's anchor
    adv = adae(relative, anchor, weights, c.adv_clip)  # (N, G, T), Eq. 13
    flat = (terminal == terminal[:, :1]).all(dim=1)  # (N,), groups whose samples end with one score
    fallback = weight_fallback(dense, c.eps).float().mean() if c.use_weights else values.new_zeros(())
    info = {
        "reward_mean": terminal.mean(),
        "value_mean": values.mean(),
        "zero_std_ratio": flat.float().mean(),
        "zero_std_pass": (flat & (terminal[:, 0] >= 1)).float().mean(),  # of a [0, 1] reward: all pass
        "zero_std_fail": (flat & (terminal[:, 0] <= 0)).float().mean(),  # all fail
        "adv_rel_abs": (weights * relative).abs().mean(),
        "adv_anchor_abs": (weights * anchor).abs().mean(),
        "weight_fallback_frac": fallback,
    }
    return rearrange(adv, "n g t -> (n g) t"), info


# ------------------------------------------------------------------------------------------------
# Policy update: per-step clipped loss (Eq. 8) + KL, minibatches, gradient accumulation
# ------------------------------------------------------------------------------------------------


def step_loss(backend, batch: Rollout, advantages, idx, k, sigmas, config: Config):
    """Loss of sampling step k on the samples idx: recompute log p of the stored action, Eq. 8 + KL.
    idx indexes this rank's batch, and advantages are this rank's rows (B_rank, T), as batch's (policy_update
    slices them). Returns the loss and its diagnostics as detached scalar tensors."""
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
    return loss, {**info, "kl_ref": kl.mean().detach(), "loss": loss.detach()}


def has_signal(advantages) -> torch.Tensor:
    """Decision 12 (Flow-GRPO's mask, ac4c86e scripts/train_sd3.py:797): the samples whose advantage is
    non-zero at some step of `advantages` (pass the trained steps' columns), (B, T') -> (B,) bool.
    Only these carry a policy gradient."""
    return advantages.abs().sum(dim=1) != 0


def minibatches(advantages, trained: int, num_minibatches: int, generator) -> list:
    """Decision 12: the samples with a signal in the first `trained` steps (Flow-GRPO's mask), padded
    with randomly chosen samples without one up to a multiple of num_minibatches when there are enough
    (the reference pads each GPU's samples to a multiple of its sampling batches per epoch, ac4c86e
    scripts/train_sd3.py:797-808), in random order, split into at most num_minibatches parts (826-836),
    equal when the padding sufficed (fewer signalled samples than num_minibatches: fewer optimizer steps).
    A padded sample adds no policy gradient, only its KL term. Decision 13: with no
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
    Minibatches are drawn over the samples of every rank, `advantages` (total, T) in rank order; this rank
    holds samples offset..offset+B-1 and trains its part, and gradients are summed over ranks (data
    parallel). `total` (= len(advantages)) is not read: kept so that callers written for it still run.
    Diagnostics are returned as scalar tensors, summed on the device (no synchronisation per step): the
    trainer reads them once, when it logs.
    """
    trained, local_size = int(config.num_steps * config.timestep_fraction), len(batch.prompts)
    parts = minibatches(advantages, trained, config.num_minibatches, generator)
    local_adv = advantages[offset : offset + local_size]  # (B_rank, T)
    sums, count, first_errs = dict.fromkeys(("clipfrac", "approx_kl", "kl_ref", "loss"), 0.0), 0, []
    grad_norm = torch.tensor(float("nan"))
    for j, mb in enumerate(parts):
        local = mb[(mb >= offset) & (mb < offset + local_size)] - offset  # this rank's part of the minibatch
        optimizer.zero_grad(set_to_none=False)
        for micro in local.split(config.micro_batch or len(local)) if len(local) else ():  # a rank may hold none
            for k in range(trained):
                loss, info = step_loss(backend, batch, local_adv, micro, k, sigmas, config)
                (loss * len(micro) / len(mb) / trained).backward()
                sums = {key: sums[key] + info[key].double() * len(micro) for key in sums}
                if j == 0:  # the first minibatch runs before any update: its ratio must be 1
                    first_errs.append(info["ratio_err"])
        count += len(local) * trained
        all_reduce_gradients(backend.parameters())  # sum over ranks; nothing when alone
        grad_norm = torch.nn.utils.clip_grad_norm_(backend.parameters(), config.max_grad_norm)
        optimizer.step()
        if ema is not None:
            ema.update(backend.parameters())  # decision 14: once per optimizer step
    device = advantages.device  # nccl reduces GPU tensors only
    stats = [torch.as_tensor(sums[key], dtype=torch.float64).to(device) for key in sums]  # each ()
    totals = all_reduce_(torch.stack([*stats, torch.tensor(float(count), dtype=torch.float64, device=device)]))
    err = torch.stack(first_errs).max().to(device) if first_errs else torch.zeros((), device=device)
    err = all_reduce_(err, op="max")
    means = totals[:-1] / totals[-1]  # (4,), NaN where this batch trained nothing (0 / 0)
    return {
        **dict(zip(sums, means, strict=True)),
        "grad_norm": grad_norm,
        "onpolicy_ratio_err": err,
        "trained_frac": has_signal(advantages[:, :trained]).float().mean(),
        "optimizer_steps": len(parts),
    }


# ------------------------------------------------------------------------------------------------
# Algorithm 1: one iteration, and the training loop
# ------------------------------------------------------------------------------------------------


def logged(info: dict) -> dict:
    """Boilerplate: a dict of scalar tensors (anywhere) and numbers as Python floats, in one device
    synchronisation: diagnostics stay tensors until here (a `.item()` each would wait on the device)."""
    keys = [key for key, value in info.items() if isinstance(value, torch.Tensor)]
    if not keys:
        return dict(info)
    device = info[keys[0]].device
    values = torch.stack([info[key].detach().to(device, torch.float64) for key in keys]).tolist()
    return {**info, **dict(zip(keys, values, strict=True))}


def make_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for one purpose, seeded from (seed, stream...), so runs are reproducible."""
    return torch.Generator().manual_seed(hash((seed, *stream)) % 2**63)


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
    c = config
    batch = rollout(backend, prompts, sigmas, c.noise_level, reward_fn, noise, instant, c.reward_workers, c.value_steps)
    rewards = all_gather_rows(batch.rewards)  # (N*G, T|1), every rank's groups in order
    advantages, info = batch_advantages(rewards, config)  # (N*G, T), every rank's samples
    info |= policy_update(backend, batch, advantages, optimizer, sigmas, config, gen, offset, len(rewards), ema)
    return {"iteration": iteration, **logged(info), "seconds": time.perf_counter() - start}


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


def evaluate_run(backend, reward_fn, config: Config, weights, files, tag: str, step: int) -> torch.Tensor:
    """Boilerplate: the run's evaluation (held-out prompts and noise, with `weights()` applied, in
    chunks of a rank's rollout batch); its sample grid goes to `files`. Returns every sample's reward
    (B,): the same prompts and noise at every evaluation, so outcomes pair (runs.mcnemar)."""
    prompts, gen = backend.eval_prompts(config.eval_samples), make_generator(config.seed, 2)
    chunk = config.prompts_per_iteration * config.group_size // rank_and_world()[1]
    with weights():
        scores, samples = evaluate(backend, reward_fn, prompts, config.eval_steps, gen, chunk)
    if files:
        captions = prompts if isinstance(prompts[0], str) else None  # the toy's prompts are indices
        files.samples(samples, tag, step, captions, scores)
    return scores.cpu()


def train(config: Config, reward_fn=None) -> list[dict]:
    """Train the configured model with VGPO (or GRPO); returns one metrics dict per iteration.

    reward_fn(inputs, prompts) -> (B,) replaces the configured reward. With reward_workers > 0 it is
    called from worker threads, several calls at once: it must be thread-safe (the rewards of
    rewards.py are). The first record holds `eval_reward_before` (and every sample's score,
    `eval_scores_before`), and records of evaluated iterations (every eval_every, and the last) hold
    `eval_reward` and `eval_scores`: ODE samples on held-out noise and prompts, the same at every
    evaluation (paired), with the EMA weights when `ema`. With output_dir, metrics stream to
    metrics.jsonl and checkpoints are written every checkpoint_every iterations, on SIGINT/SIGTERM
    and at the end. Under torchrun, rank 0 alone evaluates, logs and writes.
    """
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
            if it == 0 and before is not None:
                record |= {"eval_reward_before": before.mean().item(), "eval_scores_before": before.tolist()}
            elif it == 0:
                record["eval_reward_before"] = None
            last = it == config.iterations - 1
            if lead and (last or (config.eval_every and (it + 1) % config.eval_every == 0)):
                scores = run_eval(f"{it + 1:05d}", it + 1)
                record |= {"eval_reward": scores.mean().item(), "eval_scores": scores.tolist()}
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
# Config: SD3.5-Medium defaults from the paper and Flow-GRPO (SPEC section 6); presets
# ------------------------------------------------------------------------------------------------


@dataclass(init=False)
class Config:
    """Config(model=X, **fields): the paper's defaults below, then PRESETS[X] when the model has a
    preset (toy, tiny, shapes), then the caller's fields; `python vgpo.py --model X --field v` builds the same.
    Config() is the CPU toy (model "toy" and its preset: clip_range 0.2, lr 3e-3, ...); the paper's defaults
    as written below apply to a model without a preset (an SD3.5 id or directory)."""

    # run
    model: str = "toy"  # toy | shapes | tiny | random-sd3.5-medium (random weights, offline) | hub id | directory
    reward: str = ""  # toy_mode|toy_region (toy), or a rewards.py spec "ocr:1,pickscore:0.5"; "": toy_mode|ocr
    eval_reward: str = ""  # the evaluations' reward (same specs); "": the training reward
    seed: int = 0  # seeds every torch.Generator of the run
    iterations: int = 100  # rollout + update rounds
    prompts_per_iteration: int = 8  # N, prompts (groups) per rollout batch (decision 16; Flow-GRPO GenEval: 48)
    group_size: int = 24  # G, samples per prompt (Flow-GRPO: 24; decision 16)
    # sampler (Eq. 7)
    num_steps: int = 10  # T, SDE sampling steps in training (paper App. A.2: 10)
    eval_steps: int = 40  # ODE steps for evaluation (paper App. A.2: 40)
    noise_level: float = 0.7  # a, SDE noise level (Flow-GRPO: 0.7)
    shift: float = 3.0  # sigma-schedule shift (SD3.5 scheduler: 3)
    # TCRM (Eqs. 9-11)
    dense_values: bool = True  # TCRM values Q_k from one-step projections; False: Q_k = R_T
    value_steps: int = 1  # Eq. 9's x0hat: 1 = one-step projection (paper); n = n-step ODE completion (DenseGRPO)
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
    cfg_detach_uncond: bool = False  # training CFG detaches o_u (Flow-GRPO 2d76907..ac4c86e); off: both (decision 9)
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
    ema: bool = True  # evaluate and export an EMA of the LoRA weights (Flow-GRPO: on); toy, tiny, shapes: off (README)
    ema_decay: float = 0.9  # EMA decay (Flow-GRPO: 0.9), warmed up as min((1 + n) / (10 + n), decay)
    ema_every: int = 8  # optimizer steps between EMA updates (Flow-GRPO: 8)
    checkpoint_every: int = 10  # also on SIGINT/SIGTERM and at the end; needs output_dir
    resume: str = ""  # a directory holding checkpoint.pt: continue that run exactly
    device: str = "auto"  # auto: cuda if available, else cpu
    # toy backend (backends.ToyBackend checks these, and refuses the fields it cannot honour)
    toy_conditions: int = 4  # conditions ("prompts") of the 2D toy
    toy_modes: int = 4  # modes of each condition's target mixture
    toy_spread: float = 0.15  # std of each mode of the toy's base distribution
    toy_pretrain_steps: int = 1500  # flow-matching steps of the base toy model
    # shapes backend (backends.ShapesBackend checks these)
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
    "shapes": dict(  # the CPU image demo (RESULTS.md, "The shapes demo"): two objects, mostly failed by the base
        # the rule (RESULTS): the two-object training prompts of base strict pass rate in [0.1, 0.4]
        # (shapes_base_rates, 16 samples each), the highest rates, distinct colour pairs, ties alphabetical
        shapes_prompts="a photo of a blue circle and a blue square; a photo of a blue square and a yellow circle; "
        "a photo of a red circle and a blue triangle",
        resolution=32,  # the model's side (shapes.SIZE)
        shift=1.0,  # pixel space at 32 px: SD3's shift 3 is for 1024 px latents
        noise_level=0.3,  # paper: 0.7; at 0.7 the 900-step base's 10-step SDE samples passed 0.03 (ODE .16), at .3 .21
        reward="geneval_shapes_score",  # Flow-GRPO's graded GenEval training score, as the paper
        eval_reward="geneval_shapes",  # GenEval's strict accuracy, as the paper reports
        prompts_per_iteration=2,  # N: two of the three prompts per batch
        iterations=60,  # about 11 minutes on 2 CPU cores with both evaluations (RESULTS)
        group_size=8,  # paper: 24; a third of the samples for a CPU
        timestep_fraction=0.5,  # train 5 of 10 steps (sigma 1 -> 0.56), where the layout is decided; paper: 0.99
        lr=3e-4,  # the paper's; 1e-3 (chosen under reward v2) drifted either way over seeds (RESULTS, pilot)
        lora_rank=8,  # a 1.7 M-parameter UNet: rank 32 would rival its widths (32-64)
        lora_alpha=16,
        eval_steps=20,  # paper: 40; the base model was selected at 20
        eval_samples=144,  # 48 per prompt, held-out noise, the same before and after: a paired McNemar test
        eval_every=0,  # before and after only: an evaluation (60 s here) costs about seven iterations
        ema=False,  # the trained weights are what is measured
        output_dir="runs/shapes",  # sample grids with prompts and rewards: samples_before.png, samples_00060.png
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


def _checker(c: Config):
    """need(ok, field, allowed): raise a ConfigError naming the field, its value and what is allowed."""

    def need(ok, name, allowed):
        if not ok:
            raise ConfigError(name, getattr(c, name), allowed)

    return need


def validate_config(c: Config) -> None:
    """Check every field before anything loads; errors name the field, value and what is allowed.
    Here the algorithm's fields; validate_run checks files, output, workers and the backend's own fields."""
    need = _checker(c)
    need(c.group_size >= 2, "group_size", "must be >= 2 (a group statistic needs two samples)")
    need(c.prompts_per_iteration >= 1, "prompts_per_iteration", "must be >= 1")
    need(c.iterations >= 0, "iterations", "must be >= 0")
    need(c.num_steps >= 1, "num_steps", "must be >= 1")
    need(c.value_steps >= 1, "value_steps", "must be >= 1 (1: the paper's one-step projection)")
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
    """Files, output and worker fields (see validate_config); then the backend's checks: its limits,
    its rewards, and a ConfigError for a field it cannot honour (backends.check_config)."""
    need = _checker(c)
    need(c.reward_workers >= 0, "reward_workers", "must be >= 0 (0: score inline)")
    need(c.reward_threads >= 0, "reward_threads", "must be >= 0 (0: one per CPU core)")
    need(
        not c.tensorboard or bool(c.output_dir), "tensorboard", "needs --output_dir (logs go to output_dir/tensorboard)"
    )
    if c.tensorboard:
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
        need(os.path.isfile(os.path.join(c.resume, "checkpoint.pt")), "resume", "the directory has no checkpoint.pt")
    need(c.eval_samples >= 1, "eval_samples", "must be >= 1")
    if c.prompt_file:
        need(os.path.isfile(c.prompt_file), "prompt_file", "no such file")
        need(any(line.strip() for line in open(c.prompt_file, encoding="utf-8")), "prompt_file", "file has no prompt")
    backends.check_config(c)  # the model's own fields, rewards and limits, and the fields it cannot honour


# ------------------------------------------------------------------------------------------------
# CLI: every Config field is a flag; help text is the field's comment
# ------------------------------------------------------------------------------------------------


def _field_help() -> dict:
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
    """Defaults: the paper's, then PRESETS[model] (toy, tiny, shapes), --preset, --method; explicit flags win."""
    pre = OneLineParser(add_help=False)
    pre.add_argument("--model", default=Config.model, help=_field_help()["model"])
    pre.add_argument("--preset", default=None, choices=["small-gpu"], help="settings for one 24 GB GPU")
    pre.add_argument("--method", default="vgpo", choices=["vgpo", "grpo"], help="grpo: dense_values off, kappa 0")
    known, _ = pre.parse_known_args(argv)
    defaults = dict(PRESETS.get(known.model, {}))  # the toy, tiny and shapes models have presets of their own
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
