"""Tests in three tiers: closed forms of each equation, invariants, end-to-end training runs."""

import argparse
import ast
import contextlib
import dataclasses
import inspect
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from einops import rearrange

import backends
import experiments
import rewards
import runs
import shapes
import shapes_labels
import shapes_model
import tiny
import vgpo

# --- Eq. 7: the SDE step and its log-probability (sampler)


def _eq7_mean_by_hand(v, x, s, s_next, a):
    """Eq. 7's mean in float64, written out from the SPEC independently of vgpo."""
    dt = s_next - s
    std = a * math.sqrt(s / (1 - (s_next if s == 1 else s)))
    return x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt, std * math.sqrt(-dt)


@pytest.mark.parametrize("s,s_next", [(1.0, 0.96), (0.7, 0.6), (0.2, 0.0)])
def test_logprob_is_the_normal_log_density_averaged_over_dims(s, s_next):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    x_next, log_prob, mean, std = vgpo.sde_step_with_logprob(v, x, s, s_next, 0.7, generator=g)
    mean64, step_std = _eq7_mean_by_hand(v.double(), x.double(), s, s_next, 0.7)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    expected = torch.distributions.Normal(mean64, step_std).log_prob(x_next.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-5)
    assert log_prob.dtype == torch.float32 and log_prob.shape == (5,) and std.shape == (5, 1, 1, 1)


def test_scoring_a_given_action_matches_sampling_it():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    sig, sig_next = torch.full((6,), 0.5), torch.full((6,), 0.4)  # (B,) tensors are allowed
    x_next, lp, _, _ = vgpo.sde_step_with_logprob(v, x, sig, sig_next, 0.7, generator=g)
    x_same, lp_again, _, _ = vgpo.sde_step_with_logprob(v, x, sig, sig_next, 0.7, x_next=x_next)
    assert torch.equal(x_same, x_next) and torch.equal(lp, lp_again)


def test_zero_noise_is_the_euler_step():
    x, v = torch.randn(4, 2), torch.randn(4, 2)
    x_next, log_prob, _, _ = vgpo.sde_step_with_logprob(v, x, 0.8, 0.5, 0.0)
    torch.testing.assert_close(x_next, x + v * (0.5 - 0.8))
    assert (log_prob == 0).all()  # decision 7: no density without noise


def test_ode_step_draws_no_noise_and_no_density():
    x, v = torch.randn(4, 3), torch.randn(4, 3)
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x_next, log_prob, _, _ = vgpo.sde_step_with_logprob(v, x, 0.6, 0.4, 0.0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    torch.testing.assert_close(x_next, x + v * (0.4 - 0.6))
    assert torch.equal(log_prob, torch.zeros(4))


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_sampler_preserves_gaussian_marginals(noise_level):
    """Data N(0, sd^2): the exact velocity is linear, E[x1 - x0 | x_s] = x (s - (1-s) sd^2) / var_s.
    Eq. 7 is marginal-preserving for any noise level: samples end with std sd, up to the
    first-order discretisation error (0.497 ODE / 0.501 SDE at 200 steps, 0.486 / 0.499 at 50)."""
    sd, n, sigmas = 0.5, 40000, backends.sigma_schedule(200, 1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=g)
    for k in range(200):
        s = sigmas[k].item()
        v = x * (s - (1 - s) * sd**2) / ((1 - s) ** 2 * sd**2 + s**2)
        x = vgpo.sde_step_with_logprob(v, x, sigmas[k], sigmas[k + 1], noise_level, generator=g)[0]
    assert abs(x.std().item() - sd) < 0.01 and abs(x.mean().item()) < 0.01


@pytest.mark.parametrize("shift", [1.0, 3.0, 10.0])
@pytest.mark.parametrize("num_steps", [1, 2, 10, 50])
@pytest.mark.parametrize("noise_level", [0.0, 0.1, 0.7, 1.5])
def test_sampler_and_loss_match_float64_over_schedules_and_noise(shift, num_steps, noise_level):
    sigmas = backends.sigma_schedule(num_steps, shift)
    assert sigmas[0] == 1 and sigmas[-1] == 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g)
    for k in range(num_steps):
        s, s_next = sigmas[k].item(), sigmas[k + 1].item()
        v = torch.randn(4, 3, generator=g, requires_grad=True)
        x_next, lp, mean, std = vgpo.sde_step_with_logprob(v, x, s, s_next, noise_level, generator=g)
        mean64, step_std = _eq7_mean_by_hand(v.detach().double(), x.double(), s, s_next, noise_level)
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
        if noise_level == 0:
            assert torch.equal(x_next, mean) and torch.equal(lp, torch.zeros(4))
        else:
            expected = torch.distributions.Normal(mean64, step_std).log_prob(x_next.double()).mean(-1)
            torch.testing.assert_close(lp.double(), expected, rtol=1e-3, atol=1e-3)
            ref = mean.detach() + 0.1
            kl = vgpo.kl_to_reference(mean, ref, std)  # Flow-GRPO's KL: mean square / (2 std^2), no |dt|
            std64 = noise_level * math.sqrt(s / (1 - (s_next if s == 1 else s)))
            torch.testing.assert_close(kl.double(), torch.full((4,), 0.01 / (2 * std64**2), dtype=torch.float64),
                                       rtol=1e-4, atol=0)  # fmt: skip
            loss, _ = vgpo.clipped_policy_loss(lp, lp.detach() + 0.01, torch.randn(4, generator=g), 1e-4)
            (loss + kl.mean()).backward()
            assert torch.isfinite(v.grad).all()
        x = x_next.detach()


# --- Eq. 9: the one-step projection (TCRM), no extra forward


def test_project_x0_recovers_x0_on_a_straight_path():
    x0, x1, s = torch.randn(8, 2), torch.randn(8, 2), torch.rand(8)
    x_s = (1 - s[:, None]) * x0 + s[:, None] * x1
    torch.testing.assert_close(vgpo.project_x0(x_s, x1 - x0, s), x0)


@pytest.mark.parametrize("instant", [True, False])
def test_tcrm_reuses_the_samplers_velocity(instant):
    config = vgpo.toy_config(toy_pretrain_steps=200)
    backend = experiments.CountingBackend(backends.ToyBackend(config))
    reward = backend.load_reward(config.reward)
    counted = backend.counted_reward(reward)
    sigmas = backend.sigmas(10)
    batch = vgpo.rollout(backend, [0, 1] * 4, sigmas, 0.7, counted, torch.Generator().manual_seed(0), instant)
    calls = 10 if instant else 1
    assert backend.calls == {"velocity": 10, "decode": calls, "reward": calls}
    assert batch.latents.shape == (8, 11, 2) and batch.rewards.shape == (8, calls)
    # the instant reward of step k scores x_{k+1} - sigma_{k+1} v(x_{k+1}, sigma_{k+1})
    if instant:
        with torch.no_grad():
            x = batch.latents[:, 3]
            x0hat = vgpo.project_x0(x, backend.inner.velocity(x, sigmas[3], batch.cond), sigmas[3])
        torch.testing.assert_close(batch.rewards[:, 2], reward(x0hat, batch.prompts))
        torch.testing.assert_close(batch.rewards[:, -1], reward(batch.latents[:, -1], batch.prompts))


def test_value_steps_one_is_the_projection_and_n_steps_cost_n_minus_one_calls_each():
    config = tiny_config(num_steps=4)
    backend = experiments.CountingBackend(vgpo.build_backend(config))
    x, cond = backend.noise(2, torch.Generator().manual_seed(0)), backend.encode(["a sign"] * 2)
    v = backend.velocity(x, 0.6, cond)
    torch.testing.assert_close(vgpo.ode_completion(backend, x, v, 0.6, cond, 1), vgpo.project_x0(x, v, 0.6))
    # three Euler steps by hand on the grid 0.6, 0.4, 0.2, 0
    by_hand = x + v * -0.2
    by_hand = by_hand + backend.velocity(by_hand, 0.4, cond) * -0.2
    by_hand = by_hand + backend.velocity(by_hand, 0.2, cond) * -0.2
    torch.testing.assert_close(vgpo.ode_completion(backend, x, v, 0.6, cond, 3), by_hand, rtol=1e-5, atol=1e-5)
    calls = {}
    for n in (1, 3):
        backend.calls = dict.fromkeys(backend.calls, 0)
        reward = backend.counted_reward(vgpo.checked_reward(backend.load_reward(config.reward), config.reward))
        sigmas = backend.sigmas(4)
        vgpo.rollout(backend, ["a", "b"], sigmas, 0.7, reward, torch.Generator().manual_seed(0), True, 0, n)
        calls[n] = backend.calls["velocity"]
    assert calls == {1: 4, 3: 4 + 3 * 2}  # T velocity calls, plus (n - 1) for each of the T - 1 projections


def tiny_config(**overrides):
    return vgpo.Config(**{**vgpo.PRESETS["tiny"], "model": "tiny", **overrides})


def counted_iteration(config):
    backend = experiments.CountingBackend(vgpo.build_backend(config))
    counted = backend.counted_reward(vgpo.checked_reward(backend.load_reward(config.reward), config.reward))
    optimizer = torch.optim.AdamW(backend.parameters(), lr=config.lr)
    sigmas = backend.sigmas(config.num_steps)
    with torch.no_grad():
        vgpo.rollout(backend, ["a", "b"], sigmas, 0.7, counted, torch.Generator().manual_seed(0), True)
    backend.calls = dict.fromkeys(backend.calls, 0)
    record = vgpo.train_iteration(backend, counted, optimizer, sigmas, config, 0)
    return backend.calls, record


def test_vgpo_iteration_calls_the_transformer_as_often_as_grpo():
    vgpo_calls, _ = counted_iteration(tiny_config(num_steps=4))
    grpo_calls, _ = counted_iteration(tiny_config(num_steps=4, **vgpo.PRESETS["grpo"]))
    assert vgpo_calls["velocity"] == grpo_calls["velocity"]
    assert (vgpo_calls["decode"], vgpo_calls["reward"]) == (4, 4)  # one per step, for the whole batch
    assert (grpo_calls["decode"], grpo_calls["reward"]) == (1, 1)


# --- Eq. 10: cumulative values


def test_cumulative_values_against_an_explicit_loop():
    rewards = torch.rand(3, 4, 7)
    values = vgpo.cumulative_values(rewards, 0.9)
    for idx in [(0, 0), (2, 3), (1, 2)]:
        r = rewards[idx].tolist()
        expected = [sum(0.9 ** (j - k) * r[j] for j in range(k, 7)) for k in range(7)]
        torch.testing.assert_close(values[idx], torch.tensor(expected))


# --- Eq. 11: timestep weights (decision 2)


def test_timestep_weights_average_one_and_fall_back_on_nonpositive_means():
    values = vgpo.cumulative_values(torch.rand(5, 10), 0.9)
    torch.testing.assert_close(vgpo.timestep_weights(values).mean(-1), torch.ones(5))
    with pytest.warns(UserWarning, match="fall back to 1"):
        w = vgpo.timestep_weights(torch.tensor([[-1.0, 0.5, 0.2], [1.0, 2.0, 3.0]]))
    torch.testing.assert_close(w[0], torch.ones(3))
    torch.testing.assert_close(w[1], torch.tensor([0.5, 1.0, 1.5]))


def test_weights_never_negative_or_huge_with_mixed_sign_values():
    with pytest.warns(UserWarning, match="negative value"):
        w = vgpo.timestep_weights(torch.tensor([[-0.5, 0.2, 0.31], [0.2, 0.4, 0.6]]))
    torch.testing.assert_close(w[0], torch.ones(3))
    torch.testing.assert_close(w[1], torch.tensor([0.5, 1.0, 1.5]))
    values = torch.rand(200, 10) * (torch.rand(200, 1) < 0.5)  # non-negative, some all zero
    w = vgpo.timestep_weights(values)
    assert (w >= 0).all() and (w <= 10).all()


def test_negative_rewards_warn_once_and_weights_fall_back():
    fn = vgpo.checked_reward(lambda x, p: -torch.ones(len(p)), "neg")
    with pytest.warns(UserWarning, match="negative") as record:
        fn(torch.zeros(2, 2), [0, 1])
        fn(torch.zeros(2, 2), [0, 1])
    assert sum("negative" in str(w.message) for w in record) == 1
    with pytest.warns(UserWarning, match="fall back"):
        w = vgpo.timestep_weights(vgpo.cumulative_values(-torch.ones(2, 5), 0.9))
    torch.testing.assert_close(w, torch.ones(2, 5))


# --- Eq. 12: the group-relative term (decisions 5, 15)


def test_grpo_population_std_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.2, 0.2]])
    adv = vgpo.grpo_advantages(rewards, 3, global_std=False)[..., 0]
    torch.testing.assert_close(adv[0], torch.tensor([-0.75, 0.25, 0.25, 0.25]) / (math.sqrt(3 / 16) + 1e-4))
    torch.testing.assert_close(adv[1], torch.tensor([1.0, 1.0, -1.0, -1.0]) * 0.15 / (0.15 + 1e-4))


@pytest.mark.parametrize("G", [8, 24])
def test_a_flat_group_whose_float32_mean_is_inexact_has_exactly_zero_relative_advantage(G):
    # Decision 15 exercised: a value whose float32 mean over the group is not the value itself (about half
    # of random values for G = 8 or 24), so (Q - mean) / (std + eps) alone would leave a signal.
    draws, other = (
        torch.rand(256, generator=torch.Generator().manual_seed(G)),
        torch.rand(1, G, 1, generator=torch.Generator()),
    )
    stacked = lambda v: torch.cat([torch.full((1, G, 1), v), other])  # noqa: E731, (2, G, 1)
    value = next(float(v) for v in draws if stacked(float(v)).mean(dim=1, keepdim=True)[0].item() != float(v))
    values = stacked(value)  # its group mean is inexact, on the very tensor relative_advantage reduces
    for global_std in (True, False):
        relative = vgpo.relative_advantage(values, global_std)  # (2, G, 1)
        assert (relative[0] == 0).all() and (relative[1] != 0).all(), global_std
    advantages = vgpo.grpo_advantages(values[..., 0], 10)  # (2, G, 10)
    assert vgpo.has_signal(advantages[0]).tolist() == [False] * G  # decision 12 drops the flat group
    assert vgpo.has_signal(advantages[1]).all()


def test_a_flat_group_has_exactly_zero_relative_advantage():
    # 24 samples at 0.8 and at 1/3: float rounding of the mean used to leave |A| ~ 2e-7 for 0.8
    values = torch.stack([torch.full((24, 3), 0.8), torch.full((24, 3), 1 / 3), torch.rand(24, 3)])  # (3, 24, 3)
    for global_std in (True, False):
        rel = vgpo.relative_advantage(values, global_std)
        assert torch.equal(rel[:2], torch.zeros(2, 24, 3)) and (rel[2] != 0).all()
    adv = vgpo.grpo_advantages(values[..., 0], 4)  # (3, 24, 4)
    assert vgpo.has_signal(rearrange(adv, "n g t -> (n g) t")).view(3, 24).all(1).tolist() == [False, False, True]
    anchored = vgpo.vgpo_advantages(values, 1.0, 2, 0.9, weights=torch.ones_like(values))
    assert (anchored[:2, :, :2] != 0).all()  # the anchor keeps a flat group in the update (VGPO's point)


# --- Eq. 13: ADAE, the anchored advantage (decisions 3, 4)


def test_anchor_is_the_discounted_mean_of_remaining_rewards():
    rewards = torch.full((1, 2, 10), 0.8)  # constant instant reward: anchor = reward at every step
    values = vgpo.cumulative_values(rewards, 0.9)
    anchor = vgpo.anchor_advantage(values, kappa=1.0, anchor_steps=10, gamma=0.9)
    torch.testing.assert_close(anchor, torch.full_like(anchor, 0.8))


def test_anchor_discount_sum_is_accurate_near_gamma_one():
    T = 10
    for gamma in (0.99999, 1 - 1e-9, 1.0, 0.0, 0.9):
        anchor = vgpo.anchor_advantage(torch.ones(1, 1, T), 1.0, T, gamma)[0, 0]  # (T,): 1 / sum_j gamma^j
        exact = torch.tensor([math.fsum(gamma**j for j in range(T - k)) for k in range(T)], dtype=torch.float64)
        torch.testing.assert_close(anchor.double(), 1 / exact, rtol=2e-7, atol=0)


def test_anchor_survives_a_group_whose_values_are_all_equal():
    values = torch.full((2, 4, 10), 0.7)  # every sample of every group scores the same
    grpo = vgpo.grpo_advantages(values[..., -1], 10)
    adae = vgpo.vgpo_advantages(values, kappa=1.0, anchor_steps=5, gamma=0.9, weights=torch.ones_like(values))
    assert grpo.abs().max() == 0
    assert (adae[..., :5] > 0).all() and (adae[..., 5:] == 0).all()


def test_a_constant_shift_leaves_grpo_unchanged_and_moves_vgpo():
    rewards = torch.rand(2, 5)
    g1, g2 = vgpo.grpo_advantages(rewards, 4), vgpo.grpo_advantages(rewards + 0.3, 4)
    torch.testing.assert_close(g1, g2)
    values = rewards[..., None].expand(2, 5, 4)
    v1 = vgpo.vgpo_advantages(values, 1.0, 2, 0.0, weights=torch.ones_like(values))
    v2 = vgpo.vgpo_advantages(values + 0.3, 1.0, 2, 0.0, weights=torch.ones_like(values))
    torch.testing.assert_close(v2[..., :2] - v1[..., :2], torch.full((2, 5, 2), 0.3))


def test_vgpo_without_anchor_on_constant_values_is_grpo():
    rewards = torch.rand(3, 6)
    values = rewards[..., None].expand(3, 6, 10)
    for global_std in (True, False):
        a = vgpo.vgpo_advantages(values, kappa=0.0, anchor_steps=5, gamma=0.0, global_std=global_std)
        torch.testing.assert_close(a, vgpo.grpo_advantages(rewards, 10, global_std=global_std))


