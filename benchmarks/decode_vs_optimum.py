"""edge-runtime vs a plain loop over the optimum ONNX export of the same model: decode and prefill speed, peak RSS.

    python benchmarks/decode_vs_optimum.py [--runs 3] [--new-tokens 128] [--threads 2] [--warmup 1] [--json]

Model: SmolLM2-135M-Instruct (the `smollm2-135m` card, its Q4_1 GGUF dequantized to float32), CPU.

- ours: `Engine.load(<card bundle>, threads=T)`, greedy, exactly N new tokens (eos disabled); prefill time and
  decode tokens/s come from `engine.last_stats`.
- optimum: the same GGUF loaded with transformers, saved as a Hugging Face folder, exported with
  `optimum.exporters.onnx.main_export(task="text-generation-with-past")`, run by a plain numpy loop on an
  `onnxruntime.InferenceSession` with edge-runtime's own SessionOptions: every step feeds the whole past back in
  and gets the grown presents out. Same prompt ids, same N greedy tokens, timed the same way.

Every measurement runs in its own child process (`--child ours|optimum`, one JSON line on stdout), so peak RSS
(ru_maxrss) belongs to one runtime; children alternate ours, optimum, ours, ... `--runs` times each and the parent
reports medians. A `--child prepare` process builds what is missing first (the bundle, fetch included; the HF
folder; the optimum export) so the parent never imports torch. Artifacts live under $EDGE_RT_HOME (default
~/.cache/edge-runtime): bundles/smollm2-135m, bench/smollm2-hf, bench/smollm2-optimum.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CARD = "smollm2-135m"
PROMPT = "Write a short story about a brave little robot."  # 40 tokens with the chat template
RUNTIMES = ("ours", "optimum")
PREPARE_TIMEOUT = 3600
RUN_TIMEOUT = 1200


# ---- paths --------------------------------------------------------------------------------------------------------
def bench_dir() -> Path:
    from edge_runtime import paths
    return paths.home() / "bench"


def hf_dir() -> Path:
    return bench_dir() / "smollm2-hf"


def optimum_dir() -> Path:
    return bench_dir() / "smollm2-optimum"


def bundle_dir() -> Path:
    from edge_runtime.cards import get_card
    return get_card(CARD).bundle_dir


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---- prepare (child): build what is missing, compute the prompt ids ------------------------------------------------
def ensure_bundle() -> dict:
    """Build the card's bundle if it has no manifest; the wall time includes the fetch when the source is missing."""
    from edge_runtime.cards import get_card
    from export.fetch import source_path
    from export.pipeline import export_bundle

    card = get_card(CARD)
    out = card.bundle_dir
    if (out / "manifest.json").is_file():
        return {"built": False}
    fetched = not source_path(card).is_file()
    _log(f"building {CARD} into {out}" + (" (fetching the source first)" if fetched else ""))
    if out.exists():  # a folder without a manifest is a leftover, not a bundle
        shutil.rmtree(out)
    t0 = time.perf_counter()
    export_bundle(CARD, out, progress=lambda m: _log(f"  export: {m}"))
    return {"built": True, "seconds": time.perf_counter() - t0, "fetch_included": fetched}


def _atomic_dir(target: Path, fill) -> None:
    """Run fill(tmp) on a temp sibling folder, then rename it to target."""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_hf_folder() -> float | None:
    """The card's GGUF loaded with transformers (float32) and saved as a Hugging Face folder, once."""
    if (hf_dir() / "config.json").is_file():
        return None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_runtime.cards import get_card
    from export.fetch import fetch

    gguf = fetch(get_card(CARD), quiet=True)
    _log(f"saving {gguf.name} as a Hugging Face folder in {hf_dir()}")
    t0 = time.perf_counter()

    def fill(tmp: Path) -> None:
        kw = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
        AutoTokenizer.from_pretrained(**kw).save_pretrained(tmp)
        AutoModelForCausalLM.from_pretrained(**kw, dtype=torch.float32).save_pretrained(tmp)

    _atomic_dir(hf_dir(), fill)
    return time.perf_counter() - t0


