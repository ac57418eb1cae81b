"""The self-distillation set: the target answers prompts through edge-runtime's own Engine, and we keep its features
(the final-normed hidden state at every position, float16: what an EAGLE draft reads and predicts) and, for every
answer token, the target's `top_k` most likely tokens and their log-probabilities (temperature 1; they choose the
draft's vocabulary).

    plan = prompt_plan(prompts, recipe)             # held-out prompts first (answered greedily), then the rest
    data = DistillSet.load(path) or DistillSet(top_k)
    answer_prompts(engine, plan, recipe, data, stop_at, path, progress)   # saves as it goes; resumable

Layout: sequence i is tokens[starts[i]:starts[i+1]] (chat prompt then answer); its answer starts at prompt_len[i].
Row r of top_ids/top_logp is the target's distribution for one answer token: sequence i owns rows
row_starts[i]..row_starts[i+1]-1, row j predicting token prompt_len[i] + j from the position before it.
features[i] [len - 1, H]: the target's feature at positions 0..len-2 (the last token never ran).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.engine import Engine
from edge_runtime.sampling import SamplingParams, make_sampler

from .clock import now
from .recipe import Recipe


@dataclass
class DistillSet:
    top_k: int
    done: int = 0                        # prompts of the plan handled so far (answered or skipped)
    skipped: int = 0                     # prompts too long for the context
    seqs: list[np.ndarray] = field(default_factory=list)      # int32 [len] prompt + answer
    prompt_lens: list[int] = field(default_factory=list)
    heldout: list[bool] = field(default_factory=list)
    top_ids: list[np.ndarray] = field(default_factory=list)   # int32 [answer len, k]
    top_logp: list[np.ndarray] = field(default_factory=list)  # float16 [answer len, k]
    features: list[np.ndarray] = field(default_factory=list)  # float16 [len - 1, H]

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def answer_tokens(self) -> int:
        return sum(len(t) for t in self.top_ids)

    def add(self, seq: list[int], prompt_len: int, heldout: bool, ids: np.ndarray, logp: np.ndarray,
            features: np.ndarray) -> None:
        self.features.append(features.astype(np.float16))
        self.seqs.append(np.asarray(seq, np.int32))
        self.prompt_lens.append(prompt_len)
        self.heldout.append(heldout)
        self.top_ids.append(ids.astype(np.int32))
        self.top_logp.append(logp.astype(np.float16))

    def save(self, path: Path) -> None:
        """One .npz, written to a temp name and renamed."""
        # whole answers only, should an interrupt have landed inside add()
        n = min(len(self.seqs), len(self.prompt_lens), len(self.heldout), len(self.top_ids), len(self.top_logp),
                len(self.features))
        seqs, top_ids, top_logp, feats = self.seqs[:n], self.top_ids[:n], self.top_logp[:n], self.features[:n]
        k = self.top_k
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, top_k=k, done=self.done, skipped=self.skipped,
                 tokens=np.concatenate(seqs) if seqs else np.zeros(0, np.int32),
                 starts=np.cumsum([0, *map(len, seqs)]), prompt_len=np.asarray(self.prompt_lens[:n], np.int32),
                 heldout=np.asarray(self.heldout[:n], bool), row_starts=np.cumsum([0, *map(len, top_ids)]),
                 top_ids=np.concatenate(top_ids) if top_ids else np.zeros((0, k), np.int32),
                 top_logp=np.concatenate(top_logp) if top_logp else np.zeros((0, k), np.float16),
                 features=np.concatenate(feats) if feats else np.zeros((0, 0), np.float16))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> DistillSet:
        with np.load(path, allow_pickle=False) as npz:
            z = {k: npz[k] for k in npz.files}  # each npz[k] reads the array again: read each once
        if "features" not in z:
            from edge_runtime.errors import DraftTrainingError
            raise DraftTrainingError(f"{path} was written before drafts read the target's features; delete "
                                     f"{path.parent} and start again")
        s, r = z["starts"], z["row_starts"]
        tokens, top_ids, top_logp, feats = z["tokens"], z["top_ids"], z["top_logp"], z["features"]
        n = len(z["prompt_len"])
        return cls(top_k=int(z["top_k"]), done=int(z["done"]), skipped=int(z["skipped"]),
                   seqs=[tokens[s[i]:s[i + 1]] for i in range(n)], prompt_lens=[int(x) for x in z["prompt_len"]],
                   heldout=[bool(x) for x in z["heldout"]], top_ids=[top_ids[r[i]:r[i + 1]] for i in range(n)],
                   top_logp=[top_logp[r[i]:r[i + 1]] for i in range(n)],
                   features=[feats[s[i] - i:s[i + 1] - i - 1] for i in range(n)])


def prompt_plan(prompts: list[str], recipe: Recipe) -> list[tuple[str, bool]]:
    """(prompt, held out) in answering order: a seeded shuffle; the held-out share first, so a run stopped by its
    time budget still has them, and any prefix of the rest is a varied sample. Then the training prompts again,
    `recipe.passes - 1` more times, each pass in a new order (sampled answers differ: more data from the same
    prompts when the budget outlasts one pass)."""
    rng = np.random.default_rng(recipe.seed)
    order = rng.permutation(len(prompts))
    n_held = min(len(prompts) - 1, max(1, round(recipe.holdout * len(prompts))))
    plan = [(prompts[i], j < n_held) for j, i in enumerate(order)]
    train = [p for p, held in plan if not held]
    for _ in range(recipe.passes - 1):
        plan += [(train[i], False) for i in rng.permutation(len(train))]
    return plan


def top_k_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely ids of a logits row, most likely first, and their log-probabilities."""
    k = min(k, logits.size)
    ids = np.argpartition(logits, logits.size - k)[logits.size - k:]
    top = logits[ids]
    m = float(top.max())
    lse = m + float(np.log(np.exp(logits - m, dtype=np.float32).sum(dtype=np.float64)))
    order = np.argsort(-top, kind="stable")
    return ids[order], top[order].astype(np.float64) - lse


