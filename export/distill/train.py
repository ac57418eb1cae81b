"""Training the EAGLE draft against the target's features and distributions (torch, CPU), with held-out acceptance
and checkpoints.

Loss per answer position u and unrolled step j (eagle.py): SmoothL1(f^, f_u) over the feature (EAGLE's regression)
+ ce_weight x the cross-entropy from the target's distribution over the draft's rows, softmax(head f_u), to the
draft's, softmax(head f^). Input features get uniform noise (EAGLE), scaled by the features' standard deviation.
Held-out acceptance: greedy speculation with `eval_k` drafts per round, replayed on the target's greedy held-out
answers: each round drafts up to eval_k tokens on the draft's own features, accepts while they match, and the next
round starts after the correction - accepted / drafted, as a real run's stats count it.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .clock import now
from .dataset import DistillSet
from .recipe import Recipe


@dataclass
class Batch:
    tokens: object      # torch int64 [B, T]: token t+1 at position t, 0-padded
    feats: object       # torch float32 [B, T, H]: the target's feature at position t
    answer: object      # torch bool [B, T]: position u holds an answer feature the draft must predict (u >= prompt)
    next_token: object  # torch int64 [B, T]: token u+1 (the target's choice from feature u; -1 where none)


def make_batch(data: DistillSet, idx: list[int], seq_len: int) -> Batch:
    import torch
    T = min(max(len(data.seqs[i]) - 1 for i in idx), seq_len)
    H = data.features[idx[0]].shape[1]
    tokens = np.zeros((len(idx), T), np.int64)
    feats = np.zeros((len(idx), T, H), np.float32)
    answer = np.zeros((len(idx), T), bool)
    nxt = np.full((len(idx), T), -1, np.int64)
    for b, i in enumerate(idx):
        seq, p = data.seqs[i], data.prompt_lens[i]
        n = min(len(seq) - 1, T)
        tokens[b, :n] = seq[1:n + 1]
        feats[b, :n] = data.features[i][:n]
        answer[b, p:n] = True
        nxt[b, :n] = seq[1:n + 1]
    return Batch(torch.from_numpy(tokens), torch.from_numpy(feats), torch.from_numpy(answer), torch.from_numpy(nxt))


def step_targets(batch: Batch, j: int):
    """For step j (start t predicts feature t + j): the mask of starts with a target, and feature/token targets
    shifted to the start's index."""
    import torch
    from torch.nn import functional as F
    mask = F.pad(batch.answer[:, j:], (0, j), value=False)
    feats = F.pad(batch.feats[:, j:], (0, 0, 0, j))
    nxt = F.pad(batch.next_token[:, j:], (0, j), value=-1)
    return mask & (nxt >= 0), feats, nxt.clamp(min=0)


def draft_loss(model, batch: Batch, steps: int, ce_weight: float, noise: float = 0.0, rows: bool = False):
    """Mean over steps (weight 0.8^(j-1)) and answer positions of SmoothL1 + ce_weight x CE; and with `rows`, the
    per-step predicted head rows [B, T] with their masks (for acceptance)."""
    import torch
    from torch.nn import functional as F
    feats = batch.feats
    if noise:
        feats = feats + (torch.rand_like(feats) * 2 - 1) * noise
    preds = model.unroll(batch.tokens, feats, steps)
    total, weights, argmax = 0.0, 0.0, []
    for j, f in enumerate(preds, start=1):
        mask, target, _ = step_targets(batch, j)
        fh, ft = f[mask], target[mask]
        if rows:
            argmax.append((model.logits(f).argmax(-1), mask))
        if fh.shape[0] == 0:
            continue
        reg = F.smooth_l1_loss(fh, ft, reduction="none").mean(-1)
        with torch.no_grad():
            p = torch.softmax(model.logits(ft), -1)
        ce = -(p * torch.log_softmax(model.logits(fh), -1)).sum(-1)
        w = 0.8 ** (j - 1)
        total = total + w * (reg + ce_weight * ce).mean()
        weights += w
    return total / max(weights, 1e-9), argmax


def replay_acceptance(hits: np.ndarray, start: int, end: int, k: int) -> tuple[int, int]:
    """hits [T, k]: hits[t, j-1] is True when step j from start t proposes the right token. Replays greedy
    speculation from start `start` while tokens remain (a start t drafts tokens t+2.. < end + 1): (accepted, drafted)."""
    accepted = drafted = 0
    t = start
    while t + 1 < end:
        kk = min(k, end - t - 1)
        run = hits[t, :kk]
        a = kk if run.all() else int(np.argmin(run))
        accepted += a
        drafted += kk
        t += a + 1
    return accepted, drafted


@dataclass
class TrainState:
    step: int = 0
    total_steps: int = 0          # fixed once measured (the learning-rate schedule runs over it)
    seconds: float = 0.0          # training time so far, over every run of a resumed training
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "heldout_loss", "acceptance", "top1"}
    best: dict | None = None      # the evaluation with the best held-out acceptance (weights: Trainer.best_weights)


