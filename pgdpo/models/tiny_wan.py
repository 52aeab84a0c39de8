"""Builders for a small Wan-family text-to-video pipeline with random weights.

The shapes-world base model and the tests use these builders. Every component is a real
diffusers or transformers class, so the saved folder loads with `WanPipeline.from_pretrained`
exactly like a released Wan checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


@dataclass
class TinyWanConfig:
    """Sizes of the small Wan pipeline.

    The VAE compresses time by 2 and space by 2, so a 9x32x32 clip becomes 5x16x16 latents
    with `z_dim` channels. The transformer patchifies latents by (1, 2, 2), giving
    5 * 8 * 8 = 320 tokens per clip.
    """

    vae_base_dim: int = 16
    z_dim: int = 8
    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 4
    num_layers: int = 4
    num_heads: int = 2
    head_dim: int = 32
    ffn_dim: int = 128
    max_sequence_length: int = 16
    flow_shift: float = 3.0
    vocabulary: list[str] = field(default_factory=list)


def build_tokenizer(vocabulary: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """Build a lower-casing word-level tokenizer; words outside `vocabulary` map to <unk>."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for word in vocabulary:
        vocab.setdefault(word.lower(), len(vocab))

    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=max_length
    )


def build_text_encoder(vocab_size: int, cfg: TinyWanConfig) -> UMT5EncoderModel:
    """Build a small randomly initialised UMT5 encoder (frozen in use: it only has to tell words apart)."""
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=cfg.text_dim,
        d_kv=cfg.text_dim // cfg.text_heads,
        d_ff=cfg.text_dim * 2,
        num_layers=cfg.text_layers,
        num_heads=cfg.text_heads,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def build_vae(cfg: TinyWanConfig) -> AutoencoderKLWan:
    """Build a small Wan VAE with 2x temporal and 2x spatial compression."""
    return AutoencoderKLWan(
        base_dim=cfg.vae_base_dim,
        z_dim=cfg.z_dim,
        dim_mult=[1, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[True],
        latents_mean=[0.0] * cfg.z_dim,
        latents_std=[1.0] * cfg.z_dim,
        scale_factor_temporal=2,
        scale_factor_spatial=2,
    )


def build_transformer(cfg: TinyWanConfig) -> WanTransformer3DModel:
    """Build a small Wan diffusion transformer."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.z_dim,
        out_channels=cfg.z_dim,
        text_dim=cfg.text_dim,
        freq_dim=64,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        rope_max_seq_len=64,
    )


def build_scheduler(cfg: TinyWanConfig) -> FlowMatchEulerDiscreteScheduler:
    """Build the flow-matching Euler scheduler with a fixed timestep shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.flow_shift)


def build_pipeline(cfg: TinyWanConfig, seed: int = 0) -> WanPipeline:
    """Build a complete random-weight `WanPipeline` from `cfg`, seeded for reproducibility."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(cfg.vocabulary, cfg.max_sequence_length)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=build_text_encoder(len(tokenizer.get_vocab()), cfg),
        vae=build_vae(cfg),
        transformer=build_transformer(cfg),
        scheduler=build_scheduler(cfg),
    )
