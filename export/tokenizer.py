"""Writes the tokenizer into a bundle and makes sure it decodes text cleanly.

A tokenizer converted from GGUF can carry a decoder chain meant for SentencePiece (ByteFallback, Replace '▁') in front
of ByteLevel; for a byte-level BPE the right decoder is ByteLevel alone, or spaces come out as 'Ġ'.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from edge_runtime.errors import ExportError

PROBE = "Hello world! The café's 3 apples cost $4.50.\n  Indented line; ünïcödé, 你好, emoji 🙂."


def _is_byte_level(node: dict | None) -> bool:
    if not node:
        return False
    if node.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(n) for n in node.get("pretokenizers", []) or [])


def save_tokenizer(hf_tokenizer, folder: Path) -> tuple[str, str]:
    """Save tokenizer.json + tokenizer_config.json into folder; return their names."""
    hf_tokenizer.save_pretrained(str(folder))
    for extra in ("special_tokens_map.json", "chat_template.jinja"):
        (folder / extra).unlink(missing_ok=True)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError("the source has no fast tokenizer (tokenizer.json); edge-runtime needs one")
    data = json.loads(path.read_text())
    if _is_byte_level(data.get("pre_tokenizer")):
        data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        path.write_text(json.dumps(data, ensure_ascii=False, indent=1))
    tok = Tokenizer.from_file(str(path))
    back = tok.decode(tok.encode(PROBE, add_special_tokens=False).ids, skip_special_tokens=False)
    if back.strip() != PROBE.strip():
        raise ExportError(f"the tokenizer does not round-trip text ({PROBE!r} decodes to {back!r})")
    return "tokenizer.json", "tokenizer_config.json"