class Trainer:
    def __init__(self, model, data: DistillSet, vocab_map: np.ndarray, target_vocab: int, recipe: Recipe):
        import torch
        torch.set_num_threads(recipe.threads)
        self.model, self.data, self.recipe = model, data, recipe
        self.vocab_map = vocab_map
        self._vmap = torch.from_numpy(vocab_map.astype(np.int64))
        self.train_idx = [i for i, h in enumerate(data.heldout) if not h]
        self.heldout_idx = [i for i, h in enumerate(data.heldout) if h]
        train_feats = [data.features[i] for i in self.train_idx[:64]]
        std = float(np.concatenate(train_feats).astype(np.float32).std()) if train_feats else 1.0
        self.noise = recipe.noise * std  # uniform noise amplitude on input features
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)
        self.state = TrainState()
        self.rng = np.random.default_rng(recipe.seed)
        self.best_weights: dict | None = None  # trained tensors at state.best

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
        if unexpected or missing:
            from edge_runtime.errors import DraftTrainingError
            raise DraftTrainingError(f"{path} does not fit this draft ({(unexpected or missing)[0]}); delete the "
                                     "work folder and start again")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["state"])
        self.rng.bit_generator.state = ckpt["rng"]
        self.best_weights = ckpt.get("best_weights")

    def _track_best(self, figures: dict) -> None:
        """Keep the weights of the evaluation with the highest held-out acceptance (ties: the lower loss)."""
        from .model import trained_state
        key = (figures["acceptance"], -figures["heldout_loss"])
        best = self.state.best
        if best is None or key > (best["acceptance"], -best["heldout_loss"]):
            self.state.best = {"step": self.state.step, **figures}
            self.best_weights = {k: v.detach().clone() for k, v in trained_state(self.model).items()}

    def use_best(self) -> dict:
        """Load the best weights into the model (export them); returns their evaluation."""
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights, strict=False)
        return self.state.best or self.state.history[-1]

    # ---- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, idx: list[int] | None = None) -> dict:
        """Held-out loss (unrolled as trained) and greedy acceptance replayed with eval_k drafts per round on the
        target's greedy answers; `top1`: the first draft's agreement alone."""
        import torch
        r = self.recipe
        idx = self.heldout_idx if idx is None else idx
        self.model.eval()
        loss = weight = 0.0
        accepted = drafted = top1 = first = 0
        steps = max(r.eval_k, r.unroll)
        with torch.no_grad():
            for start in range(0, len(idx), r.batch):
                chunk = idx[start:start + r.batch]
                batch = make_batch(self.data, chunk, r.seq_len)
                value, argmax = draft_loss(self.model, batch, steps, r.ce_weight, rows=True)
                n = int(step_targets(batch, 1)[0].sum())
                loss += float(value) * n
                weight += n
                hits = []
                for j, (rows, mask) in enumerate(argmax[:r.eval_k], start=1):
                    nxt = step_targets(batch, j)[2]
                    hits.append((mask & (self._vmap[rows] == nxt)).numpy())
                hits = np.stack(hits, -1)  # [B, T, eval_k]
                top1 += int(hits[..., 0].sum())
                first += n
                for b, i in enumerate(chunk):
                    end = min(len(self.data.seqs[i]) - 1, batch.tokens.shape[1])
                    a, d = replay_acceptance(hits[b], self.data.prompt_lens[i] - 1, end, r.eval_k)
                    accepted += a
                    drafted += d
        self.model.train()
        return {"heldout_loss": loss / max(weight, 1), "acceptance": accepted / max(drafted, 1),
                "top1": top1 / max(first, 1), "drafted": drafted}

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
        batch = make_batch(self.data, idx, r.seq_len)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.state.step)
        torch.manual_seed(int(self.rng.integers(1 << 31)))  # the noise, reproducible across resume
        loss, _ = draft_loss(self.model, batch, r.unroll, r.ce_weight, self.noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.state.step += 1
        return float(loss.detach())

    def run(self, stop_at: float, checkpoint: Path, on_step: Callable[[TrainState, dict], None] | None = None,
            checkpoint_every: float = 60.0) -> TrainState:
        """Train until state.total_steps or now() passes stop_at; evaluate every eval_every steps;
        checkpoint every checkpoint_every seconds and at the end. total_steps, when the recipe leaves it to the
        clock, is set after 3 measured steps to what the time left allows."""
        s, r = self.state, self.recipe
        if not self.train_idx:
            return s
        if r.steps:
            s.total_steps = s.total_steps or r.steps
        t_eval = now()
        if not s.history:
            s.history.append({"step": 0, "loss": None, **self.evaluate()})
            self._track_best(s.history[-1])
            if on_step:
                on_step(s, s.history[-1])
        t_eval = now() - t_eval  # 0 on resume: the estimate below then leaves evaluations out
        saved = now()
        losses: list[float] = []
        timed, t_start = 0, now()
        measure = 3  # steps timed before the step budget is fixed
        clean = True  # weights, optimizer and step agree (an interrupt inside a step leaves them out of step)
        try:
            while (not s.total_steps or s.step < s.total_steps) and now() < stop_at:
                t0 = time.perf_counter()
                clean = False
                losses.append(self.train_step())
                clean = True
                s.seconds += time.perf_counter() - t0
                timed += 1
                if not s.total_steps and timed == measure:
                    per_step = (now() - t_start) / timed + t_eval / r.eval_every
                    s.total_steps = s.step + max(1, int((stop_at - now()) / per_step))
                figures = {"loss": float(np.mean(losses[-10:]))}
                if s.step % r.eval_every == 0 or s.step == s.total_steps:
                    figures.update(self.evaluate())
                    s.history.append({"step": s.step, **figures})
                    self._track_best(figures)
                if on_step:
                    on_step(s, figures)
                if now() - saved > checkpoint_every:
                    self.save(checkpoint)
                    saved = now()
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
