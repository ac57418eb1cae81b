"""Training the draft against the target's distributions (torch, CPU), with held-out acceptance and checkpoints.

Loss per answer position: forward KL from the target's top-k distribution to the draft's, over the top-k ids the
draft's vocabulary holds:  sum_k p_k (log p_k - log q(k)).  Its gradient is the soft cross-entropy's.
Held-out acceptance: the share of held-out answer positions where the draft's argmax equals the target's, with
the target's own greedy answer as the prefix - the per-token acceptance of greedy speculative decoding.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dataset import DistillSet
from .recipe import Recipe


@dataclass
class Batch:
    input_ids: object       # torch int64 [B, T] target ids, 0-padded
    attention_mask: object  # torch int64 [B, T]
    rows: object            # torch bool [B, T]: positions whose next token is an answer token
    top_ids: object         # torch int64 [R, k] the teacher's top ids as head rows (0 where outside the head)
    top_p: object           # torch float32 [R, k] teacher probabilities (0 where outside)
    top_logp: object        # torch float32 [R, k]
    target_top1: object     # torch int64 [R] the teacher's argmax, target ids


def make_batch(data: DistillSet, idx: list[int], to_row: np.ndarray, unknown: int, seq_len: int) -> Batch:
    """to_row: target id -> head row, `unknown` for ids outside the head."""
    import torch
    seqs, rows, tops = [], [], []
    for i in idx:
        seq, p = data.seqs[i], data.prompt_lens[i]
        t = min(len(seq) - 1, seq_len)           # positions 0..t-1 run; the last token predicts nothing needed
        n_rows = t - p + 1                        # answer token j is predicted at position p - 1 + j
        seqs.append(seq[:t])
        rows.append((p - 1, n_rows))
        tops.append((data.top_ids[i][:n_rows], data.top_logp[i][:n_rows]))
    width = max(len(s) for s in seqs)
    ids = np.zeros((len(idx), width), np.int64)
    mask = np.zeros((len(idx), width), np.int64)
    row_mask = np.zeros((len(idx), width), bool)
    for b, (s, (start, n)) in enumerate(zip(seqs, rows)):
        ids[b, :len(s)] = s
        mask[b, :len(s)] = 1
        row_mask[b, start:start + n] = True
    top_t = np.concatenate([t for t, _ in tops])
    logp = np.concatenate([lp for _, lp in tops]).astype(np.float32)
    draft_ids = to_row[top_t]
    inside = draft_ids != unknown
    p = np.where(inside, np.exp(logp), 0.0).astype(np.float32)
    return Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(row_mask),
                 torch.from_numpy(np.where(inside, draft_ids, 0)), torch.from_numpy(p),
                 torch.from_numpy(np.where(inside, logp, 0.0).astype(np.float32)),
                 torch.from_numpy(top_t[:, 0].astype(np.int64)))


def draft_logprobs(model, batch: Batch):
    """log q over the draft's head rows [R, N], at the answer positions only (the head runs on those alone)."""
    import torch
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return torch.log_softmax(model.lm_head(hidden[batch.rows]), dim=-1)


def kl_loss(logq, batch: Batch):
    """Mean over positions of sum_k p_k (log p_k - log q_k) on the teacher's top-k inside the draft vocabulary."""
    picked = logq.gather(1, batch.top_ids)
    return (batch.top_p * (batch.top_logp - picked)).sum(1).mean()


@dataclass
class TrainState:
    step: int = 0
    total_steps: int = 0          # fixed once measured (the learning-rate schedule runs over it)
    seconds: float = 0.0          # training time so far, over every run of a resumed training
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "heldout_kl", "acceptance"}
    best: dict | None = None      # the evaluation with the lowest held-out KL (its weights: Trainer.best_weights)


