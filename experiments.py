"""Experiments and benchmarks beside vgpo.py: measurements that write results, not tests.

    python experiments.py methods     # GRPO vs each part of VGPO vs VGPO on the CPU toy, over seeds
    python experiments.py sweep       # kappa x gamma on a continuous and the saturating toy reward
    python experiments.py diagnostics # training diagnostics by phase: why dense values plateau
    python experiments.py reward_cost # milliseconds per image of the offline rewards
    python experiments.py benchmark   # one GRPO and one VGPO iteration on the tiny SD3 pipeline
    python experiments.py overlap     # rewards scored inline vs in worker threads; OCR throughput
    python experiments.py gpu_check   # memory and time of the small-GPU preset (needs a GPU)
    python experiments.py curves DIR [DIR ...]  # training curves of runs, one PNG
    python experiments.py shapes        # GRPO vs each part of VGPO on the shapes benchmark, resumable
    python experiments.py shapes_report # its table and figure from the finished runs
    python experiments.py shapes_curves # per category and overall at every evaluation, mean +- s.e., paired
    python experiments.py shapes_grids  # base, GRPO and VGPO samples on the same prompts and noise
    python experiments.py shapes_failures # why the strict reward fails, before and after training
    python experiments.py demo          # the shapes demo over seeds, GRPO and VGPO: paired McNemar per run
    python experiments.py demo_report   # its table (demo.md), from the finished runs
    python experiments.py demo_curves   # strict accuracy at every evaluation, mean +- s.e. over seeds, paired
    python experiments.py demo_samplers # the demo's policies drawn as evaluated (ODE) and as trained (SDE)
    python experiments.py demo_base_levels # the base's evaluation accuracy at each seed's noise: binomial?
    python experiments.py trainer_check # does the shapes trainer raise a reward every pixel moves?
    python experiments.py noise_share   # how much of the graded score the SDE noise decides
    python experiments.py bf16          # the demo's iteration in float32 against bf16 autocast: time, ratio
    python experiments.py premise       # does the one-step projection predict the final reward?
    python experiments.py gradients     # do the groups' policy gradients share a direction?

Each writes markdown (and PNGs) into --out (default results/); `shapes` saves each finished run as
results/shapes_runs/NAME.json (with its LoRA) and skips those already there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import io
import itertools
import json
import math
import multiprocessing
import os
import statistics
import time
from functools import partial
from multiprocessing import Pool

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import save_file
from tqdm import tqdm

import backends
import rewards
import runs
import shapes
import vgpo

matplotlib.use("Agg")  # figures are files

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


def fresh_pool(workers: int):
    """A pool of spawned worker processes, one run each (maxtasksperchild=1): a worker forked from this
    process copies the locks its other threads hold at that moment (the pool's, tqdm's) and can hang on
    one (seen: `demo` replacing the workers of finished runs hung both new workers in their first
    iteration); a spawned worker imports this module anew."""
    return multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=1)


def run_all(jobs: list, workers: int) -> list[dict]:
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
    ema = {"ema": True} if args.ema else {}
    jobs = [
        (s, m, seed, {"iterations": args.iterations, **(anchor if METHODS[m]["kappa"] else {}), **ema})
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
    if ema:
        command, stem = command + " --ema", stem + "_ema"
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


# ------------------------------------------------------------------------------------------------
# Shapes (#13): GRPO vs each part of VGPO on images, TCRM's premise, step mismatch, collapse
# ------------------------------------------------------------------------------------------------

SHAPES_REWARDS = {"strict": "geneval_shapes", "score": "geneval_shapes_score"}  # evaluation, Flow-GRPO's training
# The benchmark: every category of the grammar, evaluated on held-out prompts (the shapes preset's
# demo trains and evaluates on one prompt instead)
SHAPES_BENCH = dict(model="shapes", shapes_prompts="grammar")


def shapes_fields(args) -> dict:
    """The benchmark's Config fields on --shapes_prompts (the grammar unless given)."""
    return dict(SHAPES_BENCH, shapes_prompts=args.shapes_prompts)


def shapes_final_evals(backend, config: vgpo.Config, strict, ode) -> dict:
    """The run's final policy on the held-out prompts and noise of its evaluations: strict accuracy
    of ODE samples (`ode`: the last evaluation's scores, not drawn again) and of SDE samples (the
    training sampler, num_steps: 10 in the preset, "sde10"), overall and per category."""
    prompts = backend.eval_prompts(config.eval_samples)
    ode = torch.as_tensor(ode, dtype=torch.float32)
    sigmas, gen = backend.sigmas(config.num_steps), vgpo.make_generator(config.seed, 2)
    sde = vgpo.rollout(backend, prompts, sigmas, config.noise_level, strict, gen, instant=False).rewards[:, -1]
    return {
        "ode": ode.mean().item(),
        "sde10": sde.mean().item(),
        "ode_by_category": category_means(ode.tolist(), prompts),
        "sde10_by_category": category_means(sde.tolist(), prompts),
    }


def category_means(scores, prompts) -> dict:
    """{category: mean score of its prompts' samples}, in the order the categories first appear."""
    return {
        c: statistics.mean(s for s, p in zip(scores, prompts, strict=True) if shapes_category(p) == c)
        for c in shapes_categories(prompts)
    }


def shapes_category(prompt: str) -> str:
    return shapes.parse_prompt(prompt)[0]


def shapes_categories(prompts) -> list:
    return list(dict.fromkeys(shapes_category(p) for p in prompts))


def shapes_run_name(reward: str, method: str, seed: int, overrides: dict) -> str:
    extra = "".join(f"_{k}{v}" for k, v in sorted(overrides.items()) if k in ("kappa", "gamma", "value_steps"))
    return f"{reward}_{runs.method_file_name(method)}{extra}_s{seed}"


def resumable_run(out: str, folder: str, runs_folder: str, name: str) -> tuple[dict | None, str, str]:
    """A resumable run's places: (its finished record OUT/folder/NAME.json if there, else None; its run
    directory runs/runs_folder/OUT/NAME; that directory to resume from when it holds a checkpoint, else "")."""
    path = os.path.join(out, folder, name + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f), "", ""
    run_dir = os.path.join("runs", runs_folder, os.path.basename(os.path.normpath(out)), name)
    return None, run_dir, run_dir if os.path.exists(os.path.join(run_dir, "checkpoint.pt")) else ""


