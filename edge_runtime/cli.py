"""edge-rt: the command line. Library errors become one-line click errors here and only here."""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import click

from . import __version__, paths
from .cards import DEFAULT_MODEL, card_names, get_card, looks_like_path
from .errors import EdgeRuntimeError, ExportError

HELP = {"/reset": "forget the conversation", "/stats": "speed and speculation figures of the last answer",
        "/exit": "quit (also /bye, Ctrl-D)", "/help": "this list"}


def _fail_cleanly(fn):
    """Typed library errors -> `Error: message`, exit 1, no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeRuntimeError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def _export_api():
    try:
        from export import pipeline
    except ImportError as e:
        raise ExportError(f"building a bundle needs the export extra ({e.name} is missing): "
                          "pip install 'edge-runtime[export]'") from None
    return pipeline


def _build(source: str, out: Path, force: bool = False, kv_dtype: str = "float32", **export_options):
    """Run the export pipeline with a progress bar over its stages."""
    from tqdm import tqdm
    stages = ["load source", "build graph", "write graph", "write tokenizer", "build draft", "verify"]
    pipeline = _export_api()
    t0 = time.perf_counter()
    # disable=None: no bar when stderr is not a terminal (a pipe or log gets only the result or the error line)
    with tqdm(total=len(stages), desc=f"export {source}", unit="step", file=sys.stderr, leave=True,
              disable=None) as bar:
        def progress(stage: str) -> None:
            bar.set_postfix_str(stage)
            bar.update(stages.index(stage) - bar.n)
        try:
            bundle = pipeline.export_bundle(source, out, force=force, progress=progress, kv_dtype=kv_dtype,
                                            **export_options)
        except BaseException:
            bar.leave = False  # a failed export ends with its one `Error:` line, not a stale bar above it
            raise
        bar.update(len(stages) - bar.n)
    src = bundle.manifest.source
    click.echo(f"bundle {out}: verified, max |logit error| {src['verify_max_abs_error']:.2e} "
               f"(tolerance {src['verify_tolerance']:.2e}), built in {time.perf_counter() - t0:.0f} s", err=True)
    return bundle


def _bundle_path(model: str) -> Path:
    """A bundle folder, or a card's cached bundle, built on first use."""
    if looks_like_path(model):
        return Path(model)
    card = get_card(model)
    if not (card.bundle_dir / "manifest.json").is_file():
        click.echo(f"{card.name} is not built yet: fetching and exporting it (once)", err=True)
        _build(card.name, card.bundle_dir)
    return card.bundle_dir


def _engine(model: str, context: int | None, threads: int | None, draft: str | None = None, draft_min: int = 1,
            draft_max: int = 4, train_draft: bool = False, **options):
    from .bundle import Bundle
    from .engine import Engine
    bundle = Bundle.load(_bundle_path(model))
    if train_draft or draft == "trained" or (draft is None and bundle.manifest.defaults.draft == "trained"):
        draft = _trained_draft(bundle, build=train_draft, asked=draft == "trained")
    draft = bundle.manifest.defaults.draft if draft is None else draft
    from .drafters import split_draft
    model_draft = split_draft(draft)[0]
    if model_draft not in (None, "self", "target") and not looks_like_path(model_draft):
        _bundle_path(model_draft)  # a card name: build it on first use like the target
    if _OWN_PROCESS:
        from .session import share_thread_pool
        share_thread_pool(threads)  # target and draft on one pool (session.py); after every build above
    return Engine(bundle, context=context, threads=threads, draft=draft, draft_min=draft_min, draft_max=draft_max,
                  **options)


def _trained_draft_dir(name: str) -> Path:
    """Where `edge-rt train-draft CARD` and `chat --train-draft` put a model's trained draft."""
    return paths.bundles_dir() / f"{name}-draft"