def ensure_optimum_export() -> float | None:
    if (optimum_dir() / "model.onnx").is_file():
        return None
    from optimum.exporters.onnx import main_export

    _log(f"exporting {hf_dir()} with optimum into {optimum_dir()}")
    t0 = time.perf_counter()
    _atomic_dir(optimum_dir(), lambda tmp: main_export(str(hf_dir()), output=tmp, task="text-generation-with-past",
                                                       library_name="transformers"))
    return time.perf_counter() - t0


def prompt_ids_of_bundle(prompt: str = PROMPT) -> list[int]:
    """A chat prompt as edge-runtime tokenizes it (tokenizer + template only, no session)."""
    from edge_runtime.bundle import Bundle
    from edge_runtime.chat_template import CHATML, ChatTemplate
    from edge_runtime.tokenizer import load_tokenizer

    m = Bundle.load(bundle_dir(), verify=False).manifest
    tok = load_tokenizer(bundle_dir() / m.tokenizer)
    name = lambda i: None if i is None else tok.id_to_token(i)  # noqa: E731
    template = ChatTemplate(m.chat_template or CHATML, bos_token=name(m.tokens.bos),
                            eos_token=name(m.tokens.eos[0] if m.tokens.eos else None))
    text = template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False).ids


def child_prepare(_args) -> dict:
    bundle = ensure_bundle()
    return {"bundle": bundle, "hf_folder_seconds": ensure_hf_folder(),
            "optimum_export_seconds": ensure_optimum_export(), "prompt_ids": prompt_ids_of_bundle()}


# ---- ours (child) -------------------------------------------------------------------------------------------------
def child_ours(args) -> dict:
    from edge_runtime import Engine

    t0 = time.perf_counter()
    engine = Engine.load(bundle_dir(), threads=args.threads)
    load_s = time.perf_counter() - t0
    engine.eos = frozenset()  # exactly N tokens
    ids = engine.chat_ids([{"role": "user", "content": PROMPT}])
    for _ in range(args.warmup):
        list(engine.generate_step(ids, max_tokens=min(8, args.new_tokens)))
        engine.reset()  # otherwise the measured run would find the prompt cached and prefill one token
    tokens = list(engine.generate_step(ids, max_tokens=args.new_tokens))
    s = engine.last_stats
    assert s.prefilled_tokens == len(ids), (s.prefilled_tokens, len(ids))
    return {"prompt_ids": ids, "tokens": tokens, "load_s": load_s, "prefill_s": s.prefill_seconds,
            "decode_s": s.decode_seconds, "decode_steps": s.generated_tokens - 1}


# ---- optimum baseline (child) -------------------------------------------------------------------------------------
class PlainLoop:
    """input_ids, attention_mask, [position_ids], past_key_values.* -> logits, present.*; presents fed back."""

    def __init__(self, session):
        import numpy as np
        self.np = np
        self.session = session
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.output_names = [o.name for o in session.get_outputs()]
        self.present_of = {n: n.replace("past_key_values.", "present.") for n in self.past_names}
        missing = [p for p in self.present_of.values() if p not in self.output_names]
        if missing or "logits" not in self.output_names:
            raise RuntimeError(f"unexpected optimum graph outputs: {self.output_names}")

    def empty_past(self) -> dict:
        def empty(name):
            _, kv, _, hd = self.inputs[name].shape  # ['batch_size', kv_heads, 'past_sequence_length', head_dim]
            dtype = self.np.float16 if "float16" in self.inputs[name].type else self.np.float32
            return self.np.zeros((1, kv, 0, hd), dtype)
        return {n: empty(n) for n in self.past_names}

    def step(self, ids, past: dict, pos: int):
        """Run ids at positions pos..pos+n-1; return last-position logits and the new past."""
        np, n = self.np, len(ids)
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, pos + n), np.int64), **past}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(pos, pos + n, dtype=np.int64)[None]
        out = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        return out["logits"][0, -1], {p: out[self.present_of[p]] for p in self.past_names}

    def generate(self, prompt_ids: list[int], n_new: int) -> tuple[list[int], float, float]:
        """Greedy n_new tokens; (tokens, prefill seconds incl. the first argmax, seconds for the other n-1)."""
        t0 = time.perf_counter()
        logits, past = self.step(prompt_ids, self.empty_past(), 0)
        tokens = [int(logits.argmax())]
        t1 = time.perf_counter()
        pos = len(prompt_ids)
        while len(tokens) < n_new:
            logits, past = self.step(tokens[-1:], past, pos)
            pos += 1
            tokens.append(int(logits.argmax()))
        return tokens, t1 - t0, time.perf_counter() - t1


