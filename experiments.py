"""Experiments and benchmarks beside vgpo.py: measurements that write results, not tests.

    python experiments.py methods     # GRPO vs each part of VGPO vs VGPO on the CPU toy, over seeds
    python experiments.py sweep       # kappa x gamma on a continuous and the saturating toy reward
    python experiments.py diagnostics # training diagnostics by phase: why dense values plateau
    python experiments.py reward_cost # milliseconds per image of the offline rewards
    python experiments.py benchmark   # one GRPO and one VGPO iteration on the tiny SD3 pipeline

Each writes markdown (and a PNG for `methods`) into --out (default results/).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import time
from multiprocessing import Pool

import torch

import vgpo

# The five methods: each part of VGPO switched on alone. "weights only" scales GRPO's terminal
# advantage by TCRM's Eq. 11 weights; "anchor only" adds the anchor to GRPO (Q_k = R_T).
METHODS = {
    "GRPO": dict(dense_values=False, kappa=0.0, weighting="off"),
    "weights only": dict(dense_values=False, kappa=0.0, weighting="on"),
    "TCRM": dict(dense_values=True, kappa=0.0, weighting="on"),
    "anchor only": dict(dense_values=False, kappa=1.0, weighting="off"),
    "VGPO": dict(dense_values=True, kappa=1.0, weighting="on"),
}
SETTINGS = {
    "continuous, 4 modes": dict(reward="toy_mode"),
    "saturating, 4 modes": dict(reward="toy_region"),
    "continuous, 1 broad mode": dict(reward="toy_mode", toy_modes=1, toy_spread=1.0),
}
THRESHOLD = 0.7  # rollout reward that counts as "reached"


def run_one(job: tuple) -> dict:
    """One training run, quiet; returns its reward curve and summary numbers."""
    setting, method, seed, overrides = job
    torch.set_num_threads(1)  # two runs in parallel on two cores
    config = vgpo.toy_config(**{**SETTINGS[setting], **METHODS[method], "seed": seed, **overrides})
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        history = vgpo.train(config)
    curve = [h["reward_mean"] for h in history]
    reached = next((i + 1 for i, r in enumerate(curve) if r >= THRESHOLD), None)
    return {
        "setting": setting,
        "method": method,
        "seed": seed,
        **overrides,
        "curve": curve,
        "eval_before": history[0]["eval_reward_before"],
        "eval_after": history[-1]["eval_reward"],
        "iters_to_threshold": reached,
        "zero_std_ratio": statistics.mean(h["zero_std_ratio"] for h in history),
        "sec_per_iter": statistics.mean(h["seconds"] for h in history),
    }


def run_all(jobs: list, workers: int) -> list[dict]:
    from tqdm import tqdm

    with Pool(workers) as pool:
        return list(tqdm(pool.imap(run_one, jobs), total=len(jobs), desc="runs"))


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "never"
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def methods_table(runs: list[dict]) -> str:
    """Markdown: per setting and method, mean ± std over seeds."""
    rows = [
        "| setting | method | final eval reward (ODE) | final rollout reward (SDE, last 10 it.) | iters to rollout "
        f"reward {THRESHOLD} (runs reaching it) | zero_std_ratio | s / iter |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting in dict.fromkeys(r["setting"] for r in runs):
        for method in dict.fromkeys(r["method"] for r in runs):
            rs = [r for r in runs if r["setting"] == setting and r["method"] == method]
            reached = [r["iters_to_threshold"] for r in rs]
            hits = sum(x is not None for x in reached)
            cells = [
                mean_std(r["eval_after"] for r in rs),
                mean_std(statistics.mean(r["curve"][-10:]) for r in rs),
                f"{mean_std(reached)} ({hits}/{len(rs)})",
                mean_std(r["zero_std_ratio"] for r in rs),
                f"{statistics.mean(r['sec_per_iter'] for r in rs):.3f}",
            ]
            rows.append(f"| {setting} | {method} | " + " | ".join(cells) + " |")
    before = {s: mean_std(r["eval_before"] for r in runs if r["setting"] == s) for s in SETTINGS}
    notes = "; ".join(f"{s}: {b}" for s, b in before.items() if b != "never")
    return "\n".join(rows) + f"\n\nPretrained policy (before training), eval reward: {notes}.\n"


def methods_figure(runs: list[dict], path: str) -> None:
    """Rollout reward vs iteration, mean and ± std band over seeds; one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in runs))
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 3.8), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        for method in dict.fromkeys(r["method"] for r in runs):
            curves = torch.tensor([r["curve"] for r in runs if r["setting"] == setting and r["method"] == method])
            mean, std = curves.mean(0), curves.std(0, correction=0)
            x = torch.arange(1, len(mean) + 1)
            ax.plot(x, mean, label=method, lw=1.5)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
        ax.set(title=setting, xlabel="iteration", ylabel="rollout reward (SDE)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def methods(args) -> None:
    names = args.methods.split(",") if args.methods else list(METHODS)
    anchor = {"kappa": args.kappa} if args.kappa is not None else {}  # only for methods with an anchor
    jobs = [
        (s, m, seed, {"iterations": args.iterations, **(anchor if METHODS[m]["kappa"] else {})})
        for s in SETTINGS
        for m in names
        for seed in range(args.seeds)
    ]
    start = time.perf_counter()
    runs = run_all(jobs, args.workers)
    wall = time.perf_counter() - start
    command = f"python experiments.py methods --seeds {args.seeds} --iterations {args.iterations}"
    stem = "toy_methods"
    if args.methods:
        command, stem = command + f" --methods '{args.methods}'", stem + "_" + args.methods.replace(" ", "_")
    if anchor:
        command, stem = command + f" --kappa {args.kappa}", stem + f"_kappa{args.kappa}"
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(runs, f)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(f"`{command}`: {len(jobs)} runs, {wall:.0f} s wall on {args.workers} CPU workers.\n\n")
        f.write(methods_table(runs))
    methods_figure(runs, os.path.join(args.out, f"{stem}.png"))
    print(open(os.path.join(args.out, f"{stem}.md")).read())


def sweep(args) -> None:
    """kappa x gamma for VGPO on a continuous and on the saturating reward."""
    kappas, gammas, settings = [0.0, 0.5, 1.0, 2.0], [0.5, 0.9, 0.99], ["continuous, 4 modes", "saturating, 4 modes"]
    jobs = [
        (s, "VGPO", seed, {"iterations": args.iterations, "kappa": k, "gamma": g})
        for s in settings
        for k in kappas
        for g in gammas
        for seed in range(args.seeds)
    ]
    start = time.perf_counter()
    runs = run_all(jobs, args.workers)
    command = f"python experiments.py sweep --seeds {args.seeds} --iterations {args.iterations}"
    text = (
        f"`{command}`: final eval reward (ODE) of VGPO, mean ± std over {args.seeds} seeds; "
        f"{time.perf_counter() - start:.0f} s wall on {args.workers} CPU workers.\n"
    )
    for s in settings:
        rows = [f"| {s}: kappa \\ gamma | " + " | ".join(map(str, gammas)) + " |", "|---" * (len(gammas) + 1) + "|"]
        for k in kappas:
            cells = [
                mean_std(r["eval_after"] for r in runs if (r["setting"], r["kappa"], r["gamma"]) == (s, k, g))
                for g in gammas
            ]
            rows.append(f"| {k} | " + " | ".join(cells) + " |")
        text += "\n" + "\n".join(rows) + "\n"
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(text)
    print(text)


def diagnostics(args) -> None:
    """Why dense values plateau: training diagnostics by phase, saturating reward, seed 0."""
    keys = ("reward_mean", "zero_std_ratio", "adv_rel_abs", "adv_anchor_abs", "kl_ref", "clipfrac", "grad_norm")
    phases = [(0, 30), (30, 60), (100, args.iterations)]
    rows = ["| method | iterations | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for method in ("GRPO", "TCRM", "VGPO"):
        config = vgpo.toy_config(
            **{**SETTINGS["saturating, 4 modes"], **METHODS[method], "iterations": args.iterations}
        )
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            history = vgpo.train(config)
        for lo, hi in phases:
            means = [statistics.mean(h[k] for h in history[lo:hi]) for k in keys]
            rows.append(f"| {method} | {lo}-{hi} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    text = (
        f"`python experiments.py diagnostics --iterations {args.iterations}`: saturating toy reward, seed 0; "
        "means of the logged metrics over each span of iterations.\n\n" + "\n".join(rows) + "\n"
    )
    with open(os.path.join(args.out, "diagnostics.md"), "w") as f:
        f.write(text)
    print(text)


def render_text(text: str, size: int = 256) -> torch.Tensor:
    """Black text on white, drawn with PIL's default font: (3, size, size) in [0, 1]."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text((20, size // 2 - 28), text, fill="black", font=ImageFont.load_default(size=40))
    return torch.tensor(np.array(image)).permute(2, 0, 1).float() / 255  # (3, H, W)


def reward_cost(args) -> None:
    """Milliseconds per image of the offline rewards, on 8 images with rendered text per size."""
    import rewards

    rows = ["| reward | image side | ms / image | mean reward |", "|---|---|---|---|"]
    for name in rewards.OFFLINE_REWARDS:
        fn = rewards.load_reward(name)
        for size in (256, 512):
            images = torch.stack([render_text("HELLO", size) for _ in range(8)])  # (8, 3, S, S)
            fn(images[:1], ['"hello"'])  # warm-up
            start = time.perf_counter()
            scores = fn(images, ['a sign that says "hello"'] * 8)
            ms = (time.perf_counter() - start) / 8 * 1000
            rows.append(f"| {name} | {size} | {ms:.1f} | {scores.mean():.3f} |")
    text = "`python experiments.py reward_cost` (CPU):\n\n" + "\n".join(rows) + "\n"
    with open(os.path.join(args.out, "reward_cost.md"), "w") as f:
        f.write(text)
    print(text)


# ------------------------------------------------------------------------------------------------
# Benchmark: cost of one iteration, GRPO vs VGPO, on the tiny SD3 pipeline
# ------------------------------------------------------------------------------------------------


class CountingBackend:
    """Wraps a backend; counts and times velocity (transformer) and decode (VAE) calls."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = {"velocity": 0, "decode": 0, "reward": 0}
        self.seconds = {"velocity": 0.0, "decode": 0.0, "reward": 0.0}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _timed(self, name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.calls[name] += 1
        self.seconds[name] += time.perf_counter() - start
        return out

    def velocity(self, *args):
        return self._timed("velocity", self.inner.velocity, *args)

    def decode(self, x):
        return self._timed("decode", self.inner.decode, x)

    def counted_reward(self, reward_fn):
        return lambda images, prompts: self._timed("reward", reward_fn, images, prompts)


def benchmark_iteration(config: vgpo.Config, repeats: int) -> dict:
    """Counts and seconds of one training iteration (after one warm-up iteration), split into
    rollout (transformer, decodes, rewards) and update; peak GPU memory when on a GPU."""
    backend = CountingBackend(vgpo.build_backend(config))
    reward = backend.counted_reward(vgpo.checked_reward(backend.default_reward(), config.reward))
    optimizer = torch.optim.AdamW(backend.parameters(), lr=config.lr)
    sigmas, phases = backend.sigmas(config.num_steps), {"rollout": 0.0, "update": 0.0}
    originals = {"rollout": vgpo.rollout, "update": vgpo.policy_update}

    def timed(phase):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = originals[phase](*args, **kwargs)
            phases[phase] += time.perf_counter() - start
            return out

        return run

    vgpo.rollout, vgpo.policy_update = timed("rollout"), timed("update")  # train_iteration looks them up
    try:
        vgpo.train_iteration(backend, reward, optimizer, sigmas, config, 0)  # warm-up
        backend.calls, backend.seconds = dict.fromkeys(backend.calls, 0), dict.fromkeys(backend.seconds, 0.0)
        phases.update(rollout=0.0, update=0.0)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        its = [vgpo.train_iteration(backend, reward, optimizer, sigmas, config, i + 1) for i in range(repeats)]
    finally:
        vgpo.rollout, vgpo.policy_update = originals["rollout"], originals["update"]
    per = {f"{k}_calls": v / repeats for k, v in backend.calls.items()}
    per |= {f"{k}_s": v / repeats for k, v in {**backend.seconds, **phases}.items()}
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {**per, "iteration_s": sum(i["seconds"] for i in its) / repeats, "peak_gib": peak}


def benchmark(args) -> None:
    base = {**vgpo.PRESETS.get(args.model, {}), **vgpo.PRESETS.get(args.preset, {})}
    base |= dict(model=args.model, resolution=args.resolution, reward=args.reward)
    rows = [
        "| method | s / iteration | rollout s (transformer / decodes / rewards) | update s | transformer calls "
        "| VAE decodes | reward calls | peak GPU GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("GRPO", "VGPO"):
        r = benchmark_iteration(vgpo.Config(**{**base, **METHODS[name]}), args.repeats)
        split = f"{r['rollout_s'] - r['decode_s'] - r['reward_s']:.3f} / {r['decode_s']:.3f} / {r['reward_s']:.3f}"
        rows.append(
            f"| {name} | {r['iteration_s']:.3f} | {r['rollout_s']:.3f} ({split}) | {r['update_s']:.3f} "
            f"| {r['velocity_calls']:.0f} | {r['decode_calls']:.0f} | {r['reward_calls']:.0f} | {r['peak_gib']:.2f} |"
        )
    c = vgpo.Config(**base)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    command = (
        f"python experiments.py benchmark --model {args.model} --reward {args.reward} --resolution {args.resolution}"
    )
    command += f" --preset {args.preset}" if args.preset else ""
    text = (
        f"`{command}` ({device}; {c.prompts_per_iteration} prompts x {c.group_size} samples, T = {c.num_steps}, "
        f"{c.num_minibatches} minibatches, mean of {args.repeats} iterations after one warm-up). Transformer calls "
        "are guided forwards (cond + uncond batched): T in the rollout, then per trained step and minibatch one "
        "for the policy and one for the reference. Rollout transformer time includes the SDE steps.\n\n"
        + "\n".join(rows)
        + "\n"
    )
    stem = f"benchmark_{args.model}_{args.reward}" + (f"_{args.preset}" if args.preset else "")
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(text)
    print(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["methods", "sweep", "diagnostics", "reward_cost", "benchmark"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=vgpo.PRESETS["toy"]["iterations"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", default="", help="methods: a comma-separated subset of METHODS")
    parser.add_argument("--kappa", type=float, default=None, help="methods: kappa of the methods with an anchor")
    parser.add_argument("--reward", default="jpeg_compressibility", help="benchmark: an image reward")
    parser.add_argument("--model", default="tiny", help="benchmark: tiny, random-sd3.5-medium, or an SD3 id")
    parser.add_argument("--preset", default="", help="benchmark: a vgpo.PRESETS entry, e.g. small-gpu")
    parser.add_argument("--resolution", type=int, default=32, help="benchmark: image side")
    parser.add_argument("--repeats", type=int, default=3, help="benchmark: timed iterations")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    commands = dict(methods=methods, sweep=sweep, diagnostics=diagnostics, reward_cost=reward_cost, benchmark=benchmark)
    commands[args.what](args)


if __name__ == "__main__":
    main()