def _trained_draft(bundle, build: bool, asked: bool) -> str:
    """--draft trained: the draft train-draft built for this model. Built here only when the user asks
    (chat --train-draft); otherwise a card default falls back to ngram with a notice."""
    out = _trained_draft_dir(bundle.manifest.name)
    if (out / "manifest.json").is_file():
        return str(out)
    if build:
        resume = (out.with_name(out.name + ".train") / "recipe.json").is_file()
        click.echo(f"training a draft for {bundle.manifest.name} (once, about 30 minutes; Ctrl-C stops, "
                   f"--train-draft again resumes)", err=True)
        _train_draft(bundle.path, out, resume=resume)
        return str(out)
    if asked:
        raise click.ClickException(f"{bundle.manifest.name} has no trained draft yet; build it with `edge-rt "
                                   f"train-draft {bundle.manifest.name}` or `edge-rt chat --train-draft`")
    click.echo(f"(no trained draft for {bundle.manifest.name} yet; `edge-rt chat --train-draft` builds one in about "
               "30 minutes; using ngram)", err=True)
    return "ngram"


class _TrainProgress:
    """train-draft's stages as tqdm bars on stderr; held-out evaluations and notes as lines that stay."""

    def __init__(self):
        self.bar = None

    def stage(self, name: str, total: int, done: int = 0) -> None:
        from tqdm import tqdm
        if self.bar is not None:
            self.bar.close()
        unit = "prompt" if name.startswith("answer") else "step"
        self.bar = tqdm(total=total or None, initial=done, desc=name, unit=unit, file=sys.stderr, disable=None,
                        dynamic_ncols=True)
        if self.bar.disable and total:  # no terminal: a line per stage instead of a bar
            click.echo(f"{name}: {done} of {total} {unit}s done", err=True)

    def update(self, done: int, figures: dict) -> None:
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in figures.items() if isinstance(v, float)}, refresh=False)
        if "acceptance" in figures:
            self.note(f"step {done}: held-out greedy acceptance {figures['acceptance']:.3f} (first draft "
                      f"{figures['top1']:.3f}), loss {figures['heldout_loss']:.3f}")

    def note(self, message: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(message, file=sys.stderr)
        else:
            click.echo(message, err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train_draft(target: Path, out: Path, minutes: float = 30.0, prompts: Path | None = None, resume: bool = False,
                 settings: tuple[str, ...] = ()):
    try:
        from export.distill import parse_settings, train_draft
    except ImportError as e:
        raise ExportError(f"training a draft needs the export extra ({e.name} is missing): "
                          "pip install 'edge-runtime[export]'") from None
    progress = _TrainProgress()
    try:
        result = train_draft(target, out, prompts, minutes, resume, parse_settings(settings), progress)
    finally:
        progress.close()
    click.echo(f"draft {out}: held-out greedy acceptance {result.final['acceptance']:.3f} (untrained "
               f"{result.initial['acceptance']:.3f}; weights of step {result.final['step']} of {result.steps}), "
               f"{result.answer_tokens} answer tokens, "
               f"weights {result.draft_bytes / 2**20:.1f} MiB = {100 * result.draft_bytes / result.target_bytes:.1f}% "
               f"of the target's, built in {result.seconds / 60:.1f} min; checkpoints in {result.work}", err=True)
    return result


def _sampling(temperature, top_k, top_p, seed):
    from .sampling import SamplingParams
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def _rate(tps: float) -> str:
    """Tokens/s with the digits that matter: 48.6, or 0.0812 on the NPU simulator."""
    return f"{tps:.1f}" if tps >= 1 or tps == 0 else f"{tps:.3g}"


def _print_stats(engine) -> None:
    stats = engine.last_stats
    click.echo(f"prompt: {stats.prompt_tokens} tokens ({stats.prefilled_tokens} run), {_rate(stats.prefill_tps)} tok/s | "
               f"decode: {stats.generated_tokens} tokens, {_rate(stats.decode_tps)} tok/s | "
               f"finish: {stats.finish_reason}", err=True)
    if engine.drafter is not None:
        click.echo(f"speculation ({engine.drafter.name}): acceptance {stats.acceptance_rate:.2f}, {stats.mean_accepted:.2f} accepted per "
                   f"draft round, {stats.calls_per_token:.2f} target calls per token", err=True)


def sampling_options(fn):
    opts = [
        click.option("--max-tokens", type=int, default=None, help="Most tokens to generate [model default]."),
        click.option("--temperature", type=float, default=None, help="0 is greedy [model default]."),
        click.option("--top-k", type=int, default=None, help="Keep the k most likely tokens (0: off)."),
        click.option("--top-p", type=float, default=None, help="Nucleus sampling mass, in (0, 1]."),
        click.option("--seed", type=int, default=None, help="Seed for sampling."),
        click.option("--context", type=int, default=None, help="KV cache length in tokens [model default]."),
        click.option("--threads", type=int, default=None, help="CPU threads [all cores]."),
        click.option("--stats", is_flag=True, help="Print prompt and decode tokens/s to stderr."),
        click.option("--draft", default=None,
                     help="Speculative draft: none, ngram, self, a draft bundle / card, or ngram+DRAFT (lookup where "
                          "the text repeats, DRAFT elsewhere) [model default]."),
        click.option("--draft-min", type=int, default=1, show_default=True, help="Fewest tokens drafted per round."),
        click.option("--draft-max", type=int, default=4, show_default=True, help="Most tokens drafted per round."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def ep_options(fn):
    """--ep and the repeatable --ep-option KEY=VALUE (QNN provider options: htp_performance_mode=burst, ...)."""
    fn = click.option("--ep-option", "ep_option", multiple=True, metavar="KEY=VALUE",
                      help="Execution provider option, repeatable (e.g. htp_performance_mode=burst).")(fn)
    return click.option("--ep", type=click.Choice(["cpu", "qnn"]), default=None,
                        help="Where the model runs: cpu, or qnn (the NPU; static bundles) [the bundle's own].")(fn)


def draft_ep_option(fn):
    """--draft-ep: where a model draft runs; a QNN target with a CPU draft is a heterogeneous pair."""
    return click.option("--draft-ep", type=click.Choice(["cpu", "qnn"]), default=None,
                        help="Where a model draft runs: cpu, or qnn (a static draft bundle) [the draft graph's own; "
                             "the target's for --draft target]. The none and ngram drafts run no model and "
                             "ignore it.")(fn)


def _ep_kwargs(ep, ep_option, draft_ep=None) -> dict:
    from .providers import parse_ep_options
    return {"ep": ep, "ep_options": parse_ep_options(ep_option), "draft_ep": draft_ep}


def memory_option(fn):
    """--memory-budget, for every command that loads a model."""
    return click.option("--memory-budget", default=None, metavar="SIZE",
                        help="Most memory the model may take, e.g. 1.5GB (powers of 1024) [available memory].")(fn)


def _budget(text: str | None) -> int | None:
    from .memory import parse_size
    return None if text is None else parse_size(text)


def _resolve_sampling(engine, max_tokens, temperature, top_k, top_p, seed):
    d = engine.manifest.defaults
    params = _sampling(d.temperature if temperature is None else temperature, d.top_k if top_k is None else top_k,
                       d.top_p if top_p is None else top_p, seed)
    max_tokens = d.max_tokens if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise click.ClickException(f"--max-tokens must be at least 1, got {max_tokens}")
    return params, max_tokens


@click.group()
@click.version_option(__version__, prog_name="edge-rt")
def cli():
    """On-device LLM runtime on ONNX Runtime."""


@cli.command()
def info():
    """Versions, execution providers and devices, cache folder, model cards."""
    import numpy
    import onnxruntime as ort
    click.echo(f"edge-runtime {__version__}, onnxruntime {ort.__version__}, numpy {numpy.__version__}, "
               f"python {sys.version.split()[0]}")
    from .providers import qnn_status
    qnn = qnn_status()  # registers the QNN plugin library when it is installed, so the lists below show it
    click.echo(f"execution providers: {', '.join(ort.get_available_providers())}")
    try:
        devices = [f"{d.ep_name}:{d.device.type}" for d in ort.get_ep_devices()]
    except AttributeError:
        devices = []
    click.echo(f"devices: {', '.join(devices) or 'n/a'}")
    if qnn.available:
        click.echo(f"QNN: available (onnxruntime-qnn {qnn.version}, QNN SDK {qnn.qnn_sdk}), HTP backend "
                   f"{qnn.htp_backend}; devices: {'; '.join(qnn.devices)}")
    else:
        click.echo(f"QNN: not available ({qnn.reason})")
    click.echo(f"cache folder: {paths.home()} (set EDGE_RT_HOME to move it)")
    click.echo(f"model cards: {', '.join(card_names())} (default: {DEFAULT_MODEL})")


@cli.command()
@click.argument("card", default=DEFAULT_MODEL)
@_fail_cleanly
def fetch(card):
    """Download a model card's source weights into the cache."""
    from export.fetch import fetch as fetch_source
    path = fetch_source(get_card(card))
    click.echo(str(path))


@cli.command()
@click.argument("source")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Bundle folder to write [the cache, for a card name].")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--kv-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="KV cache element type; float16 halves the cache (attention then runs in float16).")
@click.option("--target-ep", type=click.Choice(["cpu", "qnn"]), default="cpu", show_default=True,
              help="cpu: one dynamic graph; qnn: static-shape graphs (AR-1, AR-k, AR-N) for the NPU.")
@click.option("--context", type=int, default=None,
              help="With --target-ep qnn: the static graphs' context length [model default].")
@click.option("--draft", default=None, metavar="self[:RECIPE][:LAYERS]",
              help="Add a self-draft graph: the target quantized harder (default cpu-int8), optionally cut to its "
                   "first LAYERS layers [the card's default draft].")
@_fail_cleanly
def export(source, output, force, kv_dtype, target_ep, context, draft):
    """Export SOURCE (a card name, a Hugging Face folder or a .gguf file) to an ONNX bundle."""
    if output is None:
        if looks_like_path(source):
            raise click.ClickException("-o/--output is needed when SOURCE is a path")
        output = get_card(source).bundle_dir
    if context is not None and target_ep == "cpu":
        raise click.ClickException("--context is for --target-ep qnn (a CPU bundle takes its context at load)")
    _build(source, output, force=force, kv_dtype=kv_dtype, target_ep=target_ep, context=context, draft=draft)
    click.echo(str(output))


@cli.command(name="compile")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--ep", type=click.Choice(["qnn"]), default="qnn", show_default=True,
              help="Execution provider to compile for.")
@click.option("--soc", default=None, help="QNN soc_model id of the target Snapdragon [the EP's default].")
@click.option("--ep-option", "ep_option", multiple=True, metavar="KEY=VALUE",
              help="Execution provider option, repeatable (e.g. htp_arch=73).")
@_fail_cleanly
def compile_bundle(bundle, ep, soc, ep_option):
    """Prepare QNN context binaries for BUNDLE's static graphs, so loading skips graph compilation."""
    from .compile import compile_bundle as compile_
    from .providers import parse_ep_options
    t0 = time.perf_counter()
    compiled = compile_(bundle, ep, soc, parse_ep_options(ep_option), progress=lambda msg: click.echo(msg, err=True))
    n = sum(1 for g in compiled.manifest.graphs if g.ep_context)
    click.echo(f"{n} graphs compiled for {ep} in {time.perf_counter() - t0:.1f} s", err=True)
    click.echo(str(bundle))


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("-p", "--prompt", required=True, help="The prompt.")
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@sampling_options
@memory_option
@ep_options
@draft_ep_option
@_fail_cleanly
def generate(model, prompt, raw, max_tokens, temperature, top_k, top_p, seed, context, threads, stats, draft,
             draft_min, draft_max, memory_budget, ep, ep_option, draft_ep):
    """Answer one prompt, streaming the text to stdout."""
    engine = _engine(model, context, threads, draft, draft_min, draft_max, memory_budget=_budget(memory_budget),
                     **_ep_kwargs(ep, ep_option, draft_ep))
    params, max_tokens = _resolve_sampling(engine, max_tokens, temperature, top_k, top_p, seed)
    ids = engine.encode(prompt) if raw else engine.chat_ids([{"role": "user", "content": prompt}])
    try:
        for piece in engine.stream_generate(ids, params, max_tokens):
            click.echo(piece, nl=False)
    except KeyboardInterrupt:
        pass
    click.echo()
    if stats:
        _print_stats(engine)


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--system", default=None, help="System prompt.")
@click.option("--train-draft", is_flag=True,
              help="Speculate with this model's trained draft, training it first if needed (once, ~30 minutes).")
@sampling_options
@memory_option
@ep_options
@draft_ep_option
@_fail_cleanly
def chat(model, system, train_draft, max_tokens, temperature, top_k, top_p, seed, context, threads, stats, draft,
         draft_min, draft_max, memory_budget, ep, ep_option, draft_ep):
    """Chat with MODEL. Reads one prompt per line when stdin is not a terminal."""
    from .chat import ChatSession
    if train_draft and draft not in (None, "trained"):
        raise click.ClickException(f"--train-draft speculates with the trained draft; it cannot go with --draft {draft}")
    engine = _engine(model, context, threads, draft, draft_min, draft_max, train_draft=train_draft,
                     memory_budget=_budget(memory_budget), **_ep_kwargs(ep, ep_option, draft_ep))
    params, max_tokens = _resolve_sampling(engine, max_tokens, temperature, top_k, top_p, seed)
    session = ChatSession(engine, system=system, trim=True, on_notice=lambda msg: click.echo(msg, err=True))
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
        click.echo(f"{engine.manifest.name} ready. /help for commands, Ctrl-C stops an answer, Ctrl-D quits.",
                   err=True)
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            click.echo("\n(use /exit or Ctrl-D to quit)", err=True)
            continue
        if not interactive and line == "":
            break  # end of input
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0]
            if command in ("/exit", "/bye", "/quit"):
                break
            if command == "/reset":
                session.reset()
                click.echo("(conversation cleared)", err=True)
            elif command == "/stats":
                _print_stats(engine)
            elif command == "/help":
                for name, what in HELP.items():
                    click.echo(f"{name:8} {what}", err=True)
            else:
                click.echo(f"unknown command {command}; /help lists them", err=True)
            continue
        try:
            for piece in session.send(text, params, max_tokens):
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            click.echo("\n(stopped)", err=True)
        click.echo()
        if stats:
            _print_stats(engine)


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--draft", "drafts", multiple=True,
              help="A draft to compare (repeatable): ngram, self, a draft bundle / card, or ngram+DRAFT [ngram, "
                   "and self and ngram+self if the bundle has a self-draft].")
@click.option("--runs", type=int, default=3, show_default=True, help="Measured runs per draft and prompt (median).")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--draft-min", type=int, default=1, show_default=True)
@click.option("--draft-max", type=int, default=4, show_default=True)
@click.option("--context", type=int, default=None, help="KV cache length in tokens [model default].")
@click.option("--threads", type=int, default=None, help="CPU threads [all cores].")
@click.option("--prompt", "prompts", multiple=True, metavar="NAME=TEXT",
              help="Replace the prompt set with these (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@memory_option
@ep_options
@draft_ep_option
@_fail_cleanly
def bench(model, drafts, runs, max_tokens, draft_min, draft_max, context, threads, prompts, as_json, memory_budget,
          ep, ep_option, draft_ep):
    """Target-only vs each draft kind, side by side, greedy, on a fixed prompt set (chat, summarize, copy, code)."""
    import json

    from . import bench as bench_mod
    if runs < 1 or max_tokens < 1:
        raise click.ClickException("--runs and --max-tokens must be at least 1")
    engine = _engine(model, context, threads, "none", draft_min, draft_max, memory_budget=_budget(memory_budget),
                     **_ep_kwargs(ep, ep_option, draft_ep))
    if not drafts:
        drafts = ("ngram", "self", "ngram+self") if engine.manifest.graph("draft") else ("ngram",)
    prompt_set = bench_mod.PROMPTS
    if prompts:
        if not all("=" in p for p in prompts):
            raise click.ClickException("--prompt takes NAME=TEXT")
        prompt_set = dict(p.split("=", 1) for p in prompts)
    rows = bench_mod.run_bench(engine, list(drafts), prompt_set, runs=runs, max_tokens=max_tokens,
                               draft_min=draft_min, draft_max=draft_max)
    if as_json:
        click.echo(json.dumps(bench_mod.as_json(rows), indent=1))
    else:
        from .session import default_threads
        click.echo(f"{engine.manifest.name}: greedy, {max_tokens} new tokens, median of {runs} runs, "
                   f"{threads or default_threads()} threads, target on {engine.ep}")
        click.echo(bench_mod.format_table(rows))


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--draft", default=None, help="Draft to plan for: none, ngram, self, or a draft bundle / card "
                                            "[model default].")
@click.option("--context", type=int, default=None, help="KV cache length in tokens [model default].")
@click.option("--draft-max", type=int, default=4, show_default=True, help="Most tokens drafted per round.")
@memory_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_fail_cleanly
def plan(model, draft, context, draft_max, memory_budget, as_json):
    """What MODEL will take in memory, before loading it: weights, KV cache, workspace, largest context that fits."""
    import json

    from .bundle import Bundle
    from .memory import check_plan, default_budget, plan_memory, plan_table
    bundle = Bundle.load(_bundle_path(model), verify=False)  # sizes come from the manifest and the file system
    draft = bundle.manifest.defaults.draft if draft is None else draft
    budget = _budget(memory_budget)
    note = "" if budget is not None else " (available memory)"
    budget = default_budget() if budget is None else budget
    result = plan_memory(bundle, context, draft, draft_max=draft_max, budget=budget)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1))
    else:
        click.echo(plan_table(result, note))
    if result.shortfall:
        try:
            check_plan(result)
        except EdgeRuntimeError as e:
            click.echo(f"does not fit: {e}", err=True)


