"""Tiny random-weight models built from configs, offline: the SD3 pipeline behind
`vgpo.py --model tiny` and the CLIP models the reward tests run through their real code path.

No file is downloaded: tokenizers are built in code from a character vocabulary.
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


def _clip_text_config(hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=2,
        projection_dim=projection,
        max_position_embeddings=77,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


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
        text_config=_clip_text_config(16, 16).to_dict(), vision_config=vision.to_dict(), projection_dim=16
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPModel(config).eval(), tiny_tokenizer(), processor


@_own_rng
def tiny_sd3_pipeline(resolution: int = 32, seed: int = 0):
    """A StableDiffusion3Pipeline of the real classes with tiny random weights.

    Widths follow SD3's constraints: pooled_projection_dim = the two CLIP projections summed,
    T5 width (= joint_attention_dim) >= the two CLIP hidden widths summed. VAE downsamples 2x.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 2,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=resolution,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=resolution,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    )
    t5 = T5Config(vocab_size=len(VOCAB), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection(_clip_text_config(16, 8)),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(16, 8)),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=T5EncoderModel(t5),
        tokenizer_3=tiny_tokenizer(),
    )
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        part.eval()  # built from configs, modules start in training mode (T5 has dropout 0.1)
    return pipe
