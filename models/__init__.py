"""Whole models from Hugging Face checkpoints: the family registry (config -> ModelSpec and
weight names), the decoder model built from generated kernels, loading and generation; the
state-space models (Mamba, Mamba2: models/mamba.py)."""