@cli.command("train-draft")
@click.argument("model", default=DEFAULT_MODEL)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Draft bundle folder to write [the cache, for a card name; what --draft trained loads].")
@click.option("--minutes", type=float, default=30.0, show_default=True,
              help="Wall-clock budget for answering prompts, training and export.")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text file, one prompt per line [a shipped list of ~200 chat prompts].")
@click.option("--resume", is_flag=True, help="Continue the run whose checkpoints are in OUTPUT.train/.")
@click.option("-s", "--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Rare settings (repeatable): layers, vocab, temperature, max_tokens, steps, batch, lr, threads, ...")
@_fail_cleanly
def train_draft_command(model, output, minutes, prompts, resume, settings):
    """Train a small draft for speculative decoding on MODEL's own answers and export it as a bundle."""
    if output is None:
        if looks_like_path(model):
            raise click.ClickException("-o/--output is needed when MODEL is a path")
        output = _trained_draft_dir(get_card(model).name)
    _train_draft(_bundle_path(model), output, minutes, prompts, resume, settings)
    click.echo(str(output))


def _quant_api():
    try:
        import quant.bundle  # noqa: F401  (onnx and onnxruntime.quantization: build-time only)
        import quant.eval  # noqa: F401
    except ImportError as e:
        raise ExportError(f"quantizing needs the export extra ({e.name} is missing): "
                          "pip install 'edge-runtime[export]'") from None
    import quant
    return quant


