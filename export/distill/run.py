"""`edge-rt train-draft`: self-distillation set -> trained draft -> draft bundle, within a time budget, resumable.

Work folder `<DRAFT>.train/` (next to the output): recipe.json and prompts.json (fixed when the run starts),
data.npz (the set, saved as it grows), checkpoint.pt (weights, optimizer, step, schedule, vocabulary). It stays
after the export so that `--resume` can train further into a new output; delete it when done.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_runtime.bundle import Bundle
from edge_runtime.errors import DraftTrainingError

from .clock import now
from .recipe import Recipe, load_prompts, write_json

# torch's OpenMP threads spin while waiting; on a machine shared with other jobs that made 2 threads 2x slower than
# 1 (SmolLM2 draft step: 7.3 s vs 3.9 s at load average 6.5); sleeping waiters: 2.6 s. Only if torch is not loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXPORT_RESERVE = 45.0  # seconds kept at the end of the budget for the export and its verification


class Progress(Protocol):
    def stage(self, name: str, total: int, done: int = 0) -> None: ...
    def update(self, done: int, figures: dict) -> None: ...
    def note(self, message: str) -> None: ...


class _Quiet:
    def stage(self, name, total, done=0):
        pass

    def update(self, done, figures):
        pass

    def note(self, message):
        pass


@dataclass
class Result:
    bundle: Bundle
    work: Path
    answers: int                 # sequences in the set (held-out included)
    answer_tokens: int
    steps: int
    initial: dict                # held-out figures before training
    final: dict                  # and after
    draft_bytes: int
    target_bytes: int
    seconds: float


def work_dir(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".train")


def _weights_bytes(bundle: Bundle) -> int:
    spec = bundle.manifest.graph("target")
    return sum(bundle.file(f).stat().st_size for f in (spec.file, *spec.data_files))


def _start(work: Path, resume: bool, prompts_file, settings: Recipe) -> tuple[Recipe, list[str]]:
    """The recipe and prompts of this run: new ones written into the work folder, or the saved ones on --resume."""
    if resume:
        if not (work / "recipe.json").is_file():
            raise DraftTrainingError(f"nothing to resume: {work} holds no training run; run without --resume")
        import json
        return Recipe.from_dict(json.loads((work / "recipe.json").read_text())), \
            json.loads((work / "prompts.json").read_text())
    if work.exists():
        raise DraftTrainingError(f"{work} holds an earlier training run; pass --resume to continue it or delete it")
    prompts = load_prompts(prompts_file)
    work.mkdir(parents=True)
    write_json(work / "prompts.json", prompts)
    write_json(work / "recipe.json", settings.to_dict())
    return settings, prompts


def _one_layer(recipe: Recipe, target: Bundle) -> int:
    layers = recipe.layer_ids(target.manifest.architecture.num_layers)
    if len(layers) != 1:
        raise DraftTrainingError(f"layers={recipe.layers!r}: the EAGLE draft has one layer; give the one target layer "
                                 "it starts from, e.g. -1")
    return layers[0]


def train_draft(target_path: str | Path, out: str | Path, prompts_file: str | Path | None = None,
                minutes: float = 30.0, resume: bool = False, recipe: Recipe = Recipe(),
                progress: Progress | None = None) -> Result:
    """Build a draft bundle for the target bundle at `target_path` into `out`, in about `minutes` of wall time.

    On resume the recipe and prompts are the saved ones; generation continues where it stopped, then training
    continues from the checkpoint's step."""
    t_start = now()
    deadline = t_start + minutes * 60
    say = progress or _Quiet()
    out = Path(out)
    if out.exists():
        raise DraftTrainingError(f"{out} already exists; choose another -o or delete it")
    if minutes <= 0:
        raise DraftTrainingError(f"--minutes must be > 0, got {minutes}")
    target = Bundle.load(target_path)
    work = work_dir(out)
    if resume and recipe != Recipe():
        raise DraftTrainingError("--set cannot change a run being resumed; its recipe was fixed when it started")
    if resume and prompts_file is not None:
        raise DraftTrainingError("--prompts cannot change a run being resumed; its prompts were fixed when it started")
    if not resume:
        load_prompts(prompts_file)  # a bad prompt file fails before anything is created
    from .model import build_draft, check_target, choose_vocab, export_draft
    layer = _one_layer(recipe, target)
    check_target(target, layer)
    recipe, prompts = _start(work, resume, prompts_file, recipe)
    layer = _one_layer(recipe, target)

    # 1. the self-distillation set, through the runtime
    from edge_runtime.engine import Engine

    from .dataset import DistillSet, answer_prompts, prompt_plan
    data_path = work / "data.npz"
    data = DistillSet.load(data_path) if data_path.is_file() else DistillSet(recipe.top_k)
    plan = prompt_plan(prompts, recipe)
    if data.done < len(plan):
        context = min(recipe.context, target.manifest.architecture.max_position_embeddings)
        engine = Engine(target, context=context, threads=recipe.threads)
        say.stage("answer prompts", len(plan), data.done)
        answer_prompts(engine, plan, recipe, data, t_start + recipe.gen_share * minutes * 60, data_path,
                       progress=say.update)
        del engine
    if not any(data.heldout) or all(data.heldout):
        raise DraftTrainingError(f"the set has {len(data)} answers, too few to train and hold out some; give more "
                                 f"or shorter prompts (max_tokens + prompt must fit context={recipe.context})")
    say.note(f"set: {len(data)} answers ({sum(data.heldout)} held out), {data.answer_tokens} answer tokens"
             + (f", {data.skipped} prompts too long skipped" if data.skipped else ""))

    # 2. the draft, trained
    import torch

    from .train import Trainer
    ckpt = work / "checkpoint.pt"
    arch = target.manifest.architecture
    if ckpt.is_file():  # the vocabulary was chosen when training started
        vocab_map = torch.load(ckpt, weights_only=False)["vocab_map"]
    else:
        vocab_map = choose_vocab(data, recipe.vocab, arch.vocab_size, tuple(target.manifest.tokens.eos))
    model = build_draft(target, layer, vocab_map)
    trainer = Trainer(model, data, vocab_map, arch.vocab_size, recipe)
    if ckpt.is_file():
        trainer.load(ckpt)
        say.note(f"resuming training at step {trainer.state.step} of {trainer.state.total_steps}")
    state = trainer.state

    def on_step(s, figures):
        if s.total_steps and getattr(on_step, "total", None) != s.total_steps:
            on_step.total = s.total_steps
            say.stage("train draft", s.total_steps, s.step)
        say.update(s.step, figures)

    if not (state.total_steps and state.step >= state.total_steps):
        say.stage("train draft", state.total_steps or 0, state.step)
        trainer.run(max(now() + 1, deadline - EXPORT_RESERVE), ckpt, on_step)

    # 3. the draft bundle, with the weights of the best held-out evaluation
    final = trainer.use_best()
    say.note(f"held-out greedy acceptance {state.history[0]['acceptance']:.3f} -> {final['acceptance']:.3f} "
             f"(replayed with {recipe.eval_k} drafts per round; the weights of step {final['step']} of {state.step}); "
             "exporting")
    info = {"architecture": "eagle", "init_layer": layer, "steps": state.step, "exported_step": final["step"],
            "heldout_acceptance": round(final["acceptance"], 4), "heldout_top1": round(final["top1"], 4),
            "heldout_loss": round(final["heldout_loss"], 4), "answers": len(data), "answer_tokens": data.answer_tokens,
            "recipe": recipe.to_dict()}
    held = data.heldout.index(True)
    n = min(32, len(data.seqs[held]) - 1)
    bundle = export_draft(model, vocab_map, target, out, info, probe=data.seqs[held][1:n + 1].tolist(),
                          probe_features=data.features[held][:n].astype(np.float32))
    return Result(bundle=bundle, work=work, answers=len(data), answer_tokens=data.answer_tokens, steps=state.step,
                  initial=state.history[0], final=final, draft_bytes=_weights_bytes(bundle),
                  target_bytes=_weights_bytes(target), seconds=now() - t_start)
