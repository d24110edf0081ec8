"""Experiments and benchmarks beside vgpo.py: measurements that write results, not tests.

    python experiments.py methods     # GRPO vs each part of VGPO vs VGPO on the CPU toy, over seeds
    python experiments.py sweep       # kappa x gamma on a continuous and the saturating toy reward
    python experiments.py diagnostics # training diagnostics by phase: why dense values plateau
    python experiments.py reward_cost # milliseconds per image of the offline rewards
    python experiments.py benchmark   # one GRPO and one VGPO iteration on the tiny SD3 pipeline
    python experiments.py overlap     # rewards scored inline vs in worker threads; OCR throughput
    python experiments.py gpu_check   # memory and time of the small-GPU preset (needs a GPU)
    python experiments.py curves DIR [DIR ...]  # training curves of runs, one PNG

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


def render_text(text: str, size: int = 256) -> torch.Tensor:
    """Black text on white, drawn with PIL's default font: (3, size, size) in [0, 1]."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text((20, size // 2 - 28), text, fill="black", font=ImageFont.load_default(size=40))
    return torch.tensor(np.array(image)).permute(2, 0, 1).float() / 255  # (3, H, W)


def shapes_batch(n: int, size: int, seed: int = 0):
    """n random shapes scenes (all four categories) as images (n, 3, size, size) and their prompts."""
    import numpy as np

    import shapes

    rng = np.random.default_rng(seed)
    scenes = [shapes.random_scene(shapes.CATEGORIES[i % 4], rng) for i in range(n)]
    images = torch.stack([torch.tensor(shapes.render(s, size, rng)).permute(2, 0, 1) for s in scenes]) / 255
    return images, [shapes.prompt_of(s) for s in scenes]


def reward_cost(args) -> None:
    """Milliseconds per image of the offline rewards: 8 images with rendered text per size, and
    64 random shapes scenes at 64 px for the GenEval-style rewards."""
    import rewards

    rows = ["| reward | image side | ms / image | mean reward |", "|---|---|---|---|"]
    for name in rewards.OFFLINE_REWARDS:
        fn = rewards.load_reward(name)
        shapes_reward = name.startswith("geneval_shapes")
        for size in (64,) if shapes_reward else (256, 512):
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
    reward = backend.counted_reward(vgpo.checked_reward(reward_fn or backend.default_reward(), name))
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
    import rewards

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
    import dataclasses

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
    import rewards

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
    vgpo.plot_curves(args.runs, path)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "what",
        choices=["methods", "sweep", "diagnostics", "reward_cost", "benchmark", "overlap", "gpu_check", "curves"],
    )
    parser.add_argument("runs", nargs="*", help="curves: run directories (each with a metrics.jsonl)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=vgpo.PRESETS["toy"]["iterations"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", default="", help="methods: a comma-separated subset of METHODS")
    parser.add_argument("--kappa", type=float, default=None, help="methods: kappa of the methods with an anchor")
    parser.add_argument("--ema", action="store_true", help="methods: evaluate the EMA of the LoRA weights")
    parser.add_argument("--reward", default="jpeg_compressibility", help="benchmark: an image reward")
    parser.add_argument("--model", default="tiny", help="benchmark: tiny, random-sd3.5-medium, or an SD3 id")
    parser.add_argument("--preset", default="", help="benchmark: a vgpo.PRESETS entry, e.g. small-gpu")
    parser.add_argument("--resolution", type=int, default=32, help="benchmark: image side")
    parser.add_argument("--repeats", type=int, default=3, help="benchmark: timed iterations")
    parser.add_argument("--decode_batch", type=int, default=None, help="gpu_check: images per VAE decode call")
    parser.add_argument("--skip_resident", action="store_true", help="gpu_check: offloaded text encoders only")
    parser.add_argument("--memory_cap_gib", type=float, default=0, help="gpu_check: act as a card of this size")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
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
    )
    commands[args.what](args)


if __name__ == "__main__":
    main()
