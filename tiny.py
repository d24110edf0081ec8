"""Tiny random-weight models built from configs, offline: the SD3 pipeline behind
`vgpo.py --model tiny` and the CLIP models the reward tests run through their real code path.

No file is downloaded: tokenizers are built in code from a character vocabulary. diffusers' and
transformers' model classes are imported inside the builders: importing them costs ~7 s, which the
toy and shapes paths (and `import vgpo`) should not pay.
"""

from __future__ import annotations

import functools
import string

import torch

VOCAB = ["<pad>", "<unk>", "<s>", "</s>"] + list(string.ascii_lowercase + string.digits + "\"'.,!?-")


def tiny_tokenizer(max_length: int = 77):
    """A character-level fast tokenizer (<s> text </s>, lower-cased) as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=max_length,
    )


def _clip_text_config(**fields):
    from transformers import CLIPTextConfig

    ids = dict(vocab_size=len(VOCAB), max_position_embeddings=77, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return CLIPTextConfig(**{**ids, **fields})


def _own_rng(build):
    """Run `build` on a forked global RNG: building a tiny model leaves the caller's RNG alone."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return build(*args, **kwargs)

    return wrapper


@_own_rng
def tiny_clip(image_size: int = 32, seed: int = 0):
    """A random CLIPModel (text + vision, projection 16) with a character tokenizer and a
    CLIPImageProcessor, for the reward tests. Returns (model, tokenizer, image_processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        image_size=image_size,
        patch_size=8,
        projection_dim=16,
    )
    config = CLIPConfig(
        text_config=_clip_text_config(
            hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, projection_dim=16
        ).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=16,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPModel(config).eval(), tiny_tokenizer(), processor


# Component configs of the SD3 pipeline: tiny for tests, and SD3.5-Medium's published values
# (stabilityai/stable-diffusion-3.5-medium, */config.json) for a random-weight model of real size.
# Widths follow SD3's constraints: pooled_projection_dim = the two CLIP projections summed, and the
# T5 width (= joint_attention_dim) >= the two CLIP hidden widths summed.
TINY_SD3 = dict(
    transformer=dict(
        sample_size=16,
        pos_embed_max_size=64,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
    ),
    vae=dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4),
    clip=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, projection_dim=8),
    clip_2=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, projection_dim=8),
    t5=dict(d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, vocab_size=len(VOCAB)),
)
SD35_MEDIUM = dict(
    transformer=dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)),
    ),
    vae=dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    clip=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        projection_dim=768,
        hidden_act="quick_gelu",
        vocab_size=49408,
    ),
    clip_2=dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_attention_heads=20,
        num_hidden_layers=32,
        projection_dim=1280,
        hidden_act="gelu",
        vocab_size=49408,
    ),
    t5=dict(
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        vocab_size=32128,
    ),
)


@_own_rng
def sd3_pipeline_from_configs(spec: dict, resolution: int, seed: int = 0, device=None, dtype=None):
    """A StableDiffusion3Pipeline of the real classes with random weights from `spec`
    (TINY_SD3 or SD35_MEDIUM) in `dtype`; character tokenizers. The text encoders and the VAE are
    built directly on `device`, the transformer on the CPU, as a hub pipeline loads (the backend
    moves it once the prompts are encoded)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    blocks = len(spec["vae"]["block_out_channels"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        transformer = SD3Transformer2DModel(**spec["transformer"])
        with torch.device(device or "cpu"):
            parts = dict(
                transformer=transformer,
                vae=AutoencoderKL(
                    down_block_types=("DownEncoderBlock2D",) * blocks,
                    up_block_types=("UpDecoderBlock2D",) * blocks,
                    sample_size=resolution,
                    shift_factor=0.0609,
                    scaling_factor=1.5305,
                    **spec["vae"],
                ),
                text_encoder=CLIPTextModelWithProjection(_clip_text_config(**spec["clip"])),
                text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(**spec["clip_2"])),
                text_encoder_3=T5EncoderModel(T5Config(**spec["t5"])),
            )
    finally:
        torch.set_default_dtype(previous)
    for part in parts.values():
        part.eval()  # built from configs, modules start in training mode (T5 has dropout 0.1)
    tokenizers = dict(tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), tokenizer_3=tiny_tokenizer())
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **parts, **tokenizers)


def tiny_sd3_pipeline(resolution: int = 32, seed: int = 0):
    """The tiny random SD3 pipeline of the tests and `--model tiny` (VAE downsamples 2x)."""
    return sd3_pipeline_from_configs(TINY_SD3, resolution, seed)


def max_resolution(spec: dict) -> int:
    """The largest image side the transformer's position embedding covers for a pipeline `spec`."""
    t = spec["transformer"]
    return t["pos_embed_max_size"] * t["patch_size"] * 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
