"""Experiments and benchmarks beside vgpo.py: measurements that write results, not tests.

    python experiments.py methods     # GRPO vs each part of VGPO vs VGPO on the CPU toy, over seeds
    python experiments.py sweep       # kappa x gamma on the saturating toy reward
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
        "| setting | method | final eval reward (ODE) | iters to rollout reward "
        f"{THRESHOLD} (runs reaching it) | zero_std_ratio | s / iter |",
        "|---|---|---|---|---|---|",
    ]
    for setting in dict.fromkeys(r["setting"] for r in runs):
        for method in dict.fromkeys(r["method"] for r in runs):
            rs = [r for r in runs if r["setting"] == setting and r["method"] == method]
            reached = [r["iters_to_threshold"] for r in rs]
            hits = sum(x is not None for x in reached)
            rows.append(
                f"| {setting} | {method} | {mean_std(r['eval_after'] for r in rs)} | "
                f"{mean_std(reached)} ({hits}/{len(rs)}) | {mean_std(r['zero_std_ratio'] for r in rs)} | "
                f"{statistics.mean(r['sec_per_iter'] for r in rs):.3f} |"
            )
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
    """Counts and seconds of one training iteration (after one warm-up iteration)."""
    backend = CountingBackend(vgpo.build_backend(config))
    reward = backend.counted_reward(vgpo.checked_reward(backend.default_reward(), config.reward))
    optimizer = torch.optim.AdamW(backend.parameters(), lr=config.lr)
    sigmas = backend.sigmas(config.num_steps)
    vgpo.train_iteration(backend, reward, optimizer, sigmas, config, 0)  # warm-up
    backend.calls = dict.fromkeys(backend.calls, 0)
    backend.seconds = dict.fromkeys(backend.seconds, 0.0)
    total = sum(
        vgpo.train_iteration(backend, reward, optimizer, sigmas, config, i + 1)["seconds"] for i in range(repeats)
    )
    per = {f"{k}_calls": v / repeats for k, v in backend.calls.items()}
    per |= {f"{k}_s": v / repeats for k, v in backend.seconds.items()}
    return {**per, "iteration_s": total / repeats}


def benchmark(args) -> None:
    base = dict(vgpo.PRESETS["tiny"], model="tiny", resolution=args.resolution)
    rows = [
        "| method | s / iteration | transformer calls | VAE decodes | reward calls | "
        "s in transformer calls | s in decodes | s in rewards |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, overrides in (("GRPO", METHODS["GRPO"]), ("VGPO", METHODS["VGPO"])):
        r = benchmark_iteration(vgpo.Config(**{**base, **overrides, "reward": args.reward}), args.repeats)
        rows.append(
            f"| {name} | {r['iteration_s']:.3f} | {r['velocity_calls']:.0f} | {r['decode_calls']:.0f} | "
            f"{r['reward_calls']:.0f} | {r['velocity_s']:.3f} | {r['decode_s']:.3f} | {r['reward_s']:.3f} |"
        )
    c = vgpo.Config(**base)
    command = f"python experiments.py benchmark --reward {args.reward} --resolution {args.resolution}"
    text = (
        f"`{command}` (tiny SD3 pipeline, CPU, {c.prompts_per_iteration} prompts x {c.group_size} samples, "
        f"T = {c.num_steps}, {c.num_minibatches} minibatches, mean of {args.repeats} iterations). "
        "Transformer calls count guided forwards (each a batched cond + uncond pass): rollout T, "
        "training 2 per trained step and minibatch (policy + reference).\n\n" + "\n".join(rows) + "\n"
    )
    with open(os.path.join(args.out, f"benchmark_{args.reward}.md"), "w") as f:
        f.write(text)
    print(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["methods", "sweep", "benchmark"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=vgpo.PRESETS["toy"]["iterations"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", default="", help="methods: a comma-separated subset of METHODS")
    parser.add_argument("--kappa", type=float, default=None, help="methods: kappa of the methods with an anchor")
    parser.add_argument("--reward", default="jpeg_compressibility", help="benchmark: an image reward")
    parser.add_argument("--resolution", type=int, default=32, help="benchmark: image side")
    parser.add_argument("--repeats", type=int, default=3, help="benchmark: timed iterations")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    {"methods": methods, "sweep": sweep, "benchmark": benchmark}[args.what](args)


if __name__ == "__main__":
    main()
