"""Draft sources for speculative decoding. Each proposes up to k tokens given the accepted history.

A drafter that samples (a model at temperature > 0) leaves its distributions in `q[:n]` [n, vocab] so the
verifier can apply the rejection rule; a deterministic drafter (n-gram lookup, any drafter under greedy) has
one-hot q and sets `q = None`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from .cached import CachedDecoder
from .errors import InvalidArgumentError

LOOKUP = "ngram"


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One sample from an unnormalised probability vector [V]."""
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(probs) - 1)


def split_draft(draft):
    """A --draft value -> (the model draft it loads or None, whether prompt lookup runs):
    none -> (None, False), ngram -> (None, True), self -> ("self", False), ngram+self -> ("self", True)."""
    if not isinstance(draft, str):  # None, or a bundle path
        return draft, False
    if draft == "none":
        return None, False
    if draft == LOOKUP:
        return None, True
    if draft.startswith(LOOKUP + "+"):
        model = draft[len(LOOKUP) + 1:]
        if model in ("", "none", LOOKUP) or model.startswith(LOOKUP + "+"):
            raise InvalidArgumentError(f"--draft {draft}: after ngram+ name a model draft (self, target or a draft "
                                       "bundle), e.g. ngram+self")
        return model, True
    return draft, False


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the history's last n tokens (n = max_n .. min_n)
    and propose the tokens that followed it. q is one-hot. The index grows by the new tokens only."""

    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n
        self.q = None
        self.reset()

    def prime(self, prompt: Sequence[int]) -> None:
        """Nothing to read ahead: the index grows as propose is called."""

    def reset(self) -> None:
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> position of its last token, latest occurrence
        self._indexed = 0  # positions 0.._indexed-1 have been indexed as n-gram ends
        self._history: list[int] | None = None

    def _index(self, history: Sequence[int], upto: int) -> None:
        for end in range(self._indexed, upto):
            for n in range(self.min_n, self.max_n + 1):
                if end - n + 1 >= 0:
                    self._last[tuple(history[end - n + 1:end + 1])] = end
        self._indexed = max(self._indexed, upto)

    def propose(self, history: Sequence[int], k: int, **_) -> list[int]:
        if history is not self._history or self._indexed > len(history):
            self.reset()
            self._history = history  # the loop appends to one list; a new list is a new generation
        # index every n-gram that ends before the last token, so a match is an *earlier* occurrence
        self._index(history, len(history) - 1)
        for n in range(min(self.max_n, len(history)), self.min_n - 1, -1):
            end = self._last.get(tuple(history[len(history) - n:]))
            if end is not None:
                return list(history[end + 1:end + 1 + k])
        return []


class ModelDrafter:
    """A small model (or a cheaper copy of the target) with its own KV cache.

    AdaEDL early stop (sampling): before drafting a token, the entropy H of the draft distribution gives a lower
    bound on its acceptance probability, ~ 1 - sqrt(scale * H); drafting stops when it falls below `threshold`.
    Greedy verification accepts on argmax agreement, which entropy predicts poorly (SmolLM2's INT4 self-draft is
    unsure on chat yet agrees 80-88%): there the stop cost 17% (0.92x vs 1.11x of target-only on the bench chat
    prompt), so greedy drafting leaves gamma to the length controller (speculative.py).

    vocab_map: a draft with a reduced output vocabulary (`edge-rt train-draft`): it reads target ids, and its
    logit row i is target id vocab_map[i]. q stays over the target's `vocab`, zero outside the map, so
    verification is unchanged and exact.
    """

    def __init__(self, model: CachedDecoder, name: str, gamma_max: int, vocab: int,
                 entropy_scale: float = 0.2, threshold: float = 0.4, vocab_map: np.ndarray | None = None):
        self.model = model
        self.name = name
        self.entropy_scale = entropy_scale
        self.threshold = threshold
        self._q = np.zeros((gamma_max, vocab), np.float64)  # draft distributions of the proposed tokens
        self.q: np.ndarray | None = None
        self._synced = 0  # history[:_synced] is known to be in the draft's cache
        self.catchup_seconds = 0.0  # of the last propose: feeding a backlog of > 2 tokens
        self.vocab_map = vocab_map  # [rows] target id of each logit row, or None: rows are target ids

    def reset(self) -> None:
        self._synced = 0

    def prime(self, prompt: Sequence[int]) -> None:
        """Read the prompt while the target prefills it (llama.cpp's drafts do too), so that the first round (or,
        behind lookup, the first round that needs the model) catches up on a few tokens, not the whole prompt.
        An earlier turn's cached prefix is reused."""
        self.model.sync(prompt)
        self._synced = len(prompt)

    def _confident(self, logits: np.ndarray) -> bool:
        if self.threshold <= 0:
            return True
        z = logits - logits.max()
        p = np.exp(z)
        total = p.sum()
        entropy = math.log(total) - float(p @ z) / total  # H = log sum e^z - E[z]
        return 1.0 - math.sqrt(self.entropy_scale * max(entropy, 0.0)) >= self.threshold

    def propose(self, history: Sequence[int], k: int, greedy: bool = True,
                process: Callable[[np.ndarray], np.ndarray] | None = None,
                rng: np.random.Generator | None = None, entropy_stop: bool = True) -> list[int]:
        """entropy_stop: apply the AdaEDL stop when sampling (the loop turns it off for drafts it measures as
        well aligned, speculative.py)."""
        vmap = self.vocab_map
        # catch up on what the draft has not seen (the target's correction, the last accepted draft)
        t0 = time.perf_counter()
        logits, fed = self.model.sync(history, known=self._synced)
        # A one-off catch-up (the prompt, the tokens of rounds the length controller ran without drafting) is not
        # what a drafted token costs; the controller leaves it out (speculative.py).
        self.catchup_seconds = time.perf_counter() - t0 if fed > 2 else 0.0
        self._synced = len(history)
        drafts: list[int] = []
        self.q = None if greedy else self._q
        for i in range(k):
            row = logits[-1]
            if not greedy and entropy_stop and not self._confident(row):
                break
            if greedy:
                token = int(np.argmax(row))
            elif vmap is None:
                self._q[i] = process(row)
                token = draw(self._q[i], rng)
            else:
                p = process(row)  # over the draft's rows; the draw and q(x) are the same distribution
                token = draw(p, rng)
                self._q[i] = 0.0
                self._q[i, vmap] = p
            if vmap is not None:
                token = int(vmap[token])
            drafts.append(token)
            if i + 1 < k:
                logits = self.model.extend((token,))
        return drafts


