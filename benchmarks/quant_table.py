"""Quantized bundles side by side against their float bundle: size, perplexity, top-1 agreement, KL, decode tok/s.

    python benchmarks/quant_table.py REFERENCE BUNDLE... [--text FILE]... [--steps 32] [--rounds 5] [--json]

Every bundle is loaded in one process; quality is scored on each --text (default: the shipped calibration text
and benchmarks/data/heldout.txt, an original text the recipes never calibrate on); decode tokens/s are timed in
interleaved rounds over the reference and every bundle (best round each), so background load hits all alike.
Build the bundles with `edge-rt quantize REFERENCE --recipe R -o BUNDLE`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quant.calibration import load_text  # noqa: E402
from quant.eval import evaluate_many, format_table  # noqa: E402

HELDOUT = Path(__file__).resolve().parent / "data" / "heldout.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--text", action="append", type=Path, help="text file to score (repeatable)")
    ap.add_argument("--steps", type=int, default=32, help="greedy decode steps timed per run")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved decode runs per bundle (best counts)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    texts = {str(t): load_text(t, "text") for t in args.text} if args.text else \
        {"shipped calibration text": load_text(None), "heldout.txt": load_text(HELDOUT, "text")}
    out = {}
    for name, text in texts.items():
        reports = evaluate_many(args.bundles, text, args.reference, decode_steps=args.steps, rounds=args.rounds)
        out[name] = reports
        if not args.json:
            print(f"## {name}\n{format_table(reports)}\n", flush=True)
    if args.json:
        print(json.dumps({name: [r.to_dict() for r in reports] for name, reports in out.items()}, indent=1))


if __name__ == "__main__":
    main()
