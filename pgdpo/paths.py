"""Output paths of every stage, relative to the project root (dvc.yaml lists the same paths)."""

from pathlib import Path

DATA = Path("data")
TRAIN_PROMPTS = DATA / "prompts" / "train.txt"
EVAL_PROMPTS = DATA / "prompts" / "eval.txt"
BASE_MODEL = DATA / "base"
REWARD_MODEL = DATA / "reward_model"
CANDIDATES = DATA / "candidates"
SCORES = DATA / "scores.csv"
PAIRS = DATA / "pairs"
ADAPTER = DATA / "adapter"
EVAL_BASE = DATA / "eval_base"
EVAL_TRAINED = DATA / "eval_trained"

METRICS = Path("metrics")
PLOTS = Path("plots")
REPORTS = Path("reports")

# Resumable training checkpoints: not a DVC output, removed when training finishes.
CHECKPOINTS = Path("checkpoints") / "train"