class EagleDrafter(ModelDrafter):
    """An EAGLE draft (eagle.py): each round it catches up on the accepted tokens with the target's true features
    (read from the target decoder's feature buffer), then drafts on its own predicted features. Greedy and
    sampled drafting, the reduced-vocabulary map and the AdaEDL stop are ModelDrafter's."""

    def prime(self, prompt: Sequence[int]) -> None:
        """The first round catches up on the prompt's features as it would on any round's (eagle.py)."""


class HybridDrafter:
    """Prompt lookup first, a model otherwise (`--draft ngram+self`). When the history's last `min_n` tokens occurred
    before, what followed them is proposed for free (copying, summarising, editing code); otherwise the model drafts
    (open-ended chat). The choice depends on the history only and q is whatever the round's drafts were drawn from
    (one-hot for lookup), so verification stays exact. The model catches up on skipped rounds at its next call."""

    # lookup proposes only after a 3-token match: a 1- or 2-token match is a weak guess next to a draft model
    MIN_MATCH = 3

    def __init__(self, model: ModelDrafter, lookup: NgramDrafter | None = None):
        self.lookup, self.model = lookup or NgramDrafter(min_n=self.MIN_MATCH), model
        self.name = f"{LOOKUP}+{model.name}"
        self.q: np.ndarray | None = None
        self.catchup_seconds = 0.0

    def reset(self) -> None:
        self.lookup.reset()
        self.model.reset()

    def prime(self, prompt: Sequence[int]) -> None:
        self.model.prime(prompt)

    def propose(self, history: Sequence[int], k: int, **options) -> list[int]:
        drafts = self.lookup.propose(history, k)
        if drafts:
            self.q, self.catchup_seconds = None, 0.0
            return drafts
        drafts = self.model.propose(history, k, **options)
        self.q, self.catchup_seconds = self.model.q, self.model.catchup_seconds
        return drafts
