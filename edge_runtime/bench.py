"""`edge-rt bench`: target-only and each draft kind, side by side in one process, on a fixed prompt set.

Runs are interleaved (run r measures every draft on every prompt before run r+1, the drafts in reverse order every
other run) so that machine noise spreads over all of them; figures are medians over runs.
"""
from __future__ import annotations

import resource
import statistics
from dataclasses import asdict, dataclass

from .engine import Engine
from .sampling import SamplingParams

PASSAGE = (
    "The lighthouse on Carrow Point was built in 1871 from granite quarried two miles inland. For ninety years a "
    "keeper climbed its hundred and twelve steps every evening to light the lamp, wind the clockwork that turned "
    "the lens, and write the weather in a leather logbook. In 1962 the lamp was electrified and the last keeper, "
    "Martha Ellis, moved to the village, where she taught the children to read the sea: which clouds brought rain, "
    "which tides uncovered the old wreck, and why the gulls flew inland before a storm. The logbooks are kept in "
    "the village library today, and visitors still read her final entry: calm sea, light wind from the west, "
    "lamp burning steady."
)

PROMPTS = {
    "chat": "What are three tips for staying productive when working from home?",
    "summarize": f"Summarize the following passage in two sentences.\n\n{PASSAGE}",
    "copy": f"Repeat the following passage word for word.\n\n{PASSAGE}",
    "code": "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
}


@dataclass
class BenchRow:
    draft: str
    prompt: str
    decode_tps: float          # median over runs
    speedup: float             # decode_tps / target-only decode_tps on the same prompt
    acceptance_rate: float
    mean_accepted: float       # accepted drafts per round that drafted
    calls_per_token: float     # target calls per generated token
    tokens: int
    identical: bool            # greedy tokens equal target-only's
    peak_rss_mb: float         # the process's peak RSS after this draft's runs (drafts load in order)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_bench(engine: Engine, drafts: list[str], prompts: dict[str, str] = PROMPTS, runs: int = 3,
              max_tokens: int = 128, draft_min: int = 1, draft_max: int = 4) -> list[BenchRow]:
    configs = ["none", *[d for d in drafts if d != "none"]]
    ids = {name: engine.chat_ids([{"role": "user", "content": text}]) for name, text in prompts.items()}
    tps: dict[tuple[str, str], list[float]] = {}
    last: dict[tuple[str, str], tuple] = {}
    rss: dict[str, float] = {}
    for run in range(runs + 1):  # run 0 warms up every session and is not counted
        # the order flips every run: whatever always ran first (or last) would carry any drift of the machine
        for draft in (configs if run % 2 == 0 else configs[::-1]):
            engine.set_draft(draft, draft_min, draft_max)
            for name, prompt_ids in ids.items():
                engine.reset()  # every run prefills the whole prompt
                tokens = list(engine.generate_step(prompt_ids, SamplingParams(), max_tokens))
                if run:
                    tps.setdefault((draft, name), []).append(engine.last_stats.decode_tps)
                last[draft, name] = (tokens, engine.last_stats)
            rss.setdefault(draft, _peak_rss_mb())  # after the warm-up run: this draft is loaded
    rows = []
    for draft in configs:
        for name in prompts:
            tokens, stats = last[draft, name]
            median = statistics.median(tps[draft, name])
            base = statistics.median(tps["none", name])
            rows.append(BenchRow(draft, name, median, median / base if base else 0.0, stats.acceptance_rate,
                                 stats.mean_accepted, stats.calls_per_token, len(tokens),
                                 tokens == last["none", name][0], rss[draft]))
    return rows


def format_table(rows: list[BenchRow]) -> str:
    head = (f"{'draft':<14} {'prompt':<10} {'tok/s':>7} {'speedup':>8} {'accept':>7} {'acc/rnd':>8} "
            f"{'calls/tok':>9} {'tokens':>6} {'same':>5} {'peak MB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.draft[-14:]:<14} {r.prompt:<10} {r.decode_tps:7.1f} {r.speedup:7.2f}x {r.acceptance_rate:7.2f} "
                     f"{r.mean_accepted:8.2f} {r.calls_per_token:9.2f} {r.tokens:6d} {'yes' if r.identical else 'NO':>5} "
                     f"{r.peak_rss_mb:8.0f}")
    return "\n".join(lines)


def as_json(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
