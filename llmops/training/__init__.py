"""Training on top of transformers' Trainer: model presets, datasets, checkpoint/resume, per-step tracking, instruction pairs."""
