"""The trained LoRA as an MLflow pyfunc model that turns prompts into MP4 clips.

The logged model contains the base pipeline (as a folder artifact when it is local, else its hub
id in the model config), the LoRA adapter folder, and a copy of the `pgdpo` package. So
`mlflow.pyfunc.load_model` needs no checkout of this project.

Input: a DataFrame with a `prompt` column and an optional integer `seed` column (default:
`params["seed"]` plus the row number). Output: a DataFrame with columns prompt, seed and
video_path, one H.264 MP4 per row written to `params["output_dir"]` (default: a new temporary
folder). Paths rather than arrays, because a clip is a (frames, height, width, 3) array that
MLflow's tabular output schema cannot hold, and MP4 is what the rest of the pipeline reads.
"""

from __future__ import annotations

import importlib.metadata
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
# Distributions the model needs at load time; their installed versions are pinned in the model.
REQUIREMENTS = (
    "torch", "diffusers", "transformers", "peft", "safetensors", "av", "pandas", "numpy", "pydantic", "pyyaml", "tqdm", "mlflow",
)
DEFAULT_PARAMS = {"num_inference_steps": 20, "guidance_scale": 4.0, "seed": 0, "output_dir": ""}


class LoraVideoModel(mlflow.pyfunc.PythonModel):
    """Base text-to-video pipeline with the trained LoRA adapter loaded; predicts MP4 paths."""

    def load_context(self, context) -> None:
        from pgdpo.generation import ModelSource

        config = context.model_config or {}
        base = context.artifacts.get("base") or config["base_model"]
        self.source = ModelSource(
            model=base,
            device=config.get("device", "cpu"),
            dtype=config.get("dtype", "float32"),
            revision=config.get("revision"),
            variant=config.get("variant"),
            lora=context.artifacts["adapter"],
            video=tuple(config["video"].items()) if config.get("video") else None,
        )
        self.adapter = self.source.load()
        logger.info("loaded %s with the LoRA adapter %s", base, self.source.lora)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from pgdpo.generation import encode_clips
        from pgdpo.naming import video_filename

        settings = {**DEFAULT_PARAMS, **(params or {})}
        if "prompt" not in model_input.columns:
            raise ValueError(f"model input needs a 'prompt' column; got columns {list(model_input.columns)}")
        prompts = [str(prompt) for prompt in model_input["prompt"]]
        if "seed" in model_input.columns:
            seeds = [int(seed) for seed in model_input["seed"]]
        else:
            seeds = [int(settings["seed"]) + row for row in range(len(prompts))]
        output_dir = Path(settings["output_dir"] or tempfile.mkdtemp(prefix="pgdpo-predict-"))
        output_dir.mkdir(parents=True, exist_ok=True)

        clips = self.adapter.generate(
            prompts, seeds, num_inference_steps=int(settings["num_inference_steps"]),
            guidance_scale=float(settings["guidance_scale"]), batch_size=len(prompts), desc="predict",
        )
        paths = []
        for row, (prompt, data) in enumerate(zip(prompts, encode_clips(clips, self.adapter.spec.fps))):
            path = output_dir / video_filename(prompt, row)
            path.write_bytes(data)
            paths.append(str(path))
        return pd.DataFrame({"prompt": prompts, "seed": seeds, "video_path": paths})


def pinned_requirements() -> list[str]:
    """Return `name==version` for every installed distribution in REQUIREMENTS."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            logger.warning("%s is not installed; the logged model does not pin it", name)
    return pins


def model_signature():
    """Return the signature: prompt and an optional seed in, prompt, seed and video_path out, plus sampling params."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, Schema

    example_in = pd.DataFrame({"prompt": ["a red circle moving left"], "seed": [0]})
    example_out = example_in.assign(video_path=["a red circle moving left-0.mp4"])
    inferred = infer_signature(example_in, example_out, params=DEFAULT_PARAMS)
    # An inferred schema makes every example column required, so the seed column is declared by hand.
    inputs = Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)])
    return ModelSignature(inputs=inputs, outputs=inferred.outputs, params=inferred.params)


def prepare_logging() -> None:
    """Do the slow parts of `log_lora_model` that need no trained adapter.

    The tracking worker calls this while `train` computes (`Tracker.prepare`). It imports
    `mlflow.pyfunc` and `pgdpo.config` (torch), builds the signature, and runs MLflow's check of
    the pinned requirements against the installed packages. That check reads the file list of
    every installed distribution and keeps the result for the check `log_model` repeats: 2.6 s
    of the 2.9 s that `log_lora_model` took in a cProfile run on the tests' reduced project.

    NOTE: the kept result is MLflow's implementation (mlflow.utils.requirements_utils); if a
    release drops it, `log_lora_model` is only slower again, not different.
    """
    import mlflow.pyfunc  # noqa: F401 - imported here, ahead of log_model
    from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

    import pgdpo.config  # noqa: F401 - the worker validates the params of log_lora_model with it

    model_signature()
    warn_dependency_requirement_mismatches(pinned_requirements())


def log_lora_model(params, base_dir: Path, adapter_dir: Path, registered_model: str | None) -> str:
    """Log the LoRA as a pyfunc model in the active run, register it if `registered_model` is set.

    Args:
        params: validated `Params`; `base.model` decides whether the base is a folder artifact.
        base_dir: local pipeline folder of the shapes-world base (used when base.model is "shapes").
        adapter_dir: the LoRA folder written by `train`.
        registered_model: registry name; None logs the model without registering it.

    Returns:
        The model URI ("models:/<model id>").
    """
    shapes = params.base.model == "shapes"
    local_base = Path(params.base.model)
    artifacts = {"adapter": str(adapter_dir)}
    config = {"device": params.runtime.device, "dtype": params.runtime.dtype}
    if not shapes:
        # A pipeline folder or hub id has no pgdpo.json, so its video size travels with the model.
        config["video"] = params.base.video.model_dump()
    if shapes or local_base.is_dir():
        artifacts["base"] = str(base_dir if shapes else local_base)
    else:
        # A hub model is referenced, not copied: the loading machine needs access to the hub or its cache.
        config |= {"base_model": params.base.model, "revision": params.base.revision, "variant": params.base.variant}

    # NOTE: MLflow saves the LoraVideoModel instance with cloudpickle, so loading the model runs
    # unpickling; load models only from tracking servers you trust. The weights are safetensors.
    info = mlflow.pyfunc.log_model(
        name="lora_video_model",
        python_model=LoraVideoModel(),
        artifacts=artifacts,
        model_config=config,
        code_paths=[str(PACKAGE_DIR)],
        pip_requirements=pinned_requirements(),
        signature=model_signature(),
        registered_model_name=registered_model,
    )
    logger.info("logged the LoRA pyfunc model %s%s", info.model_uri, f" as {registered_model}" if registered_model else "")
    return info.model_uri