def child_optimum(args) -> dict:
    import onnxruntime as ort

    from edge_runtime.session import session_options

    prompt_ids = [int(x) for x in args.prompt_ids.split(",")]
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(optimum_dir() / "model.onnx"), sess_options=session_options(args.threads),
                                   providers=["CPUExecutionProvider"])
    loop = PlainLoop(session)
    load_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        loop.generate(prompt_ids, min(8, args.new_tokens))
    tokens, prefill_s, decode_s = loop.generate(prompt_ids, args.new_tokens)
    return {"prompt_ids": prompt_ids, "tokens": tokens, "load_s": load_s, "prefill_s": prefill_s,
            "decode_s": decode_s, "decode_steps": len(tokens) - 1}


CHILDREN = {"prepare": child_prepare, "ours": child_ours, "optimum": child_optimum}


def run_child(args) -> None:
    result = CHILDREN[args.child](args)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result), flush=True)


# ---- parent -------------------------------------------------------------------------------------------------------
def spawn(child: str, args, prompt_ids: list[int] | None = None, timeout: int = RUN_TIMEOUT) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", child, "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads), "--warmup", str(args.warmup)]
    if prompt_ids is not None:
        cmd += ["--prompt-ids", ",".join(map(str, prompt_ids))]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if child == "prepare" else subprocess.PIPE,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-15:]
        sys.exit(f"child {child!r} failed (exit {done.returncode}):\n" + "\n".join(tail))
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_interleaved(args, prompt_ids: list[int]) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {r: [] for r in RUNTIMES}
    for i in range(args.runs):
        for runtime in RUNTIMES:
            r = spawn(runtime, args, prompt_ids)
            results[runtime].append(r)
            _log(f"run {i + 1}/{args.runs} {runtime:8s} decode {r['decode_steps'] / r['decode_s']:7.1f} tok/s  "
                 f"prefill {1000 * r['prefill_s']:6.1f} ms  rss {r['peak_rss_mb']:6.0f} MB")
    return results


def summarize(runs: list[dict]) -> dict:
    med = lambda key: statistics.median(key(r) for r in runs)  # noqa: E731
    prompt_len = len(runs[0]["prompt_ids"])
    prefill_s = med(lambda r: r["prefill_s"])
    return {
        "decode_tps": med(lambda r: r["decode_steps"] / r["decode_s"]),
        "decode_tps_runs": [round(r["decode_steps"] / r["decode_s"], 1) for r in runs],
        "prefill_ms": 1000 * prefill_s,
        "prompt_tps": prompt_len / prefill_s,
        "peak_rss_mb": med(lambda r: r["peak_rss_mb"]),
        "load_s": med(lambda r: r["load_s"]),
    }


