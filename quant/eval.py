"""Quality and speed of a bundle: perplexity on a text, top-1 agreement and KL against a reference bundle, size on
disk, decode tokens/s. Runs through the runtime's own Decoder and Engine, so it measures what users run.

    report = evaluate("out/smol-int4", text, reference="out/smol-f32")
    print(report.table())
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.bundle import Bundle
from edge_runtime.engine import Engine
from edge_runtime.errors import InvalidArgumentError
from edge_runtime.manifest import MANIFEST
from edge_runtime.memory import format_size
from edge_runtime.sampling import SamplingParams

DECODE_STEPS = 32
DECODE_ROUNDS = 3  # decode is timed this many times per bundle, interleaved; the best round counts


@dataclass(frozen=True)
class BundleEval:
    name: str
    path: str
    precision: str       # of the target graph, from the manifest
    size_bytes: int      # every file of the bundle, manifest included
    tokens: int          # positions scored
    perplexity: float
    decode_tps: float    # greedy decode tokens/s, best of DECODE_ROUNDS runs of DECODE_STEPS steps


@dataclass(frozen=True)
class EvalReport:
    model: BundleEval
    reference: BundleEval | None = None
    top1_agreement: float | None = None  # fraction of positions whose argmax equals the reference's
    mean_kl: float | None = None         # mean over positions of KL(reference || model), in nats
    decode_steps: int = DECODE_STEPS     # how decode_tps was timed
    decode_rounds: int = DECODE_ROUNDS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        return format_table(self)


def bundle_size(bundle: Bundle) -> int:
    files = [*bundle.manifest.files, MANIFEST]
    return sum((bundle.path / name).stat().st_size for name in files)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits - logits.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(engines: list[Engine], ids: list[int]) -> tuple[list[float], float, int, int]:
    """Run each engine over the same tokens, window by window (a window fills the KV cache), in chunks whose
    logits are all kept. engines[0] is the model, engines[1] (optional) the reference.

    Returns ([NLL sum per engine], sum of KL(reference || model), positions whose argmax agrees, positions scored).
    """
    window = min(e.context for e in engines)
    chunk_size = min(getattr(e.decoder, "max_logits", 1) for e in engines)
    nll = [0.0] * len(engines)
    kl_sum, agree, positions = 0.0, 0, 0
    for e in engines:
        e.reset()
    for start in range(0, len(ids) - 1, window):
        win = ids[start:start + window + 1]  # the window's tokens plus the one its last position predicts
        for e in engines:
            e.reset()
        for c in range(0, len(win) - 1, chunk_size):
            # the window's last token is only a target: feeding it would take slot `window`, one past the cache
            chunk = win[c:min(c + chunk_size, len(win) - 1)]
            targets = np.asarray(win[c + 1:c + 1 + len(chunk)])
            n = len(targets)
            logps = []
            for i, e in enumerate(engines):
                logp = _log_softmax(e.target.extend(chunk, keep=len(chunk))[:n])
                nll[i] -= float(logp[np.arange(n), targets].sum())
                logps.append(logp)
            if len(logps) == 2:
                got, ref = logps
                kl_sum += float((np.exp(ref) * (ref - got)).sum())
                agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            positions += n
    for e in engines:
        e.reset()
    return nll, kl_sum, agree, positions


def decode_speed(engines: list[Engine], prompt: list[int], steps: int = DECODE_STEPS,
                 rounds: int = DECODE_ROUNDS) -> list[float]:
    """Greedy decode tokens/s of each engine, timed in interleaved rounds (so background load hits all alike)
    after one untimed warm-up run each; the best round counts."""
    best = [0.0] * len(engines)
    for r in range(rounds + 1):
        for i, engine in enumerate(engines):
            engine.reset()
            eos, engine.eos = engine.eos, frozenset()  # time exactly `steps` tokens
            try:
                for _token in engine.generate_step(prompt, SamplingParams(), max_tokens=steps + 1 if r else 2):
                    pass
            finally:
                engine.eos = eos
            if r:
                best[i] = max(best[i], engine.last_stats.decode_tps)
    for engine in engines:
        engine.reset()
    return best


def evaluate(model: str | Path, text: str, reference: str | Path | None = None, *, threads: int | None = None,
             decode_steps: int = DECODE_STEPS, ep: str | None = None) -> EvalReport:
    """Perplexity of `model` on `text`; with a reference bundle also top-1 agreement and KL against it.
    ep: where both run [each graph's own]; "cpu" scores a QNN bundle's QDQ graphs as written, without the NPU."""
    return evaluate_many([model], text, reference, threads=threads, decode_steps=decode_steps, ep=ep)[0]


def evaluate_many(models: list[str | Path], text: str, reference: str | Path | None = None, *,
                  threads: int | None = None, decode_steps: int = DECODE_STEPS,
                  rounds: int = DECODE_ROUNDS, ep: str | None = None) -> list[EvalReport]:
    """evaluate() for several bundles against one reference, all loaded at once, so that decode speed is timed
    side by side (interleaved rounds over the reference and every model) in one process."""
    bundles = [Bundle.load(m) for m in models]
    ref = Bundle.load(reference) if reference is not None else None
    engines = [Engine(b, threads=threads, ep=ep) for b in bundles]
    ref_engine = Engine(ref, threads=threads, ep=ep) if ref is not None else None
    ids = engines[0].encode(text)
    if len(ids) < 2:
        raise InvalidArgumentError("the evaluation text is shorter than two tokens; give a longer text")
    for b in bundles:
        if ref is not None and ref.manifest.architecture.vocab_size != b.manifest.architecture.vocab_size:
            raise InvalidArgumentError(f"reference {ref.path} has a vocabulary of "
                                       f"{ref.manifest.architecture.vocab_size} tokens, {b.path} of "
                                       f"{b.manifest.architecture.vocab_size}; compare bundles of the same model")
    context_needed = min(len(ids), 16) + decode_steps + 1
    everyone = engines + ([ref_engine] if ref_engine else [])
    if context_needed > min(e.context for e in everyone):
        raise InvalidArgumentError(f"decode timing needs a context of {context_needed} tokens; this model has "
                                   f"{min(e.context for e in everyone)}")
    scores = [compare([e, ref_engine] if ref_engine else [e], ids) for e in engines]
    tps = decode_speed(everyone, ids[:16], decode_steps, rounds)

    def summary(b: Bundle, nll: float, positions: int, speed: float) -> BundleEval:
        return BundleEval(name=b.path.name, path=str(b.path), precision=b.graph("target").precision,
                          size_bytes=bundle_size(b), tokens=positions, perplexity=float(np.exp(nll / positions)),
                          decode_tps=speed)

    reports = []
    for i, (b, (nll, kl_sum, agree, positions)) in enumerate(zip(bundles, scores)):
        got = summary(b, nll[0], positions, tps[i])
        timing = {"decode_steps": decode_steps, "decode_rounds": rounds}
        if ref is None:
            reports.append(EvalReport(got, **timing))
        else:
            reports.append(EvalReport(got, summary(ref, nll[1], positions, tps[-1]), top1_agreement=agree / positions,
                                      mean_kl=kl_sum / positions, **timing))
    return reports


def format_table(report: EvalReport | list[EvalReport]) -> str:
    """A plain-text table: the reference first (when there is one), then each model, with ratios to the reference.
    Several reports must share their reference (evaluate_many)."""
    reports = report if isinstance(report, list) else [report]
    ref = reports[0].reference
    if ref is None:
        rows = [("bundle", "precision", "size", "ppl", "decode tok/s")]
        rows += [(r.model.name, r.model.precision, format_size(r.model.size_bytes), f"{r.model.perplexity:.3f}",
                  f"{r.model.decode_tps:.1f}") for r in reports]
    else:
        rows = [("bundle", "precision", "size", "size %", "ppl", "ppl +%", "top-1", "KL", "decode tok/s", "speed"),
                (ref.name, ref.precision, format_size(ref.size_bytes), "100%", f"{ref.perplexity:.3f}", "", "", "",
                 f"{ref.decode_tps:.1f}", "1.00x")]
        for r in reports:
            got = r.model
            rows.append((got.name, got.precision, format_size(got.size_bytes),
                         f"{100 * got.size_bytes / ref.size_bytes:.1f}%", f"{got.perplexity:.3f}",
                         f"{100 * (got.perplexity / ref.perplexity - 1):+.2f}%", f"{100 * r.top1_agreement:.1f}%",
                         f"{r.mean_kl:.4f}", f"{got.decode_tps:.1f}",
                         f"{got.decode_tps / ref.decode_tps:.2f}x" if ref.decode_tps else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    r0 = reports[0]
    footer = f"{r0.model.tokens} positions scored; decode: best of {r0.decode_rounds} runs of {r0.decode_steps} " \
             "greedy steps"
    if ref is not None:
        footer += " (interleaved); top-1 and KL(reference || model) on the same positions"
    return "\n".join(lines + [footer])