@pytest.mark.parametrize("scale", [0.0, 1e-12, 1.0, 1e6, -1e6])
@pytest.mark.parametrize("num_steps", [1, 10, 50])
def test_values_and_advantages_match_float64_for_extreme_rewards(scale, num_steps):
    g = torch.Generator().manual_seed(0)
    rewards = scale * torch.rand(12, num_steps, generator=g)  # 3 groups of 4
    for gamma in (0.0, 0.9, 1.0):
        config = vgpo.toy_config(num_steps=num_steps, group_size=4, prompts_per_iteration=3, gamma=gamma,
                                 global_std=False, anchor_steps=num_steps // 2, timestep_fraction=1.0)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # negative rewards warn (decision 2)
            adv, _ = vgpo.batch_advantages(rewards, config)
        expected = _advantages_by_hand("VGPO", rewards.double().numpy(), 4, gamma, 1.0, num_steps // 2, False)[0]
        np.testing.assert_allclose(adv.double().numpy(), expected, rtol=1e-4, atol=1e-5)
        assert adv.abs().max() <= 5.0
    equal = vgpo.grpo_advantages(torch.full((2, 3), scale), num_steps)
    assert torch.equal(equal, torch.zeros(2, 3, num_steps))


# instant rewards of N = 2 groups of G = 3, T = 3 steps; group 2 ends at 0 everywhere (GRPO's flat group)
_R = np.array([[0.2, 0.5, 1.0], [0.1, 0.0, 0.0], [0.4, 0.4, 1.0], [0.0, 0.0, 0.0], [0.3, 0.6, 0.0], [0.0, 0.2, 0.0]])


def _advantages_by_hand(method, R=_R, G=3, gamma=0.9, kappa=0.5, anchor_steps=1, global_std=True, eps=1e-4, clip=5.0):
    """SPEC sections 3-4 in float64 numpy, written apart from vgpo: (advantages (B, T), diagnostics)."""
    dense, weights_on, anchored = {
        "GRPO": (False, False, False), "weights only": (False, True, False), "TCRM": (True, True, False),
        "anchor only": (False, False, True), "VGPO": (True, True, True),
    }[method]  # fmt: skip
    B, T = R.shape
    Q = np.zeros_like(R)
    for k in reversed(range(T)):
        Q[:, k] = R[:, k] + gamma * (Q[:, k + 1] if k + 1 < T else 0)
    fallback = (Q.mean(1) <= eps) | (Q < 0).any(1)
    w = (
        np.where(fallback[:, None], 1.0, Q / np.maximum(Q.mean(1, keepdims=True), eps))
        if weights_on
        else np.ones_like(R)
    )
    values, g = (Q, gamma) if dense else (np.repeat(R[:, -1:], T, 1), 0.0)
    rel = np.zeros_like(R)
    for k in range(T):
        for n in range(B // G):
            grp = values[G * n : G * n + G, k]
            std = values[:, k].std() if global_std else grp.std()  # ddof 0
            rel[G * n : G * n + G, k] = 0 if np.all(grp == grp[0]) else (grp - grp.mean()) / (std + eps)
    disc = np.array([sum(g**j for j in range(T - k)) for k in range(T)])
    anchor = kappa * values / disc * (np.arange(T) < anchor_steps) if anchored else np.zeros_like(R)
    adv = np.clip(w * (rel + anchor), -clip, clip)
    flat = np.mean([np.all(R[G * n : G * n + G, -1] == R[G * n, -1]) for n in range(B // G)])
    info = dict(zero_std_ratio=flat, adv_rel_abs=np.abs(w * rel).mean(), adv_anchor_abs=np.abs(w * anchor).mean())
    ends = [R[G * n : G * n + G, -1] for n in range(B // G)]
    info["zero_std_pass"] = np.mean([np.all(e >= 1) for e in ends])
    info["zero_std_fail"] = np.mean([np.all(e <= 0) for e in ends])
    info["weight_fallback_frac"] = fallback.mean() if weights_on else 0.0  # row 3 of _R: all zero
    return adv, info


@pytest.mark.parametrize("global_std", [True, False])
def test_vgpo_advantages_with_its_own_weights_match_the_hand_derivation(global_std):
    # vgpo_advantages as an engineer calls it: Eq. 11 weights from the values (weights=None), gamma 0.9,
    # kappa 0.5, the anchor on the first step; values from _R by Eq. 10 written out here.
    Q = np.zeros_like(_R)
    for k in reversed(range(3)):
        Q[:, k] = _R[:, k] + 0.9 * (Q[:, k + 1] if k < 2 else 0.0)
    values = torch.tensor(Q, dtype=torch.float32).reshape(2, 3, 3)  # (N, G, T); row 3 all zero: weights fall back
    adv = vgpo.vgpo_advantages(values, 0.5, 1, 0.9, global_std=global_std)
    expected = _advantages_by_hand("VGPO", global_std=global_std)[0]
    np.testing.assert_allclose(adv.reshape(6, 3).double().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["GRPO", "weights only", "TCRM", "anchor only", "VGPO"])
def test_batch_advantages_of_every_method_by_hand(method, monkeypatch):
    overrides = {**experiments.METHODS[method], "kappa": 0.5 if "anchor" in method or method == "VGPO" else 0.0}
    config = vgpo.toy_config(num_steps=3, group_size=3, prompts_per_iteration=2, global_std=True, **overrides)
    instant = config.dense_values or config.use_weights
    rewards = torch.tensor(_R if instant else _R[:, -1:], dtype=torch.float32)
    calls = []
    for name in ("relative_advantage", "anchor_advantage"):  # each term once: the logged ones are those that train
        original = getattr(vgpo, name)
        monkeypatch.setattr(vgpo, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    adv, info = vgpo.batch_advantages(rewards, config)
    assert sorted(calls) == ["anchor_advantage", "relative_advantage"]
    assert all(isinstance(v, torch.Tensor) for v in info.values())  # read once, when the trainer logs
    info = vgpo.logged(info)
    expected, diagnostics = _advantages_by_hand(method)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-5, atol=1e-6)
    for key, value in diagnostics.items():
        assert info[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    if method == "GRPO":
        assert (adv[3:] == 0).all()  # the flat group carries nothing


# --- Flow-GRPO's advantage (the GRPO baseline)


def test_grpo_preset_is_flow_grpo_advantage():
    config = vgpo.Config(**vgpo.PRESETS["grpo"], num_steps=4, group_size=3, prompts_per_iteration=2)
    terminal = torch.rand(6, 1)
    adv, _ = vgpo.batch_advantages(terminal, config)
    expected = vgpo.grpo_advantages(terminal.reshape(2, 3), 4).reshape(6, 4)
    torch.testing.assert_close(adv, expected)


# --- Eq. 8: the clipped objective and the KL to the reference (decision 8)


def test_loss_gradient_vanishes_where_the_clip_is_active():
    c = 0.1
    old = torch.zeros(4)
    log_prob = torch.tensor([0.5, -0.5, 0.5, 0.01], requires_grad=True)  # r = e^0.5, e^-0.5, e^0.5, ~1
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, info = vgpo.clipped_policy_loss(log_prob, old, adv, c)
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in info.values())  # no .item() inside
    info = vgpo.logged(info)
    loss.backward()
    assert log_prob.grad[0] == 0 and log_prob.grad[1] == 0  # clipped: no incentive to go further
    assert log_prob.grad[2] != 0 and log_prob.grad[3] != 0  # pessimistic side / inside the clip
    # by hand, per sample max(-A r, -A clip(r)): -1.1 (clipped), 0.9 (clipped), e^0.5 (unclipped), -e^0.01
    e = math.exp
    assert loss.item() == pytest.approx((-1.1 + 0.9 + e(0.5) - e(0.01)) / 4, rel=1e-6)
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, 0.0, e(0.5) / 4, -e(0.01) / 4]))  # d/dlogp r = r
    assert info["ratio_err"] == pytest.approx(e(0.5) - 1, rel=1e-6)  # max |r - 1|
    assert info["clipfrac"] == 0.75
    assert info["approx_kl"] == pytest.approx(0.5 * (0.25 * 3 + 0.0001) / 4)


def test_kl_is_the_gaussian_kl_times_dt():
    mean, ref_mean, std, dt = torch.randn(3, 4), torch.randn(3, 4), torch.full((3, 1), 0.6), 0.05
    step = torch.distributions.Normal(mean, std * dt**0.5), torch.distributions.Normal(ref_mean, std * dt**0.5)
    exact = torch.distributions.kl_divergence(*step).mean(-1)  # (B,)
    torch.testing.assert_close(vgpo.kl_to_reference(mean, ref_mean, std), exact * dt)


def test_kl_to_reference_accepts_a_float_std():
    mean, ref = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(
        vgpo.kl_to_reference(mean, ref, 0.3), vgpo.kl_to_reference(mean, ref, torch.full((3, 1), 0.3))
    )


def test_kl_ref_is_nan_not_zero_without_the_kl_term():
    config = vgpo.toy_config(beta=0.0, toy_pretrain_steps=200, prompts_per_iteration=2, group_size=2)
    assert math.isnan(_count_optimizer_steps(config)[1]["kl_ref"])


def _perturb_lora(backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backend.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _velocity_inputs(backend, prompts):
    x = backend.noise(len(prompts), torch.Generator().manual_seed(0))
    return x, backend.encode(prompts)


@pytest.mark.parametrize("model", ["toy", "tiny", "shapes"])
def test_reference_is_the_base_model_with_the_adapter_zeroed(model, shapes_weights):
    fields = {"toy": dict(toy_pretrain_steps=200), "tiny": dict(), "shapes": dict(shapes_weights=shapes_weights)}
    config = tiny_config() if model == "tiny" else vgpo.Config(model=model, **fields[model])
    backend = vgpo.build_backend(config)
    prompts = [0, 1] if model == "toy" else ["a photo of a red circle"] * 2
    x, cond = _velocity_inputs(backend, prompts)
    _perturb_lora(backend)
    with torch.no_grad():
        adapted = backend.velocity(x, 0.6, cond)
        with backend.reference():
            reference = backend.velocity(x, 0.6, cond)
        for name, p in backend.model.named_parameters():  # lora_B zero: the adapter adds nothing
            if "lora_B" in name:
                p.zero_()
        base = backend.velocity(x, 0.6, cond)
    assert not torch.allclose(adapted, base, atol=1e-4)  # the perturbation moves the policy
    torch.testing.assert_close(reference, base)  # the reference does not move with it


def test_kl_to_the_reference_is_positive_after_an_update():
    config = vgpo.toy_config(toy_pretrain_steps=200, beta=0.04, iterations=2, eval_samples=16)
    history = vgpo.train(config)
    # iteration 0's first minibatch is the reference itself (KL 0); its later ones, and iteration 1, have moved
    # away, further in iteration 1 (seeds 0-4: 2.3x-10x iteration 0's)
    assert history[0]["kl_ref"] > 0 and history[1]["kl_ref"] > history[0]["kl_ref"]
    assert math.isnan(vgpo.train(vgpo.toy_config(toy_pretrain_steps=200, beta=0.0, iterations=1, eval_samples=16))[0][
        "kl_ref"
    ])  # fmt: skip


def test_first_ratio_is_one_on_the_tiny_pipeline():
    # one minibatch: the rollout's batch shape, rows permuted; rounding may differ per CPU kernel,
    # a wrong guidance or noise level would be off by orders of magnitude more
    _, record = counted_iteration(tiny_config(num_minibatches=1))
    assert record["onpolicy_ratio_err"] < 1e-5


# --- the equation block, copied alone (everything above vgpo.py's end marker)


def _equation_block() -> str:
    source = inspect.getsource(vgpo)
    return source[: source.index("# End of the equation block")]


def _tensors(out) -> list:
    """A function's outputs as a flat list of tensors (one tensor, or a tuple holding tensors and dicts)."""
    out = out if isinstance(out, tuple) else (out,)
    return [t for o in out for t in (o.values() if isinstance(o, dict) else [o])]


def test_the_equation_block_runs_alone_with_torch_einops_math_and_warnings_and_matches_vgpo():
    block = _equation_block()
    imported = set()
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported == {"__future__", "math", "warnings", "torch", "einops"}
    copied = {"__name__": "copied"}
    exec(compile(block, "copied.py", "exec"), copied)  # a fresh namespace: nothing of vgpo, backends or runs
    public = {n for n, f in copied.items() if inspect.isfunction(f) and f.__module__ == "copied" and n[0] != "_"}
    assert public == {
        "sde_step_with_logprob", "project_x0", "cumulative_values", "weight_fallback", "timestep_weights",
        "relative_advantage", "anchor_advantage", "adae", "vgpo_advantages", "grpo_advantages",
        "clipped_policy_loss", "kl_to_reference",
    }  # fmt: skip
    assert all(copied[name] is not getattr(vgpo, name) for name in public)

    def same(name, *args, seed=None, **kwargs):  # the copy and the module give identical outputs
        gen = (lambda: {"generator": torch.Generator().manual_seed(seed)}) if seed else dict  # a fresh one each
        ours, theirs = getattr(vgpo, name)(*args, **kwargs, **gen()), copied[name](*args, **kwargs, **gen())
        pairs = zip(_tensors(ours), _tensors(theirs), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs), name
        return ours

    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    for seed in (1, 2):  # sampling from a generator: the same draw in the copy
        same("sde_step_with_logprob", v, x, 1.0, 0.9, 0.7, seed=seed)
    x_next = same("sde_step_with_logprob", v, x, 0.6, 0.4, 0.7, noise=torch.randn(4, 3, 2, 2, generator=g))[0]
    same("sde_step_with_logprob", v, x, 0.6, 0.4, 0.7, x_next=x_next)
    same("sde_step_with_logprob", v, x, 0.6, 0.4, 0.0)
    same("project_x0", x, v, torch.tensor([0.1, 0.5, 0.9, 1.0]))
    rewards = torch.rand(2, 4, 6, generator=g)  # (N, G, T)
    rewards[0, :, 2] = 0.3  # a flat group at one step
    values = same("cumulative_values", rewards, 0.9)
    same("weight_fallback", values - 0.5)
    same("timestep_weights", values)
    for global_std in (True, False):
        same("relative_advantage", values, global_std)
        same("vgpo_advantages", values, 1.0, 3, 0.9, global_std)
        same("grpo_advantages", rewards[..., -1], 6, global_std)
    anchor = same("anchor_advantage", values, 0.5, 3, 0.9)
    q = copied["cumulative_values"](torch.tensor(_R, dtype=torch.float32), 0.9).reshape(2, 3, 3)
    np.testing.assert_allclose(  # the copy alone against SPEC written out by hand (not only against vgpo)
        copied["vgpo_advantages"](q, 0.5, 1, 0.9).reshape(6, 3).double().numpy(),
        _advantages_by_hand("VGPO")[0], rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    same("adae", vgpo.relative_advantage(values), anchor, vgpo.timestep_weights(values), 5.0)
    lp = torch.randn(8, generator=g)
    same("clipped_policy_loss", lp, lp + 0.01 * torch.randn(8, generator=g), torch.randn(8, generator=g), 1e-3)
    same("kl_to_reference", x, v, torch.full((4, 1, 1, 1), 0.3))


# --- Algorithm 1, the update: minibatches, samples without signal, accumulation (decisions 12, 13)


def _count_optimizer_steps(config):
    backend = vgpo.build_backend(config)
    reward = vgpo.checked_reward(backend.load_reward(config.reward), config.reward)
    optimizer = torch.optim.AdamW(backend.parameters(), lr=config.lr)
    steps = []
    optimizer.register_step_post_hook(lambda *args: steps.append(1))
    record = vgpo.train_iteration(backend, reward, optimizer, backend.sigmas(config.num_steps), config, 0)
    return len(steps), record


def test_exactly_num_minibatches_optimizer_steps():
    config = vgpo.toy_config(prompts_per_iteration=3, group_size=2, num_minibatches=4, toy_pretrain_steps=200)
    assert _count_optimizer_steps(config)[0] == 4  # 6 samples: chunk() would give 3


def _toy_update(advantages, monkeypatch, **overrides):
    """policy_update on a toy rollout with the given advantages: (record, step_loss indices, steps, moved)."""
    config = vgpo.toy_config(**{"toy_pretrain_steps": 200, "num_minibatches": 2, **overrides})
    backend = vgpo.build_backend(config)
    reward = vgpo.checked_reward(backend.load_reward(config.reward), config.reward)
    sigmas = backend.sigmas(config.num_steps)
    batch = vgpo.rollout(backend, [0, 0, 0, 1, 1, 1], sigmas, config.noise_level, reward, torch.Generator(), True)
    seen, steps, original = [], [], vgpo.step_loss
    monkeypatch.setattr(
        vgpo, "step_loss", lambda b, s, adv, idx, *a: seen.append(idx.tolist()) or original(b, s, adv, idx, *a)
    )
    optimizer = torch.optim.AdamW(backend.parameters(), lr=config.lr)
    optimizer.register_step_post_hook(lambda *args: steps.append(1))
    before = [p.detach().clone() for p in backend.parameters()]
    record = vgpo.logged(vgpo.policy_update(backend, batch, advantages, optimizer, sigmas, config, torch.Generator()))
    moved = any(not torch.equal(p, q) for p, q in zip(before, backend.parameters(), strict=True))
    return record, seen, len(steps), moved


def test_samples_with_zero_advantage_are_left_out_of_the_update(monkeypatch):
    adv = torch.randn(6, 10)
    adv[[1, 4]] = 0.0  # two samples without signal at any step (a one-score group under GRPO)
    adv[2, :5] = 0.0  # zero at some steps only: kept
    record, seen, steps, moved = _toy_update(adv, monkeypatch)
    trained = {i for idx in seen for i in idx}
    assert trained == {0, 2, 3, 5} and steps == 2 and moved  # Flow-GRPO's mask, still 2 minibatches
    assert all(len(idx) == 2 for idx in seen)  # 4 kept samples split into 2 minibatches of 2
    assert record["trained_frac"] == pytest.approx(4 / 6)


def test_a_batch_without_signal_makes_no_update_even_with_the_kl_term(monkeypatch):
    record, seen, steps, moved = _toy_update(torch.zeros(6, 10), monkeypatch, beta=0.04)
    assert (seen, steps, moved, record["trained_frac"]) == ([], 0, False, 0.0)
    assert math.isnan(record["loss"])  # nothing was trained: no loss to report, not a false 0


def _reference_mask(advantages, trained, num_batches, pick):
    """Flow-GRPO ac4c86e scripts/train_sd3.py:740 and 797-808, transcribed: the advantages repeated over the
    trained columns, the mask of rows with a non-zero sum, then `pick(false_indices, n)` of the others set True
    until the count divides by the number of batches (when there are enough)."""
    mask = advantages[:, :trained].abs().sum(dim=1) != 0
    true_count = int(mask.sum())
    if true_count % num_batches:
        false_indices = torch.where(~mask)[0]
        num_to_change = num_batches - true_count % num_batches
        if len(false_indices) >= num_to_change:
            mask[pick(false_indices, num_to_change)] = True
    return mask


@pytest.mark.parametrize(
    "kept,total,num_minibatches",
    [
        ([0, 3, 5], 6, 2),
        ([2, 6], 8, 4),
        ([0, 1, 2, 3], 6, 2),
        ([1], 3, 2),
        pytest.param([0, 1, 2], 4, 2, id="idle-samples-exactly-cover-the-shortfall"),  # pads to 2 + 2, not 2 + 1
    ],
)
def test_minibatches_pad_the_kept_samples_as_flow_grpo(kept, total, num_minibatches):
    adv = torch.zeros(total, 10)
    adv[kept, 3] = 1.0
    adv[[i for i in range(total) if i not in kept][:1], 9] = 2.0  # signal only at the untrained last step
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    parts = vgpo.minibatches(adv, 9, num_minibatches, g1)
    chosen = torch.cat(parts).sort().values
    # the same random picks as ours: the first draw of the generator permutes the idle samples
    expected = _reference_mask(adv, 9, num_minibatches, lambda f, n: f[torch.randperm(len(f), generator=g2)[:n]])
    assert chosen.tolist() == torch.nonzero(expected).flatten().tolist()
    assert set(kept) <= set(chosen.tolist()) and len(parts) == num_minibatches
    assert len({len(p) for p in parts}) == 1  # equal minibatches, none empty
    assert vgpo.minibatches(torch.zeros(total, 10), 9, num_minibatches, g1) == []  # decision 13: no step


def test_the_default_timestep_fraction_trains_9_of_10_steps(monkeypatch):
    config = vgpo.toy_config(toy_pretrain_steps=200, prompts_per_iteration=2, group_size=4, reward_workers=0)
    assert (config.num_steps, config.timestep_fraction) == (10, 0.99)  # the paper's T and Flow-GRPO's fraction
    trained, original = [], vgpo.step_loss
    monkeypatch.setattr(vgpo, "step_loss", lambda *args: trained.append(args[4]) or original(*args))
    steps, record = _count_optimizer_steps(config)
    assert sorted(set(trained)) == list(range(9))  # int(0.99 * 10) = 9: the last step (to sigma 0) is not trained
    assert len(trained) == 9 * steps == 9 * record["optimizer_steps"]  # one forward per trained step and minibatch


def test_two_kept_samples_and_four_minibatches_make_four_real_steps(monkeypatch):
    # before: tensor_split gave two empty minibatches and AdamW still stepped on zero gradients
    adv = torch.zeros(6, 10)
    adv[[1, 4]] = torch.randn(2, 10)
    record, seen, steps, moved = _toy_update(adv, monkeypatch, num_minibatches=4)
    per_step = [tuple(idx) for idx in seen[::9]]  # 9 trained steps per minibatch
    assert steps == 4 == record["optimizer_steps"] and all(len(idx) == 1 for idx in per_step)
    assert {1, 4} <= {i for idx in per_step for i in idx} and moved  # 2 kept + 2 padded, no empty step
    assert record["trained_frac"] == pytest.approx(2 / 6)


def test_micro_batches_accumulate_the_gradient_of_the_whole_minibatch(monkeypatch):
    grads, sizes, original = {}, {}, vgpo.step_loss
    for micro in (0, 1, 2):
        spy = lambda b, s, adv, idx, *a, m=micro: (
            sizes.setdefault(m, set()).add(len(idx)) or original(b, s, adv, idx, *a)
        )
        monkeypatch.setattr(vgpo, "step_loss", spy)
        config = vgpo.toy_config(toy_pretrain_steps=200, num_minibatches=1, micro_batch=micro, beta=0.04)
        backend = vgpo.build_backend(config)
        reward = vgpo.checked_reward(backend.load_reward(config.reward), config.reward)
        sigmas = backend.sigmas(config.num_steps)
        batch = vgpo.rollout(backend, [0, 0, 0, 1, 1], sigmas, 0.7, reward, torch.Generator().manual_seed(1), True)
        optimizer = torch.optim.SGD(backend.parameters(), lr=0.0)
        params = backend.parameters()
        optimizer.register_step_pre_hook(
            lambda opt, *a, m=micro, ps=params: grads.__setitem__(m, torch.cat([p.grad.flatten().clone() for p in ps]))
        )
        adv = torch.randn(5, config.num_steps, generator=torch.Generator().manual_seed(2))
        vgpo.policy_update(backend, batch, adv, optimizer, sigmas, config, torch.Generator().manual_seed(3))
    assert sizes == {0: {5}, 1: {1}, 2: {2, 1}}  # forwards of the whole minibatch, of 1, of 2 + 2 + 1
    scale = grads[0].abs().max().item()
    assert scale > 0
    for micro in (1, 2):
        torch.testing.assert_close(grads[micro], grads[0], rtol=1e-4, atol=1e-5 * scale)


def test_small_gpu_preset_makes_num_minibatches_optimizer_steps():
    preset = {k: v for k, v in vgpo.PRESETS["small-gpu"].items() if k not in ("resolution", "offload_text_encoders")}
    config = tiny_config(**preset, iterations=1, num_steps=2, reward="jpeg_incompressibility")
    steps, record = _count_optimizer_steps(config)
    assert config.micro_batch == 4 and steps == config.num_minibatches == record["optimizer_steps"] == 2


def test_policy_update_gradient_is_the_mean_loss_over_trained_steps_in_one_graph(monkeypatch):
    config = vgpo.toy_config(toy_pretrain_steps=200, num_minibatches=1, beta=0.04, timestep_fraction=0.5,
                             max_grad_norm=1e9)  # fmt: skip
    backend = vgpo.build_backend(config)
    reward = vgpo.checked_reward(backend.load_reward(config.reward), config.reward)
    sigmas, a = backend.sigmas(config.num_steps), config.noise_level
    batch = vgpo.rollout(backend, [0, 0, 1, 1], sigmas, a, reward, torch.Generator().manual_seed(1), True)
    _perturb_lora(backend, 3)  # off-policy, so the ratio and the KL both carry gradients
    adv = torch.randn(4, config.num_steps, generator=torch.Generator().manual_seed(2))
    # the expected gradient: Eq. 8 + KL, mean over the first int(10 * 0.5) = 5 steps and the 4 samples, one graph
    total = 0
    for k in range(5):
        x, x_next = batch.latents[:, k], batch.latents[:, k + 1]
        v = backend.velocity(x, sigmas[k], batch.cond, train=True)
        _, lp, mean, std = vgpo.sde_step_with_logprob(v, x, sigmas[k], sigmas[k + 1], a, x_next=x_next)
        with torch.no_grad(), backend.reference():
            ref = vgpo.sde_step_with_logprob(backend.velocity(x, sigmas[k], batch.cond), x, sigmas[k], sigmas[k + 1], a,
                                             x_next=x_next)[2]  # fmt: skip
        loss = vgpo.clipped_policy_loss(lp, batch.log_probs[:, k], adv[:, k], config.clip_range)[0]
        total = total + loss + config.beta * vgpo.kl_to_reference(mean, ref, std).mean()
    backend.model.zero_grad()
    (total / 5).backward()
    expected = torch.cat([p.grad.flatten().clone() for p in backend.parameters()])
    seen, original = [], vgpo.step_loss
    monkeypatch.setattr(vgpo, "step_loss", lambda *args: seen.append(args[4]) or original(*args))
    grads = []
    for clip in (1e9, 0.5 * expected.norm().item()):
        config.max_grad_norm = clip
        optimizer = torch.optim.SGD(backend.parameters(), lr=0.0)
        optimizer.register_step_pre_hook(
            lambda *_: grads.append(torch.cat([p.grad.flatten().clone() for p in backend.parameters()]))
        )
        vgpo.policy_update(backend, batch, adv, optimizer, sigmas, config, torch.Generator().manual_seed(0))
    assert seen == [0, 1, 2, 3, 4] * 2  # the trained steps: the first int(T * timestep_fraction)
    torch.testing.assert_close(grads[0], expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    torch.testing.assert_close(grads[1], expected / 2, rtol=1e-4, atol=1e-6 * expected.abs().max().item())  # clipped


# --- Algorithm 1, the training loop on the toy: the reward goes up, runs repeat


FAST = dict(iterations=40, toy_pretrain_steps=800, eval_samples=256)


def test_toy_training_raises_the_reward_and_ratio_starts_at_one():
    history = vgpo.train(vgpo.toy_config(**FAST))
    first = sum(h["reward_mean"] for h in history[:5]) / 5
    last = sum(h["reward_mean"] for h in history[-5:]) / 5
    assert last > first + 0.25, (first, last)
    assert history[-1]["eval_reward"] > history[0]["eval_reward_before"] + 0.2
    # on-policy ratio is 1: the rollout (batch 64) and the minibatches (32) differ only in GEMM
    # blocking, which rounds differently on each CPU (measured 0 to 3e-6); a real mismatch is >> 1e-4
    assert max(h["onpolicy_ratio_err"] for h in history) < 1e-4


def test_same_seed_same_history_whatever_the_global_rng_and_cache():
    backends.pretrain_toy.cache_clear()
    runs = [vgpo.train(vgpo.toy_config(**{**FAST, "iterations": 3}))]  # pretrains: cache miss
    torch.rand(17)  # the global generator moves on
    runs.append(vgpo.train(vgpo.toy_config(**{**FAST, "iterations": 3})))  # cache hit
    strip = [[{k: v for k, v in h.items() if k != "seconds"} for h in run] for run in runs]
    assert strip[0] == strip[1]


def test_prompts_of_a_batch_are_distinct_while_there_are_enough():
    pool = list("abcdefg")
    for seed in range(5):
        drawn = backends.draw_prompts(pool, 5, torch.Generator().manual_seed(seed))
        assert len(set(drawn)) == 5
        drawn = backends.draw_prompts(pool, 10, torch.Generator().manual_seed(seed))
        assert sorted(drawn.count(p) for p in pool) == [1, 1, 1, 1, 2, 2, 2]
    assert sorted(backends.ToyBackend(vgpo.toy_config(toy_pretrain_steps=10)).prompts(8, torch.Generator())) == [
        0, 0, 1, 1, 2, 2, 3, 3
    ]  # fmt: skip


def test_eval_reward_scores_evaluations_and_not_training():
    # Before any update the model is the same, so the evaluation with eval_reward="toy_region"
    # must equal a run trained on toy_region, and differ from one evaluated on toy_mode; the
    # rollout rewards (training) follow `reward` alone.
    small = dict(toy_pretrain_steps=200, iterations=1, eval_samples=256)
    mode = vgpo.train(vgpo.toy_config(reward="toy_mode", **small))[0]
    region = vgpo.train(vgpo.toy_config(reward="toy_region", **small))[0]
    mixed = vgpo.train(vgpo.toy_config(reward="toy_mode", eval_reward="toy_region", **small))[0]
    assert mixed["eval_reward_before"] == region["eval_reward_before"] != mode["eval_reward_before"]
    assert mixed["reward_mean"] == mode["reward_mean"] != region["reward_mean"]
    with pytest.raises(vgpo.ConfigError, match="eval_reward"):
        vgpo.toy_config(eval_reward="ocr")
    with pytest.raises(vgpo.ConfigError, match="eval_reward"):
        vgpo.Config(model="shapes", eval_reward="geneval")


# --- EMA (decision 14)


def test_ema_updates_once_per_optimizer_step_and_the_reference_pattern_differs():
    # decision 14. Parameters p_n = n after optimizer step n; decay 0.9, every 8: updates after steps 7 and 15,
    # with d_7 = 8/17, d_15 = 16/25. Once per step (ours): 3.7059, then 7.7718. Flow-GRPO ac4c86e calls
    # ema.step after every accumulated micro-batch (train_sd3.py:954-955) with the optimizer step count:
    # with 2 micro-batches per step each due update is applied twice (5.4498, then 11.088)
    p = torch.zeros(1)
    ema = vgpo.EMA([p], 0.9, 8)
    for n in range(1, 16):
        p.fill_(n)
        ema.update([p])
    d7, d15 = 8 / 17, 16 / 25
    ours = (0 + (1 - d7) * 7) * d15 + (1 - d15) * 15
    assert ema.shadow[0].item() == pytest.approx(ours) and ours == pytest.approx(7.7718, abs=1e-4)
    twice = 0.0
    for n, d in ((7, d7), (15, d15)):
        for _ in range(2):
            twice = twice + (1 - d) * (n - twice)
    assert twice == pytest.approx(11.088, abs=1e-3)


def test_ema_reproduces_flow_grpos_schedule_on_a_concrete_sequence():
    p = torch.nn.Parameter(torch.zeros(()))
    ema = vgpo.EMA([p], decay=0.9, every=8)
    expected = 0.0
    for n in range(1, 41):  # optimizer step n sets the parameter to n
        with torch.no_grad():
            p.fill_(float(n))
        ema.update([p])
        if (n + 1) % 8 == 0:  # Flow-GRPO: update after steps 7, 15, 23, 31, 39
            d = min((1 + n) / (10 + n), 0.9)
            expected = d * expected + (1 - d) * n
    torch.testing.assert_close(ema.shadow[0], torch.tensor(expected))
    assert expected == pytest.approx(20.316, abs=1e-3)  # by hand: 3.706, 7.772, 11.925, 16.112, 20.316
    with ema.applied([p]):
        assert p.item() == pytest.approx(expected)
    assert p.item() == 40.0  # the trained weights come back


def test_trainer_ema_steps_once_per_optimizer_step_and_serves_evaluation_and_export(tmp_path, monkeypatch):
    emas, checks = [], []

    class Spy(vgpo.EMA):
        def __init__(self, *a):
            super().__init__(*a)
            self.updates = 0
            emas.append(self)

        def update(self, params):
            self.updates += 1
            super().update(params)

    monkeypatch.setattr(vgpo, "EMA", Spy)
    evaluate = vgpo.evaluate

    def spying_evaluate(backend, *a, **k):  # at each evaluation the weights in place are the EMA's
        checks.append(all(torch.equal(p, s) for p, s in zip(backend.parameters(), emas[0].shadow, strict=True)))
        return evaluate(backend, *a, **k)

    monkeypatch.setattr(vgpo, "evaluate", spying_evaluate)
    config = vgpo.toy_config(toy_pretrain_steps=200, iterations=2, eval_samples=16, ema=True, ema_every=1,
                             output_dir=str(tmp_path))  # fmt: skip
    history = vgpo.train(config)
    assert emas[0].updates == sum(h["optimizer_steps"] for h in history) == 4 and checks == [True, True]
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    names = list(runs.lora_state(vgpo.build_backend(config)))  # the order of backend.parameters()
    assert len(exported) == len(names) == len(emas[0].shadow)
    for name, shadow in zip(names, emas[0].shadow, strict=True):  # peft drops the adapter name on export
        torch.testing.assert_close(exported[name.replace(".default", "")], shadow)
    emas.clear()
    flat = dataclasses.replace(config, output_dir="", iterations=1, dense_values=False, kappa=0.0, weighting="off")
    flat = vgpo.train(flat, reward_fn=lambda x, p: torch.ones(len(p)))
    assert flat[0]["optimizer_steps"] == 0 and emas[0].updates == 0  # a skipped update moves no EMA


# --- SD3 backend on the tiny random-weight pipeline: guidance (decision 9), memory settings, LoRA export


def _lora_grad(backend, v):
    backend.model.zero_grad()
    v.sum().backward()
    return torch.cat([p.grad.flatten() for p in backend.parameters()])


@pytest.mark.parametrize("detach", [None, True])
def test_training_cfg_trains_both_branches_and_detaches_the_unconditional_one_on_request(detach):
    # Decision 9: Flow-GRPO's paper-era code (39d3d2c) and its latest (74db691) train through both branches:
    # the default (None here). cfg_detach_uncond=True is its commits 2d76907..ac4c86e
    # (scripts/train_sd3.py:190 at ac4c86e): compute_log_prob detaches noise_pred_uncond.
    backend = vgpo.build_backend(tiny_config() if detach is None else tiny_config(cfg_detach_uncond=detach))
    detach = backend.config.cfg_detach_uncond
    cond = backend.encode(["a sign"] * 2)
    x = backend.noise(2, torch.Generator().manual_seed(0))
    v_train = backend.velocity(x, 0.5, cond, train=True)
    with torch.no_grad():
        v_ng = backend.velocity(x, 0.5, cond)
    torch.testing.assert_close(v_train.detach(), v_ng)  # detaching changes gradients, not values
    g = backend.config.guidance_scale
    grad_train = _lora_grad(backend, v_train)
    backend.config.guidance_scale = 1.0  # each branch alone: the conditional, then the unconditional
    v_cond = backend.velocity(x, 0.5, cond)
    v_uncond = backend.velocity(x, 0.5, {**cond, "embeds": cond["neg_embeds"], "pooled": cond["neg_pooled"]})
    assert not torch.allclose(v_ng, v_cond.detach())  # guidance 4.5 differs from the conditional velocity
    torch.testing.assert_close(v_ng, v_uncond.detach() + g * (v_cond.detach() - v_uncond.detach()))
    grad_cond, grad_uncond = _lora_grad(backend, v_cond), _lora_grad(backend, v_uncond)
    assert grad_uncond.abs().max() > 1e-3 * grad_cond.abs().max()  # the unconditional branch has LoRA gradients
    # d(v_u + g (v_c - v_u)) = g dv_c + (1 - g) dv_u; with v_u detached (the reference) only g dv_c
    assert vgpo.Config.cfg_detach_uncond is False  # the default: both branches (decision 9)
    expected = g * grad_cond + (0 if detach else (1 - g) * grad_uncond)
    scale = expected.abs().max().item()  # the sum cancels: compare on the gradient's own scale
    torch.testing.assert_close(grad_train, expected, rtol=1e-4, atol=1e-4 * scale)


def test_guidance_one_runs_the_conditional_branch_only_and_train_cfg_off_trains_on_it():
    backend = vgpo.build_backend(tiny_config(guidance_scale=1.0))
    rows = []
    backend.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(kwargs["hidden_states"])), with_kwargs=True
    )
    cond = backend.encode(["a sign"] * 3)
    x = backend.noise(3, torch.Generator().manual_seed(0))
    v = backend.velocity(x, 0.5, cond)
    assert rows == [3]
    backend.config.guidance_scale, backend.config.train_cfg = 4.5, False
    torch.testing.assert_close(backend.velocity(x, 0.5, cond, train=True), v)  # cond only in training
    assert rows[-1] == 3 and len(backend.velocity(x, 0.5, cond)) == 3 and rows[-1] == 6  # the rollout guides


def test_gradient_checkpointing_gives_the_same_lora_gradients(monkeypatch):
    import torch.utils.checkpoint

    calls, original = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    grads, counts = [], []
    for checkpointing in (False, True):
        backend = vgpo.build_backend(tiny_config(gradient_checkpointing=checkpointing))
        x = backend.noise(2, torch.Generator().manual_seed(0))
        backend.velocity(x, 0.5, backend.encode(["a sign"] * 2), train=True).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in backend.parameters()]))
        counts.append(len(calls))
    assert counts[0] == 0 and counts[1] >= 2  # it ran: one checkpointed call per transformer block
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_offloaded_text_encoders_train_and_refuse_a_new_prompt():
    backend = vgpo.build_backend(tiny_config(offload_text_encoders=True))
    assert backend.pipe.text_encoder is None and backend.pipe.text_encoder_3 is None
    history = vgpo.train(tiny_config(offload_text_encoders=True, iterations=1))
    assert math.isfinite(history[0]["loss"])
    with pytest.raises(RuntimeError, match="not encoded before the text encoders were freed"):
        backend.encode(["a prompt nobody encoded"])


def test_prompt_encoding_is_chunked_cached_on_the_cpu_with_one_negative(tmp_path, monkeypatch):
    lines = [f'a sign that says "{i:04d}"' for i in range(1000)]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    from diffusers import StableDiffusion3Pipeline

    sizes, original = [], StableDiffusion3Pipeline.encode_prompt
    monkeypatch.setattr(
        StableDiffusion3Pipeline,
        "encode_prompt",
        lambda self, p, *a, **k: sizes.append(len(p)) or original(self, p, *a, **k),
    )
    backend = vgpo.build_backend(tiny_config(prompt_file=str(tmp_path / "p.txt"), offload_text_encoders=True))
    assert sum(sizes) == 1001 and max(sizes) <= backend.encode_batch  # every prompt once, and the empty one
    assert len(backend.cache) == 1001 and all(t.device.type == "cpu" for row in backend.cache.values() for t in row)
    assert backend.pipe.text_encoder is None
    a, b = backend.encode(lines[:3]), backend.encode(lines[500:502])
    assert a["neg_embeds"].shape[0] == 3 and a["neg_embeds"].untyped_storage().data_ptr() == (
        b["neg_embeds"].untyped_storage().data_ptr()
    )  # one negative, expanded
    pipe = tiny.tiny_sd3_pipeline(32)  # the same random weights (seed 0)
    for i in (0, 500, 999):
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            lines[i], lines[i], lines[i], do_classifier_free_guidance=True, max_sequence_length=16
        )
        got = backend.encode([lines[i]])
        torch.testing.assert_close(got["embeds"], embeds, rtol=1e-5, atol=1e-5)  # alone = in a chunk of 64
        torch.testing.assert_close(got["pooled"], pooled, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["neg_embeds"], neg, rtol=1e-5, atol=1e-5)  # the pipeline's own negative
        torch.testing.assert_close(got["neg_pooled"], neg_pooled, rtol=1e-5, atol=1e-5)


def test_offloading_encodes_every_prompt_before_the_transformer_moves(monkeypatch):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    events, encode, to = [], StableDiffusion3Pipeline.encode_prompt, SD3Transformer2DModel.to
    free = backends.SD3Backend.free_text_encoders

    def record(name, fn):
        return lambda self, *a, **k: events.append(name) or fn(self, *a, **k)

    monkeypatch.setattr(StableDiffusion3Pipeline, "encode_prompt", record("encode", encode))
    monkeypatch.setattr(SD3Transformer2DModel, "to", record("transformer", to))
    monkeypatch.setattr(backends.SD3Backend, "free_text_encoders", lambda self: free(self) or events.append("freed"))
    backend = vgpo.build_backend(tiny_config(offload_text_encoders=True))
    assert backend.pipe.text_encoder is None and "transformer" in events
    last_encode = max(i for i, e in enumerate(events) if e == "encode")
    assert last_encode < events.index("freed") < events.index("transformer")


def test_vae_decodes_in_float32_and_in_chunks(monkeypatch):
    monkeypatch.setattr(backends, "model_dtype", lambda device: torch.bfloat16)  # as on a GPU
    backend = vgpo.build_backend(tiny_config())
    assert backend.pipe.transformer.dtype == torch.bfloat16 and backend.pipe.vae.dtype == torch.float32
    latents = backend.noise(5, torch.Generator().manual_seed(0))
    whole = backend.decode(latents)
    backend.config.decode_batch = 2
    torch.testing.assert_close(backend.decode(latents), whole, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the float32 decode itself, by hand
        vae = backend.pipe.vae
        by_hand = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(whole, (by_hand / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_sigmas_follow_the_loaded_schedulers_config():
    from diffusers import FlowMatchEulerDiscreteScheduler

    backend = vgpo.build_backend(tiny_config())
    backend.pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, shift_terminal=0.1)
    expected = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1)  # the configured shift wins
    expected.set_timesteps(10)
    torch.testing.assert_close(backend.sigmas(10), expected.sigmas.float())
    assert not torch.allclose(backend.sigmas(10), backends.sigma_schedule(10, 3.0))


def test_lora_saved_in_diffusers_format_reproduces_the_trained_policy(tmp_path):
    config = tiny_config(iterations=2, lr=0.05, output_dir=str(tmp_path))
    backend = vgpo.build_backend(config)
    optimizer = torch.optim.AdamW(backend.parameters(), lr=config.lr)
    reward = backend.load_reward(config.reward)
    for it in range(2):
        vgpo.train_iteration(backend, reward, optimizer, backend.sigmas(10), config, it)
    backend.save(str(tmp_path / "lora"))

    def sample(pipe):
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        return pipe(
            "a sign that says 'hi'",
            latents=latents,
            num_inference_steps=4,
            height=32,
            width=32,
            max_sequence_length=16,
            output_type="pt",
        ).images

    fresh = tiny.tiny_sd3_pipeline(32)
    base = sample(fresh)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(sample(fresh), sample(backend.pipe), atol=1e-5, rtol=1e-5)
    assert (sample(fresh) - base).abs().max() > 1e-3  # the adapter changed the images


def test_tiny_training_writes_lora_history_and_sample_grids(tmp_path):
    history = vgpo.train(tiny_config(iterations=2, output_dir=str(tmp_path)))
    assert len(history) == 2 and "eval_reward" in history[-1]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"history.json", "lora", "samples_before.png", "samples_00002.png"} <= names


def test_ocr_prompts_carry_their_target_word():
    prompts = backends.ocr_prompts(["coffee"])
    assert all(rewards.target_text(p) == "COFFEE" for p in prompts)
    assert not set(backends.OCR_WORDS) & set(backends.OCR_EVAL_WORDS)  # held-out words


def test_prompt_file_feeds_training_and_evaluation(tmp_path):
    (tmp_path / "prompts.txt").write_text('a sign that says "ONE"\n\n  a sign that says "TWO"  \n')
    backend = vgpo.build_backend(tiny_config(prompt_file=str(tmp_path / "prompts.txt")))
    expected = ['a sign that says "ONE"', 'a sign that says "TWO"']
    assert backend.train_prompts == expected and backend.eval_prompts(3) == [*expected, expected[0]]


def test_sd35_medium_spec_respects_sd3_width_constraints():
    spec = tiny.SD35_MEDIUM
    clips = [spec["clip"], spec["clip_2"]]
    assert spec["transformer"]["pooled_projection_dim"] == sum(c["projection_dim"] for c in clips)
    assert spec["transformer"]["joint_attention_dim"] == spec["t5"]["d_model"] >= sum(c["hidden_size"] for c in clips)
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):  # builds the real architecture without allocating it
        transformer = SD3Transformer2DModel(**spec["transformer"])
        assert len(transformer.transformer_blocks) == 24
        model = backends.add_lora(transformer, 32, 64, backends.SD3_LORA_TARGETS, 0)
    # Flow-GRPO's targets on SD3.5-Medium (attn2 untouched): 8 per block x 24 blocks, less the last block's
    # to_add_out (it is context_pre_only), each a width x width linear layer with r (width + width) LoRA weights
    lora = [name for name, module in model.named_modules() if "default" in getattr(module, "lora_A", {})]
    width = spec["transformer"]["num_attention_heads"] * spec["transformer"]["attention_head_dim"]  # 1536
    assert len(lora) == len(backends.SD3_LORA_TARGETS) * 24 - 1 == 191 and not any("attn2" in name for name in lora)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 191 * 32 * (width + width) == 18_776_064


def test_unloadable_model_error_names_it_and_the_offline_options(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(RuntimeError) as err:
        backends.load_sd3_pipeline("no-such-org/no-such-model", 32, None)
    assert "no-such-org/no-such-model" in str(err.value) and "--model tiny" in str(err.value)


# --- rewards.py (OCR, JPEG, CLIP heads) and the reward contract


@pytest.fixture(scope="module")
def ocr_reward():
    return rewards.load_reward("ocr")


def test_ocr_scores_the_right_text_about_one_and_wrong_or_missing_text_lower(ocr_reward):
    images = torch.stack(
        [
            experiments.render_text("HELLO"),
            experiments.render_text("Vgpo 42"),
            experiments.render_text("WORLD"),
            torch.ones(3, 256, 256),
        ]
    )
    prompts = ['a sign that says "hello"', "a sign that says 'VGPO 42'", 'a sign "hello"', 'a sign "hello"']
    scores = ocr_reward(images, prompts)
    assert scores[0] > 0.95 and scores[1] > 0.95
    assert scores[2] < 0.5 and scores[3] == 0
    assert torch.equal(scores, ocr_reward(images, prompts))  # deterministic
    sequential = rewards.load_reward("ocr", threads=1)  # one engine, image by image
    assert torch.equal(scores, sequential(images, prompts))  # the parallel engines read the same text


def test_ocr_score_definition():
    assert rewards.edit_distance("kitten", "sitting") == 3 and rewards.edit_distance("", "abc") == 3
    assert rewards.ocr_score("He llo", "HELLO") == 1.0  # case- and space-insensitive
    assert rewards.ocr_score("help", "hello") == pytest.approx(1 - 2 / 5)
    assert rewards.ocr_score("completely different", "hi") == 0.0  # clipped at 0
    assert rewards.target_text('it\'s a sign that says "OK"') == "OK"


def test_ocr_score_is_flow_grpos_target_anywhere_counts_as_one():
    def flow_grpo(text, target):  # Flow-GRPO's scorer, written out again: substring -> 0, else capped distance
        text, target = text.replace(" ", "").lower(), target.replace(" ", "").lower()
        dist = 0 if target in text else min(rewards.edit_distance(text, target), len(target))
        return 1 - dist / len(target)

    cases = [("HELLO WORLD", "HELLO"), ("OPEN 24H", "OPEN"), ("Coffee shop", "COFFEE"), ("helo", "hello"), ("", "ab")]
    for text, target in cases:
        assert rewards.ocr_score(text, target) == pytest.approx(flow_grpo(text, target))
    assert [rewards.ocr_score(t, g) for t, g in cases[:3]] == [1.0, 1.0, 1.0]


def test_target_text_reads_quotes_not_apostrophes():
    assert rewards.target_text("it's a sign that says 'OK'") == "OK"
    assert rewards.target_text("a sign that says 'don't stop'") == "don't stop"
    with pytest.raises(ValueError, match="no quoted target"):
        rewards.target_text("it's Bob's sign")


def test_jpeg_rewards_order_flat_above_noise():
    flat, noise = torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    comp = rewards.load_reward("jpeg_compressibility")(images, ["", ""])
    incomp = rewards.load_reward("jpeg_incompressibility")(images, ["", ""])
    assert comp[0] > comp[1] and incomp[0] < incomp[1]
    torch.testing.assert_close(comp + incomp, torch.ones(2))
    mix = rewards.load_reward("jpeg_compressibility:1.0,jpeg_incompressibility:0.5")(images, ["", ""])
    torch.testing.assert_close(mix, comp + 0.5 * incomp)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_clip")
    for part in tiny.tiny_clip():
        part.save_pretrained(path)
    return str(path)


def test_pickscore_head_matches_clip_logits_through_the_real_loading_code(tiny_clip_dir):
    from transformers import CLIPModel

    scorer = rewards.load_clip_scorer(tiny_clip_dir, tiny_clip_dir, "cpu", rewards.pickscore_head)
    images, prompts = torch.rand(3, 3, 48, 40), ["a red cat", "a dog", "text"]
    scores = scorer(images, prompts)
    model, tokenizer = CLIPModel.from_pretrained(tiny_clip_dir), tiny.tiny_tokenizer()
    pixels = rewards.clip_preprocess(images, 32, scorer.mean, scorer.std)
    with torch.no_grad():
        logits = model(**tokenizer(prompts, padding=True, return_tensors="pt"), pixel_values=pixels).logits_per_image
    torch.testing.assert_close(scores, logits.diag() / 26)
    one_by_one = torch.cat([scorer(images[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=1e-5)  # batching changes nothing


def test_clip_preprocess_matches_the_image_processor_normalisation(tiny_clip_dir):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    images = torch.rand(2, 3, 32, 32)
    expected = processor(images=list(images), return_tensors="pt", do_rescale=False).pixel_values
    got = rewards.clip_preprocess(images, 32, processor.image_mean, processor.image_std)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)


def test_clipscore_and_aesthetic_heads_have_the_documented_form(tiny_clip_dir):
    from transformers import CLIPModel

    scorer = rewards.load_clip_scorer(tiny_clip_dir, tiny_clip_dir, "cpu", rewards.clipscore_head)
    images, prompts = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), list("abcdef")
    model, tokenizer = CLIPModel.from_pretrained(tiny_clip_dir), tiny.tiny_tokenizer()
    pixels = rewards.clip_preprocess(images, 32, scorer.mean, scorer.std)
    with torch.no_grad():  # Hessel et al.: 2.5 max(cos, 0); CLIP's logits are logit_scale.exp() cos
        out = model(**tokenizer(prompts, padding=True, return_tensors="pt"), pixel_values=pixels)
        cos = out.logits_per_image.diag() / model.logit_scale.exp()
    torch.testing.assert_close(scorer(images, prompts), 2.5 * cos.clamp_min(0))  # this tiny CLIP: all cos < 0
    angles = torch.tensor([0.0, 0.5, 1.2, 2.0, math.pi])  # the head on unit embeddings of known cosine
    image, text = torch.tensor([[1.0, 0.0]]).expand(5, 2), torch.stack([angles.cos(), angles.sin()], -1)
    expected = torch.tensor([2.5, 2.5 * math.cos(0.5), 2.5 * math.cos(1.2), 0.0, 0.0])
    torch.testing.assert_close(rewards.clipscore_head(None, image, text), expected)
    keys = set(rewards.AestheticMLP().state_dict())  # the LAION v2 checkpoint's key names
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def _offline(monkeypatch):
    """HF_HUB_OFFLINE=1 in this process (the hub reads it at import: its constant is patched too)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_reward_offline_error_names_the_model_and_the_offline_rewards(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(RuntimeError) as err:
        rewards.load_reward("pickscore")
    assert "yuvalkirstain/PickScore_v1" in str(err.value) and "jpeg_compressibility" in str(err.value)


@pytest.mark.parametrize(
    "images,prompts,match",
    [
        (torch.rand(2, 3, 8, 8), ["a"], "2 images but 1 prompts"),
        (torch.randint(0, 255, (2, 3, 8, 8)), ["a", "b"], "dtype"),
        (torch.rand(2, 8, 8), ["a", "b"], "shape"),
        (torch.rand(2, 3, 8, 8) * 255, ["a", "b"], r"\[0, 1\]"),
        (torch.rand(0, 3, 8, 8), [], "empty"),
        (torch.full((1, 3, 8, 8), math.nan), ["a"], "NaN"),
    ],
)
def test_bad_reward_input_names_the_problem(images, prompts, match):
    with pytest.raises(ValueError, match=match):
        rewards.load_reward("jpeg_compressibility")(images, prompts)


def test_bad_reward_spec_and_ocr_prompt_name_the_problem(ocr_reward):
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.load_reward("nope")
    with pytest.raises(ValueError, match="weight 'x'"):
        rewards.load_reward("ocr:x")
    with pytest.raises(ValueError, match="no quoted target text"):
        ocr_reward(torch.ones(1, 3, 32, 32), ["a plain prompt"])


def test_reward_spec_strips_and_rejects_empty_or_non_finite_weights():
    assert rewards.parse_spec("ocr:1, jpeg_compressibility :0.5") == [("ocr", 1.0), ("jpeg_compressibility", 0.5)]
    assert rewards.parse_spec(" ocr ") == [("ocr", 1.0)]
    for spec, message in [("ocr:", "empty weight"), ("ocr:nan", "not finite"), ("ocr:inf", "not finite")]:
        with pytest.raises(ValueError, match=message):
            rewards.parse_spec(spec)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda x, p: torch.zeros(len(p), dtype=torch.long), "dtype"),
        (lambda x, p: torch.zeros(len(p), device="meta"), "meta"),
    ],
)
def test_reward_dtype_and_device_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        vgpo.checked_reward(bad, "r")(torch.zeros(2, 2), [0, 1])


def test_concurrent_ocr_calls_sharing_one_pool_give_the_sequential_scores():
    from concurrent.futures import ThreadPoolExecutor

    reward = rewards.load_reward("ocr", threads=2)
    words = ["HELLO", "COFFEE", "GARDEN", "RIVER", "MUSIC", "BOOKS"]
    batches = [
        (torch.stack([experiments.render_text(w, 128) for w in words[i : i + 2]]), [f'a sign "{w}"' for w in words[:2]])
        for i in (0, 2, 4)
    ]
    sequential = [reward(images, prompts) for images, prompts in batches]
    with ThreadPoolExecutor(3) as pool:  # three calls at once, as three steps' rewards in the trainer
        concurrent = list(pool.map(lambda b: reward(*b), batches))
    for a, b in zip(sequential, concurrent, strict=True):
        assert torch.equal(a, b)
    assert sequential[0][0] > 0.5  # the first image does read HELLO


# --- reward workers: rewards off the sampler's critical path


def _slow_reward(seconds, threads):
    def reward_fn(points, prompts):
        threads.add(__import__("threading").current_thread().name)
        time.sleep(seconds)  # a remote or CPU reward model's latency
        return torch.exp(-points.float().square().sum(-1))  # (B,)

    return reward_fn


class _VelocityCalls:
    """Wraps a backend: counts velocity calls, and lets a reward wait until a given call has been made."""

    def __init__(self, backend):
        import threading

        self.backend, self.calls, self.changed = backend, 0, threading.Condition()

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def velocity(self, *args, **kwargs):
        with self.changed:
            self.calls += 1
            self.changed.notify_all()
        return self.backend.velocity(*args, **kwargs)

    def wait_for(self, calls, timeout):
        with self.changed:
            return self.changed.wait_for(lambda: self.calls >= calls, timeout)


def test_reward_workers_give_the_inline_rewards_in_step_order_and_overlap():
    # the rollout's velocity calls: 1 at the noise, then k + 2 after step k. Step k's reward is submitted after
    # call k + 2 and waits for call k + 3 (the sampler's next step): scored inline it blocks the sampler and can
    # only time out; scored by workers the sampler runs on and it never waits in vain
    backend = _VelocityCalls(backends.ToyBackend(vgpo.toy_config(toy_pretrain_steps=200)))
    sigmas, T, batches, timed_out = backend.sigmas(6), 6, {}, {}
    for workers in (0, 6):
        timed_out[workers], step, names = [], [0], set()

        def reward(points, prompts, timed_out=timed_out[workers], step=step, names=names):
            k, step[0] = step[0], step[0] + 1
            names.add(__import__("threading").current_thread().name)
            if k + 3 <= T and not backend.wait_for(k + 3, timeout=0.3):
                timed_out.append(k)
            return torch.exp(-points.float().square().sum(-1))  # (B,)

        batches[workers] = vgpo.rollout(
            backend, [0, 1] * 4, sigmas, 0.7, reward, torch.Generator().manual_seed(0), True, workers
        )
        assert any(n.startswith("reward") for n in names) == (workers > 0)  # scored in worker threads
    assert timed_out == {0: [0, 1, 2, 3], 6: []}
    assert torch.equal(batches[0].rewards, batches[6].rewards) and torch.equal(batches[0].latents, batches[6].latents)


def _run_with_timeout(fn, seconds=60):
    """fn() in a thread; (finished, its exception or None): a hang shows as finished False."""
    import threading

    out = {}
    thread = threading.Thread(target=lambda: out.update(error=_catch(fn)), daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), out.get("error")


def _catch(fn):
    try:
        fn()
    except Exception as err:  # returned to the test, which names what it expects
        return err
    return None


def test_an_exception_in_a_reward_worker_surfaces_by_name_without_hanging():
    backend = backends.ToyBackend(vgpo.toy_config(toy_pretrain_steps=200))
    calls = []

    def failing(points, prompts):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("reward server unreachable")
        return torch.zeros(len(prompts))

    sigmas = backend.sigmas(6)
    finished, error = _run_with_timeout(
        lambda: vgpo.rollout(backend, [0, 1], sigmas, 0.7, failing, torch.Generator().manual_seed(0), True, 4)
    )
    assert finished and isinstance(error, RuntimeError) and "reward server unreachable" in str(error)


# --- configuration and command line: errors name the flag


def test_cli_builds_config_from_presets_and_flags():
    config, _ = vgpo.parse_args(["--method", "grpo", "--group_size", "5", "--no-global_std"])
    assert (config.dense_values, config.kappa, config.group_size, config.global_std) == (False, 0.0, 5, False)
    assert config.clip_range == vgpo.PRESETS["toy"]["clip_range"]  # toy preset applied for the toy


def test_python_config_builds_the_command_lines_run():
    assert vgpo.parse_args(["--lr", "0.1"])[0] == vgpo.Config(lr=0.1)
    assert vgpo.Config(model="toy").clip_range == 0.2 and vgpo.Config(model="toy").group_size == 8
    assert vgpo.parse_args(["--model", "tiny"])[0] == vgpo.Config(model="tiny")
    assert vgpo.parse_args(["--method", "grpo"])[0] == vgpo.Config(**vgpo.PRESETS["grpo"])
    hub = ["--model", "org/sd", "--preset", "small-gpu"]
    assert vgpo.parse_args(hub)[0] == vgpo.Config(model="org/sd", **vgpo.PRESETS["small-gpu"])
    with pytest.raises(ValueError, match="resolution=512.*at most 256"):
        vgpo.Config(model="tiny", resolution=512)
    with pytest.raises(TypeError, match="unknown fields"):
        vgpo.Config(learning_rate=1.0)
    history = vgpo.train(vgpo.Config(model="tiny", iterations=1))
    assert math.isfinite(history[-1]["eval_reward"])


def test_cli_precedence_presets_flags_and_the_optional_integer(tmp_path):
    small = ["--model", "random-sd3.5-medium", "--preset", "small-gpu"]  # parsed only, nothing is built
    c, _ = vgpo.parse_args(small)
    assert c.micro_batch == 4 and c.group_size == 8 and c.gradient_checkpointing and c.resolution == 512
    c, _ = vgpo.parse_args([*small, "--micro_batch", "2", "--group_size", "6"])
    assert (c.micro_batch, c.group_size, c.prompts_per_iteration) == (2, 6, 2)  # the flag wins, the rest stays
    assert vgpo.parse_args(["--anchor_steps", "3"])[0].anchor_steps == 3
    assert vgpo.parse_args([])[0].anchor_steps == vgpo.Config().num_steps // 2  # None: num_steps // 2
    assert vgpo.parse_args(["--model", "random-sd3.5-medium"])[0].ema is True
    assert vgpo.parse_args(["--model", "random-sd3.5-medium", "--no-ema"])[0].ema is False
    assert vgpo.parse_args(["--model", "toy", "--ema"])[0].ema is True  # over the toy preset's False
    # a resumed shapes run writes where it was, not in the preset's runs/shapes
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert vgpo.parse_args(["--model", "shapes", "--resume", str(tmp_path)])[0].output_dir == str(tmp_path)
    assert vgpo.Config(model="shapes", resume=str(tmp_path)).output_dir == str(tmp_path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(group_size=1), "group_size=1"),
        (dict(anchor_steps=11), "anchor_steps=11"),
        (dict(timestep_fraction=0.0), "timestep_fraction"),
        (dict(weighting="sometimes"), "weighting"),
    ],
)
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vgpo.Config(**kwargs)


@pytest.mark.parametrize(
    "bad,match",
    [(lambda x, p: torch.zeros(len(p) + 1), "shape"), (lambda x, p: torch.full((len(p),), math.nan), "non-finite")],
)
def test_bad_reward_names_the_problem(bad, match):
    bad.__name__ = "my_reward"
    with pytest.raises(ValueError, match=f"my_reward.*{match}|{match}.*my_reward"):
        vgpo.train(vgpo.toy_config(**{**FAST, "iterations": 1}), reward_fn=bad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(noise_level=0.0), "noise_level"),
        (dict(num_minibatches=0), "num_minibatches"),
        (dict(resolution=500), "resolution=500"),
        (dict(model="tiny", reward="pickscor"), "unknown reward 'pickscor'"),
        (dict(model="tiny", prompt_file="/no/such/file"), "prompt_file.*no such file"),
        (dict(device="gpu"), "device='gpu'"),
        (dict(resume="/no/such/dir"), "checkpoint.pt"),
        (dict(gamma=1.5), "gamma=1.5"),
    ],
)
def test_more_bad_configs_name_the_field(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        vgpo.Config(**kwargs)


def test_empty_prompt_file_is_refused(tmp_path):
    (tmp_path / "p.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="prompt_file.*no prompt"):
        vgpo.Config(model="tiny", prompt_file=str(tmp_path / "p.txt"))


@pytest.mark.parametrize(
    "model,field,value",
    [
        ("shapes", "offload_text_encoders", True),  # no text encoders to free
        ("shapes", "gradient_checkpointing", True),
        ("shapes", "max_sequence_length", 64),  # its tokenizer is its own
        ("toy", "guidance_scale", 2.0),  # no guidance, no images, no text
        ("toy", "offload_text_encoders", True),
        ("toy", "cfg_detach_uncond", True),
        ("tiny", "toy_modes", 2),  # another backend's fields
        ("tiny", "shapes_prompts", "a photo of a red circle"),
    ],
)
def test_a_field_the_backend_cannot_honour_is_a_config_error_naming_it(model, field, value):
    with pytest.raises(vgpo.ConfigError, match=f"Config.{field}=.*cannot honour it") as err:
        vgpo.Config(model=model, **{field: value})
    assert err.value.field == field


def test_every_backend_implements_the_interface_and_shapes_inherits_nothing_from_sd3():
    for cls in (backends.ToyBackend, backends.SD3Backend, backends.ShapesBackend):
        assert issubclass(cls, backends.Backend) and not cls.__abstractmethods__, cls
    assert not issubclass(backends.ShapesBackend, backends.SD3Backend)  # no SD3 setting it would silently ignore
    with pytest.raises(TypeError):
        backends.Backend()  # the interface alone cannot run


def test_importing_vgpo_and_building_the_toy_load_no_image_stack():
    code = (
        "import sys, vgpo; vgpo.build_backend(vgpo.toy_config(toy_pretrain_steps=1)).sigmas(10); "
        "print(sorted(m for m in ('rewards', 'cv2', 'shapes_model', 'diffusers.pipelines') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--group_size", "1"], "--group_size: invalid value 1: must be >= 2"),
        (["--model", "tiny", "--resolution", "512"], "--resolution: invalid value 512"),
        (["--lr", "fast"], "--lr: invalid float value: 'fast'"),
        (["--method", "ppo"], "--method: invalid choice: 'ppo'"),
        (["--model", "shapes", "--offload_text_encoders"], "--offload_text_encoders: invalid value True: the 'shapes'"),
    ],
)
def test_command_line_errors_are_one_line_with_status_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        vgpo.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and flag in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --- runs: checkpoints, resume, metrics, tensorboard


RUN = ["--iterations", "8", "--checkpoint_every", "3", "--toy_pretrain_steps", "200", "--eval_samples", "32", "--ema"]


def _cli(args, kill_after=None, sig=signal.SIGKILL):
    """Run `python vgpo.py args`; optionally send `sig` once the line of iteration `kill_after` appears."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "vgpo.py", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    for line in proc.stdout:
        if kill_after is not None and line.startswith(f"iteration={kill_after} "):
            proc.send_signal(sig)
    return proc.wait(timeout=300)


def _history(directory):
    with open(os.path.join(directory, "history.json")) as f:
        return [{k: v for k, v in h.items() if k != "seconds"} for h in json.load(f)["history"]]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    full = str(tmp_path_factory.mktemp("full"))
    assert _cli([*RUN, "--output_dir", full]) == 0
    return full


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_run(tmp_path, sig, uninterrupted_run):
    full, cut = uninterrupted_run, str(tmp_path / "cut")
    assert _cli([*RUN, "--output_dir", cut], kill_after=3, sig=sig) != 0  # killed, or stopped after iteration >= 3
    saved = torch.load(os.path.join(cut, "checkpoint.pt"), weights_only=False)["iteration"]
    assert 3 <= saved < 8 and not os.path.exists(os.path.join(cut, "history.json"))
    with open(os.path.join(cut, "metrics.jsonl")) as f:  # streamed while running: nothing lost at the kill
        assert len(f.readlines()) >= saved
    assert _cli([*RUN, "--resume", cut]) == 0
    assert _history(cut) == _history(full)  # with --ema: the EMA weights resume exactly too
    with open(os.path.join(cut, "metrics.jsonl")) as f:  # one line per iteration: none lost, none doubled
        streamed = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]
    assert streamed == _history(full)


def test_resume_refuses_a_changed_config(tmp_path):
    config = vgpo.toy_config(iterations=1, toy_pretrain_steps=300, eval_samples=16, output_dir=str(tmp_path))
    vgpo.train(config)
    with pytest.raises(ValueError, match="Config.kappa=0.5 is invalid: differs from the checkpoint's 1.0"):
        vgpo.train(
            vgpo.toy_config(iterations=2, toy_pretrain_steps=300, eval_samples=16, kappa=0.5, resume=str(tmp_path))
        )


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    config = vgpo.toy_config(iterations=1, toy_pretrain_steps=300, eval_samples=16, output_dir=str(tmp_path))
    vgpo.train(config)
    good = (tmp_path / "checkpoint.pt").read_bytes()

    def crash(*args, **kwargs):
        open(args[1], "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        vgpo.train(vgpo.toy_config(iterations=2, toy_pretrain_steps=300, eval_samples=16, resume=str(tmp_path)))
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


def test_an_unreadable_checkpoint_is_named(tmp_path, capsys):
    vgpo.train(vgpo.toy_config(iterations=1, toy_pretrain_steps=200, eval_samples=16, output_dir=str(tmp_path)))
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # truncated
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        vgpo.main(
            ["--iterations", "2", "--toy_pretrain_steps", "200", "--eval_samples", "16", "--resume", str(tmp_path)]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"cannot read {tmp_path / 'checkpoint.pt'}" in err and len(err.splitlines()) == 1


def _killed_at(iteration, monkeypatch):
    original = vgpo.train_iteration

    def dying(*args, **kwargs):
        if args[5] == iteration:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(vgpo, "train_iteration", dying)
    return original


@pytest.mark.parametrize("model", ["tiny", "shapes"])
def test_kill_and_resume_equals_an_uninterrupted_run_beyond_the_toy(model, tmp_path, monkeypatch, shapes_weights):
    # tiny: killed in iteration 1 of 2, resumed; shapes: a first run of 1 iteration resumed to 2 (more iterations)
    extra = dict(shapes_weights=shapes_weights, num_steps=3, group_size=2, prompts_per_iteration=2,
                 eval_samples=4, eval_steps=3, reward="jpeg_compressibility") if model == "shapes" else {}  # fmt: skip
    make = lambda **k: (tiny_config if model == "tiny" else lambda **f: vgpo.Config(model="shapes", **f))(  # noqa: E731
        **{**extra, "checkpoint_every": 1, "ema": True, "ema_every": 1, **k}
    )
    full = vgpo.train(make(iterations=2, output_dir=str(tmp_path / "full")))
    if model == "tiny":
        original = _killed_at(1, monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            vgpo.train(make(iterations=2, output_dir=str(tmp_path / "cut")))  # dies in iteration 1
        monkeypatch.setattr(vgpo, "train_iteration", original)
    else:
        vgpo.train(make(iterations=1, output_dir=str(tmp_path / "cut")))  # a whole run of 1 iteration
    resumed = vgpo.train(make(iterations=2, resume=str(tmp_path / "cut")))
    assert len(resumed) == len(full) == 2
    assert ("eval_reward" in resumed[0]) == (model == "shapes") and "eval_reward" not in full[0]
    for a, b in zip(resumed, full, strict=True):
        for key in set(a) & set(b) - {"seconds"}:
            assert a[key] == pytest.approx(b[key], rel=1e-5, nan_ok=True), key
    states = [torch.load(str(tmp_path / d / "checkpoint.pt"), weights_only=False) for d in ("full", "cut")]
    assert states[0]["lora"].keys() == states[1]["lora"].keys() and all("lora_" in n for n in states[0]["lora"])
    for name in states[0]["lora"]:
        torch.testing.assert_close(states[1]["lora"][name], states[0]["lora"][name], rtol=1e-5, atol=1e-7)


def test_metrics_stream_curves_and_summary(tmp_path, capsys):
    dirs = []
    for method, eval_reward in (("grpo", "toy_mode"), ("vgpo", "toy_region")):  # continuous, then pass/fail
        run = tmp_path / method
        config = vgpo.toy_config(
            iterations=3, eval_every=2, toy_pretrain_steps=200, eval_samples=16, output_dir=str(run), ema=True,
            eval_reward=eval_reward, **vgpo.PRESETS[method],
        )  # fmt: skip
        history = vgpo.train(config)
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in lines] == [0, 1, 2] and lines[-1]["eval_reward"] == history[-1]["eval_reward"]
        evaluated = ((history[0], "eval_reward_before"), (history[1], "eval_reward"), (history[2], "eval_reward"))
        for record, key in evaluated:
            scores = record[key.replace("reward", "scores")]  # every sample's score, for the paired test
            assert len(scores) == 16 and record[key] == pytest.approx(sum(scores) / 16, abs=1e-6)
        assert (run / "curves.png").stat().st_size > 0
        dirs.append(str(run))
    text = capsys.readouterr().out
    assert "best eval reward" in text and "-> " in text and "EMA weights" in text and "metrics.jsonl" in text
    assert text.count("McNemar exact p") == 1  # the pass/fail evaluation only
    gained, lost, p = runs.mcnemar(history[0]["eval_scores_before"], history[-1]["eval_scores"])
    assert f"{gained} samples gained, {lost} lost, McNemar exact p = {p:.2g}" in text
    assert "eval_scores" not in text  # per-sample lists stay in metrics.jsonl, off the progress lines
    experiments.main(["curves", *dirs, "--out", str(tmp_path)])
    from PIL import Image

    assert Image.open(tmp_path / "curves.png").size[0] > 1000


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs():
    # 10 gained, 2 lost: p = 2 * P(Binomial(12, 1/2) <= 2) = 2 * (1 + 12 + 66) / 4096, by hand
    before, after = [0] * 10 + [1] * 2 + [1] * 5 + [0] * 7, [1] * 10 + [0] * 2 + [1] * 5 + [0] * 7
    assert runs.mcnemar(before, after) == (10, 2, pytest.approx(2 * 79 / 4096))
    assert runs.mcnemar(after, before) == (2, 10, pytest.approx(2 * 79 / 4096))  # two-sided
    assert runs.mcnemar([0, 1], [0, 1]) == (0, 0, 1.0)  # no discordant pair: no evidence
    assert runs.mcnemar([0] * 5, [1] * 5)[2] == pytest.approx(2 / 32)  # 5 of 5 cannot reach 0.05
    assert runs.mcnemar([0.0, 0.4], [0.6, 1.0])[:2] == (2, 0)  # outcomes are scores >= 0.5
    with pytest.raises(ValueError, match="equal lengths, got 2 and 3"):
        runs.mcnemar([0, 1], [0, 1, 1])
    # numpy outcomes (labels are bool arrays) with 63 and more discordant pairs: the counts' np.int64 made 2**63
    # wrap (p = -0.0022 for 44 / 19 in a label report); against Pascal's triangle of probabilities, halved row by row
    for gained, lost in ((44, 19), (50, 40)):
        before = np.array([False] * gained + [True] * lost + [True] * 7)
        after = np.array([True] * gained + [False] * lost + [True] * 7)
        row = [1.0]
        for _ in range(gained + lost):
            row = [(a + b) / 2 for a, b in zip([0.0, *row], [*row, 0.0], strict=True)]
        expected = min(1.0, 2 * sum(row[: min(gained, lost) + 1]))
        assert runs.mcnemar(before, after) == (gained, lost, pytest.approx(expected, rel=1e-9))
        assert 0 < expected < 1 and type(runs.mcnemar(before, after)[0]) is int


def test_zero_std_ratio_splits_into_all_pass_and_all_fail_groups():
    config = vgpo.toy_config(num_steps=2, group_size=3, prompts_per_iteration=4, **vgpo.PRESETS["grpo"])
    ends = torch.tensor([[1.0, 1, 1], [0, 0, 0], [0.5, 0.5, 0.5], [0, 1, 1]]).reshape(-1, 1)  # 4 groups of 3
    info = vgpo.logged(vgpo.batch_advantages(ends, config)[1])
    assert (info["zero_std_ratio"], info["zero_std_pass"], info["zero_std_fail"]) == (0.75, 0.25, 0.25)


def test_tensorboard_gets_scalars_and_grids_and_is_named_when_missing(tmp_path, monkeypatch):
    import importlib.util
    import types

    calls = []

    class Writer:
        def __init__(self, logdir):
            calls.append(("dir", logdir))

        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, step))

        def add_image(self, tag, image, step):
            calls.append(("image", tag, tuple(image.shape), step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "tensorboard" else real_find_spec(name, *a)
    )
    vgpo.train(tiny_config(iterations=2, output_dir=str(tmp_path), tensorboard=True))
    assert ("dir", str(tmp_path / "tensorboard")) in calls and calls[-1] == ("close",)
    assert ("scalar", "reward_mean", 2) in calls and ("scalar", "kl_ref", 1) in calls
    assert [c[3] for c in calls if c[0] == "image"] == [0, 2]  # before and after
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a)
    )
    with pytest.raises(vgpo.ConfigError, match="pip install tensorboard"):
        tiny_config(output_dir=str(tmp_path), tensorboard=True)


# --- torch.distributed (gloo, CPU): 2 ranks equal 1


def test_two_gloo_ranks_give_the_history_of_one_process(tmp_path):
    fields = dict(iterations=3, toy_pretrain_steps=300, eval_samples=64, prompts_per_iteration=4, group_size=4)
    args = [word for k, v in fields.items() for word in (f"--{k}", str(v))]  # two groups per rank
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    vgpo.train(vgpo.Config(model="toy", output_dir=one, **fields))  # the same run in this one process
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "vgpo.py"]
    cwd = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([*torchrun, *args, "--output_dir", two], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    for a, b in zip(_history(one), _history(two), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


CASES = {"one rank holds nothing": [0, 1, 2, 3], "padded across ranks": [1, 5, 6]}  # rows with a signal, of 8


def _distributed_update(rank, world, init_file, out):
    """policy_update on 8 toy samples (2 groups of 4, one per rank), for each of CASES; saves LoRA and records."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    config = vgpo.toy_config(toy_pretrain_steps=200, group_size=4, prompts_per_iteration=2, beta=0.04)
    results = {}
    for case, kept in CASES.items():
        backend = vgpo.build_backend(config)
        reward = vgpo.checked_reward(backend.load_reward(config.reward), config.reward)
        sigmas = backend.sigmas(config.num_steps)
        noise = [vgpo.make_generator(0, 3, 0, i) for i in range(8)]
        full = vgpo.rollout(backend, [0] * 4 + [1] * 4, sigmas, 0.7, reward, noise, True)
        rows = slice(4 * rank, 4 * rank + 4) if world > 1 else slice(0, 8)
        local = vgpo.Rollout(full.prompts[rows], {k: v[rows] for k, v in full.cond.items()}, full.latents[rows],
                             full.log_probs[rows], full.rewards[rows])  # fmt: skip
        adv = torch.zeros(8, config.num_steps)
        adv[kept] = torch.randn(len(kept), config.num_steps, generator=torch.Generator().manual_seed(1))
        optimizer = torch.optim.AdamW(backend.parameters(), lr=config.lr)
        offset = 4 * rank if world > 1 else 0
        record = vgpo.policy_update(backend, local, adv, optimizer, sigmas, config, torch.Generator().manual_seed(7),
                                    offset, 8)  # fmt: skip
        results[case] = (runs.lora_state(backend), vgpo.logged(record))
    torch.save(results, os.path.join(out, f"{world}_{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


def test_distributed_edges_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    _distributed_update(0, 1, "", str(tmp_path))
    mp.start_processes(  # fork: the children inherit the imports (spawn would import this file twice more)
        _distributed_update, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    one = torch.load(tmp_path / "1_0.pt", weights_only=False)
    for rank in (0, 1):
        two = torch.load(tmp_path / f"2_{rank}.pt", weights_only=False)
        for case in CASES:
            (lora_1, rec_1), (lora_2, rec_2) = one[case], two[case]
            assert rec_2["optimizer_steps"] == rec_1["optimizer_steps"] == 2 and rec_2["trained_frac"] == rec_1[
                "trained_frac"
            ]  # fmt: skip
            for name in lora_1:
                torch.testing.assert_close(lora_2[name], lora_1[name], rtol=1e-4, atol=1e-6)
            assert any(not torch.equal(v, torch.zeros_like(v)) for n, v in lora_2.items() if "lora_B" in n)  # moved


# --- experiments.py (reduced)


def test_reduced_experiment_writes_a_well_formed_table_figure_and_runs(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setitem(vgpo.PRESETS, "toy", {**vgpo.PRESETS["toy"], "toy_pretrain_steps": 200, "eval_samples": 32})
    experiments.main(["methods", "--seeds", "1", "--iterations", "3", "--workers", "1", "--out", str(tmp_path)])
    runs = json.loads((tmp_path / "toy_methods.json").read_text())
    assert len(runs) == len(experiments.SETTINGS) * len(experiments.METHODS)
    assert all(len(r["curve"]) == 3 and 0 <= r["eval_after"] <= 1 for r in runs)
    table = (tmp_path / "toy_methods.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in table) == 1 + len(runs)  # header + one row per run
    assert Image.open(tmp_path / "toy_methods.png").size[0] > 500


def test_benchmark_writes_counts_for_grpo_and_vgpo(tmp_path):
    experiments.main(["benchmark", "--repeats", "1", "--out", str(tmp_path)])
    rows = [line.split("|") for line in (tmp_path / "benchmark_tiny_jpeg_compressibility.md").read_text().splitlines()]
    counts = {r[1].strip(): [float(c) for c in r[5:8]] for r in rows if len(r) > 8 and r[1].strip() in ("GRPO", "VGPO")}
    assert counts == {"GRPO": [46, 1, 1], "VGPO": [46, 10, 10]}  # 10 rollout + 9 steps x 2 minibatches x 2


# --- shapes reward and benchmark


def _as_batch(arrays):
    return torch.tensor(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _scene_image(*things, size=64, background=(0, 0, 0)):
    """An image of (shape, colour, cx, cy, side) things drawn by shapes.draw_shape, in the grammar's colours."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    for shape, color, cx, cy, side in things:
        shapes.draw_shape(image, shape, cx, cy, side, shapes.COLORS[color])
    return image


def test_shapes_grammar_round_trips_and_names_a_bad_prompt():
    rng = np.random.default_rng(0)
    for category in shapes.CATEGORIES:
        for _ in range(20):
            scene = shapes.random_scene(category, rng)
            assert shapes.parse_prompt(shapes.prompt_of(scene)) == (category, scene)
    assert shapes.prompt_of(shapes.parse_prompt("a photo of three blue squares")[1]) == "a photo of three blue squares"
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        rewards.load_reward("geneval_shapes")(torch.zeros(1, 3, 64, 64), ["a photo of a purple circle"])


def _honest_renders(size, n, rng):
    """n scenes of the four categories, sides 10-45 % of the image (at least MIN_PIXELS + 1 px: what
    rasterises to a box of MIN_PIXELS), colours jittered, random places and backgrounds."""
    images, prompts = [], []
    low = max(0.10, (rewards.MIN_PIXELS + 1) / size)
    while len(images) < n:
        scene = shapes.random_scene(shapes.CATEGORIES[len(images) % 4], rng)
        try:
            images.append(shapes.render(scene, size, rng, side_range=(low, 0.45)))
        except RuntimeError:  # four large shapes that do not fit apart: draw another scene
            continue
        prompts.append(shapes.prompt_of(scene))
    return _as_batch(images), prompts


@pytest.mark.parametrize("size", [shapes.SIZE, 64])
def test_geneval_shapes_judges_honest_renders_right(size):
    # issue 33's target: >= 97 % of honest renders judged right, sides 10-45 % of the image. Measured on
    # 400 per size: 99.3 % at 32 px, 99.8 % at 64 px (misses: relations within the 5 % margin of centres)
    images, prompts = _honest_renders(size, 400, np.random.default_rng(size))
    strict = rewards.load_reward("geneval_shapes")(images, prompts)
    score = rewards.load_reward("geneval_shapes_score")(images, prompts)
    assert strict.mean() >= 0.97, strict.mean()
    assert (score[strict == 1] == 1).all()  # the scene as asked, nothing else drawn: the full graded score


@pytest.mark.parametrize("size", [shapes.SIZE, 64])
def test_geneval_shapes_rejects_every_family_built_to_fool_it_on_two_draws(size):
    # blocks (with and without a fringe), bars, ragged / lobed blobs, L / plus / T, specks, noise, empty;
    # each in the prompt's colour. Target >= 98 % of each family rejected on each of two independent
    # draws (here 50 each: at most one pass). The v2 reward's size floor (85 % of the renderer's
    # smallest side) did this by refusing every small shape; v3 refuses what is no shape
    strict = rewards.load_reward("geneval_shapes")
    for draw in (0, 1):
        items = shapes.fooling_images(size, np.random.default_rng(100 + draw), per_family=50)
        passed = strict(_as_batch([image for _, image, _ in items]), [prompt for *_, prompt in items])
        for family in shapes.FOOLING_FAMILIES:
            share = passed[[f == family for f, _, _ in items]].mean().item()
            assert share <= 0.02, (size, draw, family, share)


def _near_misses(rng, n=40):
    """(prompt, near-miss scene) pairs: count off by one, a wrong colour, a wrong shape, the relation reversed."""
    T, S = shapes.Thing, shapes.Scene
    other = lambda value, pool: str(rng.choice([v for v in pool if v != value]))  # noqa: E731
    pairs = []
    for _ in range(n):
        t = T(str(rng.choice(list(shapes.COLORS))), str(rng.choice(shapes.SHAPES)), int(rng.integers(2, 5)))
        prompt = shapes.prompt_of(S((t,), counted=True))
        pairs.append((prompt, S((T(t.color, t.shape, t.count + int(rng.choice([-1, 1]))),), counted=True)))
        pairs.append((prompt, S((T(t.color, t.shape, t.count - 1), T(other(t.color, shapes.COLORS), t.shape)))))
        two = shapes.random_scene("two objects", rng)
        a, b = two.things
        pairs.append((shapes.prompt_of(two), S((a, T(other(b.color, shapes.COLORS), b.shape)))))
        pairs.append((shapes.prompt_of(two), S((a, T(b.color, other(b.shape, shapes.SHAPES))))))
        pos = shapes.random_scene("position", rng)
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        pairs.append((shapes.prompt_of(pos), S(pos.things, relation=opposite[pos.relation])))
    return pairs


def test_geneval_shapes_rejects_near_misses_and_the_graded_score_ranks_them_below_one():
    # target: >= 95 % of near misses (wrong count, colour, shape, relation) rejected; 200 here
    rng = np.random.default_rng(2)
    pairs = _near_misses(rng)
    images = _as_batch([shapes.render(scene, 64, rng, side_range=(0.2, 0.3)) for _, scene in pairs])  # 5 fit
    prompts = [prompt for prompt, _ in pairs]
    strict = rewards.load_reward("geneval_shapes")(images, prompts)
    score = rewards.load_reward("geneval_shapes_score")(images, prompts)
    assert (strict == 0).float().mean() >= 0.95 and (score < 1).float().mean() >= 0.95
    assert 0.4 < score.mean() < 0.8  # graded: most near misses meet part of the prompt (the count of a
    # circle drawn for "a red circle and a red square" gives 0: two circles, no square)


def test_geneval_shapes_agrees_with_the_labels_on_the_models_own_pictures():
    # results/labels: 460 pictures the shapes model drew (base and trained policies), labelled pass /
    # fail by two annotators looking at them (assistant agents with a fresh context), blind to each
    # other and to any reward (a third where they differed), split once before any tuning. The
    # thresholds were tuned on the calibration half only. Issue 33's target on the test half is
    # agreement >= 0.92 and kappa >= 0.8; measured: 0.900 and 0.79 (v2's reward: 0.648 and 0.36), the
    # frontier in RESULTS shows what more agreement would cost. This test holds the measured level
    images, records = shapes_labels.load()
    test = [i for i, r in enumerate(records) if r["split"] == "test"]
    labels = np.array([records[i]["label"] for i in test])
    passed = shapes_labels.verdicts(images[test], [records[i] for i in test])
    assert len(test) == 230 and (labels == passed).mean() >= 0.895 and shapes_labels.kappa(labels, passed) >= 0.78
    assert shapes_labels.kappa([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.5)  # (0.75 - 0.5) / (1 - 0.5)


def test_recognise_shape_names_the_forms_at_every_size_and_nothing_else():
    for side in (5, 7, 9, 14, 24):  # the ideal forms, 5 px (the floor) to 24 px
        forms = rewards.ideal_forms(side, side)
        assert [rewards.recognise_shape(form) for form in forms.values()] == list(forms), side
        assert rewards.recognise_shape(forms["triangle"][::-1]) == "triangle"  # upside down: still one
    assert rewards.recognise_shape(np.ones((4, 4), bool)) == "small"  # under MIN_PIXELS
    square = np.ones((12, 12), bool)
    frame = square.copy()
    frame[3:9, 3:9] = False  # hollow
    ell = square.copy()
    ell[:8, 4:] = False  # an L: solidity 0.69
    plus = np.zeros((12, 12), bool)
    plus[4:8, :] = plus[:, 4:8] = True
    assert [rewards.recognise_shape(m) for m in (frame, ell, plus, square[:, :8])] == ["other"] * 4  # 12 x 8: a bar


def test_shape_measures_against_hand_computed_values():
    square = np.ones((6, 6), bool)
    m = rewards.shape_measures(square)
    assert (m["aspect"], m["solidity"], m["square"], m["taper"]) == (1.0, 1.0, 1.0, 1.0)
    steps = np.tril(np.ones((4, 4), bool))  # rows of 1, 2, 3, 4 pixels
    # hull through the corners (0, 0), (1, 0), (4, 3), (4, 4), (0, 4): 11.5 by the shoelace formula
    assert rewards.hull_area(steps) == 11.5 and rewards.shape_measures(steps)["solidity"] == pytest.approx(10 / 11.5)
    assert rewards.taper(steps) == pytest.approx(4.0)  # the last row (4) over the first (1): thirds of 4 rows
    disk = rewards.ideal_forms(21, 21)["circle"]
    assert rewards.disk_fit(disk) > 0.97 and rewards.disk_fit(square) == pytest.approx(
        rewards.iou(np.pad(square, 4), np.hypot(*(np.mgrid[-4:10, -4:10] + 0.5 - 3)) <= math.sqrt(36 / math.pi))
    )


def test_touching_shapes_are_split_and_a_fused_lump_is_not():
    two = "a photo of two red circles"
    reward = rewards.load_reward("geneval_shapes")
    necked = _scene_image(("circle", "red", 20, 32, 16), ("circle", "red", 35, 32, 16))  # overlap by 1 px
    assert [s for *_, s in rewards.components(necked)] == ["circle", "circle"]
    assert reward(_as_batch([necked]), [two]).item() == 1.0
    triangles = _scene_image(("triangle", "blue", 16, 32, 14), ("triangle", "blue", 29, 32, 14))  # base corners touch
    assert reward(_as_batch([triangles]), ["a photo of two blue triangles"]).item() == 1.0
    lump = _scene_image(("circle", "red", 26, 32, 16), ("circle", "red", 33, 32, 16))  # centres 7 px apart
    assert [s for *_, s in rewards.components(lump)] == ["other"]
    assert reward(_as_batch([lump]), [two]).item() == 0.0


def test_geneval_shapes_counts_patch_sized_blocks_and_fringes_as_clutter_and_ignores_specks():
    # a policy learned to pass "a red square" with 4 x 4 red blocks (one patch of the first shapes
    # model): a block is under the 5 px floor, so it is clutter, not a square; a pale fringe (chroma
    # half the block's) is no part of it, however large it makes the coloured patch
    reward = rewards.load_reward("geneval_shapes")
    red, prompt = (230, 20, 40), ["a photo of a red square"]
    image = np.full((32, 32, 3), 128, np.uint8)
    image[20:26, 4:10] = red  # a 6 px square: 19 % of the side, smaller than the renderer ever draws
    assert reward(_as_batch([image]), prompt).item() == 1.0
    specks = image.copy()
    specks[2:4, 2:4] = specks[2:4, 28:30] = red  # 2 x 2 dots: specks, ignored
    assert reward(_as_batch([specks]), prompt).item() == 1.0
    for y, x in [(2, 2), (2, 20), (12, 24)]:
        image[y : y + 4, x : x + 4] = red
    assert reward(_as_batch([image]), prompt).item() == 0.0  # the square amid clutter
    fringed = np.full((32, 32, 3), 128, np.uint8)
    fringed[9:15, 9:15] = (np.array(red) + 128) // 2
    fringed[10:14, 10:14] = red  # a 4 px block in a 6 px blend
    assert rewards.components(fringed)[0][3] == "small" and reward(_as_batch([fringed]), prompt).item() == 0.0


def _server_score(clauses, detected):
    """yifan123/reward-server's evaluate_reward (reward_server/gen_eval.py at 7131478), transcribed on
    recognised objects: clauses as rewards.include_clauses, detected {shape: [(colour, centre)]}."""
    scores, matched_groups = [], []
    for req in clauses:
        found = detected.get(req["shape"], [])
        scores.append(1 - abs(req["count"] - len(found)) / req["count"])
        matched = len(found) == req["count"]
        if not matched:
            scores.append(0.0)  # the clause has a colour
        else:
            right = sum(color == req["color"] for color, _ in found)
            scores.append(1 - abs(req["count"] - right) / req["count"])
            matched = right == req["count"]
            if "position" in req and matched:
                relation, target = req["position"]
                if matched_groups[target] is None:
                    matched = False
                    scores.append(0.0)
                else:
                    for _, a in found:
                        for _, b in matched_groups[target]:
                            if not shapes.relation_holds(relation, a, b, 64):
                                matched = False
                                scores.append(0.0)
                                break
                        if not matched:
                            break
                    scores.append(1.0)  # the server appends this after the loop, failed or not
        matched_groups.append(found if matched else None)
    return sum(scores) / len(scores)


def test_geneval_shapes_score_transcribes_flow_grpos_graded_score():
    score = rewards.load_reward("geneval_shapes_score")
    at = [(12, 12), (40, 12), (12, 40), (40, 40), (26, 26)]
    circles = lambda colors: _scene_image(*(("circle", c, x, y, 10) for c, (x, y) in zip(colors, at, strict=False)))  # noqa: E731
    four = "a photo of four red circles"
    pair = _scene_image(("circle", "red", 12, 26, 10), ("square", "blue", 40, 26, 10))
    cases = [
        (circles(["red"] * 3), four, (0.75 + 0) / 2),  # three of four: 1 - 1/4, and one 0 for the colour
        (circles(["red"] * 4), four, 1.0),
        (circles(["red"] * 3 + ["blue"]), four, (1 + 0.75) / 2),  # four circles, three red
        (circles(["red"] * 5), four, (0.75 + 0) / 2),  # one too many
        (circles(["red"]), "a photo of a red circle and a blue square", (1 + 1 + 0 + 0) / 4),
        (circles(["red", "blue"]), "a photo of a red circle and a blue circle", 1.0),  # decision (a)
        (circles(["red", "red"]), "a photo of a red circle and a blue circle", 0.0),
        (circles(["red", "blue"]), "a photo of a red circle left of a blue circle", 1.0),  # x 12 vs 40, (a)
        # (a): the green circle is "not red" for the blue clause (two found: 0, 0) and "not blue" for the red
        # clause (one found, wrong colour: 1, 0)
        (circles(["green", "blue"]), "a photo of a red circle left of a blue circle", (0 + 0 + 1 + 0) / 4),
        (circles(["red", "green"]), "a photo of a red circle left of a blue circle", (1 + 0 + 0 + 0) / 4),
        (pair, "a photo of a red circle left of a blue square", 1.0),
        (pair, "a photo of a red circle right of a blue square", (1 + 1 + 1 + 1 + 0) / 5),  # (c)
        (pair, "a photo of a red circle left of a green square", (1 + 0 + 1 + 1 + 0) / 5),  # no target
    ]
    got = score(_as_batch([image for image, _, _ in cases]), [prompt for _, prompt, _ in cases])
    assert got.tolist() == pytest.approx([expected for *_, expected in cases])
    # the transcription of the server agrees wherever no decision applies, and differs as each says
    for image, prompt, expected in cases:
        scene = shapes.parse_prompt(prompt)[1]
        detected = {}
        for color, shape, centre in rewards.find_objects(image)[0]:
            detected.setdefault(shape, []).append((color, centre))
        server = _server_score(rewards.include_clauses(scene), detected)
        if prompt.endswith("right of a blue square"):  # (c): one 0 for a wrong side; the server adds a 1 after it
            assert server == pytest.approx(5 / 6) and expected == pytest.approx(4 / 5)
        elif len({c["shape"] for c in rewards.include_clauses(scene)}) == 1 and not scene.counted:
            assert server == 0.0  # (a): the server counts both circles for each clause of count 1
        else:
            assert server == pytest.approx(expected), prompt
    nine = _scene_image(*(("circle", "red", x, y, 8) for x in (10, 30, 50) for y in (10, 30, 50)))
    assert score(_as_batch([nine]), ["a photo of two red circles"]).item() == 0.0  # (b): 1 - 7/2 clipped at 0


def test_shapes_failure_names_why_the_strict_reward_fails_and_agrees_with_it_on_pass():
    two = "a photo of two red circles"
    cases = [
        (_scene_image(("circle", "red", 16, 16, 20), ("circle", "red", 48, 48, 20)), two, "pass"),
        (_scene_image(("circle", "red", 26, 32, 16), ("circle", "red", 33, 32, 16)), two, "unrecognised"),  # a lump
        (_scene_image(("circle", "red", 16, 16, 20), ("circle", "red", 48, 48, 4)), two, "small"),
        (_scene_image(*(("circle", "red", x, 16, 12) for x in (10, 30, 50))), two, "wrong"),  # three
        (_scene_image(), two, "wrong"),  # nothing drawn
    ]
    assert [experiments.shapes_failure(image, prompt) for image, prompt, _ in cases] == [c for *_, c in cases]
    # "pass" exactly where the reward passes: honest renders and images built to fool it
    rng = np.random.default_rng(2)
    images, prompts = _honest_renders(shapes.SIZE, 100, rng)
    items = [(image, prompt) for _, image, prompt in shapes.fooling_images(shapes.SIZE, rng, per_family=4)]
    images = torch.cat([images, _as_batch([i for i, _ in items])])
    prompts += [p for _, p in items]
    strict = rewards.load_reward("geneval_shapes")(images, prompts)
    classes = [
        experiments.shapes_failure(image, prompt)
        for image, prompt in zip(rewards.to_uint8(images), prompts, strict=True)
    ]
    assert [c == "pass" for c in classes] == (strict == 1).tolist() and set(classes) <= set(experiments.FAILURES)


def test_shapes_failures_report_sums_classes_per_seed_and_passes_per_prompt(tmp_path):
    def record(strict, **by_prompt):  # by_prompt: prompt -> {class: images}
        counts = {k: sum(c.get(k, 0) for c in by_prompt.values()) for k in experiments.FAILURES}
        by = {q: {k: c.get(k, 0) for k in experiments.FAILURES} for q, c in by_prompt.items()}
        return dict(counts=counts, by_prompt=by, strict=strict, recorded=strict)

    done = {
        "VGPO s0": record(0.75, a={"pass": 3}, b={"small": 1}),
        "base s0": record(0.6, a={"pass": 2, "unrecognised": 1}, b={"pass": 1, "small": 1}),
        "base s1": record(0.5, a={"pass": 1}, b={"unrecognised": 1}),
    }
    experiments.shapes_failures_report(done, str(tmp_path))
    text = (tmp_path / "shapes_failures.md").read_text()
    assert "| base | 0 | 0.600 (0.600) | 3 | 1 | 1 | 0 |" in text  # pass unrecognised small wrong
    assert text.index("| base | 1 |") < text.index("| VGPO | 0 |")  # the base model first
    assert "| base | 3 / 4 | 1 / 3 |" in text and "| VGPO | 3 / 3 | 0 / 1 |" in text  # summed over seeds


def _shapes_record(method, seed, ode, **overrides):
    history = [
        dict(zero_std_ratio=z, adv_rel_abs=0.5, adv_anchor_abs=0.1, kl_ref=1e-4, seconds=1.0) for z in (0.8, 0.4)
    ]
    final = dict(ode=ode, sde10=ode)
    return dict(reward="strict", method=method, seed=seed, **overrides, iterations=2, shapes_prompts="grammar",
                eval_before=0.1, evals=[(2, ode)], final=final, history=history)  # fmt: skip


def test_shapes_jobs_filter_rewards_and_the_sweep_table_reads_the_runs(tmp_path):
    from argparse import Namespace

    args = Namespace(methods="GRPO,VGPO", iterations=2, shapes_prompts="grammar", rewards="strict", seeds=4,
                     sweep=True, out=str(tmp_path), workers=1, value_steps=1)  # fmt: skip
    jobs = experiments.shapes_jobs(args)
    assert {j[0] for j in jobs} == {"strict"} and len(jobs) == 2 * 4 + 12  # seeds 0-3, then 12 sweep runs
    assert jobs[-1][1:4] == ("VGPO", 2, {"iterations": 2, "gamma": 0.99})
    n3 = experiments.shapes_jobs(Namespace(**{**vars(args), "methods": "VGPO", "value_steps": 3, "sweep": False}))
    assert [j[2:4] for j in n3] == [(s, {"iterations": 2, "value_steps": 3}) for s in range(4)]
    assert experiments.shapes_run_name(*n3[0][:4]) == "strict_VGPO_value_steps3_s0"  # beside the n = 1 run
    with pytest.raises(SystemExit, match="strictest"):
        experiments.shapes_jobs(Namespace(**{**vars(args), "rewards": "strictest"}))
    os.makedirs(tmp_path / "shapes_runs")
    records = [_shapes_record("GRPO", 0, 0.0)] + [_shapes_record("VGPO", s, v) for s, v in enumerate((0.1, 0.2, 0.3))]
    records += [_shapes_record("VGPO", s, v, kappa=2.0) for s, v in enumerate((0.4, 0.5, 0.6))]
    records += [_shapes_record("VGPO", s, v, value_steps=3) for s, v in enumerate((0.7, 0.9))]
    for i, r in enumerate(records):
        (tmp_path / "shapes_runs" / f"{i}.json").write_text(json.dumps(r))
    experiments.shapes_report(args)
    methods = (tmp_path / "shapes_methods.md").read_text()
    assert "| strict | VGPO | 3 | 0.200 ± 0.082 | 0.100, 0.200, 0.300 |" in methods and "kappa" not in methods
    assert "| strict | VGPO (value_steps 3) | 2 | 0.800 ± 0.100 | 0.700, 0.900 |" in methods  # its own row
    sweep = (tmp_path / "shapes_sweep.md").read_text()
    assert "| 1.0 | 0.9 | 3 | 0.200 ± 0.082 | 0.100, 0.200, 0.300 | 0.600 ± 0.000 |" in sweep
    assert "| 2.0 | 0.9 | 3 | 0.500 ± 0.082 | 0.400, 0.500, 0.600 |" in sweep


def test_premise_stats_against_hand_computed_cases():
    final = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])  # two groups of 3
    same = experiments.premise_stats(final[:, None].repeat(1, 2), final, 3)
    assert same["corr_within"] == pytest.approx([1.0, 1.0]) and same["sign_agree"] == [1.0, 1.0]
    # group 1 deviations of the final: (2/3, -1/3, -1/3); group 2: (1/3, -1/6, -1/6)
    flipped = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.5, 0.5])  # group 1 reversed, group 2 right
    stats = experiments.premise_stats(flipped[:, None], final, 3)
    assert stats["sign_agree"] == [0.5]  # 3 of 6 samples agree
    d_k = torch.tensor([-2 / 3, 1 / 3, 1 / 3, 1 / 3, -1 / 6, -1 / 6])
    d_f = torch.tensor([2 / 3, -1 / 3, -1 / 3, 1 / 3, -1 / 6, -1 / 6])
    expected = (d_k @ d_f / (d_k.norm() * d_f.norm())).item()  # both have zero mean already
    assert stats["corr_within"][0] == pytest.approx(expected) and expected == pytest.approx(-0.6)
    # no group has one final score: no flat group to count
    assert stats["flat_groups"] == 0 and math.isnan(stats["flat_final_signal"][0])
    flat_final = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])  # groups 1-2 flat, 3 not
    steps = torch.tensor(
        [[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [0, 1], [1, 0], [0, 1]]
    )
    flat = experiments.premise_stats(steps, flat_final, 3)
    assert flat["flat_groups"] == 2 and flat["flat_final_signal"] == [0.0, 0.5]  # at k=1 group 1 varies


def test_shapes_model_pretrains_resumes_saves_loads_and_samples(tmp_path, monkeypatch):
    batches, original = [], shapes_model.training_batch

    def killed_at_the_third(*args):
        batches.append(1)
        if len(batches) == 3:
            raise KeyboardInterrupt  # the process dies during step 3
        return original(*args)

    monkeypatch.setattr(shapes_model, "training_batch", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        shapes_model.train(3, str(tmp_path / "a"), batch=4, snapshot_every=1)
    monkeypatch.setattr(shapes_model, "training_batch", original)
    shapes_model.train(3, str(tmp_path / "a"), batch=4, snapshot_every=1)  # resumes after step 2
    shapes_model.train(3, str(tmp_path / "b"), batch=4, snapshot_every=1)  # uninterrupted
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl")] for d in "ab"]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-4)  # the same batches and noise
    unet, encoder = shapes_model.load(str(tmp_path / "a" / "ema_00003.safetensors"))
    assert sum(p.numel() for p in unet.parameters()) > 1e6 and not any(p.requires_grad for p in encoder.parameters())
    images = shapes_model.sample(unet, encoder, ["a photo of two red circles", ""], steps=2)
    assert images.shape == (2, 3, shapes.SIZE, shapes.SIZE) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(ValueError, match="not in the shapes vocabulary"):
        shapes_model.tokenize(["a photo of a purple circle"])
    held = shapes.held_out_prompts()
    _, train_prompts = shapes_model.training_batch(64, np.random.default_rng(0), set(held["two objects"]))
    assert not set(train_prompts) & set(held["two objects"])


@pytest.fixture(scope="module")
def shapes_weights(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shapes")
    shapes_model.train(1, str(directory), batch=4)
    return str(directory / "ema_00001.safetensors")


def test_shapes_backend_reuses_the_samplers_velocity_and_trains(shapes_weights):
    counts = {}
    for method in ("grpo", "vgpo"):
        config = vgpo.Config(
            model="shapes", shapes_weights=shapes_weights, shapes_prompts="grammar", num_steps=4, group_size=2,
            prompts_per_iteration=2, reward="jpeg_compressibility", **vgpo.PRESETS[method],
        )  # fmt: skip  # a continuous reward: an untrained model's noise scores 0 on every shapes reward
        backend = experiments.CountingBackend(vgpo.build_backend(config))
        reward = backend.counted_reward(vgpo.checked_reward(backend.load_reward(config.reward), config.reward))
        optimizer = torch.optim.AdamW(backend.parameters(), lr=config.lr)
        record = vgpo.train_iteration(backend, reward, optimizer, backend.sigmas(4), config, 0)
        counts[method] = backend.calls
        assert math.isfinite(record["loss"]) and record["onpolicy_ratio_err"] < 1e-4
    assert counts["vgpo"]["velocity"] == counts["grpo"]["velocity"]  # TCRM: no extra transformer call
    assert (counts["vgpo"]["decode"], counts["grpo"]["decode"]) == (4, 1)
    backend = vgpo.build_backend(config)
    assert not set(backend.train_prompts) & set(shapes.held_out_prompts()["position"])
    drawn = backend.prompts(12, vgpo.make_generator(0, 1))  # category-balanced, distinct within a category
    assert [shapes.parse_prompt(p)[0] for p in drawn] == list(shapes.CATEGORIES) * 3 and len(set(drawn)) == 12
    held = shapes.held_out_prompts()  # evaluation too: k of each category in any first 4k, spread, then cycled
    shown = backend.eval_prompts(4 * 36)
    assert [shapes.parse_prompt(p)[0] for p in shown] == list(held) * 36
    assert len(set(shown[1::4])) == 36 and {p.split()[4] for p in shown[3::4]} == set(shapes.COLORS)
    assert set(shown[::4]) == set(held["single object"])  # 12 prompts, each 3 times
    assert set(backend.eval_prompts(4 * 176)) == {p for ps in held.values() for p in ps}
    cond = backend.encode(["a photo of a red circle"] * 2)
    x, sigma = backend.noise(2, torch.Generator().manual_seed(0)), 0.6
    with torch.no_grad():  # the guided velocity from each branch of the UNet alone
        v_u, v_c = (shapes_model.predict_velocity(backend.model, x, sigma, cond[e]) for e in ("neg_embeds", "embeds"))
        torch.testing.assert_close(
            backend.velocity(x, sigma, cond), v_u + config.guidance_scale * (v_c - v_u), rtol=1e-4, atol=1e-5
        )


def test_demo_samplers_ode_draw_is_the_runs_own_evaluation_and_the_sde_draw_is_scored_both_ways(tmp_path):
    config = vgpo.Config(model="shapes", eval_samples=6, eval_steps=4, num_steps=4, seed=3, output_dir="")
    backend = vgpo.build_backend(config)  # the shipped weights: pictures the rewards can pass
    strict, graded = rewards.load_reward("geneval_shapes"), rewards.load_reward("geneval_shapes_score")
    got = experiments.cached_draws(str(tmp_path), "base_s3", lambda: backend, strict, graded)

    def never():
        raise AssertionError("a kept draw is read, not drawn again")

    again = experiments.cached_draws(str(tmp_path), "base_s3", never, strict, graded)
    assert again["prompts"] == got["prompts"] and all(np.array_equal(again[k], got[k]) for k in got if k != "prompts")
    recorded = vgpo.evaluate_run(backend, strict, config, contextlib.nullcontext, None, "before", 0)
    np.testing.assert_array_equal(got["ode"], recorded.numpy())  # the strict verdicts the run itself records
    for way in ("ode", "sde"):  # a strict pass is a graded 1; the graded score is in [0, 1]
        assert got[way].shape == got[way + "_graded"].shape == (6,)
        assert np.all(got[way + "_graded"][got[way] == 1] == 1) and np.all(
            (got[way + "_graded"] >= 0) & (got[way + "_graded"] <= 1)
        )
    assert got["prompts"] == backend.eval_prompts(6)
    row = experiments.samplers_row(3, "same", got, got)  # a policy against itself: no pair changes
    assert row.startswith(f"| 3 | same | {got['ode'].mean():.3f} | 0 / 0, 1 |") and "| 0 / 0, 1 |" in row[30:]


def test_bf16_autocast_of_the_shapes_unet_stays_within_bf16_rounding():
    backend = vgpo.build_backend(vgpo.Config(model="shapes"))  # the shipped weights
    cond = backend.encode(["a photo of a red circle", "a photo of two blue squares"])
    x, t = backend.noise(2, torch.Generator().manual_seed(0)), torch.full((2,), 700.0)
    with torch.no_grad():
        n32, n16 = backend.network(x, t, cond), experiments.autocast_bf16(backend.network)(x, t, cond)
    assert n16.dtype == torch.float32 and not torch.equal(n16, n32)  # computed in bf16, returned as float32
    assert (n16 - n32).norm() / n32.norm() < 1e-2  # measured 0.4 %: bf16 keeps 8 bits of mantissa
    assert all(p.dtype == torch.float32 for p in backend.parameters())  # the weights stay float32


def test_shapes_prompt_file_feeds_training_and_evaluation_and_names_a_bad_prompt(shapes_weights, tmp_path):
    good = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle"]
    (tmp_path / "p.txt").write_text("\n".join(good) + "\n")
    backend = vgpo.build_backend(
        vgpo.Config(model="shapes", shapes_weights=shapes_weights, prompt_file=str(tmp_path / "p.txt"))
    )
    assert sorted(backend.prompts(3, vgpo.make_generator(0, 1))) == sorted(good)  # distinct, from the file
    assert backend.eval_prompts(4) == [*good, good[0]]
    (tmp_path / "bad.txt").write_text("a photo of a red circle\na photo of a purple circle\n")
    with pytest.raises(vgpo.ConfigError, match="purple circle"):
        vgpo.build_backend(
            vgpo.Config(model="shapes", shapes_weights=shapes_weights, prompt_file=str(tmp_path / "bad.txt"))
        )


def test_shapes_prompts_list_feeds_training_and_evaluation_and_names_a_bad_prompt(shapes_weights):
    good = ["a photo of a red square", "a photo of two blue circles"]
    config = vgpo.Config(model="shapes", shapes_weights=shapes_weights, shapes_prompts=" ; ".join(good))
    backend = vgpo.build_backend(config)
    assert sorted(backend.prompts(2, vgpo.make_generator(0, 1))) == sorted(good)
    assert backend.eval_prompts(3) == [*good, good[0]]
    demo = vgpo.build_backend(vgpo.Config(model="shapes", shapes_weights=shapes_weights))  # the preset's prompts
    preset = set(backends.shapes_prompt_list(vgpo.PRESETS["shapes"]["shapes_prompts"]))
    assert len(preset) == 3 and set(demo.eval_prompts(9)) == preset >= set(demo.prompts(2, None))
    grammar = vgpo.build_backend(vgpo.Config(model="shapes", shapes_weights=shapes_weights, shapes_prompts="grammar"))
    assert len(set(grammar.eval_prompts(400))) > 100  # held-out prompts of every category
    with pytest.raises(vgpo.ConfigError, match="shapes_prompts.*purple circle"):
        vgpo.build_backend(
            vgpo.Config(model="shapes", shapes_weights=shapes_weights, shapes_prompts="a photo of a purple circle")
        )
    with pytest.raises(vgpo.ConfigError, match="shapes_prompts"):
        vgpo.Config(model="shapes", shapes_prompts=" ; ")


def test_student_t_matches_its_closed_forms_and_the_paired_test_its_definition():
    for t in (-3.0, -0.7, 0.0, 1.3, 6.0):  # df 1 (Cauchy) and df 2 have closed-form CDFs
        assert experiments.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-7)
        assert experiments.student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-7)
    assert experiments.student_t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-6)
    assert experiments.student_t_quantile(0.8, 2) == pytest.approx(0.6 / math.sqrt(0.5 * (1 - 0.36)), rel=1e-6)
    d = [0.1, 0.05, 0.12, 0.0, 0.08]
    test = experiments.paired_t(d)
    t = statistics.mean(d) / (statistics.stdev(d) / math.sqrt(5))
    assert test["p"] == pytest.approx(2 * (1 - experiments.student_t_cdf(t, 4)))
    assert 0.02 < test["p"] < 0.04  # t = 3.34 with 4 degrees of freedom: between t_0.975 and t_0.99
    mdd = (experiments.student_t_quantile(0.975, 4) + experiments.student_t_quantile(0.8, 4)) * test["se"]
    assert test["mdd"] == pytest.approx(mdd) and test["mdd"] == pytest.approx(3.717 * test["se"], rel=1e-3)


