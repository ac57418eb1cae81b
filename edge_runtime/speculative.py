"""Speculative decoding: draft k tokens, verify k + 1 positions in one target call, keep the target's distribution.

Per round, with `last` the newest token (sampled, not yet in the target's cache):
    drafts = drafter.propose(history, k)                  # x_1..x_k, with draft distributions q_i (or one-hot)
    logits = target.extend([last, x_1..x_k], keep=k + 1)  # p_i predicts x_i; p_{k+1} is the bonus position
    accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection sample from norm(max(0, p_i - q_i))
    all accepted: sample the bonus token from p_{k+1}
    target.truncate(...)                                  # rejected drafts: a pointer move, no copy
Greedy is the temperature-0 case: accept while argmax(p_i) == x_i, then take argmax(p_i).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np

from .cached import CachedDecoder
from .drafters import draw
from .errors import InvalidArgumentError


def verify(logits: np.ndarray, drafts: list[int], q: np.ndarray | None, greedy: bool,
           process: Callable[[np.ndarray], np.ndarray], rng: np.random.Generator) -> tuple[int, int]:
    """logits [k+1, V] of the target at [last, x_1..x_k]. Returns (accepted drafts, the next token)."""
    for i, x in enumerate(drafts):
        if greedy:
            best = int(np.argmax(logits[i]))
            if best != x:
                return i, best
            continue
        p = process(logits[i])
        qx = 1.0 if q is None else q[i, x]
        # q(x) <= p(x): always accept; otherwise accept with probability p(x) / q(x)
        if rng.random() * qx < p[x]:
            continue
        if q is None:      # one-hot q: max(0, p - q) is p without x
            residual = p.copy()
            residual[x] = 0.0
        else:
            residual = np.maximum(p - q[i], 0.0)
        if residual.sum() <= 0.0:  # p == q: unreachable in exact arithmetic, kept for rounding
            residual = p
        return i, draw(residual, rng)
    bonus = logits[len(drafts)]
    return len(drafts), int(np.argmax(bonus)) if greedy else draw(process(bonus), rng)


PROBE_DECAY = 0.5
# The drafters' entropy stop (AdaEDL) guards against drafts that disagree with the target. Once the measured per-token
# acceptance reaches this, a draft's entropy no longer predicts its rejections (an INT8 self-draft is unsure where
# the target is, q ~ p, and is accepted anyway) and the stop only cuts rounds short: SmolLM2, ngram+self, chat at
# temperature 0.7, 6 alternating seeds: 1.08x of target-only with the stop, 1.43x without.
ENTROPY_STOP_BELOW = 0.8


class DraftLength:
    """Chooses k each round from what it measures: the per-token acceptance alpha, the time of a plain round (t1)
    and the extra time each drafted token adds to a round (t_draft).

    Both times are whole rounds - drafting, the verify call, sampling and the Python between them - so whatever a
    draft costs (its own steps, the longer verify, overhead) lands in t_draft; a cost model of its parts
    (draft steps + verify slope) missed ~30% and kept a draft that slowed SmolLM2's chat by 17%.
    Expected tokens from k drafts: E(k) = 1 + alpha + ... + alpha^k; time: t1 + k * t_draft.
    It picks the k in {0} U [k_min, k_max] with the least time per token; k = 0 is a plain step, so a draft
    that does not pay is switched off, and re-probed every `probe_every` rounds. A gate on what the drafting rounds
    actually delivered (tokens per second, decayed) switches it off too: the model above cannot see the rounds
    where the draft was asked and proposed nothing (AdaEDL stopped it at once: its step was paid, no token came).
    """

    def __init__(self, k_min: int = 1, k_max: int = 4, adaptive: bool = True, probe_every: int = 16,
                 decay: float = 0.9):
        if not 1 <= k_min <= k_max <= 15:
            raise InvalidArgumentError(f"draft length must satisfy 1 <= draft-min <= draft-max <= 15, "
                                       f"got {k_min}..{k_max}")
        self.k_min, self.k_max, self.adaptive = k_min, k_max, adaptive
        self.probe_every, self.decay = probe_every, decay
        self.accepted = 1.0   # decayed counts: accepted drafts, rejections (prior: alpha = 0.5)
        self.rejected = 1.0
        self.t1 = None        # seconds of a plain round (one target position)
        self.t_draft = None   # seconds one drafted token adds to a round
        self.round_tokens = 0.0   # decayed sums over drafting rounds: tokens out (accepted + 1), seconds
        self.round_seconds = 0.0
        self._plain_rounds = 0
        self._probing = False  # this round is a probe of a switched-off draft: it counts for more (PROBE_DECAY)

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def expected_time(self, k: int) -> float:
        a = min(self.alpha, 0.999)
        tokens = (1 - a ** (k + 1)) / (1 - a)
        return (self.t1 + k * (self.t_draft or 0.0)) / tokens

    def next_k(self) -> int:
        if not self.adaptive:
            return self.k_max
        if self.t1 is None:
            return 0  # measure a plain round first
        best = min(range(self.k_min, self.k_max + 1), key=self.expected_time)
        delivered = self.round_seconds / self.round_tokens if self.round_tokens > 2 else 0.0  # s per token
        if self.expected_time(best) < self.t1 and delivered < self.t1:
            return best
        self._plain_rounds += 1
        self._probing = self._plain_rounds % self.probe_every == 0
        return self.k_min if self._probing else 0

    def record(self, asked: int, proposed: int, accepted: int, seconds: float) -> None:
        """One round: k asked of the drafter, drafts it proposed (fewer when it stopped early), drafts accepted,
        and the round's seconds (without one-off catch-ups of the draft's cache)."""
        d = self.decay
        if asked and self._probing:  # one probe must be able to switch a draft back on (chat acceptance is bursty)
            d, self._probing = min(d, PROBE_DECAY), False
        if asked == 0:
            self.t1 = seconds if self.t1 is None else d * self.t1 + (1 - d) * seconds
            return
        if proposed:
            self.accepted = d * self.accepted + accepted
            self.rejected = d * self.rejected + (1 if accepted < proposed else 0)
        self.round_tokens = d * self.round_tokens + accepted + 1
        self.round_seconds = d * self.round_seconds + seconds
        if self.t1 is not None:  # a round that proposed nothing still paid for asking
            per_draft = max(0.0, seconds - self.t1) / max(proposed, 1)
            self.t_draft = per_draft if self.t_draft is None else d * self.t_draft + (1 - d) * per_draft


def speculative_steps(target: CachedDecoder, drafter, length: DraftLength, first_logits: np.ndarray,
                      history: list[int], greedy: bool, sample: Callable[[np.ndarray], int],
                      process: Callable[[np.ndarray], np.ndarray], rng: np.random.Generator,
                      stats) -> Iterator[int]:
    """Yield tokens forever (the caller stops at end-of-sequence or max_tokens and closes the generator).

    `history` is the prompt; it grows in place with every token yielded (the drafters index it).
    """
    token = sample(first_logits[-1])
    while True:
        yield token
        history.append(token)
        k = min(length.next_k(), target.kv.free - 1)
        t0 = time.perf_counter()
        drafts = (drafter.propose(history, k, greedy=greedy, process=process, rng=rng,
                                  entropy_stop=length.alpha < ENTROPY_STOP_BELOW) if k > 0 else [])
        catchup = getattr(drafter, "catchup_seconds", 0.0) if k > 0 else 0.0
        logits = target.extend([token, *drafts], keep=len(drafts) + 1)
        accepted, token = verify(logits, drafts, drafter.q if drafts else None, greedy, process, rng)
        target.truncate(len(target.tokens) - (len(drafts) - accepted))
        length.record(k, len(drafts), accepted, time.perf_counter() - t0 - catchup)
        stats.target_calls += 1
        stats.drafted_tokens += len(drafts)
        stats.accepted_tokens += accepted
        stats.rounds_with_drafts += bool(drafts)
        for x in drafts[:accepted]:
            yield x
            history.append(x)
