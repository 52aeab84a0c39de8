"""Builders of tiny random-weight pipelines, one per supported diffusers family, for tests.

Every component is the class a released checkpoint of that family uses (or, for tokenizers,
a word-level `PreTrainedTokenizerFast`), so a saved folder loads through
`pgdpo.models.load_adapter` exactly like the real model. Nothing is downloaded. Sizes are the
smallest each family's architecture accepts, so one sampling or training step takes well
under a second on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    MotionAdapter,
    TextToVideoSDPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from pgdpo.models.tiny_wan import EOS, PAD, UNK, TinyWanConfig, build_pipeline, build_tokenizer

# Words the tiny tokenizers know; any other word maps to <unk>.
VOCABULARY = "a red green blue circle square triangle moves left right up down".split()
# Ids that `build_tokenizer` gives its special tokens.
PAD_ID, EOS_ID = 0, 1
TEXT_DIM = 32


@dataclass(frozen=True)
class TinyFamily:
    """A builder of one family's tiny pipeline and the video size that pipeline accepts."""

    pipeline_class: str
    build: Callable[[int], DiffusionPipeline]
    video: dict[str, int]


def build_clip_text_encoder(vocab_size: int, max_length: int, hidden_size: int = TEXT_DIM) -> CLIPTextModel:
    """Build a one-layer CLIP text encoder whose pooled output is read at the EOS token."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        pad_token_id=PAD_ID,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
    )
    return CLIPTextModel(config).eval()


def build_t5_encoder(vocab_size: int, d_model: int = TEXT_DIM) -> T5EncoderModel:
    """Build a one-layer T5 encoder."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )
    return T5EncoderModel(config).eval()


# ----- TextToVideoSDPipeline (ModelScope) ----------------------------------------------------


def build_image_vae() -> AutoencoderKL:
    """Build a Stable Diffusion-style image VAE that compresses space by 2 into 4 latent channels."""
    return AutoencoderKL(
        block_out_channels=(16, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
    )


def build_text_to_video_sd(seed: int = 0) -> TextToVideoSDPipeline:
    """Build a ModelScope-style pipeline: 2x spatial image VAE, two-level UNet3D, DDIM epsilon.

    A 4x32x32 clip becomes 4-channel latents of 4x16x16.
    """
    torch.manual_seed(seed)
    max_length = 16
    tokenizer = build_tokenizer(VOCABULARY, max_length)
    vae = build_image_vae()
    # `attention_head_dim` of UNet3DConditionModel is the number of heads (a diffusers naming quirk).
    unet = UNet3DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
    )
    # The scheduler settings of the diffusers-format ModelScope checkpoint (text-to-video-ms-1.7b).
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return TextToVideoSDPipeline(
        vae=vae,
        text_encoder=build_clip_text_encoder(len(tokenizer.get_vocab()), max_length),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )


# ----- AnimateDiffPipeline -------------------------------------------------------------------


def build_animatediff(seed: int = 0) -> AnimateDiffPipeline:
    """Build an AnimateDiff pipeline: a two-level image UNet plus motion modules, DDIM epsilon.

    A 4x32x32 clip becomes 4-channel latents of 4x16x16.
    """
    torch.manual_seed(seed)
    max_length = 16
    tokenizer = build_tokenizer(VOCABULARY, max_length)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
    )
    motion_adapter = MotionAdapter(
        block_out_channels=(16, 32),
        motion_layers_per_block=1,
        motion_norm_num_groups=8,
        motion_num_attention_heads=2,
        motion_max_seq_length=16,
    )
    # Epsilon-prediction DDIM with linear betas and no sample clipping.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="linspace",
    )
    # The constructor wraps the image UNet and the motion adapter into one UNetMotionModel.
    return AnimateDiffPipeline(
        vae=build_image_vae(),
        text_encoder=build_clip_text_encoder(len(tokenizer.get_vocab()), max_length),
        tokenizer=tokenizer,
        unet=unet,
        motion_adapter=motion_adapter,
        scheduler=scheduler,
    )


# ----- CogVideoXPipeline ---------------------------------------------------------------------


def build_cogvideox(seed: int = 0) -> CogVideoXPipeline:
    """Build a CogVideoX-5B-style pipeline: rotary positions and v-prediction with zero terminal SNR.

    The VAE compresses time by 4 and space by 4, so a 9x32x32 clip becomes 4-channel latents
    of 3x8x8. The transformer patchifies them by 2x2, giving 3 * 4 * 4 = 48 video tokens.
    """
    torch.manual_seed(seed)
    max_length = 16
    tokenizer = build_tokenizer(VOCABULARY, max_length)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 16),
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        sample_height=32,
        sample_width=32,
    )
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=TEXT_DIM,
        num_layers=1,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=max_length,
        use_rotary_positional_embeddings=True,
    )
    # v-prediction with zero terminal SNR, so training exercises get_velocity on the
    # CogVideoX-specific noise schedule.
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=build_t5_encoder(len(tokenizer.get_vocab())),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


# ----- LTXPipeline ---------------------------------------------------------------------------


