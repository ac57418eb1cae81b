"""Incremental detokenization: token ids in, text pieces out, one token at a time.

Window technique (as in HF text-generation-inference): the text of ids[prefix:] minus the text of
ids[prefix:read] is what the newest ids add. The token(s) at ids[prefix:read] are already emitted and are kept
only as context, because decoders are not concatenative at token level (byte-level BPE splits a UTF-8 character
across tokens; Metaspace strips the first space of a decode). Each step decodes O(window) ids, not all of them.
"""

from __future__ import annotations

import tokenizers

_INCOMPLETE = "\ufffd"  # what a decode ends with while a multi-byte UTF-8 character is still missing bytes


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces that concatenate to tokenizer.decode(all ids)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        self._ids: list[int] = []  # only the live window; older ids are dropped as it slides
        self._prefix = 0  # ids[prefix:read]: already emitted, kept as decode context
        self._read = 0  # ids[read:]: not yet emitted
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def add(self, token_id: int) -> str:
        """Feed one id; returns the newly completed text ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is pending (an incomplete character comes out as '\ufffd', as in a full decode)."""
        if self._read == len(self._ids):
            return ""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or (not final and new_text.endswith(_INCOMPLETE)):
            # Nothing yet (skipped special token, or bytes of a character still to come): widen the window.
            if final:
                self._slide()
            return ""
        piece = new_text[len(prefix_text) :]
        self._slide()
        self._pieces.append(piece)
        return piece

    def _slide(self) -> None:
        # The ids just emitted become the context; everything before them is no longer needed.
        del self._ids[: self._read]
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