@cli.command()
@click.argument("bundle")
@click.option("--recipe", required=True, help="cpu-int4, cpu-int4-fast, cpu-int4-all, cpu-int8, auto (with "
                                              "--max-size), qnn-w8a16, qnn-w4a16.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Bundle folder to write.")
@click.option("--draft-recipe", default=None, help="Recipe for the bundle's float draft graph [the same; "
                                                   "cpu-int4 with auto].")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text to calibrate and evaluate on [a shipped corpus].")
@click.option("--block-size", type=int, default=None, help="Weights per quantization block, a power of 2 [32].")
@click.option("--accuracy-level", type=int, default=None,
              help="MatMulNBits accuracy level: 4 computes with int8 activations (fastest), 0 in float [4].")
@click.option("--max-size", default=None, metavar="SIZE",
              help="auto: the largest the bundle may be, e.g. 100MB (powers of 1024).")
@_fail_cleanly
def quantize(bundle, recipe, output, draft_recipe, calibration, block_size, accuracy_level, max_size):
    """Quantize BUNDLE (a float bundle folder or card name) with RECIPE into -o; print its quality and speed
    against BUNDLE."""
    from tqdm import tqdm
    quant = _quant_api()
    from quant.calibration import load_text
    src = _bundle_path(bundle)
    t0 = time.perf_counter()
    with tqdm(desc=f"quantize {recipe}", bar_format="{desc}: {postfix} [{elapsed}]", file=sys.stderr,
              disable=None) as bar:
        try:
            from quant.qnn import RECIPES as QNN_RECIPES
            qnn = recipe in QNN_RECIPES
            if qnn:
                if any(v is not None for v in (draft_recipe, block_size, accuracy_level, max_size)):
                    raise click.ClickException(f"{recipe} takes only --calibration")
                from quant.qnn import quantize_static_bundle
                quantize_static_bundle(src, output, recipe, calibration=calibration, progress=bar.set_postfix_str)
            else:
                quant.bundle.quantize_bundle(src, output, recipe, draft_recipe=draft_recipe, calibration=calibration,
                                             progress=bar.set_postfix_str, block_size=block_size,
                                             accuracy_level=accuracy_level, max_size=max_size)
        except BaseException:
            bar.leave = False  # a failure ends with its one `Error:` line, not a stale status above it
            raise
    # QNN bundles are scored on the CPU: their QDQ graphs as written (the NPU's logits match within ~3%,
    # tests/test_qnn.py), since the HTP simulator is far too slow for a text
    where = " on the CPU (the QDQ graphs as written)" if qnn else ""
    click.echo(f"bundle {output}: {recipe}, built in {time.perf_counter() - t0:.0f} s; "
               f"measuring it against the input{where}", err=True)
    report = quant.eval.evaluate(output, load_text(calibration), reference=src, ep="cpu" if qnn else None)
    click.echo(report.table())


@cli.command("eval")
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text to score [the shipped calibration corpus].")
@click.option("--reference", default=None, help="Bundle to compare with (the float original): top-1 agreement, KL.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_fail_cleanly
def eval_command(model, text, reference, as_json):
    """Perplexity of MODEL on a text, size on disk, decode tokens/s; agreement and KL against --reference."""
    import json
    quant = _quant_api()
    from quant.calibration import load_text
    report = quant.eval.evaluate(_bundle_path(model), load_text(text, "text"),
                                 reference=None if reference is None else _bundle_path(reference))
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else report.table())


# True when edge-rt is the program (not a CliRunner or an application calling cli()): only then may the engine
# take ONNX Runtime's process-wide thread pool, which makes ORT refuse sessions that want a pool of their own.
_OWN_PROCESS = False


def main():
    global _OWN_PROCESS
    _OWN_PROCESS = True
    cli()


if __name__ == "__main__":
    main()
