"""Run bookkeeping for vgpo.train: distributed helpers, sample grids, the EMA of the LoRA weights,
streamed metrics and curves, TensorBoard, checkpoints, stop signals, and the run's files.

Nothing here changes the algorithm; vgpo.py calls it. matplotlib (curves) and tensorboard are
imported where used: matplotlib is a figure-only dependency, tensorboard an optional one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import textwrap
import threading

import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from backends import ConfigError

# ------------------------------------------------------------------------------------------------
# Distributed (torchrun): ranks, reductions, gathers; each a no-op in a single process
# ------------------------------------------------------------------------------------------------


def rank_and_world() -> tuple[int, int]:
    """Boilerplate: (rank, world size) under torch.distributed, else (0, 1)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed(config) -> bool:
    """Boilerplate: under torchrun (WORLD_SIZE > 1) join the process group: nccl on GPUs, else gloo.
    Returns whether this call created the group (and so must destroy it)."""
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
    dist.barrier()
    dist.destroy_process_group()


def all_reduce_(t: torch.Tensor, op="sum") -> torch.Tensor:
    """Boilerplate: in-place all-reduce (sum or max) over ranks; the tensor itself when alone."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_reduce_gradients(params) -> None:
    """Boilerplate: sum the LoRA gradients over ranks in one flat all-reduce (zeros where a rank
    had no sample in the minibatch)."""
    if not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_(torch.cat([g.flatten() for g in grads]))
    for p, part in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = part.view_as(p).clone()


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Boilerplate: concatenate every rank's rows, in rank order; the tensor itself when alone."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------
# Metrics, sample grids, EMA, checkpoints and the run's files
# ------------------------------------------------------------------------------------------------


def method_file_name(method: str) -> str:
    """A method's name as run directories and records spell it ("anchor only" -> "anchor_only")."""
    return method.replace(" ", "_")


def format_metrics(record: dict) -> str:
    """One line of an iteration's scalars (per-sample evaluation scores are left to metrics.jsonl)."""
    items = [(k, v) for k, v in record.items() if not isinstance(v, list)]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


def mcnemar(before, after) -> tuple[int, int, float]:
    """Exact two-sided McNemar test of paired pass/fail outcomes (the same prompts and noise before
    and after): (gained, lost, p), p = P(a split of the gained + lost discordant pairs at least this
    uneven | each pair as likely to go either way) = min(1, 2 * P(Binomial(n, 1/2) <= min)).
    Outcomes are scores >= 0.5 (1 = pass); `before` and `after` are equal-length sequences."""
    if len(before) != len(after):
        raise ValueError(f"paired outcomes need equal lengths, got {len(before)} and {len(after)}")
    gained = int(sum(a >= 0.5 > b for b, a in zip(before, after, strict=True)))  # int: numpy outcomes sum to
    lost = int(sum(b >= 0.5 > a for b, a in zip(before, after, strict=True)))  # np.int64, whose 2**n wraps at 63
    n = gained + lost
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n
    return gained, lost, min(1.0, 2 * tail)


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
        grid = image_grid(samples)
        Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
        return

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
    with open(path, "w" if rewrite else "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


CURVES = ("reward_mean", "eval_reward", "zero_std_ratio", "adv_rel_abs", "adv_anchor_abs", "kl_ref", "clipfrac")


def plot_curves(run_dirs: list, path: str) -> None:
    """Boilerplate: the CURVES metrics of one or several runs (their metrics.jsonl) in one PNG."""
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


def open_tensorboard(config):
    """Boilerplate: a SummaryWriter in output_dir/tensorboard, or None when not asked for."""
    if not config.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(config.output_dir, "tensorboard"))


def save_outputs(backend, config, history: list) -> None:
    """Boilerplate: the trained LoRA weights, the config and the history in config.output_dir."""
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
    "micro_batch",  # memory only: the same gradients, accumulated in other chunks
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


def load_lora(backend, path: str) -> None:
    """Put a saved LoRA into a backend built with the same LoRA settings: a checkpoint's (`.pt`, float32) or a
    lora_state() saved with safetensors (`.lora.safetensors`, as experiments.py keeps a finished run's)."""
    if path.endswith(".pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)["lora"]
    else:
        from safetensors.torch import load_file  # imported where used: only reading such a file needs it

        state = load_file(path)
    set_lora(backend, state)  # copy_ casts a float16 file to the parameters' dtype


def save_checkpoint(path: str, backend, optimizer, config, history: list, ema=None) -> None:
    """Boilerplate: LoRA weights, optimizer, iteration, RNG, config and history, written atomically
    (temporary file, then rename), so a crash while saving keeps the last good checkpoint."""
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


def load_checkpoint(path: str, backend, optimizer, config, ema=None) -> list:
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
        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signum, self.previous[signum])
            signal.raise_signal(signum)
        self.requested = True
        tqdm.write(f"signal {signum}: stopping after this iteration, with a checkpoint")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class RunFiles:
    """Boilerplate: what a run writes in output_dir as it goes: metrics.jsonl (one line per
    iteration, flushed), sample grids, TensorBoard scalars and images, curves.png at the end."""

    def __init__(self, config):
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
        save_samples(samples, os.path.join(self.dir, f"samples_{tag}.png"), prompts, scores)
        grid = image_grid(samples)
        if self.writer and grid is not None:
            self.writer.add_image("eval_samples", grid, step)

    def finish(self) -> None:
        plot_curves([self.dir], os.path.join(self.dir, "curves.png"))
        if self.writer:
            self.writer.close()


def summary(history: list, config, seconds: float) -> str:
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
        paired = history[0].get("eval_scores_before"), history[evals[-1][0] - 1].get("eval_scores")
        if paired[0] and paired[1] and all(s in (0.0, 1.0) for s in paired[0] + paired[1]):  # a pass/fail reward
            gained, lost, p = mcnemar(*paired)
            pairs = f"{gained} samples gained, {lost} lost, McNemar exact p = {p:.2g}"
            lines.insert(1, f"paired on the same noise: {pairs}")
    if evals:
        best = max(evals, key=lambda e: e[1])
        lines.append(f"best eval reward {best[1]:.4f} at iteration {best[0]}")
    if config.output_dir:
        lines.append(f"files in {config.output_dir}: metrics.jsonl, curves.png, samples_*.png, lora/, checkpoint.pt")
        if evals:
            lines.append(f"sample grids before -> after: samples_before.png -> samples_{evals[-1][0]:05d}.png")
    return "\n".join(lines)