def test_demo_runs_pair_their_evaluations_resume_and_report(shapes_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the runs' checkpoints go to ./runs/shapes_demo
    fields = dict(shapes_weights=shapes_weights, eval_samples=6, group_size=2, num_steps=2, eval_steps=2)
    argv = ["demo", "--seeds", "1", "--iterations", "1", "--workers", "1", "--out", "out"]
    experiments.main([*argv, "--overrides", json.dumps(fields)])
    for method in ("GRPO", "VGPO"):
        run = json.loads((tmp_path / "out" / "demo_runs" / f"{method}_s0.json").read_text())
        before, after = run["history"][0]["eval_scores_before"], run["history"][-1]["eval_scores"]
        assert len(before) == len(after) == 6 and (run["gained"], run["lost"], run["p"]) == runs.mcnemar(before, after)
        prompts = backends.shapes_prompt_list(vgpo.PRESETS["shapes"]["shapes_prompts"])
        assert run["prompts"] == prompts and run["per_prompt"][prompts[1]][1] == statistics.mean(after[1::3])
        assert (tmp_path / "out" / "grids" / f"{method}_s0_after.png").exists()
    report = (tmp_path / "out" / "demo.md").read_text()
    assert report.count("| GRPO | 0 |") == report.count("| VGPO | 0 |") == 1 and "VGPO - GRPO, paired by seed" in report
    (tmp_path / "out" / "demo.md").unlink()
    experiments.main([*argv, "--overrides", json.dumps(fields)])  # finished runs are read, not rerun
    assert (tmp_path / "out" / "demo.md").read_text().splitlines()[2:] == report.splitlines()[2:]
    run = json.loads((tmp_path / "out" / "demo_runs" / "GRPO_s0.json").read_text())
    assert experiments.base_verdicts(run, 0) == run["history"][0]["eval_scores_before"]  # the run's own evaluation
    experiments.main(["demo_base_levels", "--seeds", "2", "--out", "out"])  # seed 0 read, seed 1 drawn
    levels = json.loads((tmp_path / "out" / "base_levels.json").read_text())
    assert levels["0"] == run["history"][0]["eval_scores_before"] and levels["1"] == experiments.base_verdicts(run, 1)
    assert "on 1 df, p = " in (tmp_path / "out" / "base_levels.md").read_text()


def test_chi2_sf_against_closed_forms():
    for x in (0.1, 1.0, 3.84, 10.0, 30.0):  # 2 df: exp(-x/2); 1 df: erfc(sqrt(x/2)); 4 df: (1 + x/2) exp(-x/2)
        assert experiments.chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-9, abs=1e-15)
        assert experiments.chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9, abs=1e-15)
        assert experiments.chi2_sf(x, 4) == pytest.approx((1 + x / 2) * math.exp(-x / 2), rel=1e-9, abs=1e-15)
    assert experiments.chi2_sf(0.0, 3) == 1.0 and experiments.chi2_sf(3.84, 1) == pytest.approx(0.05, abs=1e-3)


