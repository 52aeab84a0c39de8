"""Memory and speed options on a tiny Wan pipeline: each must leave the numbers unchanged on CPU.

Covers gradient accumulation, gradient checkpointing, torch.compile (training: slow, sampling), autocast on CPU, VAE slicing and
tiling, model CPU offload on CPU, releasing the frozen modules for training, and the
family checks of the video size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pgdpo.config import Params, ParamsError
from pgdpo.generation import ModelSource
from pgdpo.losses import LossConfig
from pgdpo.models import MemoryOptions, load_adapter, load_base
from pgdpo.models.adapter import VideoConstraints, VideoSpec
from pgdpo.models.compile import compile_denoiser
from pgdpo.models.memory import configure_vae
from pgdpo.models.tiny_families import TINY_FAMILIES
from pgdpo.training.parallel import DataParallel
from pgdpo.training.speed import enable_gradient_checkpointing
from pgdpo.training.trainer import PairData, TrainConfig, accumulate_gradients, pair_errors, train_preference
from tests.conftest import TINY_WAN_VIDEO, add_nonzero_lora

CPU = torch.device("cpu")
# Latent shape of one tiny Wan clip: 8 channels, 9 frames -> 5, 32x32 pixels -> 16x16.
LATENT_SHAPE = (8, 5, 16, 16)


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_adapter(folder: Path, memory: MemoryOptions | None = None):
    """Load the tiny Wan and add a seeded rank-4 LoRA whose B matrices are nonzero, so every LoRA weight gets a gradient."""
    adapter = load_adapter(folder, CPU, video=TINY_WAN_VIDEO, memory=memory)
    add_nonzero_lora(adapter, scale=0.01)
    return adapter


def random_pairs(num_pairs: int, seed: int = 0) -> PairData:
    generator = torch.Generator().manual_seed(seed)
    return PairData(
        chosen=torch.randn(num_pairs, *LATENT_SHAPE, generator=generator),
        rejected=torch.randn(num_pairs, *LATENT_SHAPE, generator=generator),
        prompt_embeds=torch.randn(num_pairs, 16, 32, generator=generator),
        score_w=torch.rand(num_pairs, generator=generator) * 0.5 + 0.5,
        score_l=torch.rand(num_pairs, generator=generator) * 0.5,
        pair_ids=np.arange(num_pairs),
    )


def train_config(**overrides) -> TrainConfig:
    values = dict(method="pgdpo", loss=LossConfig.from_dict({"beta": 500.0}), steps=2, batch_size=4, lr=1e-3,
                  warmup_steps=0, probe_every=10, log_every=1, seed=0)
    return TrainConfig(**(values | overrides))


def lora_gradients(adapter, pairs: PairData, cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], list]:
    """Zero the LoRA gradients, run one accumulation over `pairs`, and return the gradients and metric parts."""
    denoiser = adapter.denoiser
    denoiser.zero_grad(set_to_none=True)
    noise = torch.randn(pairs.chosen.shape, generator=torch.Generator().manual_seed(5))
    sigmas = torch.tensor([0.2, 0.4, 0.6, 0.8])[: len(pairs)]
    parts = accumulate_gradients(adapter, pairs, cfg, noise, sigmas, step=1, parallel=DataParallel())
    grads = {name: p.grad.clone() for name, p in denoiser.named_parameters() if p.requires_grad}
    return grads, parts


def lora_state(adapter) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in adapter.denoiser.named_parameters() if p.requires_grad}


# ----- gradient accumulation ---------------------------------------------------------------


def test_accumulation_matches_full_batch_gradient(tiny_wan_folder: Path):
    adapter = lora_adapter(tiny_wan_folder)
    pairs = random_pairs(4)
    full, full_parts = lora_gradients(adapter, pairs, train_config(grad_accum_steps=1))
    split, split_parts = lora_gradients(adapter, pairs, train_config(grad_accum_steps=2))

    assert len(full_parts) == 1
    assert [count for count, _ in split_parts] == [2, 2]
    assert any(grad.abs().max() > 0 for grad in full.values())
    for name in full:
        # D = policy error - reference error cancels most digits of two float32 means, so split
        # and full batches agree to about 1e-5 of each gradient's largest entry.
        scale = float(full[name].abs().max())
        torch.testing.assert_close(split[name], full[name], rtol=1e-4, atol=1e-5 * scale, msg=f"gradient of {name}")


def test_accumulation_matches_full_batch_update(tiny_wan_folder: Path):
    states = {}
    for accum in (1, 2):
        adapter = lora_adapter(tiny_wan_folder)
        train_log, _ = train_preference(adapter, random_pairs(6), random_pairs(2, seed=9), train_config(grad_accum_steps=accum))
        states[accum] = (lora_state(adapter), train_log)

    (full, full_log), (split, split_log) = states[1], states[2]
    for name in full:
        torch.testing.assert_close(split[name], full[name], rtol=1e-4, atol=1e-7, msg=f"LoRA weight {name}")
    # The logged loss is the mean over the whole batch of 4 pairs, not over the last micro-batch.
    np.testing.assert_allclose(split_log["loss"], full_log["loss"], rtol=1e-4)
    np.testing.assert_allclose(split_log["ars_alpha_min"], full_log["ars_alpha_min"], rtol=1e-6)


# ----- gradient checkpointing --------------------------------------------------------------


def test_gradient_checkpointing_same_loss_and_gradients(tiny_wan_folder: Path):
    adapter = lora_adapter(tiny_wan_folder)
    pairs = random_pairs(4)
    plain, plain_parts = lora_gradients(adapter, pairs, train_config())
    enable_gradient_checkpointing(adapter.denoiser)
    assert adapter.denoiser.gradient_checkpointing
    checkpointed, checkpointed_parts = lora_gradients(adapter, pairs, train_config())

    assert checkpointed_parts[0][1]["loss"] == pytest.approx(plain_parts[0][1]["loss"], rel=1e-6)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-9, msg=f"gradient of {name}")


def test_gradient_checkpointing_unsupported_raises():
    pipe = TINY_FAMILIES["text_to_video_sd"].build(0)
    with pytest.raises(ParamsError, match="UNet3DConditionModel does not support gradient checkpointing"):
        enable_gradient_checkpointing(pipe.unet)


# ----- torch.compile -----------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_denoiser_same_loss_gradients_and_keys(tiny_wan_folder: Path):
    # About a minute: inductor compiles the policy, reference and no-gradient graphs.
    adapter = lora_adapter(tiny_wan_folder)
    pairs = random_pairs(4)
    keys = list(adapter.denoiser.state_dict())
    plain, plain_parts = lora_gradients(adapter, pairs, train_config())
    compile_denoiser(adapter.denoiser)
    compiled, compiled_parts = lora_gradients(adapter, pairs, train_config())

    assert list(adapter.denoiser.state_dict()) == keys, "compiling must keep the state-dict keys LoRA saving uses"
    # Fused kernels round differently, and beta = 500 multiplies the error differences inside the
    # loss. So the checks allow 2e-4 relative for the loss and 1e-3 for diff_chosen.
    assert compiled_parts[0][1]["loss"] == pytest.approx(plain_parts[0][1]["loss"], rel=2e-4)
    assert compiled_parts[0][1]["diff_chosen"] == pytest.approx(plain_parts[0][1]["diff_chosen"], rel=1e-3, abs=1e-7)
    errors = {name: float((compiled[name] - plain[name]).abs().max() / plain[name].abs().max()) for name in plain}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 5e-4, f"gradient of {worst} differs by {errors[worst]:.2e} of its largest entry"


# ----- autocast ----------------------------------------------------------------------------


def test_autocast_is_noop_on_cpu(tiny_wan_folder: Path, caplog):
    adapter = lora_adapter(tiny_wan_folder)
    pairs = random_pairs(2)
    noise = torch.randn(pairs.chosen.shape, generator=torch.Generator().manual_seed(3))
    sigmas = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        plain, _, _ = pair_errors(adapter, pairs, noise, sigmas, reference=False, autocast_dtype="float32")
        with caplog.at_level(logging.INFO, logger="pgdpo.runtime"):
            for _ in range(3):
                autocast, _, _ = pair_errors(adapter, pairs, noise, sigmas, reference=False, autocast_dtype="float16")

    torch.testing.assert_close(autocast, plain, rtol=0, atol=0)
    ignored = [record for record in caplog.records if "runtime.autocast=float16 ignored" in record.message]
    assert len(ignored) <= 1, "the ignored-autocast message is logged at most once per process"


# ----- VAE slicing and tiling, CPU offload -------------------------------------------------


def test_vae_slicing_and_tiling_same_decode(tiny_wan_folder: Path):
    plain = load_adapter(tiny_wan_folder, CPU, video=TINY_WAN_VIDEO)
    sliced = load_adapter(tiny_wan_folder, CPU, video=TINY_WAN_VIDEO, memory=MemoryOptions(vae_slicing=True, vae_tiling=True))
    assert sliced.pipe.vae.use_slicing and sliced.pipe.vae.use_tiling
    latents = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))

    clips = plain.decode_latents(latents)
    # Batch size 1 per VAE call changes float rounding, which moves a few pixels by one level.
    difference = np.abs(sliced.decode_latents(latents).astype(int) - clips.astype(int))
    assert difference.max() <= 1
    assert (difference > 0).mean() < 1e-3
    torch.testing.assert_close(sliced.encode_videos(clips), plain.encode_videos(clips), rtol=1e-5, atol=1e-5)


def test_vae_option_unsupported_logs_warning(caplog):
    pipe = SimpleNamespace(vae=torch.nn.Linear(2, 2))
    with caplog.at_level(logging.WARNING, logger="pgdpo.models.memory"):
        configure_vae(pipe, slicing=True, tiling=True)
    messages = [record.message for record in caplog.records]
    assert "runtime.vae_slicing: Linear does not support it; the VAE runs without it" in messages
    assert "runtime.vae_tiling: Linear does not support it; the VAE runs without it" in messages


def test_cpu_offload_ignored_on_cpu(tiny_wan_folder: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="pgdpo.models.memory"):
        adapter = load_adapter(tiny_wan_folder, CPU, video=TINY_WAN_VIDEO, memory=MemoryOptions(cpu_offload=True))
    assert any("runtime.cpu_offload applies on CUDA only" in record.message for record in caplog.records)
    clip = adapter.generate(["a red circle"], [0], num_inference_steps=2, guidance_scale=1.0, batch_size=1)
    assert clip.shape == (1, 9, 32, 32, 3)


# ----- frozen modules released for training ------------------------------------------------


def test_release_frozen_keeps_denoiser_output(tiny_wan_folder: Path):
    full = load_adapter(tiny_wan_folder, CPU, video=TINY_WAN_VIDEO)
    released = load_adapter(tiny_wan_folder, CPU, video=TINY_WAN_VIDEO, memory=MemoryOptions(release_frozen=True))

    assert all(p.device.type == "meta" for p in released.pipe.text_encoder.parameters())
    assert all(p.device.type == "meta" for p in released.pipe.vae.parameters())
    assert all(p.device.type == "cpu" for p in released.denoiser.parameters())
    noisy = torch.randn(1, *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([500.0])
    with torch.no_grad():
        torch.testing.assert_close(released.predict(noisy, timesteps, embeds), full.predict(noisy, timesteps, embeds))


# ----- video size checks -------------------------------------------------------------------


def test_video_constraints_name_valid_values():
    wan = VideoConstraints(frame_step=4, size_multiple=16)
    assert wan.violations(VideoSpec(num_frames=81, height=480, width=832)) == {}
    problems = wan.violations(VideoSpec(num_frames=80, height=480, width=840))
    assert set(problems) == {"num_frames", "width"}
    assert "for example use 81" in problems["num_frames"]
    assert "for example use 832" in problems["width"] or "for example use 848" in problems["width"]


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_tiny_family_video_is_valid(family: str):
    from pgdpo.models import ADAPTERS

    tiny = TINY_FAMILIES[family]
    pipe = tiny.build(0)
    adapter = ADAPTERS[tiny.pipeline_class](pipe, VideoSpec(**tiny.video), CPU, torch.float32)
    assert adapter.video_constraints().violations(adapter.spec) == {}


def test_base_video_invalid_raises_params_error(tiny_wan_folder: Path):
    params = Params.model_validate(
        {"base": {"model": str(tiny_wan_folder), "video": TINY_WAN_VIDEO | {"num_frames": 8, "height": 40}}}
    )
    with pytest.raises(ParamsError) as raised:
        load_base(params)
    message = str(raised.value)
    assert "base.video.num_frames = 8 is not 1 + k * 2" in message
    assert "base.video.height = 40 is not a positive multiple of 16" in message


def test_base_video_sets_spec(tiny_wan_folder: Path):
    params = Params.model_validate({"base": {"model": str(tiny_wan_folder), "video": TINY_WAN_VIDEO}})
    adapter = load_base(params)
    assert (adapter.spec.num_frames, adapter.spec.height, adapter.spec.width, adapter.spec.fps) == (9, 32, 32, 8)
    assert adapter.spec.max_sequence_length == 16


# ----- torch.compile in the sampling stages ------------------------------------------------


def compiled_graphs() -> int:
    """Return how many distinct graphs torch.compile has traced in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compile_sampling_matches_eager(tiny_wan_folder: Path):
    # About 30 s: inductor compiles one graph (the conditional and unconditional passes share a shape).
    base = {"model": str(tiny_wan_folder), "video": TINY_WAN_VIDEO}
    compiled_params = Params.model_validate({"base": base, "runtime": {"compile_sampling": True}})
    source = ModelSource.from_params(compiled_params)
    assert source.compile_mode == "default"
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    sample = dict(num_inference_steps=2, guidance_scale=4.0, batch_size=2)

    before = compiled_graphs()
    compiled = source.load().generate(prompts, seeds, **sample)
    assert compiled_graphs() > before, "runtime.compile_sampling must compile the denoiser"
    eager = load_base(Params.model_validate({"base": base})).generate(prompts, seeds, **sample)
    difference = np.abs(compiled.astype(np.int16) - eager.astype(np.int16))
    assert difference.max() <= 1, f"compiled clips differ from eager ones by up to {difference.max()} uint8 levels"

    # Training loads ignore the sampling switch: `train.compile` decides there.
    trainer = load_base(compiled_params, training=True)
    before = compiled_graphs()
    with torch.no_grad():
        trainer.predict(torch.randn(1, *LATENT_SHAPE), torch.tensor([500.0]), torch.randn(1, 16, 32))
    assert compiled_graphs() == before