def build_ltx(seed: int = 0) -> LTXPipeline:
    """Build an LTX-Video-0.9.1-style pipeline: timestep-conditioned decoder, dynamic timestep shift.

    The VAE patchifies by 4x4 and has one 2x space-time downsampling block, so it compresses
    time by 2 and space by 8: a 9x32x32 clip becomes 8-channel latents of 5x4x4, which the
    transformer takes as 80 tokens.
    """
    torch.manual_seed(seed)
    max_length = 16
    tokenizer = build_tokenizer(VOCABULARY, max_length)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(16, 16),
        down_block_types=("LTXVideoDownBlock3D",) * 2,
        decoder_block_out_channels=(16, 16),
        layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, False),
        decoder_spatio_temporal_scaling=(True, False),
        decoder_inject_noise=(False, False, False),
        downsample_type=("conv", "conv"),
        upsample_residual=(False, False),
        upsample_factor=(1, 1),
        timestep_conditioning=True,
        patch_size=4,
        patch_size_t=1,
    )
    # Non-trivial latent statistics, so a missing normalisation step changes the latents.
    vae.latents_mean.fill_(0.1)
    vae.latents_std.fill_(0.5)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=TEXT_DIM,
    )
    # The dynamic-shift settings of the diffusers-format LTX-Video 0.9.1 scheduler config.
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return LTXPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=build_t5_encoder(len(tokenizer.get_vocab())),
        tokenizer=tokenizer,
        transformer=transformer,
    )


# ----- HunyuanVideoPipeline ------------------------------------------------------------------

# Chat markers of the Llama 3 prompt template that HunyuanVideoPipeline wraps every prompt in.
LLAMA_MARKERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BOS = "<|begin_of_text|>"


def build_llama_tokenizer(vocabulary: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer on which HunyuanVideoPipeline's default prompt template works.

    The pipeline drops the first `crop_start` (95) tokens of every encoded prompt, which is
    the length of the template's system part under the released Llama tokenizer. This
    tokenizer splits the chat markers off as tokens of their own and prepends as many BOS
    tokens as it takes for the system part to be exactly `crop_start` tokens long here too.
    """
    vocab = {PAD: 0, EOS: 1, UNK: 2, BOS: 3}
    for token in LLAMA_MARKERS:
        vocab[token] = len(vocab)
    for word in vocabulary:
        vocab.setdefault(word.lower(), len(vocab))

    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(LLAMA_MARKERS)
    system_part = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    num_bos = DEFAULT_PROMPT_TEMPLATE["crop_start"] - len(tokenizer.encode(system_part).ids)
    if num_bos < 1:
        raise ValueError(f"the prompt template's system part is longer than crop_start; {num_bos=}")
    tokenizer.post_processor = TemplateProcessing(
        single=" ".join([BOS] * num_bos + ["$A", EOS]), special_tokens=[(BOS, 3), (EOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=BOS,
        model_max_length=max_length,
    )


def build_hunyuan_video(seed: int = 0) -> HunyuanVideoPipeline:
    """Build a HunyuanVideo-style pipeline: Llama and CLIP text encoders, embedded guidance, shift 7.

    The VAE compresses time by 4 and space by 4, so a 9x32x32 clip becomes 4-channel latents
    of 3x8x8. The transformer patchifies them by 2x2, giving 3 * 4 * 4 = 48 video tokens.
    """
    torch.manual_seed(seed)
    max_length = 16
    crop_start = DEFAULT_PROMPT_TEMPLATE["crop_start"]
    tokenizer = build_llama_tokenizer(VOCABULARY, crop_start + max_length)
    # Three layers, because the pipeline reads the hidden states of the third layer from the end.
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=TEXT_DIM,
            intermediate_size=2 * TEXT_DIM,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=crop_start + max_length,
            pad_token_id=PAD_ID,
            bos_token_id=3,
            eos_token_id=EOS_ID,
        )
    ).eval()
    # The pipeline pads CLIP prompts to 77 tokens, the length of the released CLIP tokenizer.
    clip_length = 77
    tokenizer_2 = build_tokenizer(VOCABULARY, clip_length)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4,
        block_out_channels=(8, 8, 16),
        down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
        mid_block_add_attention=False,
    )
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        rope_axes_dim=(4, 6, 6),
    )
    return HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=build_clip_text_encoder(len(tokenizer_2.get_vocab()), clip_length),
        tokenizer_2=tokenizer_2,
    )


# ----- WanPipeline ---------------------------------------------------------------------------


def build_wan(seed: int = 0) -> DiffusionPipeline:
    """Build the shapes-world Wan pipeline of `tiny_wan`, cut to one transformer layer."""
    config = TinyWanConfig(num_layers=1, head_dim=16, ffn_dim=32, max_sequence_length=16, vocabulary=VOCABULARY)
    return build_pipeline(config, seed=seed)


TINY_FAMILIES: dict[str, TinyFamily] = {
    "animatediff": TinyFamily(
        "AnimateDiffPipeline",
        build_animatediff,
        {"num_frames": 4, "height": 32, "width": 32, "max_sequence_length": 16},
    ),
    "text_to_video_sd": TinyFamily(
        "TextToVideoSDPipeline",
        build_text_to_video_sd,
        {"num_frames": 4, "height": 32, "width": 32, "max_sequence_length": 16},
    ),
    "cogvideox": TinyFamily(
        "CogVideoXPipeline",
        build_cogvideox,
        {"num_frames": 9, "height": 32, "width": 32, "max_sequence_length": 16},
    ),
    "ltx": TinyFamily(
        "LTXPipeline",
        build_ltx,
        # fps 25 equals LTXPipeline's default frame_rate, which the tests' own pipeline calls use.
        {"num_frames": 9, "height": 32, "width": 32, "fps": 25, "max_sequence_length": 16},
    ),
    "hunyuan_video": TinyFamily(
        "HunyuanVideoPipeline",
        build_hunyuan_video,
        {"num_frames": 9, "height": 32, "width": 32, "max_sequence_length": 16},
    ),
    "wan": TinyFamily(
        "WanPipeline",
        build_wan,
        {"num_frames": 9, "height": 32, "width": 32, "max_sequence_length": 16},
    ),
}