class Trainer:
    def __init__(self, model, data: DistillSet, vocab_map: np.ndarray, target_vocab: int, recipe: Recipe):
        import torch
        torch.set_num_threads(recipe.threads)
        self.model, self.data, self.recipe = model, data, recipe
        self.vocab_map = vocab_map
        self.unknown = len(vocab_map)
        self.to_row = np.full(target_vocab, self.unknown, np.int64)
        self.to_row[vocab_map] = np.arange(len(vocab_map))
        self.train_idx = [i for i, h in enumerate(data.heldout) if not h]
        self.heldout_idx = [i for i, h in enumerate(data.heldout) if h]
        self.params = [p for p in model.parameters() if p.requires_grad]  # the embedding stays the target's
        self.optimizer = torch.optim.AdamW(self.params, lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)
        self.state = TrainState()
        self.rng = np.random.default_rng(recipe.seed)
        self.best_weights: dict | None = None  # trained tensors at state.best (a few epochs overfit the small set)

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        import torch
        tmp = path.with_name(f".{path.name}.tmp")
        from .model import trained_state
        torch.save({"model": trained_state(self.model), "optimizer": self.optimizer.state_dict(),
                    "state": self.state.__dict__, "rng": self.rng.bit_generator.state,
                    "vocab_map": self.vocab_map, "best_weights": self.best_weights}, tmp)
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        import torch
        ckpt = torch.load(path, weights_only=False)
        missing, unexpected = self.model.load_state_dict(ckpt["model"], strict=False)
        if unexpected or any(k != "model.embed_tokens.weight" for k in missing):
            from edge_runtime.errors import DraftTrainingError
            raise DraftTrainingError(f"{path} does not fit this draft ({(unexpected or missing)[0]}); delete the "
                                     "work folder and start again")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["state"])
        self.rng.bit_generator.state = ckpt["rng"]
        self.best_weights = ckpt.get("best_weights")

    def _track_best(self, figures: dict) -> None:
        """Keep the weights of the evaluation with the lowest held-out KL."""
        from .model import trained_state
        if self.state.best is None or figures["heldout_kl"] < self.state.best["heldout_kl"]:
            self.state.best = {"step": self.state.step, **figures}
            self.best_weights = {k: v.detach().clone() for k, v in trained_state(self.model).items()}

    def use_best(self) -> dict:
        """Load the best weights into the model (export them); returns their evaluation."""
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights, strict=False)
        return self.state.best or self.state.history[-1]

    # ---- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, idx: list[int] | None = None) -> dict:
        """Held-out KL and greedy acceptance (draft argmax == target argmax, teacher-forced on greedy answers)."""
        import torch
        idx = self.heldout_idx if idx is None else idx
        self.model.eval()
        kl = agree = rows = 0.0
        with torch.no_grad():
            for start in range(0, len(idx), self.recipe.batch):
                batch = make_batch(self.data, idx[start:start + self.recipe.batch], self.to_row, self.unknown,
                                   self.recipe.seq_len)
                logq = draft_logprobs(self.model, batch)
                n = logq.shape[0]
                kl += float(kl_loss(logq, batch)) * n
                proposed = torch.from_numpy(self.vocab_map)[logq.argmax(1)]
                agree += float((proposed == batch.target_top1).sum())
                rows += n
        self.model.train()
        return {"heldout_kl": kl / max(rows, 1), "acceptance": agree / max(rows, 1), "positions": int(rows)}

    # ---- training ------------------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up over the first 5% of steps, then cosine down to 10% of the peak."""
        total = max(self.state.total_steps, 1)
        warm = max(1, min(20, total // 20))
        if step < warm:
            return self.recipe.lr * (step + 1) / warm
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return self.recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def train_step(self) -> float:
        import torch
        r = self.recipe
        idx = self.rng.choice(self.train_idx, size=min(r.batch, len(self.train_idx)), replace=False).tolist()
        batch = make_batch(self.data, idx, self.to_row, self.unknown, r.seq_len)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.state.step)
        loss = kl_loss(draft_logprobs(self.model, batch), batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.state.step += 1
        return float(loss.detach())

    def run(self, stop_at: float, checkpoint: Path, on_step: Callable[[TrainState, dict], None] | None = None,
            checkpoint_every: float = 60.0) -> TrainState:
        """Train until state.total_steps or time.monotonic() passes stop_at; evaluate every eval_every steps;
        checkpoint every checkpoint_every seconds and at the end. total_steps, when the recipe leaves it to the
        clock, is set after 3 measured steps to what the time left allows."""
        s, r = self.state, self.recipe
        if not self.train_idx:
            return s
        if r.steps:
            s.total_steps = s.total_steps or r.steps
        t_eval = time.monotonic()
        if not s.history:
            s.history.append({"step": 0, "loss": None, **self.evaluate()})
            self._track_best(s.history[-1])
            if on_step:
                on_step(s, s.history[-1])
        t_eval = time.monotonic() - t_eval  # 0 on resume: the estimate below then leaves evaluations out
        saved = time.monotonic()
        losses: list[float] = []
        timed, t_start = 0, time.monotonic()
        measure = 3  # steps timed before the step budget is fixed
        clean = True  # weights, optimizer and step agree (an interrupt inside a step leaves them out of step)
        try:
            while (not s.total_steps or s.step < s.total_steps) and time.monotonic() < stop_at:
                t0 = time.perf_counter()
                clean = False
                losses.append(self.train_step())
                clean = True
                s.seconds += time.perf_counter() - t0
                timed += 1
                if not s.total_steps and timed == measure:
                    per_step = (time.monotonic() - t_start) / timed + t_eval / r.eval_every
                    s.total_steps = s.step + max(1, int((stop_at - time.monotonic()) / per_step))
                figures = {"loss": float(np.mean(losses[-10:]))}
                if s.step % r.eval_every == 0 or s.step == s.total_steps:
                    figures.update(self.evaluate())
                    s.history.append({"step": s.step, **figures})
                    self._track_best(figures)
                if on_step:
                    on_step(s, figures)
                if time.monotonic() - saved > checkpoint_every:
                    self.save(checkpoint)
                    saved = time.monotonic()
        except BaseException:  # Ctrl-C: keep what was trained, so --resume goes on from here
            if clean:
                self.save(checkpoint)
            raise
        if s.history[-1]["step"] != s.step:
            s.history.append({"step": s.step, "loss": float(np.mean(losses[-10:])) if losses else None,
                              **self.evaluate()})
            self._track_best(s.history[-1])
        self.save(checkpoint)
        return s
