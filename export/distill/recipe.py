"""What `edge-rt train-draft` builds (the recipe, rare settings through `--set KEY=VALUE`) and the prompts it uses."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import DraftTrainingError

DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "draft_prompts.txt"


@dataclass(frozen=True)
class Recipe:
    # the draft (EAGLE, distill/eagle.py): one layer initialised from target layer `layers` (negative: from the end),
    # reading (token, target feature), with an LM head over the `vocab` tokens the target uses most. Measured on
    # SmolLM2 before EAGLE, a draft cut from the target (no features): layer 0 reached 0.17 held-out acceptance.
    layers: str = "0"
    vocab: int = 8192
    # the self-distillation set: the target answers each prompt at `temperature` (held-out prompts greedily)
    temperature: float = 0.7
    max_tokens: int = 128
    top_k: int = 32            # the target's most likely next tokens kept per position (the distillation target)
    holdout: float = 0.06      # share of the prompts kept out of training, for the held-out acceptance
    gen_share: float = 0.4     # most of --minutes spent generating the training answers
    passes: int = 1            # times each training prompt may be answered (new samples) while gen_share lasts
    context: int = 1024        # the target's KV cache while answering; longer prompts are skipped
    # training
    batch: int = 8             # sequences per step
    seq_len: int = 320         # tokens per sequence (the end of longer answers is cut)
    lr: float = 1e-3
    unroll: int = 2            # training steps unrolled on the draft's own features (1: EAGLE-1's teacher forcing)
    noise: float = 0.1         # uniform noise on input features, x their standard deviation (EAGLE)
    ce_weight: float = 0.5     # the distribution term's weight next to the feature regression
    eval_k: int = 4            # drafts per round when replaying greedy speculation on held-out answers
    steps: int = 0             # 0: as many as the time left allows
    eval_every: int = 25       # steps between held-out evaluations
    seed: int = 0
    threads: int = 2

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """The target layers the draft starts from, in order (negative numbers count from the end)."""
        try:
            parts = [int(p) for p in self.layers.split(",")]
        except ValueError:
            raise DraftTrainingError(f"layers={self.layers!r}: give target layer numbers, e.g. -1 or 0,29") from None
        if any(not -num_layers <= i < num_layers for i in parts):
            raise DraftTrainingError(f"layers={self.layers!r} does not fit a target of {num_layers} layers")
        return tuple(i % num_layers for i in parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def parse_settings(settings: list[str] | tuple[str, ...], base: Recipe = Recipe()) -> Recipe:
    """["vocab=4096", "layers=1"] -> a Recipe; unknown keys and bad values are DraftTrainingError."""
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    values = {}
    for item in settings:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise DraftTrainingError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        kind = type(getattr(base, key))
        try:
            values[key] = kind(value.strip())
        except ValueError:
            raise DraftTrainingError(f"--set {item!r}: {key} takes a {kind.__name__}") from None
    recipe = dataclasses.replace(base, **values)
    checks = [(recipe.vocab >= 2, "vocab must be at least 2"), (recipe.temperature > 0, "temperature must be > 0"),
              (recipe.max_tokens >= 1, "max_tokens must be at least 1"), (recipe.top_k >= 1, "top_k must be >= 1"),
              (recipe.passes >= 1, "passes must be at least 1"),
              (0 < recipe.holdout < 1, "holdout must be in (0, 1)"), (0 < recipe.gen_share < 1, "gen_share in (0, 1)"),
              (recipe.batch >= 1 and recipe.seq_len >= 8, "batch >= 1 and seq_len >= 8"),
              (recipe.lr > 0 and recipe.steps >= 0 and recipe.eval_every >= 1, "lr > 0, steps >= 0, eval_every >= 1"),
              (recipe.threads >= 1 and recipe.context >= 16, "threads >= 1 and context >= 16"),
              (1 <= recipe.unroll <= 8 and 1 <= recipe.eval_k <= 15, "unroll in 1..8 and eval_k in 1..15"),
              (recipe.noise >= 0 and recipe.ce_weight >= 0, "noise >= 0 and ce_weight >= 0")]
    for ok, what in checks:
        if not ok:
            raise DraftTrainingError(f"bad --set value: {what}")
    return recipe


def load_prompts(path: str | Path | None = None) -> list[str]:
    """One prompt per line of a UTF-8 text file; blank lines and lines starting with `#` are skipped, a literal
    `\\n` is a line break. At least two prompts (one is held out)."""
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DraftTrainingError(f"cannot read the prompt file {path} ({e.strerror or e}); give a text file with "
                                 "one prompt per line") from None
    if b"\0" in raw:
        raise DraftTrainingError(f"{path} is not a text file (it holds NUL bytes); give a UTF-8 text file with one "
                                 "prompt per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DraftTrainingError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); give a UTF-8 text file "
                                 "with one prompt per line") from None
    prompts = [line.strip().replace("\\n", "\n") for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if len(prompts) < 2:
        raise DraftTrainingError(f"{path} holds {len(prompts)} prompt(s); give at least 2, one per line "
                                 "(some are held out to measure acceptance)")
    return prompts


def write_json(path: Path, data) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