def answer(engine: Engine, prompt_ids: list[int], sampling: SamplingParams, max_tokens: int,
           top_k: int) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """The target's answer (ending with its end-of-sequence token when it stops), per answer token the top-k
    of the distribution it was drawn from, and the features [prompt + answer - 1, H] (a view into the decoder's
    buffer). One target call per token, through the runtime's cached decoder."""
    sample = make_sampler(sampling)
    logits, _ = engine.target.sync(prompt_ids)
    tokens, ids, logp = [], np.zeros((max_tokens, top_k), np.int32), np.zeros((max_tokens, top_k))
    for i in range(max_tokens):
        row = logits[-1]
        ids[i], logp[i] = top_k_logprobs(row, top_k)
        token = sample(row)
        tokens.append(token)
        if token in engine.eos or i + 1 == max_tokens:
            break
        logits = engine.target.extend((token,))
    n = len(tokens)
    return tokens, ids[:n], logp[:n], engine.decoder.features[:len(prompt_ids) + n - 1]


Progress = Callable[[int, dict], None]  # (prompts done, figures) after each prompt


def answer_prompts(engine: Engine, plan: list[tuple[str, bool]], recipe: Recipe, data: DistillSet,
                   stop_at: float, path: Path, progress: Progress | None = None, save_every: float = 30.0) -> None:
    """Answer plan[data.done:] until done or now() passes stop_at (held-out prompts are always answered),
    saving `data` to `path` every `save_every` seconds and at the end."""
    saved = now()
    t0, tokens0 = time.perf_counter(), data.answer_tokens
    try:
        for j in range(data.done, len(plan)):
            prompt, heldout = plan[j]
            if not heldout and now() > stop_at:
                break
            ids = engine.chat_ids([{"role": "user", "content": prompt}])
            if len(ids) + recipe.max_tokens > engine.context:
                data.skipped += 1
            else:
                # held-out answers are greedy (what greedy speculation meets); training answers are sampled
                sampling = SamplingParams() if heldout else SamplingParams(temperature=recipe.temperature,
                                                                           seed=recipe.seed * 100003 + j)
                tokens, top_ids, top_logp, feats = answer(engine, ids, sampling, recipe.max_tokens, recipe.top_k)
                data.add([*ids, *tokens], len(ids), heldout, top_ids, top_logp, feats)  # one prompt: all or nothing
            data.done = j + 1
            if now() - saved > save_every:
                data.save(path)
                saved = now()
            if progress:
                elapsed = time.perf_counter() - t0
                progress(data.done, {"tokens": data.answer_tokens,
                                     "tok/s": (data.answer_tokens - tokens0) / elapsed if elapsed else 0.0})
    finally:  # also on Ctrl-C: --resume continues after the last whole answer
        data.save(path)
