"""Reward models trained by the pipeline: a tiny open_clip model for the shapes world."""

from pgdpo.reward.train import ARCHITECTURE, RewardModelConfig, register_architecture, train_reward_model

__all__ = ["ARCHITECTURE", "RewardModelConfig", "register_architecture", "train_reward_model"]
