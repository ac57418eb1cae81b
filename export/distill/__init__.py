"""Training a draft model for speculative decoding from the target's own answers (`edge-rt train-draft`).

recipe.py (settings, prompts) -> dataset.py (the target answers through the runtime) -> model.py (the draft, its
vocabulary, its bundle) -> train.py (distillation loss, held-out acceptance, checkpoints) -> run.py (all of it
within a time budget, resumable).
"""
from .recipe import Recipe, load_prompts, parse_settings
from .run import Result, train_draft, work_dir

__all__ = ["Recipe", "Result", "load_prompts", "parse_settings", "train_draft", "work_dir"]