def test_grammar_runs_record_categories_and_their_pictures_draw_again(shapes_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the runs' checkpoints go to ./runs/shapes/out
    fields = dict(shapes_weights=shapes_weights, eval_samples=8, group_size=2, prompts_per_iteration=4, num_steps=2,
                  eval_steps=2, iterations=1)  # fmt: skip
    experiments.main(["shapes", "--methods", "GRPO,VGPO", "--seeds", "1", "--workers", "1", "--out", "out",
                      "--overrides", json.dumps(fields)])  # fmt: skip
    run = json.loads((tmp_path / "out" / "shapes_runs" / "score_VGPO_s0.json").read_text())
    assert run["eval_prompts"] == experiments.grammar_eval_prompts(8) and run["overrides"] == fields
    last = run["history"][-1]["eval_scores"]  # the final ODE numbers are the last evaluation's, per category
    assert run["final"]["ode"] == pytest.approx(statistics.mean(last))
    assert run["final"]["ode_by_category"]["counting"] == pytest.approx(statistics.mean(last[1::4]))
    assert set(run["final"]["sde10_by_category"]) == set(shapes.CATEGORIES)
    assert all((tmp_path / "out" / "grids" / f"score_{m}_s0_{tag}.png").exists() for m in ("GRPO", "VGPO")
               for tag in ("before", "after"))  # fmt: skip
    experiments.main(["shapes_curves", "--seeds", "1", "--out", "out"])
    assert "| VGPO - GRPO | 1 | 1 |" in (tmp_path / "out" / "shapes_curves.md").read_text()
    loaded, load_lora = [], runs.load_lora
    monkeypatch.setattr(runs, "load_lora", lambda backend, path: (loaded.append(path), load_lora(backend, path)))
    shapes_labels.main(["trained", "--grammar", "out", "--seeds", "1", "--per_run", "8", "--out", "labels"])
    out = capsys.readouterr().out  # 8: the run's evaluation chunk, the same batch shape, so the same pictures
    assert "strict verdicts differing from the runs' records: 0" in out
    drawn = json.loads((tmp_path / "labels" / "samples.json").read_text())
    assert sorted((r["source"], r["category"]) for r in drawn) == sorted(
        (s, c) for s in ("base", "GRPO", "VGPO") for c in shapes.CATEGORIES for _ in range(2)
    )
    os.rename(tmp_path / "runs", tmp_path / "gone")  # a fresh checkout: only the committed float16 LoRAs are left
    shapes_labels.main(["trained", "--grammar", "out", "--seeds", "1", "--per_run", "8", "--out", "again"])
    assert "strict verdicts differing from the runs' records: " in capsys.readouterr().out
    assert json.loads((tmp_path / "again" / "samples.json").read_text()) == drawn  # the same pictures, in order
    first, again = (np.load(tmp_path / d / "images.npz")["images"].astype(float) for d in ("labels", "again"))
    trained_ = np.array([r["source"] != "base" for r in drawn])
    assert np.array_equal(first[~trained_], again[~trained_])  # the base is drawn without a LoRA
    assert np.abs(first[trained_] - again[trained_]).mean() < 0.5  # float16 LoRA: at most a rare level off (0 here)
    assert loaded[:2] == [
        os.path.join("runs", "shapes", "out", f"score_{m}_s0", "checkpoint.pt") for m in ("GRPO", "VGPO")
    ]
    assert loaded[2:] == [
        os.path.join("out", "shapes_runs", f"score_{m}_s0.lora.safetensors") for m in ("GRPO", "VGPO")
    ]
    (tmp_path / "out" / "shapes_runs" / "score_VGPO_s0.lora.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="score_VGPO_s0.lora.safetensors"):
        shapes_labels.main(["trained", "--grammar", "out", "--seeds", "1", "--per_run", "8", "--out", "third"])


def test_evaluated_runs_read_a_finished_runs_record_where_its_directory_is_gone(tmp_path):
    # runs/ is not committed: on a fresh checkout the curves must come from the records OUT/*_runs/NAME.json
    root, records = tmp_path / "runs", tmp_path / "records"
    (root / "GRPO_s0").mkdir(parents=True)
    records.mkdir()
    running = [{"iteration": 0, "eval_scores_before": [1, 0]}, {"iteration": 1, "eval_scores": [1, 1]}]
    (root / "GRPO_s0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in running))
    (root / "VGPO_s2").mkdir()  # a run directory without metrics yet: skipped
    stale = [{"iteration": 0, "eval_scores_before": [0, 0]}]  # GRPO_s0's record: its directory wins
    (records / "GRPO_s0.json").write_text(json.dumps({"history": stale}))
    finished = [{"iteration": 0, "eval_scores_before": [0, 1]}, {"iteration": 1, "eval_scores": [1, 1]}]
    (records / "anchor_only_s1.json").write_text(json.dumps({"history": finished}))
    (records / "anchor_only_s1.lora.safetensors").write_bytes(b"")  # not a record
    (records / "VGPO_s5.json").write_text(json.dumps({"history": finished}))  # seed 5: not below 3
    got = list(experiments.evaluated_runs(str(root), 3, str(records)))
    assert got == [("GRPO", 0, running), ("anchor_only", 1, finished)]
    assert [n for n, _, _ in experiments.evaluated_runs(str(root), 3)] == ["GRPO"]  # no records given


def test_demo_curves_read_running_runs_keep_an_iterations_last_record_and_pair_each_evaluation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = [0, 0, 0, 1, 1, 0]
    later = {0: {2: [1, 1, 0, 1, 1, 0], 4: [1, 1, 1, 1, 0, 0]}, 1: {2: [1, 0, 0, 1, 1, 0]}}  # seed 1 still running
    vgpo_later = {0: {2: [1, 1, 1, 1, 1, 0]}, 1: {2: [1, 1, 1, 1, 1, 1]}}  # VGPO - GRPO at 2: +1/6, +3/6
    anchor_later = {0: {2: [0, 1, 1, 1, 0, 0]}}  # an ablation on one seed: anchor only - GRPO at 2: -1/6
    runs_ = [(("GRPO", s), e) for s, e in later.items()] + [(("VGPO", s), e) for s, e in vgpo_later.items()]
    runs_ += [(("anchor_only", s), e) for s, e in anchor_later.items()]
    for (method, seed), evals in runs_:
        run = tmp_path / "runs" / "shapes_demo" / "out" / f"{method}_s{seed}"
        run.mkdir(parents=True)
        lines = []
        for it in range(4 if seed == 0 else 2):
            record = {"iteration": it, "seconds": 30.0, "reward_mean": 0.1 * it}
            if it == 0:
                record |= {"eval_scores_before": before, "eval_reward_before": statistics.mean(before)}
            if it + 1 in evals:
                record |= {"eval_scores": evals[it + 1], "eval_reward": statistics.mean(evals[it + 1])}
            lines.append(record)
        if seed == 0:  # iterations 1 and 2 logged twice (vgpo.train rewrites on resume; a file appended by hand)
            lines[1:1] = [{"iteration": it, "seconds": 99.0, "reward_mean": 9.0} for it in (1, 2)]
        run.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    experiments.main(["demo_curves", "--out", "out", "--threshold", "0.6"])
    text = (tmp_path / "out" / "curves.md").read_text()
    assert (tmp_path / "out" / "curves.png").exists()
    # iteration 2: both seeds, 4/6 and 3/6 -> mean 0.583, s.e. 0.083; 3 gained 0 lost in all; seed 0 read from
    # each iteration's last record (30 s, not 99 s: 2 iterations, 1 min); rollouts' graded score (0 + 0.1) / 2
    assert "| GRPO | 2 | 2 | 1 | 0.583 ± 0.083 | 3 / 0 | 0 of 2 | 0.050 |" in text
    gained, lost, _ = runs.mcnemar(before, later[0][4])
    assert (gained, lost) == (3, 1) and "| GRPO | 4 | 1 | 2 | 0.667 ± nan | 3 / 1 | 0 of 1 | 0.250 |" in text
    assert "GRPO: mean strict accuracy 0.6 first reached at iteration 4" in text
    assert "VGPO: mean strict accuracy 0.6 first reached at iteration 2" in text  # (5/6 + 6/6) / 2
    # paired by seed at iteration 2: +1/6, +3/6 -> mean 1/3, s.e. 1/6, t = 2 on 1 df (Cauchy): p = 1 - 2 atan(2) / pi
    # = 0.295; detectable (t_0.975 + t_0.8) s.e. = (tan(0.475 pi) + tan(0.3 pi)) / 6 = 2.347
    assert "| 2 | 2 | +0.167 / +0.500 | +0.333 ± 0.167 | 0.3 | 2.347 |" in text
    vgpo_table, anchor_table = text.split("VGPO - GRPO, paired by seed")[1].split("anchor only - GRPO, paired by seed")
    assert "| 2 | 1 | -0.167 | -0.167 ± nan | nan | nan |" in anchor_table and "-0.167" not in vgpo_table
    assert "Paired tests on fewer than 4 seeds (here as few as 2)" in anchor_table  # the one seed's row has no test
    experiments.main(["demo_curves", "--out", "out", "--threshold", "0.95"])
    text = (tmp_path / "out" / "curves.md").read_text()
    assert "GRPO: mean strict accuracy 0.95 not reached by iteration 4" in text
    assert "VGPO: mean strict accuracy 0.95 not reached by iteration 2" in text


def test_demo_report_pairs_each_method_with_grpo_by_seed(tmp_path):
    (tmp_path / "demo_runs").mkdir()
    afters = {"GRPO": [0.5, 0.25, 0.5], "TCRM": [0.75, 0.25], "VGPO": [0.75, 0.5, 1.0]}  # TCRM: seeds 0, 1 only
    for method, values in afters.items():
        for seed, after in enumerate(values):
            h = {"seconds": 30.0, "reward_mean": 0.5, "zero_std_pass": 0.0, "zero_std_fail": 0.0,
                 "eval_scores_before": [0, 1, 0, 0]}  # fmt: skip
            record = dict(method=method, seed=seed, overrides={}, iterations=1, prompts=["p"], before=0.25,
                          after=after, gained=1, lost=0, p=1.0, per_prompt={"p": [0.25, after]}, history=[h],
                          wall_s=60.0)  # fmt: skip
            (tmp_path / "demo_runs" / f"{method}_s{seed}.json").write_text(json.dumps(record))
    experiments.demo_report(argparse.Namespace(out=str(tmp_path)))
    text = (tmp_path / "demo.md").read_text()
    # VGPO - GRPO: +0.25, +0.25, +0.5: mean 1/3, s.e. (0.25 / sqrt(3)) / sqrt(3) = 1/12, t = 4 on 2 df:
    # p = 1 - t / sqrt(2 + t^2) = 0.057 (Student's t with 2 df in closed form)
    assert "- VGPO - GRPO, paired by seed (3 seeds): +0.333 ± 0.083, paired t-test p = 0.057" in text
    assert "- TCRM - GRPO, paired by seed (2 seeds): +0.125 ± 0.125, paired t-test p = 0.5" in text  # t = 1, 1 df
    assert "- VGPO - TCRM" not in text and "- GRPO: significant rises in 0 of 3 seeds" in text
    assert "Paired tests on fewer than 4 seeds (here as few as 2): the s.e. rests on 1 degree(s)" in text


def test_shapes_curves_split_categories_average_them_and_pair_each_method_with_grpo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = experiments.grammar_eval_prompts(8)  # the backend's order: one of each category, twice
    assert [shapes.parse_prompt(p)[0] for p in prompts] == list(shapes.CATEGORIES) * 2
    before = [1, 0, 0, 0, 1, 1, 0, 0]  # single 1, counting 1/2, two objects 0, position 0: overall 0.375
    after = {("GRPO", 0): [1, 1, 0, 0, 1, 1, 1, 0], ("VGPO", 0): [1, 1, 1, 1, 1, 1, 1, 0],  # 0.625, 0.875
             ("GRPO", 1): before, ("VGPO", 1): [1, 1, 0, 0, 1, 1, 0, 0], ("anchor_only", 0): before}  # fmt: skip
    for (method, seed), scores in after.items():
        run = tmp_path / "runs" / "shapes" / "out" / f"score_{method}_s{seed}"
        run.mkdir(parents=True)
        lines = [
            {"iteration": 0, "seconds": 30.0, "zero_std_pass": 0.5, "zero_std_fail": 0.25,
             "eval_scores_before": before, "eval_reward_before": statistics.mean(before)},
            {"iteration": 1, "seconds": 30.0, "zero_std_pass": 0.25, "zero_std_fail": 0.25,
             "eval_scores": scores, "eval_reward": statistics.mean(scores)},
        ]  # fmt: skip
        run.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    experiments.main(["shapes_curves", "--out", "out", "--threshold", "0.6"])
    text = (tmp_path / "out" / "shapes_curves.md").read_text()
    assert (tmp_path / "out" / "shapes_curves.png").exists()
    # GRPO at 2: overall (0.625 + 0.375) / 2 ± 0.125; counting (1 + 1/2) / 2, two objects (1/2 + 0) / 2; seed 0
    # gained indices 1 and 6 (McNemar p 0.5: no rise); groups all pass / all fail since before: 0.375 / 0.25
    assert ("| GRPO | 2 | 2 | 1 | 0.500 ± 0.125 | 1.000 ± 0.000 | 0.750 ± 0.250 | 0.250 ± 0.250 | 0.000 ± 0.000 "
            "| 2 / 0 | 0 of 2 | 0.375 / 0.250 |") in text  # fmt: skip
    assert "| GRPO | 0 | 2 | 0 | 0.375 ± 0.000 |" in text
    lines = text.splitlines()  # each table's header and rule have the same columns
    heads = [i for i, line in enumerate(lines) if line.startswith("| method")]
    assert len(heads) == 2 and all(lines[i].count("|") == lines[i + 1].count("|") for i in heads)
    assert "GRPO: mean overall strict accuracy 0.6 not reached by iteration 2" in text
    assert "VGPO: mean overall strict accuracy 0.6 first reached at iteration 2" in text  # (0.875 + 0.5) / 2
    # VGPO - GRPO: +0.25, +0.125 -> 0.1875 ± 0.0625, t = 3 on 1 df: p = 1 - 2 atan(3) / pi = 0.205; per category
    # the mean differences 0, 1/4, 1/4, 1/4 (their mean is the overall's)
    assert "| VGPO - GRPO | 2 | 2 | +0.250 / +0.125 | +0.188 ± 0.062 | 0.2 |" in text
    assert text.split("| VGPO - GRPO | 2 |")[1].split("\n")[0].endswith("| +0.000 | +0.250 | +0.250 | +0.250 |")
    assert "| anchor only - GRPO | 2 | 1 | -0.250 | -0.250 ± nan | nan |" in text  # one seed (0.375 - 0.625): no test
    assert "Paired tests on fewer than 4 seeds (here as few as 2)" in text
    experiments.main(["shapes_curves", "--out", "out", "--seeds", "1"])  # seed 0 only
    text = (tmp_path / "out" / "shapes_curves.md").read_text()
    assert "| GRPO | 2 | 1 | 1 | 0.625 ± nan |" in text and "Paired tests on fewer" not in text  # no test, no warning


def test_few_seeds_note_warns_only_where_a_paired_test_rests_on_two_or_three_seeds():
    assert experiments.few_seeds_note([5, 4]) == [] and experiments.few_seeds_note([1, 1]) == []
    (note,) = experiments.few_seeds_note([5, 3, 1])  # the one-seed row has no test; the three-seed row is the fewest
    assert "as few as 3" in note and "2 degree(s) of freedom" in note


def test_trained_report_pairs_each_policys_picture_with_the_bases_and_counts_the_reward_against_the_labels(
    tmp_path,
):
    prompt, rng = "a photo of a red circle and a blue triangle", np.random.default_rng(0)
    good = shapes.render(shapes.parse_prompt(prompt)[1], 32, rng, background=(255, 255, 255))  # the reward passes
    blank = np.full((32, 32, 3), 255, np.uint8)  # the reward fails
    # (source, index, picture, label): GRPO gains index 0 and 1 by the labels and loses index 2
    rows = [("base", 0, blank, False), ("base", 1, good, False), ("base", 2, good, True), ("base", 3, good, True)]
    rows += [("GRPO", 0, good, True), ("GRPO", 1, blank, True), ("GRPO", 2, blank, False), ("GRPO", 3, good, True)]
    rows += [("anchor only", 2, good, False)]  # an ablation labelled on one picture: lost by the labels
    records = [dict(id=k, prompt=prompt, category="two objects", source=s, seed=0, index=i, split="test")
               for k, (s, i, _, _) in enumerate(rows)]  # fmt: skip
    records[3]["category"] = records[7]["category"] = "single object"  # index 3 counted apart (prompt unchanged)
    np.savez_compressed(tmp_path / "images.npz", images=np.stack([r[2] for r in rows]))
    (tmp_path / "samples.json").write_text(json.dumps(records))
    labels = {str(k): dict(label=r[3], confidence="sure", reason="") for k, r in enumerate(rows)}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    shapes_labels.main(["trained_report", "--out", str(tmp_path)])
    text = (tmp_path / "trained.md").read_text()
    assert "| base | 4 | 0.500 | 0.750 | 0.750 |" in text  # one false pass (index 1)
    assert "| GRPO | 4 | 0.750 | 0.500 | 0.750 | 0.50 | 0 | 1 |" in text  # one miss (index 1)
    assert "VGPO" not in text  # no pictures of it
    assert "| anchor only | 1 | 0.000 | 1.000 | 0.000 |" in text and text.index("| base |") < text.index("| GRPO |")
    assert "anchor only, by the labels, on 1 paired pictures: 1.000 -> 0.000 (0 gained, 1 lost" in text
    # per category (the grammar's order), labels / reward: base index 0-2 labels F F T, reward F T T; GRPO T T F, T F F
    assert "| pictures of | single object | two objects |" in text
    assert "| base | 1.00 / 1.00 (1) | 0.33 / 0.67 (3) |" in text
    assert "| GRPO | 1.00 / 1.00 (1) | 0.67 / 0.33 (3) |" in text
    assert "| anchor only | - | 0.00 / 1.00 (1) |" in text  # no single-object picture of it
    assert (
        "GRPO, by the labels, on 4 paired pictures: 0.500 -> 0.750 (2 gained, 1 lost, McNemar exact p = 1); "
        "seed 0: 0.500 -> 0.750, p = 1" in text
    )


def test_trained_report_pairs_methods_with_each_other_on_the_pictures_both_were_labelled_on(tmp_path):
    # (source, seed, index, label). GRPO against TCRM on (seed, index): (0,0) F/T, (0,1) F/T, (0,2) T/T, (0,3) F/F,
    # (1,0) F/T; TCRM's (1,1) has no GRPO picture. So 5 pairs, GRPO 1/5, TCRM 4/5, TCRM alone passes 3, GRPO
    # alone 0: exact McNemar two-sided p = 2 * 0.5**3 = 0.25.
    rows = [("base", 0, i, False) for i in range(4)]
    rows += [("GRPO", 0, 0, False), ("GRPO", 0, 1, False), ("GRPO", 0, 2, True), ("GRPO", 0, 3, False)]
    rows += [("GRPO", 1, 0, False), ("TCRM", 1, 1, True), ("TCRM", 1, 0, True)]
    rows += [("TCRM", 0, 0, True), ("TCRM", 0, 1, True), ("TCRM", 0, 2, True), ("TCRM", 0, 3, False)]
    prompt = "a photo of a red circle and a blue triangle"
    records = [dict(id=k, prompt=prompt, category="two objects", source=src, seed=s, index=i, split="test")
               for k, (src, s, i, _) in enumerate(rows)]  # fmt: skip
    np.savez_compressed(tmp_path / "images.npz", images=np.full((len(rows), 32, 32, 3), 255, np.uint8))
    (tmp_path / "samples.json").write_text(json.dumps(records))
    labels = {str(k): dict(label=r[3], confidence="sure", reason="") for k, r in enumerate(rows)}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    shapes_labels.main(["trained_report", "--out", str(tmp_path)])
    text = (tmp_path / "trained.md").read_text()
    assert (
        "- TCRM against GRPO, by the labels, on the same 5 pictures (seed, prompt and noise): 0.200 (GRPO) against "
        "0.800 (TCRM); TCRM alone passes 3, GRPO alone 0 (McNemar exact p = 0.25)" in text
    )
    assert "against base" not in text  # the base is paired in its own lines (before -> after)
    assert "TCRM, by the labels, on 4 paired pictures: 0.000 -> 0.750" in text  # seed 0 only: the base's pictures


def test_shipped_shapes_weights_reach_the_stated_base_accuracy():
    # RESULTS.md, "The base model draws shapes": on 128 held-out samples per category the shipped
    # weights reach 0.98 / 0.51 / 0.22 / 0.11 (reward v3). Here 8 per category at seed 0: each count must lie
    # in the central 99.8 % of Binomial(8, stated rate) (this machine: 8 / 4 / 3 / 3)
    unet, encoder = shapes_model.load(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_base.safetensors")
    )
    accuracy = shapes_model.evaluate(unet, encoder, per_category=8, steps=20)
    stated = {"single object": 0.98, "counting": 0.51, "two objects": 0.22, "position": 0.11}
    central = lambda pmf: (int(np.searchsorted(np.cumsum(pmf), 0.001)), int(np.searchsorted(np.cumsum(pmf), 0.999)))  # noqa: E731
    total = np.ones(1)  # the pmf of the four categories' summed count: the binomials convolved
    for category, rate in stated.items():
        pmf = np.array([math.comb(8, j) * rate**j * (1 - rate) ** (8 - j) for j in range(9)])
        low, high = central(pmf)  # counting's is every count: 8 samples cannot test a rate near 0.5 alone
        assert low <= round(accuracy[category] * 8) <= high, (category, accuracy, low, high)
        total = np.convolve(total, pmf)
    low, high = central(total)  # 9 .. 21 of 32
    assert low <= sum(round(accuracy[c] * 8) for c in stated) <= high, (accuracy, low, high)
