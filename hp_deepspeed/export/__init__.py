"""Export a trained run (Hugging Face backbone, conditioning, precomputed prompts) and serve it."""

from hp_deepspeed.export.consolidate import export_run, load_run_model, resolve_checkpoint
from hp_deepspeed.export.predict import load_export, predict, predict_main

__all__ = ["export_run", "load_export", "load_run_model", "predict", "predict_main", "resolve_checkpoint"]
