"""The bundle's tokenizer (tokenizers' Rust implementation) and its special tokens."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .errors import BundleError


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
        raise BundleError(f"cannot read tokenizer {path} ({e}); re-export the bundle") from None
