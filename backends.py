"""The models behind vgpo's trainer: the CPU toy, SD3(.5) through diffusers, and the shapes UNet.

`Backend` is the interface `vgpo.rollout`, `vgpo.policy_update` and `vgpo.train` call: prompts and
their encoding, noise, the velocity (guided, with gradients when training), decoding to the reward's
inputs, the reference policy (the LoRA adapter disabled), the trainable parameters and saving them.
Each backend also checks the Config fields that concern it (`check_config`) and refuses, with a
ConfigError naming the field, a setting it cannot honour. `build_backend(config)` picks one by
`config.model`. This file also holds the sigma schedule, the LoRA set-up, and ConfigError (the CLI
prints it as one line naming the flag). Heavy imports (diffusers' pipelines, the rewards, the shapes
model, OpenCV) happen inside the backend that needs them: the toy loads none of them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from abc import ABC, abstractmethod

import torch
import torch.nn as nn

import shapes
import tiny

# ------------------------------------------------------------------------------------------------
# Shared by every backend: errors, noise, the sigma schedule, prompts, LoRA
# ------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A field's value that cannot run, with the field, the value and what is allowed; the CLI
    prints it as one line naming the flag and exits with status 2."""

    def __init__(self, field: str, value, allowed: str):
        super().__init__(f"Config.{field}={value!r} is invalid: {allowed}")
        self.field, self.value, self.allowed = field, value, allowed


def require(ok: bool, config, field: str, allowed: str) -> None:
    """Raise a ConfigError naming `field`, its value in `config` and what is allowed, unless ok."""
    if not ok:
        raise ConfigError(field, getattr(config, field), allowed)


def sigma_schedule(num_steps: int, shift: float, scheduler_config=None) -> torch.Tensor:
    """sig_0 = 1 > ... > sig_T = 0, exactly as diffusers' FlowMatchEulerDiscreteScheduler (SD3.5).

    scheduler_config: a loaded pipeline's `scheduler.config` (its other settings are kept, its
    shift replaced by `shift`); None: the scheduler's defaults (decision 10).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler  # lazy: diffusers' import costs seconds

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


def randn(shape, generator, device) -> torch.Tensor:
    """Standard normal noise from one generator, or from one generator per sample (a list)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


# ------------------------------------------------------------------------------------------------
# The backend interface
# ------------------------------------------------------------------------------------------------


