"""Every supported diffusers family end to end on a tiny random-weight pipeline.

Per family, a tiny pipeline is saved and loaded back through `load_adapter`. One clip pair
is then sampled, encoded, cached and trained on for two steps with LoRA. Last, the saved
LoRA is loaded into a fresh pipeline with the pipeline's own `load_lora_weights`.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pgdpo.losses import LossConfig
from pgdpo.models import ADAPTERS, VideoModelAdapter, load_adapter
from pgdpo.models.tiny_families import TINY_FAMILIES, TinyFamily
from pgdpo.pairs import cache_latents, load_latents
from pgdpo.training.lora import add_lora, save_lora
from pgdpo.training.trainer import PairData, TrainConfig, train_preference
from pgdpo.video import write_mp4

CPU = torch.device("cpu")
PROMPT = "a red circle moves left"
SEEDS = [0, 1]  # chosen and rejected clip of the one training pair
EXPECTED_OBJECTIVE = {
    "animatediff": "epsilon",
    "text_to_video_sd": "epsilon",
    "cogvideox": "v_prediction",
    "ltx": "flow",
    "hunyuan_video": "flow",
    "wan": "flow",
}


@dataclass
class TrainedFamily:
    """Outputs of running one family through sampling, caching and two training steps."""

    family: TinyFamily
    base_dir: Path
    lora_dir: Path
    adapter: VideoModelAdapter
    clips: np.ndarray
    latents: torch.Tensor
    decoded: np.ndarray
    pair: PairData
    train_log: pd.DataFrame
    base_before: dict[str, torch.Tensor]
    lora_before: dict[str, torch.Tensor]


def is_lora(name: str) -> bool:
    return "lora_" in name


def snapshot(module: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """Copy the LoRA parameters (`lora=True`) or every other parameter of `module`."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if is_lora(name) == lora}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run on one CPU thread: these models are too small to gain from more, and threads contend on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(TINY_FAMILIES))
def trained(request, tmp_path_factory) -> TrainedFamily:
    family = TINY_FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base_dir, lora_dir = root / "base", root / "lora"
    family.build(0).save_pretrained(base_dir)

    adapter = load_adapter(base_dir, CPU, video=family.video)
    clips = adapter.generate(
        [PROMPT] * len(SEEDS), SEEDS, num_inference_steps=2, guidance_scale=3.0, batch_size=len(SEEDS)
    )
    latents = adapter.encode_videos(clips).float()
    decoded = adapter.decode_latents(latents)

    # Cache one pair the way the label stage does: MP4 files in, safetensors out.
    for role, clip in zip(("chosen", "rejected"), clips):
        write_mp4(root / f"{role}.mp4", clip)
    pairs = pd.DataFrame({"prompt": [PROMPT], "chosen_path": ["chosen.mp4"], "rejected_path": ["rejected.mp4"]})
    cache_latents(adapter, pairs, root, root / "latents.safetensors")
    cached = load_latents(root / "latents.safetensors")
    pair = PairData(
        chosen=cached["chosen"],
        rejected=cached["rejected"],
        prompt_embeds=cached["prompt_embeds"],
        score_w=torch.tensor([1.0]),
        score_l=torch.tensor([0.0]),
        pair_ids=np.array([0]),
    )
    # alpha != rank, so a reload that ignored the saved lora_alpha would scale the LoRA wrongly.
    add_lora(adapter, rank=4, alpha=8.0, dropout=0.0, targets=None, seed=0)
    base_before = snapshot(adapter.denoiser, lora=False)
    lora_before = snapshot(adapter.denoiser, lora=True)
    config = TrainConfig(
        method="pgdpo", loss=LossConfig(), steps=2, batch_size=1, lr=1e-2, probe_every=2, log_every=1
    )
    train_log, _ = train_preference(adapter, train=pair, probe=pair, cfg=config)
    save_lora(adapter, lora_dir)
    return TrainedFamily(
        family, base_dir, lora_dir, adapter, clips, latents, decoded, pair, train_log, base_before, lora_before
    )


def test_every_adapter_has_tiny_pipeline():
    assert {family.pipeline_class for family in TINY_FAMILIES.values()} == set(ADAPTERS)


def test_load_adapter_picks_family(trained: TrainedFamily):
    assert type(trained.adapter.pipe).__name__ == trained.family.pipeline_class
    assert type(trained.adapter) is ADAPTERS[trained.family.pipeline_class]


def test_generate_returns_uint8_clips(trained: TrainedFamily):
    video = trained.family.video
    assert trained.clips.shape == (len(SEEDS), video["num_frames"], video["height"], video["width"], 3)
    assert trained.clips.dtype == np.uint8
    # Different seeds must give different clips, or the pair would carry no preference.
    assert not np.array_equal(trained.clips[0], trained.clips[1])


def test_encode_decode_shapes(trained: TrainedFamily):
    assert trained.latents.dim() == 5
    assert trained.latents.shape[0] == len(SEEDS)
    assert torch.isfinite(trained.latents).all()
    assert trained.decoded.shape == trained.clips.shape
    assert trained.decoded.dtype == np.uint8


