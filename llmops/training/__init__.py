"""Training on top of transformers' Trainer: model presets, datasets, checkpoint/resume, tracking, launchers.

`tasks/pretrain.py` and `tasks/finetune.py` are the two DVC stages; what they share lives here.
"""