class Backend(ABC):
    """What vgpo's trainer calls. A subclass sets `config`, `device` and `model` (its network inside
    the peft adapter of `add_lora`) and implements the abstract methods; the LoRA methods are shared.

    `unsupported` names the Config fields the backend cannot honour: set away from their default,
    `check_config` raises a ConfigError naming the field (never silently ignored). Subclasses extend
    `check_config` with their own limits; it runs before anything loads.
    """

    config: object
    device: torch.device
    model: nn.Module  # the network inside its peft LoRA adapter
    unsupported: tuple[str, ...] = ()

    @classmethod
    def check_config(cls, config) -> None:
        """A ConfigError for a field this backend cannot honour or a value beyond its limits."""
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        for field in cls.unsupported:
            allowed = f"the {config.model!r} model cannot honour it (leave it at {defaults[field]!r})"
            require(getattr(config, field) == defaults[field], config, field, allowed)

    @abstractmethod
    def load_reward(self, spec: str, field: str = "reward"):
        """The reward `spec` as fn(inputs, prompts) -> (B,) float32; a bad spec: ConfigError on `field`."""

    @abstractmethod
    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The schedule sig_0 = 1 > ... > sig_T = 0, (T+1,)."""

    @abstractmethod
    def prompts(self, n: int, generator) -> list:
        """n training prompts, distinct while there are enough (decision 11)."""

    @abstractmethod
    def eval_prompts(self, n: int) -> list:
        """n held-out prompts for evaluation, the same every time."""

    @abstractmethod
    def encode(self, prompts) -> dict:
        """The prompts' conditioning tensors, batch first, on the device."""

    @abstractmethod
    def noise(self, batch: int, generator) -> torch.Tensor:
        """States at sigma 1 from one generator or one per sample (a list), (B, D...)."""

    @abstractmethod
    def velocity(self, x, sigma, cond, train: bool = False) -> torch.Tensor:
        """The (guided) velocity at x, (B, D...); with gradients to the LoRA weights when train."""

    @abstractmethod
    def decode(self, x0):
        """Data x0 (B, D...) -> the reward's inputs (images (B, 3, H, W) in [0, 1], or the toy's points)."""

    # LoRA, shared by every backend

    def reference(self):
        """A context in which the network is the base model (the adapter disabled): Eq. 8's reference."""
        return self.model.disable_adapter()

    def parameters(self) -> list:
        """The trainable (LoRA) tensors."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, directory: str):
        """The LoRA weights (the peft adapter) into `directory`."""
        self.model.save_pretrained(directory)


# ------------------------------------------------------------------------------------------------
# Toy: a conditional 2-D flow on per-condition mixtures of Gaussians
# ------------------------------------------------------------------------------------------------


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


class ToyBackend(Backend):
    """The 2-D toy behind the backend interface; the policy is the MLP with a peft LoRA adapter, on the CPU."""

    unsupported = (  # image and text settings: the toy has neither
        "resolution", "guidance_scale", "train_cfg", "cfg_detach_uncond", "decode_batch", "prompt_file",
        "max_sequence_length", "gradient_checkpointing", "offload_text_encoders", "reward_threads",
        "shapes_weights", "shapes_prompts",
    )  # fmt: skip

    @classmethod
    def check_config(cls, c) -> None:
        super().check_config(c)
        require(c.device in ("auto", "cpu"), c, "device", "the toy runs on the CPU: auto or cpu")
        require(c.toy_conditions >= 1, c, "toy_conditions", "must be >= 1")
        require(c.toy_modes >= 1, c, "toy_modes", "must be >= 1")
        require(c.toy_spread > 0, c, "toy_spread", "must be > 0")
        for field in ("reward", "eval_reward") if c.eval_reward else ("reward",):
            require(getattr(c, field) in TOY_REWARDS, c, field, f"the toy's rewards are {sorted(TOY_REWARDS)}")

    def __init__(self, config):
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
        return randn((batch, 2), generator, self.device)  # (B, 2)

    def velocity(self, x, sigma, cond, train=False):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(x.shape[0])  # (B,)
        return self.model(x, sigma, cond["c"])  # (B, 2)

    def decode(self, x0):
        return x0  # the toy reward reads points


# ------------------------------------------------------------------------------------------------
# SD3.5: diffusers pipeline, peft LoRA on the transformer, guided velocity
# ------------------------------------------------------------------------------------------------


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
        if model == "tiny":
            return tiny.tiny_sd3_pipeline(resolution)
        return tiny.sd3_pipeline_from_configs(tiny.SD35_MEDIUM, resolution, device=device, dtype=dtype)

    from diffusers import StableDiffusion3Pipeline  # lazy: ~7 s of imports the toy and shapes paths skip

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


TOY_FIELDS = ("toy_conditions", "toy_modes", "toy_spread", "toy_pretrain_steps")


class GuidedBackend(Backend):
    """A text-conditioned network with classifier-free guidance, scored by rewards.py: the shared part
    of SD3Backend and ShapesBackend. A subclass gives `cond_keys`, `network` and `held_out` prompts.

    The guided velocity v = v_u + g (v_c - v_u) drives the sampler; training recomputes it through
    both branches, as Flow-GRPO's paper-era and latest code, or with v_u detached when
    cfg_detach_uncond (its commits 2d76907..ac4c86e, scripts/train_sd3.py:190; decision 9).
    """

    cond_keys: tuple[str, ...]  # the conditioning tensors of one branch; "neg_" + key: the unconditional's
    held_out: list  # the evaluation prompts

    @classmethod
    def check_config(cls, c) -> None:
        super().check_config(c)
        require(c.resolution >= 16 and c.resolution % 16 == 0, c, "resolution", "must be a multiple of 16")
        import rewards  # lazy: OpenCV and PIL, which the toy never needs

        for field in ("reward", "eval_reward") if c.eval_reward else ("reward",):
            try:
                rewards.parse_spec(getattr(c, field))
            except ValueError as err:
                raise ConfigError(field, getattr(c, field), str(err)) from None

    def load_reward(self, spec: str, field: str = "reward"):
        import rewards

        return rewards.load_reward(spec, self.device, self.config.reward_threads)

    def eval_prompts(self, n):
        return [self.held_out[i % len(self.held_out)] for i in range(n)]

    def velocity(self, x, sigma, cond, train=False):
        """Both networks predict the velocity: the guided output itself (see `guided`)."""
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

    @abstractmethod
    def network(self, x, t, cond):
        """One forward: x (b, C, H, W), t (b,) in [0, 1000], cond of `cond_keys` -> the velocity."""


class SD3Backend(GuidedBackend):
    """SD3(.5) behind the backend interface: frozen VAE and text encoders, LoRA on the transformer.

    Prompt embeddings are cached off the accelerator and moved per batch. With offload_text_encoders
    every prompt is encoded, and the encoders freed, before the transformer reaches the accelerator,
    so the two never share its memory (SD3.5-Medium: 15.4 GiB together in bf16).
    """

    encode_batch = 64  # prompts per text-encoder call: bounds the encoders' activation memory
    unsupported = (*TOY_FIELDS, "shapes_weights", "shapes_prompts")
    cond_keys = ("embeds", "pooled")

    @classmethod
    def check_config(cls, c) -> None:
        super().check_config(c)
        require(c.max_sequence_length >= 1, c, "max_sequence_length", "must be >= 1")
        if c.model == "tiny":
            top = tiny.max_resolution(tiny.TINY_SD3)
            require(
                c.resolution <= top, c, "resolution", f"the tiny model's position embedding covers at most {top} px"
            )

    def __init__(self, config):
        self.config = config
        self.device = torch.device(
            config.device if config.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        )
        self.dtype = model_dtype(self.device)
        pipe = load_sd3_pipeline(config.model, config.resolution, self.dtype, self.device)
        check_resolution(pipe, config.resolution)
        for part in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            part.requires_grad_(False).eval().to(self.device, self.dtype)  # eval: no dropout anywhere
        self.pipe, self.cache = pipe, {}
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
        self.cache_prompts(self.train_prompts + self.held_out)
        self.pipe.text_encoder = self.pipe.text_encoder_2 = self.pipe.text_encoder_3 = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def sigmas(self, num_steps):
        return sigma_schedule(num_steps, self.config.shift, self.pipe.scheduler.config)

    def prompts(self, n, generator):
        return draw_prompts(self.train_prompts, n, generator)

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

    def cache_prompts(self, prompts) -> None:
        """Encode each prompt not yet cached (and the empty prompt, once) into the CPU cache."""
        new = [p for p in dict.fromkeys(["", *prompts]) if p not in self.cache]
        for p, row in zip(new, self._encode_new(new) if new else [], strict=True):
            self.cache[p] = row

    def encode(self, prompts):
        """Prompt embeddings of a batch on the device: embeds (B, L, E), pooled (B, E') and the empty
        prompt's (classifier-free guidance), expanded. Each distinct prompt is encoded once and cached
        on the CPU; one negative embedding for all."""
        self.cache_prompts(prompts)
        negative = self.cache[""]
        embeds = torch.stack([self.cache[p][0] for p in prompts]).to(self.device)  # (B, L, E)
        pooled = torch.stack([self.cache[p][1] for p in prompts]).to(self.device)  # (B, E')
        neg_embeds, neg_pooled = (t.to(self.device).expand(len(prompts), *t.shape) for t in negative)
        return {"embeds": embeds, "pooled": pooled, "neg_embeds": neg_embeds, "neg_pooled": neg_pooled}

    def noise(self, batch, generator):
        side = self.config.resolution // self.pipe.vae_scale_factor
        shape = (batch, self.pipe.transformer.config.in_channels, side, side)
        return randn(shape, generator, self.device)  # (B, C, H, W)

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


# ------------------------------------------------------------------------------------------------
# Shapes: a small UNet on 32 px scenes (shapes_model.py), predicting the velocity, guided
# ------------------------------------------------------------------------------------------------


def shapes_prompt_list(spec: str) -> list[str]:
    """shapes_prompts "p1; p2" -> ["p1", "p2"] (the grammar has no ';')."""
    return [p.strip() for p in spec.split(";") if p.strip()]


def balanced_prompts(by_category: dict, seed: int = 0) -> list[str]:
    """Evaluation order of the grammar: the i-th prompt from category i mod 4, so that any first 4k
    prompts hold k of each category (decision: overall = the mean of the categories, as GenEval); within
    a category a fixed shuffle, so that k prompts span its colours and shapes, cycled where a category
    has fewer prompts than the longest (12 single objects against 176 positions)."""
    rng = torch.Generator().manual_seed(seed)
    order = [[p[i] for i in torch.randperm(len(p), generator=rng).tolist()] for p in by_category.values()]
    longest = max(map(len, order))
    return [order[c][i % len(order[c])] for i in range(longest) for c in range(len(order))]


class ShapesBackend(GuidedBackend):
    """The shapes model behind the backend interface: shapes_model.py's UNet in pixel space on the CPU,
    LoRA on its self- and cross-attention projections, classifier-free guidance as SD3's (GuidedBackend).
    The network predicts the velocity; decode only rescales pixels from [-1, 1] to [0, 1] (VGPO's T
    decodes cost nothing)."""

    unsupported = (  # SD3's memory settings (no text encoders, no VAE) and the toy's fields
        "offload_text_encoders", "max_sequence_length", "gradient_checkpointing", "decode_batch", *TOY_FIELDS,
    )  # fmt: skip
    cond_keys = ("embeds",)

    @classmethod
    def check_config(cls, c) -> None:
        super().check_config(c)
        require(c.device in ("auto", "cpu"), c, "device", "the shapes model runs on the CPU: auto or cpu")
        require(c.resolution == shapes.SIZE, c, "resolution", f"the shapes model is {shapes.SIZE} px")
        ok = c.shapes_prompts == "grammar" or bool(shapes_prompt_list(c.shapes_prompts))
        require(ok, c, "shapes_prompts", "'grammar' or prompts separated by ';'")

    def __init__(self, config):
        import shapes_model  # lazy: diffusers' UNet

        path = config.shapes_weights or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "shapes_base.safetensors"
        )
        if not os.path.isfile(path):
            raise ConfigError("shapes_weights", path, "no such file; `python shapes_model.py train` pretrains one")
        unet, self.encoder = shapes_model.load(path)
        self.config, self.device, self.dtype = config, torch.device("cpu"), torch.float32
        self.model = add_lora(unet, config.lora_rank, config.lora_alpha, shapes_model.LORA_TARGETS, config.seed).eval()
        held = shapes.held_out_prompts()
        self.held_out = balanced_prompts(held)  # evaluation: the i-th prompt from category i mod 4
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

    @torch.no_grad()
    def encode(self, prompts):
        import shapes_model

        embeds = self.encoder(shapes_model.tokenize(prompts))  # (B, L, E)
        return {"embeds": embeds, "neg_embeds": self.encoder(shapes_model.tokenize([""] * len(prompts)))}

    def noise(self, batch, generator):
        return randn((batch, 3, shapes.SIZE, shapes.SIZE), generator, self.device)  # (B, 3, H, W)

    def network(self, x, t, cond):
        return self.model(x, t, encoder_hidden_states=cond["embeds"], return_dict=False)[0]  # (b, 3, H, W)

    @torch.no_grad()
    def decode(self, x0):
        return ((x0.float().clamp(-1, 1) + 1) / 2).clamp(0, 1)  # pixels in [0, 1]


def backend_class(model: str) -> type[Backend]:
    """The backend of `Config.model`: the CPU toy, the shapes UNet, or SD3.5 (tiny, hub id or directory)."""
    return {"toy": ToyBackend, "shapes": ShapesBackend}.get(model, SD3Backend)


def check_config(config) -> None:
    """The configured backend's checks (`Backend.check_config`), before anything loads."""
    backend_class(config.model).check_config(config)


def build_backend(config) -> Backend:
    """The model behind the backend interface, built from `config`."""
    return backend_class(config.model)(config)
