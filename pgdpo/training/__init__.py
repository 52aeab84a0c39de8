"""Preference fine-tuning: LoRA setup and export, and the training loop."""