def leading_match(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def compare_tokens(results: dict[str, list[dict]]) -> dict:
    ours, base = results["ours"][0]["tokens"], results["optimum"][0]["tokens"]
    stable = {rt: all(r["tokens"] == runs[0]["tokens"] for r in runs) for rt, runs in results.items()}
    return {"same": ours == base, "matching_leading_tokens": leading_match(ours, base), "of": len(ours),
            "deterministic_across_runs": stable}


def report(args, prep: dict, results: dict[str, list[dict]]) -> dict:
    summary = {rt: summarize(runs) for rt, runs in results.items()}
    return {
        "model": CARD, "prompt": PROMPT, "prompt_tokens": len(prep["prompt_ids"]), "new_tokens": args.new_tokens,
        "threads": args.threads, "runs": args.runs, "warmup": args.warmup,
        "runtimes": summary,
        "decode_ratio_ours_over_optimum": summary["ours"]["decode_tps"] / summary["optimum"]["decode_tps"],
        "tokens": compare_tokens(results),
        "first_build": prep["bundle"],
        "hf_folder_seconds": prep["hf_folder_seconds"], "optimum_export_seconds": prep["optimum_export_seconds"],
    }


def print_table(rep: dict) -> None:
    print(f"SmolLM2-135M-Instruct fp32, CPU, {rep['threads']} threads: prompt {rep['prompt_tokens']} tokens, "
          f"{rep['new_tokens']} new tokens (greedy), medians of {rep['runs']} interleaved runs "
          f"(warmup {rep['warmup']})")
    header = f"{'runtime':<9}| {'decode tok/s':>12} | {'prefill ms':>10} | {'prompt tok/s':>12} | " \
             f"{'peak RSS MB':>11} | {'load s':>6}"
    print(header)
    print("-" * len(header))
    for rt, s in rep["runtimes"].items():
        print(f"{rt:<9}| {s['decode_tps']:>12.1f} | {s['prefill_ms']:>10.1f} | {s['prompt_tps']:>12.0f} | "
              f"{s['peak_rss_mb']:>11.0f} | {s['load_s']:>6.2f}")
    print(f"decode tok/s ratio ours/optimum: {rep['decode_ratio_ours_over_optimum']:.2f}x")
    print("decode tok/s per run: " + "; ".join(f"{rt} {s['decode_tps_runs']}" for rt, s in rep["runtimes"].items()))
    t = rep["tokens"]
    if not t["same"]:
        print(f"WARNING: greedy tokens differ: {t['matching_leading_tokens']} of {t['of']} leading tokens match")
    else:
        print(f"greedy tokens: identical ({t['of']} of {t['of']})")
    if not all(t["deterministic_across_runs"].values()):
        print(f"WARNING: tokens changed between runs of one runtime: {t['deterministic_across_runs']}")
    b = rep["first_build"]
    if b["built"]:
        print(f"first build of the bundle: {b['seconds']:.1f} s" + (" (fetch included)" if b["fetch_included"] else ""))
    if rep["optimum_export_seconds"] is not None:
        hf = rep["hf_folder_seconds"]
        print(f"one-time baseline setup: HF folder {hf:.1f} s, optimum export {rep['optimum_export_seconds']:.1f} s"
              if hf is not None else f"one-time optimum export: {rep['optimum_export_seconds']:.1f} s")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options every side-by-side benchmark here takes (compare_runtimes.py too)."""
    p.add_argument("--runs", type=int, default=3, help="child processes per row, interleaved (default 3)")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per run (default 128)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for every runtime (default 2)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed short generations (8 tokens) in each child before the timed one (default 1)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(p)
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs < 1 or args.new_tokens < 2 or args.threads < 1 or args.warmup < 0:
        p.error("need --runs >= 1, --new-tokens >= 2, --threads >= 1, --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    prep = spawn("prepare", args, timeout=PREPARE_TIMEOUT)
    results = run_interleaved(args, prep["prompt_ids"])
    ours_ids = results["ours"][0]["prompt_ids"]
    if ours_ids != prep["prompt_ids"]:
        sys.exit(f"engine.chat_ids gave {len(ours_ids)} ids, the prepared prompt {len(prep['prompt_ids'])}: differ")
    rep = report(args, prep, results)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print_table(rep)


if __name__ == "__main__":
    main()
