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
    """Run each engine's decoder over the same tokens, window by window (a window fills the KV cache), in chunks
    whose logits are all kept. engines[0] is the model, engines[1] (optional) the reference.

    Returns ([NLL sum per engine], sum of KL(reference || model), positions whose argmax agrees, positions scored).
    """
    decoders = [e.decoder for e in engines]
    window = min(d.kv.capacity for d in decoders)
    chunk_size = min(d.max_logits for d in decoders)
    nll = [0.0] * len(decoders)
    kl_sum, agree, positions = 0.0, 0, 0
    for e in engines:
        e.reset()
    for start in range(0, len(ids) - 1, window):
        win = ids[start:start + window + 1]  # the window's tokens plus the one its last position predicts
        for e in engines:
            e.reset()
        for c in range(0, len(win) - 1, chunk_size):
            chunk = win[c:c + chunk_size]
            targets = np.asarray(win[c + 1:c + 1 + len(chunk)])
            n = len(targets)  # the window's last token has no target
            logps = []
            for i, dec in enumerate(decoders):
                logp = _log_softmax(dec.forward(chunk, keep=len(chunk))[:n])
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
    """Greedy decode tokens/s of each engine, timed in interleaved rounds (so background load hits all alike)."""
    best = [0.0] * len(engines)
    for _ in range(rounds):
        for i, engine in enumerate(engines):
            engine.reset()
            eos, engine.eos = engine.eos, frozenset()  # time exactly `steps` tokens
            try:
                for _token in engine.generate_step(prompt, SamplingParams(), max_tokens=steps + 1):
                    pass
            finally:
                engine.eos = eos
            best[i] = max(best[i], engine.last_stats.decode_tps)
    return best


def evaluate(model: str | Path, text: str, reference: str | Path | None = None, *, threads: int | None = None,
             decode_steps: int = DECODE_STEPS) -> EvalReport:
    """Perplexity of `model` on `text`; with a reference bundle also top-1 agreement and KL against it."""
    bundle = Bundle.load(model)
    ref = Bundle.load(reference) if reference is not None else None
    engine = Engine(bundle, threads=threads)
    ids = engine.encode(text)
    if len(ids) < 2:
        raise InvalidArgumentError("the evaluation text is shorter than two tokens; give a longer text")
    if ref is not None and ref.manifest.architecture.vocab_size != bundle.manifest.architecture.vocab_size:
        raise InvalidArgumentError(f"reference {ref.path} has a vocabulary of {ref.manifest.architecture.vocab_size}"
                                   f" tokens, {bundle.path} of {bundle.manifest.architecture.vocab_size}; "
                                   "compare bundles of the same model")
    engines = [engine] + ([Engine(ref, threads=threads)] if ref is not None else [])
    nll, kl_sum, agree, positions = compare(engines, ids)
    context_needed = min(len(ids), 16) + decode_steps + 1
    if context_needed > engine.context:
        raise InvalidArgumentError(f"decode timing needs a context of {context_needed} tokens; this model has "
                                   f"{engine.context}")
    tps = decode_speed(engines, ids[:16], decode_steps)

    def summary(b: Bundle, i: int) -> BundleEval:
        return BundleEval(name=b.path.name, path=str(b.path), precision=b.graph("target").precision,
                          size_bytes=bundle_size(b), tokens=positions, perplexity=float(np.exp(nll[i] / positions)),
                          decode_tps=tps[i])

    if ref is None:
        return EvalReport(summary(bundle, 0))
    return EvalReport(summary(bundle, 0), summary(ref, 1), top1_agreement=agree / positions,
                      mean_kl=kl_sum / positions)


def format_table(report: EvalReport) -> str:
    """A plain-text table: the reference first (when there is one), then the model, with ratios to the reference."""
    rows = [("bundle", "precision", "size MB", "size", "ppl", "ppl +%", "top-1", "KL", "decode tok/s", "speed")]
    ref, got = report.reference, report.model
    if ref is not None:
        rows.append((ref.name, ref.precision, f"{ref.size_bytes / 1e6:.1f}", "100%", f"{ref.perplexity:.3f}", "",
                     "", "", f"{ref.decode_tps:.1f}", "1.00x"))
    rows.append((
        got.name, got.precision, f"{got.size_bytes / 1e6:.1f}",
        f"{100 * got.size_bytes / ref.size_bytes:.1f}%" if ref else "",
        f"{got.perplexity:.3f}",
        f"{100 * (got.perplexity / ref.perplexity - 1):+.2f}%" if ref else "",
        f"{100 * report.top1_agreement:.1f}%" if ref else "",
        f"{report.mean_kl:.4f}" if ref else "",
        f"{got.decode_tps:.1f}",
        f"{got.decode_tps / ref.decode_tps:.2f}x" if ref and ref.decode_tps else "",
    ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    footer = f"{got.tokens} positions scored"
    if ref is not None:
        footer += "; ppl, top-1 and KL(reference || model) on the same tokens; decode: best of " \
                  f"{DECODE_ROUNDS} interleaved runs of {DECODE_STEPS} greedy steps"
    return "\n".join(lines + [footer])