def test_cached_pair_shapes(trained: TrainedFamily):
    assert trained.pair.chosen.shape == trained.latents[:1].shape
    assert trained.pair.rejected.shape == trained.latents[:1].shape
    assert trained.pair.prompt_embeds.dim() == 3
    assert trained.pair.prompt_embeds.shape[0] == 1
    assert torch.isfinite(trained.pair.prompt_embeds).all()


def test_objective_read_from_scheduler(trained: TrainedFamily):
    family_name = trained.adapter.family
    assert trained.adapter.objective == EXPECTED_OBJECTIVE[family_name]


def test_training_loss_finite(trained: TrainedFamily):
    assert trained.train_log["step"].tolist() == [1, 2]
    for loss in trained.train_log["loss"]:
        assert math.isfinite(loss)


def test_training_changes_only_lora(trained: TrainedFamily):
    denoiser = trained.adapter.denoiser
    lora_after = snapshot(denoiser, lora=True)
    assert lora_after.keys() == trained.lora_before.keys()
    assert any(not torch.equal(trained.lora_before[name], lora_after[name]) for name in lora_after)

    base_after = snapshot(denoiser, lora=False)
    assert base_after.keys() == trained.base_before.keys()
    changed = [name for name in base_after if not torch.equal(trained.base_before[name], base_after[name])]
    assert changed == []


def test_reloaded_lora_matches_trained(trained: TrainedFamily):
    generator = torch.Generator().manual_seed(5)
    latents = trained.latents[:1]
    noise = torch.randn(latents.shape, generator=generator)
    noisy, timesteps, _ = trained.adapter.noisy_latents_and_target(latents, noise, torch.tensor([0.5]))

    trained.adapter.denoiser.eval()
    with torch.no_grad():
        expected = trained.adapter.predict(noisy, timesteps, trained.pair.prompt_embeds)

    reloaded = load_adapter(trained.base_dir, CPU, video=trained.family.video)
    with torch.no_grad():
        base_output = reloaded.predict(noisy, timesteps, trained.pair.prompt_embeds)
        reloaded.pipe.load_lora_weights(str(trained.lora_dir))
        reloaded_output = reloaded.predict(noisy, timesteps, trained.pair.prompt_embeds)
        reloaded.pipe.fuse_lora()
        fused_output = reloaded.predict(noisy, timesteps, trained.pair.prompt_embeds)

    # Training moved the LoRA weights, so the base output must differ, or the check below is vacuous.
    assert (base_output - expected).abs().max().item() > 1e-4
    torch.testing.assert_close(reloaded_output, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_output, expected, rtol=1e-4, atol=1e-5)


def to_pipeline_latents(adapter: VideoModelAdapter, latents: torch.Tensor) -> torch.Tensor:
    """Convert (B, C, F, H, W) latents to the layout of the pipeline's `latents` argument."""
    if adapter.family == "cogvideox":
        return latents.permute(0, 2, 1, 3, 4)
    if adapter.family == "ltx":
        return adapter.pipe._pack_latents(
            latents, adapter.pipe.transformer_spatial_patch_size, adapter.pipe.transformer_temporal_patch_size
        )
    return latents


def from_denoiser_output(adapter: VideoModelAdapter, output: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Convert one denoiser output inside the pipeline's loop back to the (B, C, F, H, W) layout of `latents`."""
    if adapter.family == "cogvideox":
        return output.permute(0, 2, 1, 3, 4)
    if adapter.family == "ltx":
        return adapter.pipe._unpack_latents(output, *latents.shape[2:])
    return output


def test_predict_matches_pipeline_denoiser(trained: TrainedFamily):
    adapter = load_adapter(trained.base_dir, CPU, video=trained.family.video)
    latents = torch.randn(trained.latents[:1].shape, generator=torch.Generator().manual_seed(3))
    captured: dict[str, torch.Tensor] = {}

    def capture_first_call(module, args, kwargs, output):
        if not captured:
            captured["timestep"] = kwargs["timestep"] if "timestep" in kwargs else args[1]
            captured["output"] = output[0]

    call = {
        "prompt": [PROMPT],
        "num_frames": trained.family.video["num_frames"],
        "height": trained.family.video["height"],
        "width": trained.family.video["width"],
        "num_inference_steps": 2,
        "latents": to_pipeline_latents(adapter, latents),
        "output_type": "latent",
    }
    if "max_sequence_length" in inspect.signature(adapter.pipe.__call__).parameters:
        call["max_sequence_length"] = trained.family.video["max_sequence_length"]
    if adapter.family != "hunyuan_video":
        # Without classifier-free guidance the denoiser gets only the prompt's batch.
        # HunyuanVideo embeds its guidance scale instead and keeps the pipeline's default.
        call["guidance_scale"] = 1.0
    handle = adapter.denoiser.register_forward_hook(capture_first_call, with_kwargs=True)
    try:
        adapter.pipe(**call)
    finally:
        handle.remove()

    expected = from_denoiser_output(adapter, captured["output"], latents)
    with torch.no_grad():
        actual = adapter.predict(latents, captured["timestep"], adapter.encode_prompts([PROMPT]))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_unknown_pipeline_class_rejected(tmp_path: Path):
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="StableDiffusionPipeline") as error:
        load_adapter(tmp_path, CPU, video={"num_frames": 4, "height": 32, "width": 32})
    for pipeline_class in ADAPTERS:
        assert pipeline_class in str(error.value)
