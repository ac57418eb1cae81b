"""A conversation over one engine: messages in, streamed answer out, the KV cache reused across turns."""
from __future__ import annotations

from collections.abc import Callable, Iterator

from .detokenizer import StreamingDetokenizer
from .engine import Engine
from .errors import ContextFullError
from .sampling import SamplingParams


class ChatSession:
    """Each turn renders the whole conversation with the chat template; the engine prefills only the tokens past
    the longest prefix it already holds, so a new turn costs its own tokens, not the history's.

    trim=False (the API default): a conversation that outgrows the context raises ContextFullError.
    trim=True (the chat command): the oldest turns are dropped and the rest re-prefilled; on_notice says so.
    """

    def __init__(self, engine: Engine, system: str | None = None, trim: bool = False,
                 on_notice: Callable[[str], None] | None = None):
        self.engine = engine
        self.system = system
        self.trim = trim
        self.on_notice = on_notice or (lambda _msg: None)
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _first_turn(self) -> int:
        return 1 if self.system else 0

    def _fit(self, max_tokens: int) -> list[int]:
        """Token ids of the conversation, leaving room for an answer; drop the oldest turns if allowed."""
        room = min(max_tokens, self.engine.context // 4)  # an answer needs room; a long one may still stop early
        while True:
            ids = self.engine.chat_ids(self.messages)
            if len(ids) + room <= self.engine.context:
                return ids
            turns = len(self.messages) - self._first_turn()
            if not self.trim or turns <= 1:
                raise ContextFullError(
                    f"the conversation needs {len(ids)} + {room} tokens but the context holds {self.engine.context}; "
                    "start a new conversation (/reset) or load the model with a larger context")
            # drop the oldest exchange: a user message and the assistant answer after it
            del self.messages[self._first_turn():self._first_turn() + min(2, turns - 1)]
            self.on_notice(f"(context full: dropped the oldest turn, {len(self.messages) - self._first_turn()} "
                           "messages kept)")

    def send(self, text: str, sampling: SamplingParams = SamplingParams(), max_tokens: int = 512) -> Iterator[str]:
        """Stream the answer to `text`. Stopping early (closing the generator, Ctrl-C) keeps the partial answer."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self._fit(max_tokens)
        except ContextFullError:
            self.messages.pop()
            raise
        detok = StreamingDetokenizer(self.engine.tokenizer)
        try:
            for token in self.engine.generate_step(ids, sampling, max_tokens):
                if piece := detok.add(token):
                    yield piece
            if tail := detok.flush():
                yield tail
        except ContextFullError:
            if not self.trim:
                raise
            self.on_notice("(context full: the answer was cut; older turns will be dropped next time)")
        finally:
            self.messages.append({"role": "assistant", "content": detok.text})