def write_record(path: str, record: dict) -> dict:
    """A finished run's record, written atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
    return record


def shapes_run(job: tuple) -> dict:
    """One shapes training run, resumable: the finished run is results/shapes_runs/NAME.json (a rerun
    loads it); an unfinished one continues from runs/shapes/OUT/NAME/checkpoint.pt."""
    reward, method, seed, overrides, out, threads = job
    torch.set_num_threads(threads)
    name = shapes_run_name(reward, method, seed, overrides)
    path = os.path.join(out, "shapes_runs", name + ".json")
    finished, run_dir, resume = resumable_run(out, "shapes_runs", "shapes", name)
    if finished:
        return finished
    fields = {**METHODS[method], **overrides, "reward": SHAPES_REWARDS[reward], "eval_reward": "geneval_shapes"}
    config = vgpo.Config(**{**SHAPES_BENCH, **fields}, seed=seed, output_dir=run_dir, resume=resume)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        history = vgpo.train(config)
        backend, _, strict, optimizer = vgpo.setup(config)  # eval reward: geneval_shapes
        vgpo.load_checkpoint(os.path.join(run_dir, "checkpoint.pt"), backend, optimizer, config)
        finals = shapes_final_evals(backend, config, strict, history[-1]["eval_scores"])
        eval_prompts = backend.eval_prompts(config.eval_samples)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in runs.lora_state(backend).items()}, path[:-5] + ".lora.safetensors")
    os.makedirs(os.path.join(out, "grids"), exist_ok=True)  # the first evaluation pictures, before and after
    for tag, src in (("before", "samples_before.png"), ("after", f"samples_{config.iterations:05d}.png")):
        Image.open(os.path.join(run_dir, src)).save(os.path.join(out, "grids", f"{name}_{tag}.png"))
    record = {
        "reward": reward,
        "method": method,
        "seed": seed,
        **overrides,
        "iterations": config.iterations,
        "shapes_prompts": config.shapes_prompts,
        "overrides": overrides,
        "eval_prompts": eval_prompts,  # evaluate_run's, in order: the evaluations' scores per category
        "eval_before": history[0]["eval_reward_before"],
        "evals": [(h["iteration"] + 1, h["eval_reward"]) for h in history if h.get("eval_reward") is not None],
        "final": finals,
        "history": history,
        "wall_s": time.perf_counter() - start,
    }
    return write_record(path, record)


def shapes_jobs(args) -> list:
    """Seed by seed (both runs of a seed at once with two workers): every --rewards x --methods run of
    seeds 0..--seeds-1 with the shapes preset on the grammar and the --overrides Config fields; then,
    with --sweep, VGPO's kappa 0.5, 2 and gamma 0.5, 0.99 over 3 seeds."""
    names = args.methods.split(",") if args.methods else list(METHODS)
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods {args.methods!r}: {bad} not in {list(METHODS)}")
    base = json.loads(args.overrides) if getattr(args, "overrides", "") else {}
    if args.iterations:
        base["iterations"] = args.iterations
    if args.shapes_prompts != "grammar":
        base["shapes_prompts"] = args.shapes_prompts
    if args.value_steps != 1:
        base["value_steps"] = args.value_steps
    rewards_ = args.rewards.split(",")
    bad = [r for r in rewards_ if r not in SHAPES_REWARDS]
    if bad:
        raise SystemExit(f"--rewards {args.rewards!r}: {bad} not in {list(SHAPES_REWARDS)}")
    jobs = [(r, m, s, base) for s in range(args.seeds) for r in rewards_ for m in names]
    if args.sweep:
        jobs += [("strict", "VGPO", s, base | {"kappa": k}) for s in range(3) for k in (0.5, 2.0)]
        jobs += [("strict", "VGPO", s, base | {"gamma": g}) for s in range(3) for g in (0.5, 0.99)]
    return [(*job, args.out, max(1, torch.get_num_threads() // args.workers)) for job in jobs]


def shapes_runs(args) -> None:
    """GRPO vs each part of VGPO on the shapes benchmark (the demo's preset, held-out strict accuracy),
    run by run in the background: python experiments.py shapes; then python experiments.py shapes_report."""
    jobs = shapes_jobs(args)
    with contextlib.ExitStack() as stack:  # one worker: in this process (a fork after torch ran can hang)
        pool = stack.enter_context(fresh_pool(args.workers)) if args.workers > 1 else None
        done = pool.imap(shapes_run, jobs) if pool else map(shapes_run, jobs)
        for record in tqdm(done, total=len(jobs), desc="shapes runs"):
            tqdm.write(f"{record['reward']} {record['method']} seed {record['seed']}: {record['final']}")
    shapes_report(args)


def load_shapes_runs(out: str) -> list:
    runs = []
    for path in sorted(glob.glob(os.path.join(out, "shapes_runs", "*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def last_finite(history: list, key: str) -> float:
    """The last finite value of a logged metric (an iteration without an update logs NaN, decision 12)."""
    return next((h[key] for h in reversed(history) if math.isfinite(h[key])), float("nan"))


def shapes_report(args) -> None:
    """Table (shapes_methods.md) and figure (shapes_methods.png) of the finished runs (not the sweep's)."""
    all_runs = load_shapes_runs(args.out)
    runs = [r for r in all_runs if not is_sweep(r)]
    if not runs:
        raise SystemExit(f"no finished runs in {args.out}/shapes_runs: run `python experiments.py shapes` first")
    prompts = runs[0].get("shapes_prompts", "grammar")  # runs before the field: the grammar
    where = "held-out" if prompts == "grammar" else "its prompts, new noise"
    rows = [
        f"| reward | method | seeds | strict acc. ODE ({where}) | per seed | SDE 10 "
        "| iters to eval +0.1 over base | zero_std_ratio first / last 10 it. "
        "| adv_rel_abs / adv_anchor_abs | KL to ref | s / iter (median) |",
        "|---" * 11 + "|",
    ]
    for reward in dict.fromkeys(r["reward"] for r in runs):
        for method in run_labels(runs):
            rs = [r for r in runs if r["reward"] == reward and run_label(r) == method]
            if not rs:
                continue
            reached = [next((i for i, e in r["evals"] if e >= r["eval_before"] + 0.1), None) for r in rs]
            zs = lambda r, part: statistics.mean(h["zero_std_ratio"] for h in part(r["history"]))  # noqa: E731
            hist = [h for r in rs for h in r["history"]]
            cells = [
                str(len(rs)),
                mean_std(r["final"]["ode"] for r in rs),
                ", ".join(f"{r['final']['ode']:.3f}" for r in sorted(rs, key=lambda r: r["seed"])),
                mean_std(r["final"]["sde10"] for r in rs),
                f"{mean_std(reached)} ({sum(x is not None for x in reached)}/{len(rs)})",
                f"{mean_std(zs(r, lambda h: h[:10]) for r in rs)} / {mean_std(zs(r, lambda h: h[-10:]) for r in rs)}",
                f"{statistics.mean(h['adv_rel_abs'] for h in hist):.2f} / "
                f"{statistics.mean(h['adv_anchor_abs'] for h in hist):.2f}",
                f"{statistics.mean(last_finite(r['history'], 'kl_ref') for r in rs):.1e}",
                f"{statistics.median(h['seconds'] for h in hist):.1f}",
            ]
            rows.append(f"| {reward} | {method} | " + " | ".join(cells) + " |")
    before = mean_std(r["eval_before"] for r in runs)
    text = (
        "`python experiments.py shapes` then `python experiments.py shapes_report`: the shapes preset "
        f"({runs[0]['iterations']} iterations), prompts: {prompts}; mean ± std over seeds; base model before "
        f"training: {before}.\n\n" + "\n".join(rows) + "\n"
    )
    with open(os.path.join(args.out, "shapes_methods.md"), "w") as f:
        f.write(text)
    shapes_figure(runs, os.path.join(args.out, "shapes_methods.png"), where)
    print(text)
    if any(map(is_sweep, all_runs)):
        shapes_sweep_report(all_runs, args.out)


def run_label(run: dict) -> str:
    """A run's row in the reports: its method, and the value estimate where it is not the paper's."""
    n = run.get("value_steps", 1)
    return run["method"] + (f" (value_steps {n})" if n != 1 else "")


def run_labels(runs: list) -> list:
    """The rows of the reports in METHODS order, each method's value_steps variants after it."""
    rows = {(list(METHODS).index(r["method"]), r.get("value_steps", 1)): run_label(r) for r in runs}
    return [rows[key] for key in sorted(rows)]


def is_sweep(run: dict) -> bool:
    """A run of shapes --sweep (its record names the kappa or gamma it changed)."""
    return "kappa" in run or "gamma" in run


def shapes_sweep_report(all_runs: list, out: str) -> None:
    """shapes_sweep.md: VGPO's kappa and gamma (--sweep) beside VGPO's defaults on the same seeds."""
    default = vgpo.Config()
    settings = {(default.kappa, default.gamma): []}  # the default first, then the sweep's in file order
    for r in all_runs:
        if r["reward"] == "strict" and run_label(r) == "VGPO" and r["seed"] < 3:
            settings.setdefault((r.get("kappa", default.kappa), r.get("gamma", default.gamma)), []).append(r)
    rows = ["| kappa | gamma | seeds | strict acc. ODE | per seed | zero_std_ratio last 10 it. |", "|---" * 6 + "|"]
    for (kappa, gamma), rs in settings.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        per_seed = ", ".join(f"{r['final']['ode']:.3f}" for r in rs)
        zero = mean_std(statistics.mean(h["zero_std_ratio"] for h in r["history"][-10:]) for r in rs)
        rows.append(
            f"| {kappa} | {gamma} | {len(rs)} | {mean_std(r['final']['ode'] for r in rs)} | {per_seed} | {zero} |"
        )
    text = (
        f"`python experiments.py shapes --methods VGPO --rewards strict --sweep` then `shapes_report` ({out}): "
        f"VGPO, strict reward, seeds 0-2, mean ± std over seeds; the first row is the default (kappa "
        f"{default.kappa}, gamma {default.gamma}).\n\n" + "\n".join(rows) + "\n"
    )
    with open(os.path.join(out, "shapes_sweep.md"), "w") as f:
        f.write(text)
    print(text)


def shapes_figure(runs: list, path: str, where: str = "held-out") -> None:
    """Per reward: strict accuracy (ODE) and zero_std_ratio over iterations, mean ± std over seeds."""

    rewards_ = list(dict.fromkeys(r["reward"] for r in runs))
    fig, axes = plt.subplots(len(rewards_), 2, figsize=(11, 3.6 * len(rewards_)), squeeze=False)
    for row, reward in zip(axes, rewards_, strict=True):
        for method in run_labels(runs):
            rs = [r for r in runs if r["reward"] == reward and run_label(r) == method]
            if not rs:
                continue
            xs = [0] + [i for i, _ in rs[0]["evals"]]
            acc = torch.tensor([[r["eval_before"]] + [e for _, e in r["evals"]] for r in rs])
            zero = torch.tensor([[h["zero_std_ratio"] for h in r["history"]] for r in rs])
            for ax, x, y in ((row[0], xs, acc), (row[1], list(range(1, zero.shape[1] + 1)), zero)):
                mean, std = y.mean(0), y.std(0, correction=0)
                ax.plot(x, mean, label=f"{method} ({len(rs)})", lw=1.5)
                ax.fill_between(x, mean - std, mean + std, alpha=0.15)
        row[0].set(title=f"{reward} reward: strict accuracy (ODE, {where})", xlabel="iteration")
        row[1].set(title=f"{reward} reward: zero_std_ratio (groups with one score)", xlabel="iteration")
        for ax in row:
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shapes_grids(args) -> None:
    """Base, GRPO and VGPO (strict reward, seed 0) on the same evaluation prompts (held-out, or
    --shapes_prompts) and noise: one PNG each."""
    config = vgpo.Config(**shapes_fields(args), seed=0)
    backend = vgpo.build_backend(config)
    strict = rewards.load_reward("geneval_shapes")
    prompts = backend.eval_prompts(12)
    panels = {"base": None}
    for method in ("GRPO", "VGPO"):
        panels[method] = os.path.join(args.out, "shapes_runs", f"strict_{method}_s0.lora.safetensors")
    for name, path in panels.items():
        if path and not os.path.exists(path):
            raise SystemExit(f"{path} is missing: run `python experiments.py shapes` first")
        if path:
            runs.load_lora(backend, path)
        scores, samples = vgpo.evaluate(backend, strict, prompts, config.eval_steps, vgpo.make_generator(0, 2))
        runs.save_samples(samples, os.path.join(args.out, f"shapes_grid_{name}.png"), prompts, scores, limit=12)
        print(f"{name}: {scores.mean().item():.3f} on these 12 prompts")


FAILURES = {
    "pass": "passes",
    "unrecognised": "a coloured piece above the size floor that no form fits: shapes fused into a lump, or a blob",
    "small": "a coloured piece under the size floor (rewards.MIN_PIXELS), above a speck",
    "wrong": "every piece a named shape, but a count, shape, colour or relation wrong, or nothing drawn",
}


def shapes_failure(arr, prompt: str) -> str:
    """Why the strict reward (rewards.geneval_shapes) fails one image (H, W, 3) uint8: a key of
    FAILURES, the first that applies in its order; "pass" when it passes."""
    comps = rewards.components(arr)
    named = rewards.named_objects(comps)
    kinds = {shape for *_, shape in comps if shape not in shapes.SHAPES}
    if not kinds and all(rewards.shapes_requirements(shapes.parse_prompt(prompt)[1], named, arr.shape[0])):
        return "pass"
    if "other" in kinds:
        return "unrecognised"
    return "small" if kinds else "wrong"


def shapes_failures(args) -> None:
    """Why the strict reward fails, before and after training: for each seed of the shapes runs in
    --out, the base model and each method's final LoRA on that seed's evaluation prompts and noise (the
    runs' own final evaluation, re-sampled), each image put in one FAILURES class. Resumable:
    shapes_failures.json; table shapes_failures.md."""
    path = os.path.join(args.out, "shapes_failures.json")
    done = json.load(open(path)) if os.path.exists(path) else {}
    finished = [r for r in load_shapes_runs(args.out) if not is_sweep(r) and r["reward"] == "strict"]
    if not finished:
        raise SystemExit(f"no finished strict runs in {args.out}/shapes_runs: run `python experiments.py shapes`")
    strict = rewards.load_reward("geneval_shapes")
    jobs = [(r["seed"], "base", None, r["eval_before"]) for r in finished]
    jobs += [
        (r["seed"], run_label(r), shapes_run_name("strict", r["method"], r["seed"], r), r["final"]["ode"])
        for r in finished
    ]
    jobs = list({(seed, label): (seed, label, name, recorded) for seed, label, name, recorded in jobs}.values())
    for seed, label, name, recorded in tqdm(jobs, desc="failures"):
        key = f"{label} s{seed}"
        if key in done:
            continue
        config = vgpo.Config(**{**SHAPES_BENCH, "shapes_prompts": finished[0]["shapes_prompts"]}, seed=seed)
        backend = vgpo.build_backend(config)
        if name:
            runs.load_lora(backend, os.path.join(args.out, "shapes_runs", name + ".lora.safetensors"))
        prompts = backend.eval_prompts(config.eval_samples)
        chunk = config.prompts_per_iteration * config.group_size  # as the run's evaluation
        classes = []

        def classified(images, batch_prompts, classes=classes):  # evaluate() keeps the first chunk's images alone
            classes.extend(map(shapes_failure, rewards.to_uint8(images), batch_prompts))
            return strict(images, batch_prompts)

        gen = vgpo.make_generator(seed, 2)
        scores, _ = vgpo.evaluate(backend, classified, prompts, config.eval_steps, gen, chunk)
        by_prompt = {q: [c for c, p in zip(classes, prompts, strict=True) if p == q] for q in dict.fromkeys(prompts)}
        done[key] = dict(
            counts={k: classes.count(k) for k in FAILURES},
            by_prompt={q: {k: cs.count(k) for k in FAILURES} for q, cs in by_prompt.items()},
            strict=scores.mean().item(),
            recorded=recorded,
        )
        with open(path + ".tmp", "w") as f:
            json.dump(done, f, indent=1)
        os.replace(path + ".tmp", path)
    shapes_failures_report(done, args.out)


def shapes_failures_report(done: dict, out: str) -> None:
    """shapes_failures.md from shapes_failures.json's records ({"POLICY sSEED": record})."""
    rows = ["| policy | seed | strict (recorded) | " + " | ".join(FAILURES) + " |", "|---" * (3 + len(FAILURES)) + "|"]
    for key, d in sorted(done.items(), key=lambda kv: (kv[0].rsplit(" s", 1)[0] != "base", kv[0])):
        label, seed = key.rsplit(" s", 1)
        cells = [f"{d['strict']:.3f} ({d['recorded']:.3f})"] + [str(d["counts"][k]) for k in FAILURES]
        rows.append(f"| {label} | {seed} | " + " | ".join(cells) + " |")
    legend = "\n".join(f"- {k}: {v}" for k, v in FAILURES.items())
    text = (
        f"`python experiments.py shapes_failures --out {out}`: the images of each policy on its seed's "
        "evaluation prompts and noise (the run's final evaluation, sampled again; in brackets the accuracy "
        f"the run recorded), each counted in the first class that applies:\n\n{legend}\n\n" + "\n".join(rows) + "\n"
    )
    by_policy = {}  # policy -> prompt -> [passes, images], summed over seeds
    for key, d in done.items():
        for prompt, counts in d.get("by_prompt", {}).items():
            total = by_policy.setdefault(key.rsplit(" s", 1)[0], {}).setdefault(prompt, [0, 0])
            total[0], total[1] = total[0] + counts["pass"], total[1] + sum(counts.values())
    if by_policy:
        prompts = list(dict.fromkeys(q for per_prompt in by_policy.values() for q in per_prompt))
        text += "\nPasses / images per prompt, over all seeds:\n\n| policy | " + " | ".join(prompts) + " |\n"
        text += "|---" * (1 + len(prompts)) + "|\n"
        for label, per_prompt in by_policy.items():
            text += f"| {label} | " + " | ".join("{} / {}".format(*per_prompt.get(q, [0, 0])) for q in prompts) + " |\n"
    with open(os.path.join(out, "shapes_failures.md"), "w") as f:
        f.write(text)
    print(text)


def shapes_base_rates(args) -> None:
    """The base model's strict pass rate per training prompt of --categories (--per_prompt ODE samples
    each, new noise): shapes_base_rates.json and .md, from which the demo's prompts are chosen (rule
    in RESULTS.md). Resumable: prompts already in the .json are kept."""
    backend = vgpo.build_backend(vgpo.Config(**SHAPES_BENCH, seed=0))
    strict = rewards.load_reward("geneval_shapes")
    categories = [c.strip() for c in args.categories.split(",")]
    bad = [c for c in categories if c not in backend.by_category]
    if bad:
        raise SystemExit(f"--categories {args.categories!r}: {bad} not in {list(backend.by_category)}")
    prompts = [p for c in categories for p in backend.by_category[c]]
    path = os.path.join(args.out, "shapes_base_rates.json")
    rates = json.load(open(path)) if os.path.exists(path) else {}
    for prompt in tqdm([p for p in prompts if p not in rates], desc="base rates"):
        scores, _ = vgpo.evaluate(backend, strict, [prompt] * args.per_prompt, 20, vgpo.make_generator(0, 5))
        rates[prompt] = scores.mean().item()
        with open(path, "w") as f:
            json.dump(rates, f, indent=1)
    rows = ["| prompt | category | base strict pass rate |", "|---|---|---|"]
    rows += [f"| {p} | {shapes_category(p)} | {r:.3f} |" for p, r in sorted(rates.items(), key=lambda x: x[1])]
    text = (
        f"`python experiments.py shapes_base_rates --per_prompt {args.per_prompt} --categories CATEGORIES`, run for "
        f"{', '.join(sorted({shapes_category(p) for p in rates}))} (each run adds its prompts to the .json): the "
        "shipped base model, training prompts, ODE 20 steps, guidance 4.5, new noise, strict reward (v3).\n\n"
        + "\n".join(rows)
        + "\n"
    )
    with open(os.path.join(args.out, "shapes_base_rates.md"), "w") as f:
        f.write(text)
    print(text)


# ------------------------------------------------------------------------------------------------
# The shapes demo over seeds (issue 34): paired before/after outcomes, McNemar per run, paired methods
# ------------------------------------------------------------------------------------------------


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) of Student's t with df degrees of freedom: 1/2 + the density's integral from 0 to t
    (Simpson's rule, 4000 intervals; the density in closed form)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    n, h = 4000, abs(t) / 4000
    area = h / 3 * sum((1 if i in (0, n) else 4 if i % 2 else 2) * f(i * h) for i in range(n + 1))
    return 0.5 + math.copysign(area, t)


def student_t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t (bisection on student_t_cdf)."""
    lo, hi = -200.0, 200.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def paired_t(differences) -> dict:
    """Paired t-test of per-seed differences: mean, standard error, two-sided p, and the mean difference
    these seeds detect with 80 % power at the 5 % level, (t_0.975 + t_0.8) * sd / sqrt(n), at their sd."""
    d = [float(x) for x in differences]
    n = len(d)
    if n < 2:
        return {"n": n, "mean": d[0] if d else float("nan"), "se": float("nan"), "p": float("nan"), "mdd": float("nan")}
    sd = statistics.stdev(d)
    se = sd / math.sqrt(n)
    t = statistics.mean(d) / se if se > 0 else math.copysign(math.inf, statistics.mean(d) or 1.0)
    p = 2 * (1 - student_t_cdf(abs(t), n - 1)) if math.isfinite(t) else 0.0
    mdd = (student_t_quantile(0.975, n - 1) + student_t_quantile(0.8, n - 1)) * se
    return {"n": n, "mean": statistics.mean(d), "se": se, "p": p, "mdd": mdd}


FEW_SEEDS = 4  # paired t-tests on fewer seeds than this are printed with few_seeds_note's warning


def few_seeds_note(seed_counts) -> list[str]:
    """A warning under a table of paired t-tests where any row rests on 2 or 3 seeds: its s.e. has 1-2 degrees
    of freedom, so a small p can come from a few nearly equal differences by luck."""
    n = min((k for k in seed_counts if k >= 2), default=None)
    if n is None or n >= FEW_SEEDS:
        return []
    return [
        f"\nPaired tests on fewer than {FEW_SEEDS} seeds (here as few as {n}): the s.e. rests on {n - 1} degree(s) of "
        "freedom, so a small p can be a few nearly equal differences by luck, not a measured precision: a lead."
    ]


def baseline(methods_: list[str]) -> str:
    """The method the others are paired against: GRPO where it ran, else the first."""
    return "GRPO" if "GRPO" in methods_ else methods_[0]


def demo_run(job: tuple) -> dict:
    """One run of the shapes demo (`python vgpo.py --model shapes`, with the method's fields and the
    seed), resumable: the finished run is OUT/demo_runs/NAME.json; an unfinished one continues from
    its checkpoint. Its before/after sample grids are copied to OUT/grids."""
    method, seed, overrides, out, threads = job
    torch.set_num_threads(threads)
    name = f"{runs.method_file_name(method)}_s{seed}"
    finished, run_dir, resume = resumable_run(out, "demo_runs", "shapes_demo", name)
    if finished:
        return finished
    config = vgpo.Config(model="shapes", **METHODS[method], **overrides, seed=seed, output_dir=run_dir, resume=resume)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        history = vgpo.train(config)
    evals = [(h["iteration"] + 1, h["eval_reward"]) for h in history if h.get("eval_reward") is not None]
    before, after = history[0]["eval_scores_before"], history[evals[-1][0] - 1]["eval_scores"]
    gained, lost, p = runs.mcnemar(before, after)
    prompts = backends.shapes_prompt_list(config.shapes_prompts)  # evaluate_run cycles them: i % k
    k = len(prompts)
    os.makedirs(os.path.join(out, "grids"), exist_ok=True)
    for tag, src in (("before", "samples_before.png"), ("after", f"samples_{evals[-1][0]:05d}.png")):
        Image.open(os.path.join(run_dir, src)).save(os.path.join(out, "grids", f"{name}_{tag}.png"))
    record = {
        "method": method,
        "seed": seed,
        "overrides": overrides,
        "iterations": config.iterations,
        "prompts": prompts,
        "before": statistics.mean(before),
        "after": statistics.mean(after),
        "gained": gained,
        "lost": lost,
        "p": p,
        "per_prompt": {q: [statistics.mean(before[i::k]), statistics.mean(after[i::k])] for i, q in enumerate(prompts)},
        "evals": evals,
        "history": history,
        "wall_s": time.perf_counter() - start,
    }
    return write_record(os.path.join(out, "demo_runs", name + ".json"), record)


def demo(args) -> None:
    """The shapes demo over --seeds for each of --methods (default GRPO, VGPO), seed by seed, --workers
    runs at once, each resumable: OUT/demo_runs/*.json, OUT/grids; then demo_report."""
    names = args.methods.split(",") if args.methods else ["GRPO", "VGPO"]
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods {args.methods!r}: {bad} not in {list(METHODS)}")
    overrides = json.loads(args.overrides) if args.overrides else {}
    if args.iterations:
        overrides["iterations"] = args.iterations
    threads = max(1, torch.get_num_threads() // args.workers)
    jobs = [(m, s, overrides, args.out, threads) for s in range(args.seeds) for m in names]
    with contextlib.ExitStack() as stack:  # one worker: in this process (a fork after torch ran can hang)
        pool = stack.enter_context(fresh_pool(args.workers)) if args.workers > 1 else None
        for r in tqdm(pool.imap(demo_run, jobs) if pool else map(demo_run, jobs), total=len(jobs), desc="demo runs"):
            tqdm.write(f"{r['method']} seed {r['seed']}: {r['before']:.3f} -> {r['after']:.3f} (p = {r['p']:.2g})")
    demo_report(args)


def finished_demo_runs(out: str, seeds: int | None = None) -> list[dict]:
    """The records of the demo's finished runs in OUT/demo_runs (of seeds below `seeds` when given)."""
    found = []
    for path in sorted(glob.glob(os.path.join(out, "demo_runs", "*.json"))):
        with open(path) as f:
            record = json.load(f)
        if seeds is None or record["seed"] < seeds:
            found.append(record)
    if not found:
        below = "" if seeds is None else f" of seed < {seeds}"
        raise SystemExit(f"no finished runs{below} in {out}/demo_runs: run `python experiments.py demo` first")
    return found


def demo_runs_root(out: str) -> str:
    """Where `demo --out OUT` keeps its run directories (checkpoints, metrics): runs/shapes_demo/<OUT's name>."""
    return os.path.join("runs", "shapes_demo", os.path.basename(os.path.normpath(out)))


def demo_report(args) -> None:
    """OUT/demo.md: every run's paired before/after (McNemar), the rises per method, and each method
    minus GRPO paired by seed (paired t-test and the difference the seeds can detect)."""
    found = finished_demo_runs(args.out)
    rows = [
        "| method | seed | strict before | after | gained | lost | McNemar p | rise at p < 0.05 | per prompt after "
        "| rollouts' graded score, first -> last 10 it. | groups all pass / all fail | s / iter | wall min |",
        "|---" * 13 + "|",
    ]
    methods_ = list(dict.fromkeys(r["method"] for r in found))
    for r in sorted(found, key=lambda r: (methods_.index(r["method"]), r["seed"])):
        h = r["history"]
        sec, mean = statistics.median(x["seconds"] for x in h), lambda key, part: statistics.mean(x[key] for x in part)
        rows.append(
            f"| {r['method']} | {r['seed']} | {r['before']:.3f} | {r['after']:.3f} | {r['gained']} | {r['lost']} "
            f"| {r['p']:.2g} | {'yes' if r['after'] > r['before'] and r['p'] < 0.05 else 'no'} "
            f"| {' / '.join(f'{a:.2f}' for _, a in r['per_prompt'].values())} "
            f"| {mean('reward_mean', h[:10]):.2f} -> {mean('reward_mean', h[-10:]):.2f} "
            f"| {mean('zero_std_pass', h):.3f} / {mean('zero_std_fail', h):.3f} | {sec:.1f} | {r['wall_s'] / 60:.1f} |"
        )
    lines = []
    for m in methods_:
        rs = [r for r in found if r["method"] == m]
        test = paired_t([r["after"] - r["before"] for r in rs])
        rises = sum(r["after"] > r["before"] and r["p"] < 0.05 for r in rs)
        lines.append(
            f"- {m}: significant rises in {rises} of {len(rs)} seeds; after - before {test['mean']:+.3f} "
            f"± {test['se']:.3f} (s.e. over seeds)"
        )
    a = baseline(methods_)
    after = {(r["method"], r["seed"]): r["after"] for r in found}
    pair_seeds = []
    for b in [m for m in methods_ if m != a]:
        seeds = sorted({r["seed"] for r in found if r["method"] == a} & {r["seed"] for r in found if r["method"] == b})
        test = paired_t([after[b, s] - after[a, s] for s in seeds])
        lines.append(
            f"- {b} - {a}, paired by seed ({test['n']} seeds): {test['mean']:+.3f} ± {test['se']:.3f}, paired t-test "
            f"p = {test['p']:.2g}; these seeds detect a difference of {test['mdd']:.3f} (80 % power, 5 % level)"
        )
        pair_seeds.append(test["n"])
    lines += few_seeds_note(pair_seeds)
    first = found[0]
    text = (
        f"`python experiments.py demo --seeds N --out {args.out}`: `python vgpo.py --model shapes` "
        f"({first['iterations']} iterations, overrides {first['overrides'] or 'none'}) per method and seed; strict "
        f"accuracy (v3) of {len(first['history'][0]['eval_scores_before'])} ODE samples on the training prompts, "
        "held-out noise, the same before and after (paired); prompts: "
        + "; ".join(first["prompts"])
        + ".\n\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(lines)
        + "\n"
    )
    with open(os.path.join(args.out, "demo.md"), "w") as f:
        f.write(text)
    print(text)


def mean_se(values) -> tuple[float, float]:
    values = list(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.mean(values), se


def read_metrics(run_dir: str) -> list:
    """A run's metrics.jsonl, one record per iteration. vgpo.train rewrites the file from its checkpoint on
    resume (runs.RunFiles.start), so it holds each iteration once; should a file hold an iteration twice
    (appended by other means), its last record counts."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = {r["iteration"]: r for r in map(json.loads, filter(str.strip, f))}
    return [records[i] for i in sorted(records)]


def evaluated_runs(root: str, seeds: int, records: str = ""):
    """(name, seed, history) of each run NAME_sSEED with seed below `seeds` whose history holds its first
    evaluation (`eval_scores_before`): read from its directory ROOT/NAME_sSEED/metrics.jsonl as written (a
    running run counts up to its last record), or, where that directory is gone (a fresh checkout: runs/ is
    not committed), from the finished run's record RECORDS/NAME_sSEED.json (the history vgpo.train returned)."""
    dirs = {os.path.basename(d): d for d in glob.glob(os.path.join(root, "*_s*"))}
    files = (
        {os.path.basename(f)[: -len(".json")]: f for f in glob.glob(os.path.join(records, "*_s*.json"))}
        if records
        else {}
    )
    for key in sorted(set(dirs) | set(files)):
        name, seed = key.rsplit("_s", 1)
        if int(seed) >= seeds:
            continue
        if key in dirs and os.path.exists(os.path.join(dirs[key], "metrics.jsonl")):
            history = read_metrics(dirs[key])
        elif key in files:
            with open(files[key]) as f:
                history = json.load(f)["history"]
        else:
            continue
        if history and history[0].get("eval_scores_before") is not None:
            yield name, int(seed), history


def demo_curves(args) -> None:
    """OUT/curves.md and OUT/curves.png: strict accuracy at every evaluation of the demo's runs (eval_every),
    against iteration and against training seconds (evaluations excluded), read from the run directories
    runs/shapes_demo/OUT/* as they are written, so running runs count up to their last evaluation (a finished
    run whose directory is gone: from its record OUT/demo_runs/*.json). Each
    evaluation is paired with the run's first (McNemar); per method and iteration, the mean ± s.e. over the
    seeds below --seeds that reached it; --threshold: the first evaluation whose mean reaches that strict
    accuracy. Each method minus GRPO at each evaluation, paired by seed (paired_t)."""
    root = demo_runs_root(args.out)
    found = {}  # method -> seed -> [(iteration, training seconds, accuracy, gained, lost, p, rollouts' score)]
    for method, seed, history in evaluated_runs(root, args.seeds, os.path.join(args.out, "demo_runs")):
        before, seconds, window, points = history[0]["eval_scores_before"], 0.0, [], []
        points.append((0, 0.0, statistics.mean(before), 0, 0, 1.0, float("nan")))
        for h in history:
            seconds, window = seconds + h["seconds"], window + [h["reward_mean"]]
            if h.get("eval_scores") is not None:
                gained, lost, p = runs.mcnemar(before, h["eval_scores"])
                points.append((h["iteration"] + 1, seconds, h["eval_reward"], gained, lost, p, statistics.mean(window)))
                window = []
        found.setdefault(method.replace("_", " "), {})[seed] = points
    if not found:
        raise SystemExit(
            f"no run with an evaluation under {root} or {args.out}/demo_runs: run `python experiments.py demo` first"
        )
    rows = [
        "| method | iteration | seeds | training min | strict accuracy (mean ± s.e.) | gained / lost vs before "
        "| seeds with a rise at p < 0.05 | rollouts' graded score since the last evaluation |",
        "|---" * 8 + "|",
    ]
    os.makedirs(args.out, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    reached = []
    for method, seeds in found.items():
        curve = []
        for it in sorted({pt[0] for pts in seeds.values() for pt in pts}):
            at = [pt for pts in seeds.values() for pt in pts if pt[0] == it]
            (acc, se), minutes = mean_se(pt[2] for pt in at), statistics.mean(pt[1] for pt in at) / 60
            rises = sum(pt[3] > pt[4] and pt[5] < 0.05 for pt in at)
            rollout = statistics.mean(pt[6] for pt in at)
            curve.append((it, minutes, acc, se))
            rows.append(
                f"| {method} | {it} | {len(at)} | {minutes:.0f} | {acc:.3f} ± {se:.3f} "
                f"| {sum(pt[3] for pt in at)} / {sum(pt[4] for pt in at)} | {rises} of {len(at)} "
                f"| {'' if it == 0 else f'{rollout:.3f}'} |"
            )
        first = next((it for it, _, acc, _ in curve if args.threshold and acc >= args.threshold), None)
        if args.threshold:
            last = curve[-1][0]
            when = f"not reached by iteration {last}" if first is None else f"first reached at iteration {first}"
            reached.append(f"- {method}: mean strict accuracy {args.threshold} {when}")
        its, mins, acc, se = (np.array(v, dtype=float) for v in zip(*curve, strict=True))
        for ax, xs in zip(axes, (its, mins), strict=True):
            ax.plot(xs, acc, marker="o", label=method)
            ax.fill_between(xs, acc - np.nan_to_num(se), acc + np.nan_to_num(se), alpha=0.2)
    # each method minus GRPO at the same seed: the same evaluation noise, base
    paired, pair_seeds, a = [], [], baseline(list(found))
    at = {(m, s): {pt[0]: pt[2] for pt in pts} for m, runs_ in found.items() for s, pts in runs_.items()}
    for b in [m for m in found if m != a]:
        common, table = sorted(set(found[a]) & set(found[b])), []
        for it in sorted({it for s in common for it in at[a, s]} - {0}):
            diffs = [at[b, s][it] - at[a, s][it] for s in common if it in at[a, s] and it in at[b, s]]
            test = paired_t(diffs)
            per_seed = " / ".join(f"{d:+.3f}" for d in diffs)
            table.append(
                f"| {it} | {test['n']} | {per_seed} | {test['mean']:+.3f} ± {test['se']:.3f} "
                f"| {test['p']:.2g} | {test['mdd']:.3f} |"
            )
            pair_seeds.append(test["n"])
        if table:
            paired += [
                *([""] if paired else []),
                f"{b} - {a}, paired by seed (the same evaluation noise and base): per seed, mean ± s.e., paired "
                "t-test p, and the difference these seeds detect (80 % power, 5 % level).\n",
                "| iteration | seeds | per seed | mean ± s.e. | p | detectable |",
                "|---" * 6 + "|",
                *table,
            ]
    paired += few_seeds_note(pair_seeds)  # [] where no table (no test on 2-3 seeds)
    for ax, label in zip(axes, ("iteration", "training minutes (evaluations excluded)"), strict=True):
        ax.set_xlabel(label)
        ax.set_ylabel("strict accuracy, held-out noise")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "curves.png"), dpi=110)
    plt.close(fig)
    text = (
        f"`python experiments.py demo_curves --seeds {args.seeds} --out {args.out}`: every evaluation of the runs "
        f"in {root} of seeds below {args.seeds}, each paired with its run's first (McNemar, exact).\n\n"
        + "\n\n".join("\n".join(part) for part in (rows, reached, paired) if part)
        + "\n"
    )
    with open(os.path.join(args.out, "curves.md"), "w") as f:
        f.write(text)
    print(text)


def grammar_eval_prompts(n: int) -> list[str]:
    """The shapes backend's evaluation prompts on the grammar (backends.balanced_prompts, cycled), without
    loading the model: a running run's evaluation scores, in order, belong to these prompts."""
    held = backends.balanced_prompts(shapes.held_out_prompts())
    return [held[i % len(held)] for i in range(n)]


def grammar_points(history: list, prompts: list) -> list[dict]:
    """A grammar run's evaluations (before training and every eval_every): iteration, training seconds
    (evaluations excluded), strict accuracy per category and overall (the mean of the categories, as
    GenEval), McNemar against the first on all samples, and the share of groups all passing and all
    failing (zero_std_pass / zero_std_fail) over the iterations since the previous evaluation."""
    before = history[0]["eval_scores_before"]

    def point(iteration, seconds, scores, window):
        by = category_means(scores, prompts)
        gained, lost, p = runs.mcnemar(before, scores)
        zero = {k: statistics.mean(h[k] for h in window) if window else float("nan") for k in ZERO_KEYS}
        return dict(iteration=iteration, seconds=seconds, overall=statistics.mean(by.values()), by=by,
                    gained=gained, lost=lost, p=p, **zero)  # fmt: skip

    points, seconds, window = [point(0, 0.0, before, [])], 0.0, []
    for h in history:
        seconds, window = seconds + h["seconds"], window + [h]
        if h.get("eval_scores") is not None:
            points.append(point(h["iteration"] + 1, seconds, h["eval_scores"], window))
            window = []
    return points


ZERO_KEYS = ("zero_std_pass", "zero_std_fail")


def shapes_curves(args) -> None:
    """OUT/shapes_curves.md and .png for `shapes` runs on the grammar: strict accuracy per category and
    overall at every evaluation, against iteration and training minutes, mean ± s.e. over the seeds below
    --seeds that reached it (read from runs/shapes/OUT/* as written: running runs count up to their last
    evaluation; a finished run whose directory is gone, from its record OUT/shapes_runs/*.json); the all-pass
    and all-fail groups between evaluations (ADAE's case); --threshold: the first evaluation whose mean overall
    accuracy reaches it; every method against GRPO, paired by seed."""
    root = os.path.join("runs", "shapes", os.path.basename(os.path.normpath(args.out)))
    found, curves_ = {}, {}  # method -> seed -> points; method -> per-iteration zero_std means over seeds
    for name, seed, history in evaluated_runs(root, args.seeds, os.path.join(args.out, "shapes_runs")):
        prompts = grammar_eval_prompts(len(history[0]["eval_scores_before"]))
        method = name.split("_", 1)[1].replace("_", " ")  # REWARD_METHOD (shapes_run_name)
        found.setdefault(method, {})[seed] = grammar_points(history, prompts)
        curves_.setdefault(method, []).append([[h[k] for k in ZERO_KEYS] for h in history])
    if not found:
        raise SystemExit(
            f"no run with an evaluation under {root} or {args.out}/shapes_runs: run `python experiments.py shapes` "
            "first"
        )
    categories = list(next(iter(next(iter(found.values())).values()))[0]["by"])
    head = " | ".join(categories)
    rows = [
        f"| method | iteration | seeds | training min | overall | {head} | gained / lost vs before "
        "| seeds with a rise at p < 0.05 | groups all pass / all fail since the last evaluation |",
        "|---" * (8 + len(categories)) + "|",
    ]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    reached = []
    for method, seeds in found.items():
        curve = []
        for it in sorted({pt["iteration"] for pts in seeds.values() for pt in pts}):
            at = [pt for pts in seeds.values() for pt in pts if pt["iteration"] == it]
            overall = mean_se(pt["overall"] for pt in at)
            by = {c: mean_se(pt["by"][c] for pt in at) for c in categories}
            minutes = statistics.mean(pt["seconds"] for pt in at) / 60
            rises = sum(pt["gained"] > pt["lost"] and pt["p"] < 0.05 for pt in at)
            zero = " / ".join(f"{statistics.mean(pt[k] for pt in at):.3f}" for k in ZERO_KEYS) if it else ""
            cells = " | ".join(f"{m:.3f} ± {se:.3f}" for m, se in (overall, *by.values()))
            rows.append(
                f"| {method} | {it} | {len(at)} | {minutes:.0f} | {cells} | {sum(pt['gained'] for pt in at)} / "
                f"{sum(pt['lost'] for pt in at)} | {rises} of {len(at)} | {zero} |"
            )
            curve.append((it, minutes, overall, by))
        if args.threshold:
            first = next((it for it, _, (acc, _), _ in curve if acc >= args.threshold), None)
            when = f"first reached at iteration {first}" if first is not None else "not reached"
            when += "" if first is not None else f" by iteration {curve[-1][0]}"
            reached.append(f"- {method}: mean overall strict accuracy {args.threshold} {when}")
        its, mins = np.array([c[0] for c in curve]), np.array([c[1] for c in curve])
        series = [("overall", its, [c[2] for c in curve]), ("overall", mins, [c[2] for c in curve])]
        series += [(c, its, [x[3][c] for x in curve]) for c in categories]
        for ax, (_, xs, ms) in zip([axes[0, 0], axes[0, 1], *axes[1]], series, strict=True):
            m, se = np.array(ms, dtype=float).T
            ax.plot(xs, m, marker="o", label=method)
            ax.fill_between(xs, m - np.nan_to_num(se), m + np.nan_to_num(se), alpha=0.2)
        length = min(map(len, curves_[method]))
        zero = np.array([c[:length] for c in curves_[method]]).mean(0)  # (iterations, 2), mean over seeds
        for ax, column in zip(axes[0, 2:], zero.T, strict=True):
            smooth = np.convolve(column, np.ones(5) / 5, mode="valid")  # 5-iteration moving mean
            ax.plot(np.arange(len(smooth)) + 5, smooth, label=method)
    titles = ["overall", "overall", "groups all passing (zero_std_pass)", "groups all failing (zero_std_fail)"]
    xlabels = ["iteration", "training minutes", "iteration", "iteration"]
    for ax, title, xlabel in zip(axes[0], titles, xlabels, strict=True):
        ax.set(title=title, xlabel=xlabel)
    for ax, c in zip(axes[1], categories, strict=True):
        ax.set(title=c, xlabel="iteration")
    for ax in axes.flat:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "shapes_curves.png"), dpi=100)
    plt.close(fig)
    paired, pair_seeds = [], []
    for method in [m for m in found if m != "GRPO" and "GRPO" in found]:
        common = sorted(set(found[method]) & set(found["GRPO"]))
        at = {(m, s): {pt["iteration"]: pt for pt in found[m][s]} for m in (method, "GRPO") for s in common}
        for it in sorted({it for s in common for it in at[method, s]} - {0}):
            both = [s for s in common if it in at[method, s] and it in at["GRPO", s]]
            diffs = [at[method, s][it]["overall"] - at["GRPO", s][it]["overall"] for s in both]
            test = paired_t(diffs)
            per_cat = " | ".join(
                f"{statistics.mean(at[method, s][it]['by'][c] - at['GRPO', s][it]['by'][c] for s in both):+.3f}"
                for c in categories
            )
            pair_seeds.append(test["n"])
            paired.append(
                f"| {method} - GRPO | {it} | {test['n']} | {' / '.join(f'{d:+.3f}' for d in diffs)} "
                f"| {test['mean']:+.3f} ± {test['se']:.3f} | {test['p']:.2g} | {test['mdd']:.3f} | {per_cat} |"
            )
    if paired:
        paired = [
            "Each method minus GRPO at the same seed (the same evaluation prompts, noise and base): overall per seed, "
            "mean ± s.e., paired t-test p, the difference these seeds detect (80 % power, 5 % level), and the mean "
            "difference per category.\n",
            f"| methods | iteration | seeds | overall per seed | mean ± s.e. | p | detectable | {head} |",
            "|---" * (7 + len(categories)) + "|",
            *paired,
            *few_seeds_note(pair_seeds),
        ]
    text = (
        f"`python experiments.py shapes_curves --seeds {args.seeds} --out {args.out}`: every evaluation of the runs "
        f"in {root} of seeds below {args.seeds} on the held-out prompts (category-balanced); overall = the mean of "
        "the category accuracies; each evaluation paired with its run's first (McNemar, exact, all samples).\n\n"
        + "\n\n".join("\n".join(part) for part in (rows, reached, paired) if part)
        + "\n"
    )
    with open(os.path.join(args.out, "shapes_curves.md"), "w") as f:
        f.write(text)
    print(text)


def sampled_both_ways(backend, config: vgpo.Config, strict, graded) -> dict:
    """A policy's pictures on its run's evaluation prompts drawn two ways: as evaluated (ODE, eval_steps, the
    evaluation's noise, so the strict verdicts are the run's own) and as trained (the SDE of Eq. 7, num_steps,
    noise_level, one generator per sample). Each: strict verdicts and graded scores, (B,) numpy each."""
    prompts, scored = backend.eval_prompts(config.eval_samples), []

    def both(images, prompts_):
        scored.append(graded(images, prompts_))
        return strict(images, prompts_)

    chunk = config.prompts_per_iteration * config.group_size
    ode = vgpo.evaluate(backend, both, prompts, config.eval_steps, vgpo.make_generator(config.seed, 2), chunk)[0]
    ode_graded, scored = torch.cat(scored), []
    noise = [vgpo.make_generator(config.seed, 8, i) for i in range(len(prompts))]
    sigmas = backend.sigmas(config.num_steps)
    sde = vgpo.rollout(backend, prompts, sigmas, config.noise_level, both, noise, instant=False).rewards[:, -1]
    return {"prompts": prompts, "ode": ode.numpy(), "ode_graded": ode_graded.numpy(), "sde": sde.numpy(),
            "sde_graded": scored[0].numpy()}  # fmt: skip


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) of a chi-square with df degrees of freedom: 1 - P(df/2, x/2), the regularized lower incomplete
    gamma by its power series, P(a, z) = z^a e^-z / Gamma(a + 1) * sum_n z^n / ((a + 1) ... (a + n))."""
    a, z = df / 2, x / 2
    if z <= 0:
        return 1.0
    term = total = 1.0
    for n in range(1, 2000):
        term *= z / (a + n)
        total += term
        if term < 1e-16 * total:
            break
    return max(0.0, 1.0 - math.exp(a * math.log(z) - z - math.lgamma(a + 1)) * total)


def base_verdicts(record: dict, seed: int) -> list[float]:
    """The base model's strict verdicts on the evaluation of a demo run like `record` (its Config overrides) at
    `seed`: evaluate_run's prompts, noise (make_generator(seed, 2)) and chunks, so a run's own
    eval_scores_before are reproduced."""
    config = vgpo.Config(model="shapes", **record["overrides"], seed=seed, output_dir="")
    backend, strict = vgpo.build_backend(config), rewards.load_reward(config.eval_reward)
    chunk = config.prompts_per_iteration * config.group_size
    prompts, gen = backend.eval_prompts(config.eval_samples), vgpo.make_generator(seed, 2)
    return vgpo.evaluate(backend, strict, prompts, config.eval_steps, gen, chunk)[0].tolist()


def demo_base_levels(args) -> None:
    """How much the base model's evaluation accuracy varies with the evaluation's seed alone: its verdicts at
    seeds 0..--seeds-1 with the demo's config (OUT's records; a seed with a record is read from it, any other
    drawn), kept in OUT/base_levels.json seed by seed (resumable); OUT/base_levels.md: each level, their
    spread against the binomial's at the pooled rate, and the chi-square test of homogeneity."""
    found = finished_demo_runs(args.out)
    recorded = {r["seed"]: r["history"][0]["eval_scores_before"] for r in found}
    path = os.path.join(args.out, "base_levels.json")
    levels = {}
    if os.path.exists(path):
        with open(path) as f:
            levels = {int(k): v for k, v in json.load(f).items()}
    for seed in tqdm(range(args.seeds), desc="base levels"):
        if seed not in levels:
            levels[seed] = recorded[seed] if seed in recorded else base_verdicts(found[0], seed)
            with open(path + ".tmp", "w") as f:
                json.dump({str(k): v for k, v in sorted(levels.items())}, f)
            os.replace(path + ".tmp", path)
    seeds = list(range(args.seeds))
    rates, n = [statistics.mean(levels[s]) for s in seeds], len(levels[0])
    pooled = statistics.mean(rates)
    varies = 0 < pooled < 1  # every picture passing, or none: no binomial spread to compare with
    chi2 = sum(n * (r - pooled) ** 2 for r in rates) / (pooled * (1 - pooled)) if varies else float("nan")
    spread = statistics.stdev(rates) if len(rates) > 1 else float("nan")
    text = (
        f"`python experiments.py demo_base_levels --seeds {args.seeds} --out {args.out}`: the base model's strict "
        f"accuracy on the demo's evaluation ({n} pictures) at each seed's evaluation noise.\n\n"
        "| seed | " + " | ".join(map(str, seeds)) + " |\n" + "|---" * (len(seeds) + 1) + "|\n"
        "| strict accuracy | " + " | ".join(f"{r:.3f}" for r in rates) + " |\n\n"
        f"Mean {pooled:.3f}; spread over seeds (s.d.) {spread:.3f} against a binomial "
        f"{math.sqrt(pooled * (1 - pooled) / n):.3f} at {n} samples; chi-square {chi2:.1f} on {len(seeds) - 1} df, "
        f"p = {chi2_sf(chi2, len(seeds) - 1) if varies else float('nan'):.2g}.\n"
    )
    with open(os.path.join(args.out, "base_levels.md"), "w") as f:
        f.write(text)
    print(text)


def demo_samplers(args) -> None:
    """Did training improve the pictures it trains on? Each finished demo run's final policy and the base model
    (seeds < --seeds) sampled as evaluated (ODE) and as trained (SDE) on the run's evaluation prompts, the same
    noise for base and policy within a sampler: strict accuracy (McNemar against the base) and the graded
    training score, overall and per prompt. Each policy's draws are kept in OUT/samplers/ (a rerun with more
    seeds draws only the new runs). Writes OUT/samplers.md."""
    torch.set_num_threads(args.threads)
    strict, graded = rewards.load_reward("geneval_shapes"), rewards.load_reward("geneval_shapes_score")
    run_root, records = demo_runs_root(args.out), finished_demo_runs(args.out, args.seeds)
    rows = [
        "| seed | policy | ODE strict | gained / lost, p | ODE graded | SDE strict | gained / lost, p | SDE graded "
        "| per prompt: ODE strict / SDE strict |",
        "|---" * 9 + "|",
    ]
    base = {}
    os.makedirs(os.path.join(args.out, "samplers"), exist_ok=True)
    for record in tqdm(sorted(records, key=lambda r: (r["seed"], r["method"])), desc="policies"):
        seed = record["seed"]
        config = vgpo.Config(model="shapes", **record["overrides"], seed=seed, output_dir="")
        name = f"{runs.method_file_name(record['method'])}_s{seed}"
        if seed not in base:
            base[seed] = cached_draws(args.out, f"base_s{seed}", partial(vgpo.build_backend, config), strict, graded)
            rows.append(samplers_row(seed, "base", base[seed], None))

        def policy(name=name, record=record, config=config):
            state = torch.load(os.path.join(run_root, name, "checkpoint.pt"), weights_only=False, map_location="cpu")
            if state["iteration"] != record["iterations"]:  # the iterations done, saved at the end
                raise SystemExit(
                    f"{run_root}/{name}: its checkpoint holds {state['iteration']} of {record['iterations']}"
                )
            backend = vgpo.build_backend(config)
            runs.set_lora(backend, state["lora"])
            return backend

        rows.append(
            samplers_row(seed, record["method"], cached_draws(args.out, name, policy, strict, graded), base[seed])
        )
    first = records[0]
    text = (
        f"`python experiments.py demo_samplers --out {args.out} --seeds {args.seeds}`: each run's final policy and "
        f"the base model on the run's {config.eval_samples} evaluation samples, drawn as evaluated (ODE, eval_steps, "
        "the evaluation's noise) and as trained (SDE, num_steps, noise_level, new noise), the same noise for base "
        "and policy within a sampler; McNemar against the base; per prompt in the order "
        + "; ".join(p.removeprefix("a photo of ") for p in first["prompts"])
        + ".\n\n"
        + "\n".join(rows) + "\n"
    )  # fmt: skip
    with open(os.path.join(args.out, "samplers.md"), "w") as f:
        f.write(text)
    print(text)


def cached_draws(out: str, name: str, build, strict, graded) -> dict:
    """sampled_both_ways of the policy `build()` returns, kept in OUT/samplers/NAME.json: drawn once, read after."""
    path = os.path.join(out, "samplers", name + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return {k: v if k == "prompts" else np.array(v) for k, v in json.load(f).items()}
    backend = build()
    got = sampled_both_ways(backend, backend.config, strict, graded)
    write_record(path, {k: v if k == "prompts" else v.tolist() for k, v in got.items()})
    return got


def samplers_row(seed: int, policy: str, got: dict, base: dict | None) -> str:
    """One row of demo_samplers' table."""
    k = len(dict.fromkeys(got["prompts"]))
    tests = {m: runs.mcnemar(base[m], got[m]) if base else None for m in ("ode", "sde")}
    test = {m: f"{t[0]} / {t[1]}, {t[2]:.2g}" if t else "" for m, t in tests.items()}
    per = " / ".join(f"{got['ode'][i::k].mean():.2f}" for i in range(k)) + " ; "
    per += " / ".join(f"{got['sde'][i::k].mean():.2f}" for i in range(k))  # the evaluation cycles its k prompts
    return (
        f"| {seed} | {policy} | {got['ode'].mean():.3f} | {test['ode']} | {got['ode_graded'].mean():.3f} "
        f"| {got['sde'].mean():.3f} | {test['sde']} | {got['sde_graded'].mean():.3f} | {per} |"
    )


def brightness(images, prompts):
    """A reward every pixel moves: the picture's mean brightness in [0, 1], (B,)."""
    return images.float().mean(dim=tuple(range(1, images.ndim)))


def trainer_check(args) -> None:
    """Does the shapes trainer raise a reward that every pixel moves? GRPO on the demo's preset with the
    pictures' mean brightness as the reward, --iterations (25): the rollouts' reward and KL to the reference
    per iteration. A rise says that sampler, ratio, gradient and update work on the shapes backend, so a
    flat GenEval score is that score's signal at the demo's batch. Writes trainer_check.md."""
    torch.set_num_threads(args.threads)
    config = vgpo.Config(model="shapes", output_dir="", reward_workers=0, **METHODS["GRPO"])
    backend, reward_fn, _, optimizer = vgpo.setup(config, reward_fn=brightness)
    sigmas, rows = backend.sigmas(config.num_steps), []
    for it in tqdm(range(args.iterations or 25), desc="brightness"):
        r = vgpo.train_iteration(backend, reward_fn, optimizer, sigmas, config, it)
        rows.append(f"| {it} | {r['reward_mean']:.3f} | {r['kl_ref']:.1e} | {r['clipfrac']:.3f} |")
    text = (
        "`python experiments.py trainer_check`: GRPO, the shapes demo's preset, reward = mean brightness of the "
        "picture.\n\n| iteration | rollouts' reward | KL to the reference | clipfrac |\n|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )
    with open(os.path.join(args.out, "trainer_check.md"), "w") as f:
        f.write(text)
    print(text)


@torch.no_grad()
def noise_share(args) -> None:
    """Which noise decides the graded score of a rollout? The policy gradient credits the SDE noise of
    each step (Eq. 7), not the initial noise. For each demo prompt: 16 initial noises x 8 SDE draws each
    (the preset's 10 steps and noise level), the graded score's variance over all 128 samples, and the
    mean variance within an initial noise: their ratio is the share the SDE noise decides. Writes noise_share.md."""
    torch.set_num_threads(args.threads)
    config = vgpo.Config(model="shapes", output_dir="", reward_workers=0)
    backend, score, strict, _ = vgpo.setup(config)
    sigmas, n_init, n_sde, rows = backend.sigmas(config.num_steps), 16, 8, []
    for prompt in backends.shapes_prompt_list(config.shapes_prompts):
        x = backend.noise(n_init, torch.Generator().manual_seed(123)).repeat_interleave(n_sde, 0)  # (128, D...)
        prompts, gen = [prompt] * len(x), torch.Generator().manual_seed(7)
        cond = backend.encode(prompts)
        for k in range(config.num_steps):
            eps = backends.randn(x.shape, gen, x.device)
            v = backend.velocity(x, sigmas[k], cond)
            x = vgpo.sde_step_with_logprob(v, x, sigmas[k], sigmas[k + 1], config.noise_level, noise=eps)[0]
        images = backend.decode(x)
        r = score(images, prompts).view(n_init, n_sde)
        total, within = r.flatten().var().item(), r.var(1).mean().item()
        rows.append(
            f"| {prompt} | {r.mean().item():.3f} | {strict(images, prompts).mean().item():.3f} | {total:.3f} "
            f"| {within:.3f} | {within / total:.2f} | {int((r.amax(1) == r.amin(1)).sum())} of {n_init} |"
        )
    text = (
        f"`python experiments.py noise_share`: the shapes demo's prompts, {n_init} initial noises x {n_sde} SDE draws "
        f"({config.num_steps} steps, noise level {config.noise_level}), graded score.\n\n"
        "| prompt | graded score | strict | variance | within an initial noise | share of the SDE noise "
        "| initial noises whose 8 draws score alike |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    with open(os.path.join(args.out, "noise_share.md"), "w") as f:
        f.write(text)
    print(text)


@torch.no_grad()
def step_log_probs(backend, batch, k: int, sigmas, config) -> torch.Tensor:
    """log p(x_{k+1} | x_k) of a rollout's stored actions under the backend's current weights, (B,)."""
    x, x_next = batch.latents[:, k], batch.latents[:, k + 1]
    v = backend.velocity(x, sigmas[k], batch.cond, train=True)
    return vgpo.sde_step_with_logprob(v, x, sigmas[k], sigmas[k + 1], config.noise_level, x_next=x_next)[1]


def autocast_bf16(network):
    """A backend's network run under torch.autocast bf16 on the CPU (weights and outputs stay float32)."""

    def run(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return network(*args, **kwargs).float()

    return run


def bf16(args) -> None:
    """The demo's preset in float32 against bf16 autocast (issue 34's option): seconds per iteration (one warm-up, then
    --repeats each, interleaved, alone on the machine), and what bf16 does to the policy ratio: the change
    of the stored actions' log-probs over one optimizer step, in float32 and in bf16, against the clip range
    (the ratio is exp of that change). Writes bf16.md."""
    torch.set_num_threads(args.threads)
    config = vgpo.Config(model="shapes", output_dir="", seed=0)  # one config; bf16 wraps a backend's network
    built = {on: vgpo.setup(config) for on in (False, True)}
    built[True][0].network = autocast_bf16(built[True][0].network)
    sigmas = built[False][0].sigmas(config.num_steps)
    seconds = {False: [], True: []}
    for r in range(args.repeats + 1):
        for on in (False, True):
            backend, reward, _, optimizer = built[on]
            record = vgpo.train_iteration(backend, reward, optimizer, sigmas, config, r)
            if r:  # the first is a warm-up
                seconds[on].append(record["seconds"])
    # the ratio: one float32 rollout, one float32 optimizer step, log-probs in both precisions
    backend32, reward, _, optimizer = built[False]
    backend16 = built[True][0]
    prompts = [p for p in backend32.prompts(2, vgpo.make_generator(9, 1)) for _ in range(8)]
    noise = [vgpo.make_generator(9, 3, i) for i in range(len(prompts))]
    batch = vgpo.rollout(backend32, prompts, sigmas, config.noise_level, reward, noise, instant=True)
    trained = int(config.num_steps * config.timestep_fraction)
    runs.set_lora(backend16, runs.lora_state(backend32))
    before = {on: [step_log_probs(b, batch, k, sigmas, config) for k in range(trained)]
              for on, b in ((False, backend32), (True, backend16))}  # fmt: skip
    advantages, _ = vgpo.batch_advantages(batch.rewards, config)
    vgpo.policy_update(backend32, batch, advantages, optimizer, sigmas, config, vgpo.make_generator(9, 4))
    runs.set_lora(backend16, runs.lora_state(backend32))
    after = {on: [step_log_probs(b, batch, k, sigmas, config) for k in range(trained)]
             for on, b in ((False, backend32), (True, backend16))}  # fmt: skip
    change = {on: torch.stack([a - b for a, b in zip(after[on], before[on], strict=True)]) for on in (False, True)}
    error = (change[True] - change[False]).abs()  # bf16's error in the log-ratio, (trained, B)
    same = (torch.stack(before[True]) - torch.stack(before[False])).abs()
    clip = config.clip_range
    rows = [
        "| | float32 | bf16 autocast |",
        "|---|---|---|",
        f"| s / iteration (median of {args.repeats}) | {statistics.median(seconds[False]):.2f} "
        f"| {statistics.median(seconds[True]):.2f} |",
        f"| log-ratio after one optimizer step, median abs | {change[False].abs().median():.2e} "
        f"| {change[True].abs().median():.2e} |",
        f"| share of (sample, step) outside the clip range {clip:g} "
        f"| {(change[False].abs() > clip).float().mean():.2f} | {(change[True].abs() > clip).float().mean():.2f} |",
        f"| bf16's error in that log-ratio, median / max abs | | {error.median():.2e} / {error.max():.2e} |",
        f"| bf16 log-prob minus float32's, same weights, median abs | | {same.median():.2e} |",
    ]
    text = (
        f"`python experiments.py bf16 --threads {args.threads} --repeats {args.repeats}`: the shapes demo's preset "
        f"(GRPO's iteration and VGPO's differ little here), {torch.get_num_threads()} threads, this CPU; the ratio "
        "measured on one float32 rollout of 2 x 8 samples, its first "
        f"{trained} steps, over one float32 optimizer step (lr {config.lr:g}).\n\n" + "\n".join(rows) + "\n"
    )
    with open(os.path.join(args.out, "bf16.md"), "w") as f:
        f.write(text)
    print(text)


def premise_stats(instant, final, group_size: int) -> dict:
    """How well step k's projected reward predicts the final one. instant (B, T), final (B,),
    samples group-major. Per k: Pearson correlation over all samples; within groups (each group's
    mean removed from both, as the group-relative advantage sees them); and the fraction of samples
    whose within-group deviation has the final one's sign, among those with a nonzero final deviation;
    and, among the groups whose final rewards are all equal (no signal for GRPO, decision 12), the
    fraction whose step-k rewards differ (a signal only the dense values give)."""

    def pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        den = (a.square().sum() * b.square().sum()).sqrt()
        return (a * b).sum().item() / den.item() if den > 0 else float("nan")

    dev = lambda r: r - r.reshape(-1, group_size).mean(1).repeat_interleave(group_size)  # noqa: E731
    d_final = dev(final)
    mask = d_final != 0
    flat = final.reshape(-1, group_size).std(1, correction=0) == 0  # (groups,)
    out = {"corr": [], "corr_within": [], "sign_agree": [], "flat_final_signal": [], "flat_groups": flat.sum().item()}
    for k in range(instant.shape[1]):
        d_k = dev(instant[:, k])
        out["corr"].append(pearson(instant[:, k], final))
        out["corr_within"].append(pearson(d_k, d_final))
        agree = (torch.sign(d_k[mask]) == torch.sign(d_final[mask])).float()
        out["sign_agree"].append(agree.mean().item() if mask.any() else float("nan"))
        varied = instant[:, k].reshape(-1, group_size).std(1, correction=0)[flat] > 0
        out["flat_final_signal"].append(varied.float().mean().item() if flat.any() else float("nan"))
    return out


@torch.no_grad()
def ode_completion_rewards(backend, batch, sigmas, reward_fns: dict, steps: int = 3) -> dict:
    """DenseGRPO's alternative to the one-step projection: from each state x_k of a rollout, a
    `steps`-step Euler ODE to sigma = 0 (vgpo.ode_completion), scored by each reward. Returns
    {name: (B, T-1)} for the states after steps 1..T-1."""
    out = {name: [] for name in reward_fns}
    for k in range(1, len(sigmas) - 1):
        x = batch.latents[:, k]
        v = backend.velocity(x, sigmas[k], batch.cond)
        images = backend.decode(vgpo.ode_completion(backend, x, v, sigmas[k], batch.cond, steps))
        for name, fn in reward_fns.items():
            out[name].append(fn(images, batch.prompts))
    return {name: torch.stack(rows, 1) for name, rows in out.items()}


def premise(args) -> None:
    """TCRM's premise on images: per step, the projected reward vs the final reward, under the SDE
    and the ODE, for the base model and the trained VGPO (strict, seed 0) policy; also a 3-step ODE
    completion from the same states. Strict reward and graded score. Writes shapes_premise.{json,md,png}."""
    torch.set_num_threads(args.threads)
    config = vgpo.Config(**shapes_fields(args), seed=0)
    backend = vgpo.build_backend(config)
    base = runs.lora_state(backend)
    trained_path = os.path.join(args.out, "shapes_runs", "strict_VGPO_s0.lora.safetensors")
    policies = {"base": None} | ({"VGPO (strict, seed 0)": trained_path} if os.path.exists(trained_path) else {})
    scorers = {n: rewards.load_reward(SHAPES_REWARDS[n]) for n in SHAPES_REWARDS}
    sigmas = backend.sigmas(config.num_steps)
    groups, G = args.premise_groups, config.group_size
    prompts = [p for p in backend.prompts(groups, vgpo.make_generator(7, 0)) for _ in range(G)]  # as in training
    results = {"sigmas": sigmas.tolist(), "groups": groups, "group_size": G, "prompts": args.shapes_prompts, "runs": []}
    for policy, path in policies.items():
        runs.set_lora(backend, base)
        if path:
            runs.load_lora(backend, path)
        for sampler, noise in (("SDE", config.noise_level), ("ODE", 0.0)):
            strict_rows = []

            def both(images, prompts, rows=strict_rows):  # the score for the rollout; strict kept, in step order
                rows.append(scorers["strict"](images, prompts))
                return scorers["score"](images, prompts)

            batch = vgpo.rollout(backend, prompts, sigmas, noise, both, vgpo.make_generator(7, 1), instant=True)
            instants = {"score": batch.rewards, "strict": torch.stack(strict_rows, 1)}  # (B, T) each
            completions = ode_completion_rewards(backend, batch, sigmas, scorers) if sampler == "SDE" else {}
            for reward, instant in instants.items():
                stats = premise_stats(instant, instant[:, -1], G)
                record = {"policy": policy, "sampler": sampler, "reward": reward, "estimate": "one-step projection"}
                results["runs"].append(record | stats | {"mean_final": instant[:, -1].mean().item()})
                if reward in completions:
                    full = torch.cat([completions[reward], instant[:, -1:]], 1)  # (B, T): the last is final
                    stats = premise_stats(full, instant[:, -1], G)
                    record = record | {"estimate": "3-step ODE completion"}
                    results["runs"].append(record | stats)
    with open(os.path.join(args.out, "shapes_premise.json"), "w") as f:
        json.dump(results, f)
    premise_report(results, args.out)


def gradients(args) -> None:
    """Do the groups agree on where to move? One rollout of the shapes preset: premise_groups / 2
    training prompts (the grammar's, or --shapes_prompts), each in two groups of G with their own
    noise; GRPO's advantages, then each group's policy gradient (ratio 1, no KL) over the trained
    steps (0-4) and over the later ones (5-8), and the cosine between every two groups' gradients:
    groups of different prompts, and groups of the same prompt. A direction that many prompts share
    gives a positive mean over different prompts; a group gradient that is mostly sampling noise
    gives ~0 even for the same prompt. Writes shapes_gradients.{json,md}."""
    torch.set_num_threads(args.threads)
    results = []
    for reward in ("strict", "score"):
        config = vgpo.Config(**shapes_fields(args), reward=SHAPES_REWARDS[reward], beta=0.0, **METHODS["GRPO"])
        backend = vgpo.build_backend(config)
        reward_fn = vgpo.checked_reward(backend.load_reward(config.reward), config.reward)
        sigmas, G, N = backend.sigmas(config.num_steps), config.group_size, args.premise_groups // 2 * 2
        drawn = backend.prompts(N // 2, vgpo.make_generator(7, 0))
        prompts = [p for p in drawn for _ in range(2 * G)]  # group 2i and 2i+1: prompt i
        noise = [vgpo.make_generator(7, 3, i) for i in range(len(prompts))]
        batch = vgpo.rollout(backend, prompts, sigmas, config.noise_level, reward_fn, noise, instant=False)
        advantages, info = vgpo.batch_advantages(batch.rewards, config)  # (N*G, T)
        for steps in (range(0, 5), range(5, 9)):
            grads = {}  # group -> its policy gradient
            for n in range(N):
                idx = torch.arange(n * G, (n + 1) * G)
                if not vgpo.has_signal(advantages[idx]).any():
                    continue  # a one-score group: no gradient (decision 12)
                for p in backend.parameters():
                    p.grad = None
                for k in steps:
                    loss, _ = vgpo.step_loss(backend, batch, advantages, idx, k, sigmas, config)
                    (loss / len(steps)).backward()
                grads[n] = torch.nn.functional.normalize(
                    torch.cat([p.grad.flatten() for p in backend.parameters()]), dim=0
                )
            pairs = list(itertools.combinations(grads, 2))
            cos = {(i, j): (grads[i] @ grads[j]).item() for i, j in pairs}
            first = prompts[::G]  # each group's prompt
            other = torch.tensor([c for (i, j), c in cos.items() if first[i] != first[j]])
            same = torch.tensor([c for (i, j), c in cos.items() if first[i] == first[j]])
            mean_grad = torch.stack(list(grads.values())).mean(0).norm().item()  # 1 if all agree
            results.append(
                dict(reward=reward, steps=f"{steps.start}-{steps.stop - 1}", sigmas=f"{sigmas[steps.start]:.2f}-"
                     f"{sigmas[steps.stop - 1]:.2f}", groups=len(grads), prompts=N // 2,
                     reward_mean=info["reward_mean"], mean_cos=other.mean().item() if len(other) else float("nan"),
                     sem_cos=(other.std() / len(grads)).item() if len(other) > 1 else float("nan"),
                     mean_abs_cos=other.abs().mean().item() if len(other) else float("nan"),
                     same_pairs=len(same), same_cos=same.mean().item() if len(same) else float("nan"),
                     same_sem=(same.std() / len(same) ** 0.5).item() if len(same) > 1 else float("nan"),
                     mean_unit_norm=mean_grad, noise_unit_norm=len(grads) ** -0.5)
            )  # fmt: skip
            print(results[-1], flush=True)
    with open(os.path.join(args.out, "shapes_gradients.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [
        f"`python experiments.py gradients --premise_groups {args.premise_groups} --shapes_prompts "
        f"'{args.shapes_prompts}'`: GRPO's per-group policy "
        "gradients on one rollout of the shapes preset, each prompt in two groups of its own noise (groups "
        "with one score have none). Different prompts: every pair of groups of two prompts, sem taken as "
        "std / groups (pairs are not independent); same prompt: the two groups of one prompt, sem std / "
        "sqrt(pairs).\n",
        "| reward | steps (sigma) | groups (prompts) | rollout reward | mean cos, different prompts | "
        "mean abs cos | mean cos, same prompt (pairs) | norm of the mean unit gradient | "
        "same for independent directions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['reward']} | {r['steps']} ({r['sigmas']}) | {r['groups']} ({r['prompts']}) | "
            f"{r['reward_mean']:.2f} | {r['mean_cos']:.3f} ± {r['sem_cos']:.3f} | {r['mean_abs_cos']:.3f} | "
            f"{r['same_cos']:.3f} ± {r['same_sem']:.3f} ({r['same_pairs']}) | {r['mean_unit_norm']:.3f} | "
            f"{r['noise_unit_norm']:.3f} |"
        )
    with open(os.path.join(args.out, "shapes_gradients.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def premise_report(results: dict, out: str) -> None:
    """Markdown table and figure of premise()'s results."""

    sig = results["sigmas"][1:]  # the sigma of the state after each step
    rows = [
        "| policy | sampler | reward | estimate | "
        + " | ".join(f"k={k + 1} (σ {s:.3f})" for k, s in enumerate(sig))
        + " |",
        "|---" * (4 + len(sig)),
    ]
    for r in results["runs"]:
        for key in ("corr_within", "sign_agree", "flat_final_signal"):
            if key not in r:  # runs before the field
                continue
            cells = " | ".join("–" if v != v else f"{v:.2f}" for v in r[key])
            rows.append(f"| {r['policy']} | {r['sampler']} | {r['reward']} | {r['estimate']}: {key} | {cells} |")
    text = (
        f"`python experiments.py premise`: {results['groups']} training prompts "
        f"({results.get('prompts', 'grammar')}) x {results['group_size']} samples, 10 steps; for each step k, "
        "the reward of the state after step k (its one-step projection, or a 3-step ODE completion) against "
        "the final reward. corr_within: Pearson correlation after removing each "
        "group's mean; sign_agree: fraction of samples whose within-group deviation at k has the final "
        "deviation's sign (samples with a nonzero final deviation); flat_final_signal: of the groups whose final "
        "rewards are all equal (no signal for GRPO), the fraction whose rewards at k differ. The last step is "
        "the final reward itself.\n\n" + "\n".join(rows) + "\n"
    )
    with open(os.path.join(out, "shapes_premise.md"), "w") as f:
        f.write(text)
    keys = ("corr", "corr_within", "sign_agree") + (
        ("flat_final_signal",) if "flat_final_signal" in results["runs"][0] else ()
    )
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8))
    for ax, key in zip(axes, keys, strict=True):
        for r in results["runs"]:
            if r["reward"] != "strict" and key != "corr_within":
                continue
            style = "--" if r["estimate"] != "one-step projection" else "-"
            label = f"{r['policy']}, {r['sampler']}, {r['reward']}" + (", ODE completion" if style == "--" else "")
            ax.plot(sig, r[key], style, marker=".", label=label)
        ax.set(title=key + ("" if key == "corr_within" else " (strict)"), xlabel="sigma of the state", xlim=(1, 0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "shapes_premise.png"), dpi=110)
    plt.close(fig)
    print(text)


def render_text(text: str, size: int = 256) -> torch.Tensor:
    """Black text on white, drawn with PIL's default font: (3, size, size) in [0, 1]."""
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text((20, size // 2 - 28), text, fill="black", font=ImageFont.load_default(size=40))
    return torch.tensor(np.array(image)).permute(2, 0, 1).float() / 255  # (3, H, W)


def shapes_batch(n: int, size: int, seed: int = 0):
    """n random shapes scenes (all four categories) as images (n, 3, size, size) and their prompts."""
    rng = np.random.default_rng(seed)
    scenes = [shapes.random_scene(shapes.CATEGORIES[i % 4], rng) for i in range(n)]
    images = torch.stack([torch.tensor(shapes.render(s, size, rng)).permute(2, 0, 1) for s in scenes]) / 255
    return images, [shapes.prompt_of(s) for s in scenes]


def reward_cost(args) -> None:
    """Milliseconds per image of the offline rewards: 8 images with rendered text per size, and
    64 random shapes scenes at the model's 32 px for the GenEval-style rewards."""
    rows = ["| reward | image side | ms / image | mean reward |", "|---|---|---|---|"]
    for name in rewards.OFFLINE_REWARDS:
        fn = rewards.load_reward(name)
        shapes_reward = name.startswith("geneval_shapes")
        for size in (shapes.SIZE,) if shapes_reward else (256, 512):
            if shapes_reward:
                images, prompts = shapes_batch(64, size)
            else:
                images, prompts = torch.stack([render_text("HELLO", size) for _ in range(8)]), ['"hello"'] * 8
            fn(images[:1], prompts[:1])  # warm-up
            start = time.perf_counter()
            scores = fn(images, prompts)
            ms = (time.perf_counter() - start) / len(images) * 1000
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

    def _timed(self, name, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.calls[name] += 1
        self.seconds[name] += time.perf_counter() - start
        return out

    def velocity(self, *args, **kwargs):
        return self._timed("velocity", self.inner.velocity, *args, **kwargs)

    def decode(self, x):
        return self._timed("decode", self.inner.decode, x)

    def counted_reward(self, reward_fn):
        return lambda images, prompts: self._timed("reward", reward_fn, images, prompts)


def latency_reward(ms: float):
    """A stand-in for a remote or CPU reward model: a fixed latency per call (sleeping, so it
    holds no core), then the mean pixel value in [0, 1]."""

    def reward_fn(images, prompts):
        time.sleep(ms / 1000)
        return images.float().mean(dim=tuple(range(1, images.ndim)))  # (B,)

    reward_fn.__name__ = f"latency_{ms:g}ms"
    return reward_fn


def benchmark_iteration(config: vgpo.Config, repeats: int, backend=None, reward_fn=None, warmup=True) -> dict:
    """Counts and seconds of one training iteration (after one warm-up iteration), split into
    rollout (transformer, decodes, rewards) and update; peak GPU memory when on a GPU.
    backend: reuse a built backend (its config is replaced by `config`); reward_fn: instead of
    the configured reward. With repeats = 0 only a rollout is timed (no update)."""
    inner = backend.inner if isinstance(backend, CountingBackend) else backend
    inner = inner or vgpo.build_backend(config)
    inner.config = config
    backend = CountingBackend(inner)
    name = getattr(reward_fn, "__name__", config.reward)
    reward = backend.counted_reward(vgpo.checked_reward(reward_fn or backend.load_reward(config.reward), name))
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
    cuda = torch.cuda.is_available() and inner.device.type == "cuda"
    try:
        if warmup:
            vgpo.train_iteration(backend, reward, optimizer, sigmas, config, 0)
        backend.calls, backend.seconds = dict.fromkeys(backend.calls, 0), dict.fromkeys(backend.seconds, 0.0)
        phases.update(rollout=0.0, update=0.0)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if repeats:
            its = [vgpo.train_iteration(backend, reward, optimizer, sigmas, config, i + 1) for i in range(repeats)]
            seconds = sum(i["seconds"] for i in its) / repeats
        else:  # a rollout alone, as train_iteration runs it
            start, n = time.perf_counter(), config.prompts_per_iteration * config.group_size
            prompts = backend.prompts(config.prompts_per_iteration, vgpo.make_generator(config.seed, 1, 1))
            noise = [vgpo.make_generator(config.seed, 3, 1, i) for i in range(n)]
            instant = config.dense_values or config.use_weights
            batch = vgpo.rollout(
                backend, [p for p in prompts for _ in range(config.group_size)], sigmas, config.noise_level,
                reward, noise, instant, config.reward_workers,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            assert torch.isfinite(batch.rewards).all()
    finally:
        vgpo.rollout, vgpo.policy_update = originals["rollout"], originals["update"]
    n = max(repeats, 1)
    per = {f"{k}_calls": v / n for k, v in backend.calls.items()}
    per |= {f"{k}_s": v / n for k, v in {**backend.seconds, **phases}.items()}
    if not repeats:
        per["rollout_s"] = seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {**per, "iteration_s": seconds, "peak_gib": peak}


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


# ------------------------------------------------------------------------------------------------
# Overlap: instant rewards scored in threads while the sampler runs (reward_workers), parallel OCR
# ------------------------------------------------------------------------------------------------

OVERLAP_CASES = [  # (label, reward spec or latency in ms, image side, timed: "iteration" or "rollout")
    ("jpeg_compressibility", "jpeg_compressibility", 32, "iteration"),
    ("latency 50 ms / call", 50, 32, "iteration"),
    ("latency 100 ms / call", 100, 32, "iteration"),
    ("ocr", "ocr", 64, "iteration"),
    # Not at 256 px: the tiny model's random images are noise there, OCR reads hundreds of false boxes
    # (a VGPO rollout took 38 s); ocr_throughput measures OCR at 256 px on rendered text instead.
]


def ocr_throughput(threads_list, size: int = 256, images: int = 16) -> list[tuple[int, float]]:
    """Images per second of one OCR reward call on rendered text, for each thread count."""
    batch = torch.stack([render_text(w, size) for w in ("HELLO", "GARDEN", "MUSIC", "NORTH") * (images // 4)])
    prompts = ['a sign that says "hello"'] * len(batch)
    out = []
    for threads in threads_list:
        fn = rewards.load_reward("ocr", threads=threads)
        fn(batch, prompts)  # warm-up: one engine per thread
        start = time.perf_counter()
        fn(batch, prompts)
        out.append((threads, len(batch) / (time.perf_counter() - start)))
    return out


def overlap(args) -> None:
    """GRPO and VGPO on the tiny pipeline, rewards scored inline vs in worker threads."""
    rows = [
        "| reward | side | timed | GRPO inline | VGPO inline | VGPO / GRPO | GRPO workers | VGPO workers "
        "| VGPO / GRPO | VGPO extra cost hidden |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {**vgpo.PRESETS["tiny"], "model": "tiny"}
    for label, reward, side, timed in OVERLAP_CASES:
        spec = reward if isinstance(reward, str) else "jpeg_compressibility"
        fn = None if isinstance(reward, str) else latency_reward(reward)
        t = {}
        for mode, workers in (("inline", 0), ("workers", vgpo.Config.reward_workers)):
            for name in ("GRPO", "VGPO"):
                config = vgpo.Config(**{**base, **METHODS[name], "resolution": side, "reward": spec})
                config.reward_workers = workers
                repeats = args.repeats if timed == "iteration" else 0  # 0: one rollout, no update
                t[mode, name] = benchmark_iteration(config, repeats, reward_fn=fn)["iteration_s"]
        hidden = 1 - (t["workers", "VGPO"] - t["workers", "GRPO"]) / (t["inline", "VGPO"] - t["inline", "GRPO"])
        cells = [t["inline", "GRPO"], t["inline", "VGPO"], t["inline", "VGPO"] / t["inline", "GRPO"]]
        cells += [t["workers", "GRPO"], t["workers", "VGPO"], t["workers", "VGPO"] / t["workers", "GRPO"], hidden]
        rows.append(f"| {label} | {side} | {timed} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        print(rows[-1], flush=True)
    cores = os.cpu_count() or 1
    tput = ocr_throughput(sorted({1, 2, cores, 2 * cores}))
    text = (
        f"`python experiments.py overlap --repeats {args.repeats}` (CPU, {cores} cores; tiny pipeline, "
        f"{base['prompts_per_iteration']} prompts x {base['group_size']} samples, T = 10; seconds per iteration, "
        f"or per rollout where the table says so, mean of {args.repeats} after a warm-up; workers = "
        f"{vgpo.Config.reward_workers} reward threads). 'Hidden' is 1 - (VGPO - GRPO with workers) / "
        "(VGPO - GRPO inline).\n\n" + "\n".join(rows) + "\n\n"
        "OCR throughput of one reward call (16 rendered-text images at 256 px; an engine per thread):\n\n"
        "| threads | images / s |\n|---|---|\n" + "\n".join(f"| {n} | {r:.1f} |" for n, r in tput) + "\n"
    )
    with open(os.path.join(args.out, "overlap.md"), "w") as f:
        f.write(text)
    print(text)


# ------------------------------------------------------------------------------------------------
# GPU check: memory and time of the small-GPU preset on SD3.5-Medium's architecture (random weights)
# ------------------------------------------------------------------------------------------------


def gpu_check(args) -> None:
    """One backend of SD3.5-Medium's architecture, measured in several settings in turn (the text
    encoders are freed part-way, as --offload_text_encoders does). Appends one JSON line per
    measurement to --out/gpu_check.jsonl as it goes, then writes gpu_check.md."""
    cuda = torch.cuda.is_available()  # without one (a dry run: --model tiny --resolution 32) memory reads 0
    gib = lambda read: read() / 2**30 if cuda else 0.0
    path = os.path.join(args.out, "gpu_check.jsonl")
    model = args.model if args.model != "tiny" or not cuda else "random-sd3.5-medium"
    preset = {**vgpo.PRESETS["small-gpu"], "resolution": args.resolution, "reward": "jpeg_compressibility"}
    if args.decode_batch is not None:
        preset["decode_batch"] = args.decode_batch
    base = vgpo.Config(**{**preset, "model": model, "offload_text_encoders": False})
    if cuda and args.memory_cap_gib:  # behave as a card of this size: the allocator fails beyond it
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total)
    start = time.perf_counter()
    backend = vgpo.build_backend(base)
    log = dict(device=torch.cuda.get_device_name() if cuda else "CPU", model=model, build_s=time.perf_counter() - start)
    log["memory_cap_gib"] = args.memory_cap_gib
    log["resident_gib"] = gib(torch.cuda.memory_allocated)
    print(json.dumps(log), flush=True)

    def measure(label, method, repeats=1, warmup=False, reward_fn=None, **fields):
        config = dataclasses.replace(base, **{**METHODS[method], **fields})
        if config.gradient_checkpointing:
            backend.pipe.transformer.enable_gradient_checkpointing()
        else:
            backend.pipe.transformer.disable_gradient_checkpointing()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            r = benchmark_iteration(config, repeats, backend=backend, warmup=warmup, reward_fn=reward_fn)
        except torch.OutOfMemoryError as err:
            r = {"error": f"out of memory: {str(err)[:120]}"}
        row = {"label": label, "method": method, **{k: getattr(config, k) for k in GPU_FIELDS}, **r}
        row["reserved_gib"] = gib(torch.cuda.max_memory_reserved)
        if cuda:
            torch.cuda.empty_cache()
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    if not args.skip_resident:
        measure("encoders resident, checkpointing", "GRPO", warmup=True)
        measure("encoders resident, checkpointing", "VGPO")
    backend.free_text_encoders()
    log["resident_after_offload_gib"] = gib(torch.cuda.memory_allocated)
    measure("small-gpu preset", "GRPO", warmup=args.skip_resident)
    measure("small-gpu preset", "VGPO")
    if args.memory_cap_gib:  # the preset alone, under the cap
        return
    measure("small-gpu preset, no checkpointing", "VGPO", gradient_checkpointing=False)
    for threads in (0, 4):  # rollouts alone; OCR engines made and warmed before timing
        ocr = rewards.load_reward("ocr", threads=threads)
        ocr(backend.decode(backend.noise(2, torch.Generator())), ['"a"'] * 2)
        for method, workers in (("GRPO", 4), ("VGPO", 4), ("VGPO", 0)):
            label = f"small-gpu preset, OCR ({threads or os.cpu_count()} threads/call), {workers} workers"
            measure(
                label, method, repeats=0, reward="ocr", reward_workers=workers, reward_threads=threads, reward_fn=ocr
            )
    latents = backend.noise(16, torch.Generator().manual_seed(0))
    for size in (16, 8, 4):  # the VAE decode's own peak, above what is resident
        backend.config = dataclasses.replace(base, decode_batch=size)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before, t0 = gib(torch.cuda.memory_allocated), time.perf_counter()
        backend.decode(latents)
        if cuda:
            torch.cuda.synchronize()
        log[f"decode16_batch{size}_peak_gib"] = gib(torch.cuda.max_memory_allocated) - before
        log[f"decode16_batch{size}_s"] = time.perf_counter() - t0
    print(json.dumps(log), flush=True)
    log["ocr_images_per_s"] = ocr_throughput([1, 4, os.cpu_count() or 1], size=512)
    print(json.dumps(log), flush=True)
    with open(os.path.join(args.out, "gpu_check_log.json"), "w") as f:
        json.dump(log, f, indent=1)


GPU_FIELDS = ("gradient_checkpointing", "decode_batch", "reward", "reward_workers", "reward_threads")


def curves(args) -> None:
    """Reward, eval reward, zero_std_ratio, |A| parts, KL to the reference and clipfrac of the
    run directories given, in one PNG (--out/curves.png)."""
    path = os.path.join(args.out, "curves.png")
    runs.plot_curves(args.runs, path)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "what",
        choices=[
            "methods",
            "sweep",
            "diagnostics",
            "reward_cost",
            "benchmark",
            "overlap",
            "gpu_check",
            "curves",
            "shapes",
            "shapes_report",
            "shapes_grids",
            "shapes_base_rates",
            "shapes_failures",
            "demo",
            "demo_report",
            "demo_curves",
            "demo_samplers",
            "demo_base_levels",
            "shapes_curves",
            "trainer_check",
            "noise_share",
            "bf16",
            "premise",
            "gradients",
        ],
    )
    parser.add_argument("runs", nargs="*", help="curves: run directories (each with a metrics.jsonl)")
    parser.add_argument("--seeds", type=int, default=5, help="demo, demo_samplers: seeds 0..N-1; demo_curves: below N")
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="methods, sweep: toy iterations; shapes, demo: preset's; trainer_check: 25",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", default="", help="methods: a comma-separated subset of METHODS")
    parser.add_argument("--kappa", type=float, default=None, help="methods: kappa of the methods with an anchor")
    parser.add_argument(
        "--shapes_prompts", default="grammar", help="shapes: the benchmark (grammar) or prompts separated by ';'"
    )
    parser.add_argument("--ema", action="store_true", help="methods: evaluate the EMA of the LoRA weights")
    parser.add_argument("--reward", default="jpeg_compressibility", help="benchmark: an image reward")
    parser.add_argument("--model", default="tiny", help="benchmark: tiny, random-sd3.5-medium, or an SD3 id")
    parser.add_argument("--preset", default="", help="benchmark: a vgpo.PRESETS entry, e.g. small-gpu")
    parser.add_argument("--resolution", type=int, default=32, help="benchmark: image side")
    parser.add_argument("--repeats", type=int, default=3, help="benchmark, bf16: timed iterations")
    parser.add_argument("--decode_batch", type=int, default=None, help="gpu_check: images per VAE decode call")
    parser.add_argument("--skip_resident", action="store_true", help="gpu_check: offloaded text encoders only")
    parser.add_argument("--memory_cap_gib", type=float, default=0, help="gpu_check: act as a card of this size")
    parser.add_argument("--rewards", default="score", help="shapes: the rewards trained on (strict, score)")
    parser.add_argument("--sweep", action="store_true", help="shapes: also kappa 0.5, 2 and gamma 0.5, 0.99 (VGPO)")
    parser.add_argument("--value_steps", type=int, default=1, help="shapes: Config.value_steps of every run")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="premise, gradients, bf16, trainer_check, noise_share, demo_samplers: threads",
    )
    parser.add_argument("--premise_groups", type=int, default=16, help="premise, gradients: prompts (groups of G)")
    parser.add_argument("--per_prompt", type=int, default=32, help="shapes_base_rates: samples per prompt")
    parser.add_argument("--categories", default="single object,counting", help="shapes_base_rates: categories")
    parser.add_argument("--overrides", default="", help="demo, shapes: Config fields as JSON, e.g. '{\"lr\": 3e-4}'")
    parser.add_argument("--threshold", type=float, default=0, help="demo_curves: a strict accuracy to reach")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    if args.iterations is None and args.what in ("methods", "sweep", "diagnostics"):
        args.iterations = vgpo.PRESETS["toy"]["iterations"]
    os.makedirs(args.out, exist_ok=True)
    commands = dict(
        methods=methods,
        sweep=sweep,
        diagnostics=diagnostics,
        reward_cost=reward_cost,
        benchmark=benchmark,
        overlap=overlap,
        gpu_check=gpu_check,
        curves=curves,
        shapes=shapes_runs,
        shapes_report=shapes_report,
        shapes_grids=shapes_grids,
        shapes_base_rates=shapes_base_rates,
        shapes_failures=shapes_failures,
        demo=demo,
        demo_report=demo_report,
        demo_curves=demo_curves,
        demo_samplers=demo_samplers,
        shapes_curves=shapes_curves,
        demo_base_levels=demo_base_levels,
        trainer_check=trainer_check,
        noise_share=noise_share,
        bf16=bf16,
        premise=premise,
        gradients=gradients,
    )
    commands[args.what](args)


if __name__ == "__main__":
    main()
