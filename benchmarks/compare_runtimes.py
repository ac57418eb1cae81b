"""edge-runtime vs onnxruntime-genai vs llama.cpp on one model and the same token ids: decode, prefill, peak RSS.

    python benchmarks/compare_runtimes.py [--precision fp32 int4] [--runs 3] [--new-tokens 128] [--threads 2]
                                          [--context 2048] [--warmup 1] [--json]

Model: SmolLM2-135M-Instruct (the `smollm2-135m` card: its Q4_1 GGUF, dequantized to float32 by transformers and
saved as a Hugging Face folder, as benchmarks/decode_vs_optimum.py does), CPU, greedy, exactly N new tokens after
a fixed chat prompt (end-of-sequence ignored), KV cache of `--context` positions everywhere.

rows (a row whose runtime or model is missing is skipped, and the table says why):
- fp32 edge-rt: the card's bundle (`edge-rt export smollm2-135m`).
- fp32 onnxruntime-genai: `python -m onnxruntime_genai.models.builder -i <HF folder> -o OUT -p fp32 -e cpu`.
- int4 edge-rt: `edge-rt quantize <bundle> --recipe cpu-int4-all -o OUT` (or --ours-int4): every linear and the LM
  head at 4 bits, genai's int4 precision (edge-rt's default cpu-int4 keeps the head and ~10% of the body at 8 bits).
- int4 onnxruntime-genai: the same builder with `-p int4` (MatMulNBits, block 32, accuracy level 4).
- q4_1 llama.cpp: llama-cpp-python on the card's own GGUF (Q4_1), when installed.

The genai builder of onnxruntime-genai 0.18 imports transformers 5; this project pins transformers < 4.58, so the
builder runs in a venv of its own (`--genai-builder-python`, default `$EDGE_RT_HOME/bench/genai-builder-venv`, see
benchmarks/README.md). Neither peer is a dependency of edge-runtime.

Timing, the same for every runtime: prefill = feeding the prompt ids and choosing the first token; decode tok/s =
(N - 1) / the time of the N - 1 steps after it. Peak RSS = VmHWM of the child process (reset by exec, so it is that
runtime's own). Every measurement is its own child (`--child ...`, one JSON line); children run interleaved
(row 1, row 2, ..., row 1, ...) `--runs` times and the table shows medians; `--warmup` untimed 8-token generations
run in each child first. A `prepare` child builds what is missing under $EDGE_RT_HOME/bench.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_vs_optimum import (CARD, _atomic_dir, bench_dir, bundle_dir, ensure_bundle,  # noqa: E402
                               add_run_args, ensure_hf_folder, hf_dir, prompt_ids_of_bundle)

PROMPT = "Write a short story about a robot who learns to paint. Keep it under two hundred words."
PREPARE_TIMEOUT = 3600
RUN_TIMEOUT = 1200
# (precision, runtime): the rows, in table order
ROWS = (("fp32", "edge-rt"), ("fp32", "onnxruntime-genai"), ("int4", "edge-rt"), ("int4", "onnxruntime-genai"),
        ("int4", "llama.cpp"))
CHILD_OF = {"edge-rt": "ours", "onnxruntime-genai": "genai", "llama.cpp": "llamacpp"}


def _log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:  # VmHWM: this process's own peak, not its parent's before exec
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def ours_int4_dir() -> Path:
    return bench_dir() / "smollm2-cpu-int4-all"


def genai_dir(precision: str) -> Path:
    return bench_dir() / f"genai-{precision}"


def default_builder_python() -> Path:
    return bench_dir() / "genai-builder-venv" / "bin" / "python"


# ---- prepare (child): build what is missing ------------------------------------------------------------------------
def _have(module: str) -> str | None:
    """The version of an installed module, or None."""
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return getattr(mod, "__version__", "?")


def ensure_genai_model(precision: str, builder_python: str) -> tuple[Path | None, str]:
    out = genai_dir(precision)
    if (out / "genai_config.json").is_file():
        return out, "built before"
    if not _have("onnxruntime_genai"):
        return None, "onnxruntime-genai is not installed"
    python = builder_python if Path(builder_python).exists() else sys.executable
    _log(f"building the onnxruntime-genai {precision} model into {out} (builder python: {python})")
    cache = bench_dir() / f".genai-cache-{precision}"

    def build(tmp: Path) -> None:
        cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir()), "-o", str(tmp), "-p",
               precision, "-e", "cpu", "-c", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PREPARE_TIMEOUT)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise RuntimeError(f"the genai builder failed: {' '.join(tail)}")

    try:
        t0 = time.perf_counter()
        _atomic_dir(out, build)
        return out, f"built in {time.perf_counter() - t0:.0f} s"
    except RuntimeError as e:
        return None, str(e)


def ensure_ours_int4(given: str | None = None) -> tuple[Path | None, str]:
    if given:
        return Path(given), "given with --ours-int4"
    out = ours_int4_dir()
    if (out / "manifest.json").is_file():
        return out, "built before"
    _log(f"quantizing {bundle_dir()} with the cpu-int4-all recipe into {out}")
    done = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "quantize", str(bundle_dir()), "--recipe",
                           "cpu-int4-all", "-o", str(out)], capture_output=True, text=True, timeout=PREPARE_TIMEOUT)
    if done.returncode != 0:
        return None, f"edge-rt quantize failed: {(done.stderr or '').strip().splitlines()[-1:]}"
    return out, "quantized now"


def llamacpp_model() -> tuple[Path | None, str]:
    if not _have("llama_cpp"):
        return None, "llama-cpp-python is not installed"
    from edge_runtime.cards import get_card
    from export.fetch import fetch
    return fetch(get_card(CARD), quiet=True), "the card's GGUF"


def child_prepare(args) -> dict:
    ensure_bundle()
    ensure_hf_folder()
    models, notes = {}, {}
    for precision, runtime in ROWS:
        if precision not in args.precision:
            continue
        if runtime == "edge-rt":
            path, note = (bundle_dir(), "the card's bundle") if precision == "fp32" else ensure_ours_int4(args.ours_int4)
        elif runtime == "onnxruntime-genai":
            path, note = ensure_genai_model(precision, args.genai_builder_python)
        else:
            path, note = llamacpp_model()
        key = f"{precision}/{runtime}"
        models[key], notes[key] = (str(path) if path else None), note
    versions = {"edge-rt": _have("edge_runtime"), "onnxruntime": _have("onnxruntime"),
                "onnxruntime-genai": _have("onnxruntime_genai"), "llama.cpp": _have("llama_cpp")}
    return {"prompt_ids": prompt_ids_of_bundle(PROMPT), "models": models, "notes": notes, "versions": versions}


# ---- the runtimes (children) ---------------------------------------------------------------------------------------
def child_ours(args, ids: list[int]) -> dict:
    from edge_runtime import Engine
    from edge_runtime.bundle import Bundle
    from edge_runtime.session import share_thread_pool

    t0 = time.perf_counter()
    share_thread_pool(args.threads)  # as `edge-rt generate` runs (this child runs nothing else)
    engine = Engine(Bundle.load(args.model), context=args.context, threads=args.threads)
    load_s = time.perf_counter() - t0
    engine.eos = frozenset()  # exactly N tokens
    for _ in range(args.warmup):
        list(engine.generate_step(ids, max_tokens=8))
        engine.reset()  # the timed run prefills the whole prompt again
    tokens = list(engine.generate_step(ids, max_tokens=args.new_tokens))
    s = engine.last_stats
    assert s.prefilled_tokens == len(ids), (s.prefilled_tokens, len(ids))
    return {"tokens": tokens, "load_s": load_s, "prefill_s": s.prefill_seconds, "decode_s": s.decode_seconds}


def child_genai(args, ids: list[int]) -> dict:
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    config = og.Config(args.model)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t0

    def run(n: int) -> tuple[list[int], float, float]:
        params = og.GeneratorParams(model)
        # max_length sizes genai's shared past/present buffer: the same KV cache as ours; min_length: no early stop
        params.set_search_options(max_length=args.context, min_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)   # runs the prompt
        gen.generate_next_token()  # picks the first token from the prompt's logits
        tokens = [int(gen.get_next_tokens()[0])]
        t1 = time.perf_counter()
        while len(tokens) < n:
            gen.generate_next_token()  # runs the last token, then picks the next
            tokens.append(int(gen.get_next_tokens()[0]))
        return tokens, t1 - t0, time.perf_counter() - t1

    for _ in range(args.warmup):
        run(8)
    tokens, prefill_s, decode_s = run(args.new_tokens)
    return {"tokens": tokens, "load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s}


def child_llamacpp(args, ids: list[int]) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=args.model, n_ctx=args.context, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False)
    load_s = time.perf_counter() - t0

    def run(n: int) -> tuple[list[int], float, float]:
        steps = llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
        t0 = time.perf_counter()
        tokens = [int(next(steps))]  # evaluates the prompt, picks the first token
        t1 = time.perf_counter()
        while len(tokens) < n:
            tokens.append(int(next(steps)))  # evaluates the last token, picks the next
        steps.close()
        return tokens, t1 - t0, time.perf_counter() - t1

    for _ in range(args.warmup):
        run(8)
    tokens, prefill_s, decode_s = run(args.new_tokens)
    return {"tokens": tokens, "load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s}


CHILDREN = {"ours": child_ours, "genai": child_genai, "llamacpp": child_llamacpp}


def run_child(args) -> None:
    if args.child == "prepare":
        result = child_prepare(args)
    else:
        ids = [int(x) for x in args.prompt_ids.split(",")]
        result = CHILDREN[args.child](args, ids)
        result["decode_steps"] = len(result["tokens"]) - 1
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result), flush=True)


# ---- parent ---------------------------------------------------------------------------------------------------------
def spawn(child: str, args, model: str | None = None, ids: list[int] | None = None,
          timeout: int = RUN_TIMEOUT) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", child, "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads), "--context", str(args.context), "--warmup", str(args.warmup),
           "--genai-builder-python", args.genai_builder_python, "--precision", *args.precision]
    if args.ours_int4:
        cmd += ["--ours-int4", args.ours_int4]
    if model is not None:
        cmd += ["--model", model, "--prompt-ids", ",".join(map(str, ids))]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if child == "prepare" else subprocess.PIPE,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-15:]
        sys.exit(f"child {child!r} ({model}) failed (exit {done.returncode}):\n" + "\n".join(tail))
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_interleaved(args, prep: dict) -> dict[str, list[dict]]:
    rows = [k for k, path in prep["models"].items() if path]
    results: dict[str, list[dict]] = {k: [] for k in rows}
    for i in range(args.runs):
        # the order flips every run: whoever always ran first (or last) would carry any drift of the machine
        for key in (rows if i % 2 == 0 else rows[::-1]):
            runtime = key.split("/", 1)[1]
            r = spawn(CHILD_OF[runtime], args, prep["models"][key], prep["prompt_ids"])
            results[key].append(r)
            _log(f"run {i + 1}/{args.runs} {key:24s} decode {r['decode_steps'] / r['decode_s']:7.1f} tok/s  "
                 f"prefill {1000 * r['prefill_s']:6.1f} ms  peak RSS {r['peak_rss_mb']:6.0f} MB")
    return results


def leading_match(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def summarize(runs: list[dict], reference: list[int] | None) -> dict:
    med = lambda key: statistics.median(key(r) for r in runs)  # noqa: E731
    tokens = runs[0]["tokens"]
    return {
        "decode_tps": med(lambda r: r["decode_steps"] / r["decode_s"]),
        "decode_tps_runs": [round(r["decode_steps"] / r["decode_s"], 1) for r in runs],
        "prefill_ms": 1000 * med(lambda r: r["prefill_s"]),
        "peak_rss_mb": med(lambda r: r["peak_rss_mb"]),
        "load_s": med(lambda r: r["load_s"]),
        "tokens_match_edge_rt": None if reference is None else leading_match(tokens, reference),
        "deterministic": all(r["tokens"] == tokens for r in runs),
    }


def report(args, prep: dict, results: dict[str, list[dict]]) -> dict:
    rows = {}
    for key, runs in results.items():
        precision = key.split("/")[0]
        ref = f"{precision}/edge-rt" if f"{precision}/edge-rt" in results else "fp32/edge-rt"
        rows[key] = summarize(runs, results[ref][0]["tokens"] if ref in results else None)
        rows[key]["tokens_compared_with"] = ref if ref in results else None
    ratios = {}
    for precision in ("fp32", "int4"):
        a, b = rows.get(f"{precision}/edge-rt"), rows.get(f"{precision}/onnxruntime-genai")
        if a and b:
            # paired: run i of each, taken back to back; steadier than the ratio of medians on a noisy machine
            paired = [x / y for x, y in zip(a["decode_tps_runs"], b["decode_tps_runs"])]
            ratios[precision] = {"decode": a["decode_tps"] / b["decode_tps"], "prefill": b["prefill_ms"] / a["prefill_ms"],
                                 "peak_rss": a["peak_rss_mb"] / b["peak_rss_mb"],
                                 "decode_paired": statistics.median(paired)}
    skipped = {k: prep["notes"][k] for k, path in prep["models"].items() if not path}
    return {"model": CARD, "prompt": PROMPT, "prompt_tokens": len(prep["prompt_ids"]), "new_tokens": args.new_tokens,
            "threads": args.threads, "context": args.context, "runs": args.runs, "warmup": args.warmup,
            "versions": prep["versions"], "rows": rows, "edge_rt_over_genai": ratios, "skipped": skipped,
            "models": {k: v for k, v in prep["models"].items() if v}}


def print_table(rep: dict) -> None:
    print(f"SmolLM2-135M-Instruct, CPU, {rep['threads']} threads, greedy: prompt {rep['prompt_tokens']} tokens, "
          f"{rep['new_tokens']} new tokens, context {rep['context']}; medians of {rep['runs']} interleaved runs")
    v = rep["versions"]
    print("versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x))
    header = (f"{'precision':<9} | {'runtime':<17} | {'decode tok/s':>12} | {'prefill ms':>10} | {'peak RSS MB':>11} | "
              f"{'load s':>6} | same greedy tokens as edge-rt")
    print(header)
    print("-" * len(header))
    for key, s in rep["rows"].items():
        precision, runtime = key.split("/", 1)
        ref = s["tokens_compared_with"]
        same = "-" if ref == key else ("n/a" if ref is None else
                                        f"{s['tokens_match_edge_rt']} of {rep['new_tokens']} leading (vs {ref})")
        print(f"{precision if runtime != 'llama.cpp' else 'q4_1':<9} | {runtime:<17} | {s['decode_tps']:>12.1f} | "
              f"{s['prefill_ms']:>10.1f} | {s['peak_rss_mb']:>11.0f} | {s['load_s']:>6.2f} | {same}")
    for precision, r in rep["edge_rt_over_genai"].items():
        print(f"{precision}: edge-rt / onnxruntime-genai: decode {r['decode']:.2f}x (median of per-run ratios "
              f"{r['decode_paired']:.2f}x), prefill {r['prefill']:.2f}x (>1: edge-rt faster), peak RSS {r['peak_rss']:.2f}x")
    print("decode tok/s per run: " + "; ".join(f"{k} {s['decode_tps_runs']}" for k, s in rep["rows"].items()))
    for key, s in rep["rows"].items():
        if not s["deterministic"]:
            print(f"WARNING: {key} gave different tokens in different runs")
    for key, why in rep["skipped"].items():
        print(f"skipped {key}: {why}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", nargs="+", choices=["fp32", "int4"], default=["fp32", "int4"])
    add_run_args(p)
    p.add_argument("--context", type=int, default=2048, help="KV cache positions for every runtime (default 2048)")
    p.add_argument("--genai-builder-python", default=str(default_builder_python()),
                   help="python that runs onnxruntime-genai's model builder (needs transformers 5)")
    p.add_argument("--ours-int4", default=None, help="an int4 edge-rt bundle to use instead of quantizing one")
    p.add_argument("--child", choices=["prepare", *CHILDREN], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs < 1 or args.new_tokens < 2 or args.threads < 1 or args.warmup < 0 or args.context < 64:
        p.error("need --runs >= 1, --new-tokens >= 2, --threads >= 1, --warmup >= 0, --context >= 64")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    prep = spawn("prepare", args, timeout=PREPARE_TIMEOUT)
    if len(prep["prompt_ids"]) + args.new_tokens > args.context:
        sys.exit(f"--context {args.context} cannot hold the prompt and {args.new_tokens} new tokens")
    results = run_interleaved(args, prep)
    rep = report(args, prep, results)
    print(json.dumps(rep, indent=2)) if args.json else print_table(rep)


if __name__ == "__main__":
    main()
