"""Thread pools: `edge-rt` runs a target and its draft on one process-wide ONNX Runtime pool (session.py)."""
from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from edge_runtime import cli as cli_module
from edge_runtime import session

# A child process: an engine with a model draft, greedy; prints its tokens and its thread count. argv: bundle,
# draft, "shared" or "own".
CHILD = """
import json, os, sys
from edge_runtime import Engine
from edge_runtime.bundle import Bundle
from edge_runtime.session import share_thread_pool
bundle, draft, mode = sys.argv[1:4]
if mode == "shared":
    assert share_thread_pool(2) == 2 and share_thread_pool(3) == 2  # the first call sizes the pool
engine = Engine(Bundle.load(bundle), context=64, threads=2, draft=draft)
engine.eos = frozenset()
tokens = list(engine.generate_step([5, 6, 7, 8, 9], max_tokens=12))
print(json.dumps({"tokens": tokens, "threads": len(os.listdir("/proc/self/task")),
                  "speculated": engine.last_stats.drafted_tokens}))
"""


def _child(bundle, draft, mode) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(draft), mode], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_target_and_draft_share_one_pool(tiny_bundle, tiny_draft_bundle):
    own, shared = _child(tiny_bundle, tiny_draft_bundle, "own"), _child(tiny_bundle, tiny_draft_bundle, "shared")
    assert own["speculated"] > 0 and shared["speculated"] > 0  # both sessions ran
    assert shared["tokens"] == own["tokens"]
    # 2 threads per pool = the calling thread + 1 worker: a pool per session has one worker more than one pool
    assert own["threads"] - shared["threads"] == 1, (own, shared)


def test_the_edge_rt_program_takes_the_shared_pool(tiny_bundle, monkeypatch):
    calls = []
    monkeypatch.setattr(session, "share_thread_pool", lambda threads=None: calls.append(threads) or 2)
    args = ["generate", str(tiny_bundle), "-p", "hi", "--max-tokens", "2", "--threads", "2", "--draft", "ngram"]
    assert CliRunner().invoke(cli_module.cli, args).exit_code == 0
    assert calls == []  # cli() called by an application (or CliRunner) leaves the application's pools alone
    monkeypatch.setattr(cli_module, "_OWN_PROCESS", True)  # what main() sets
    result = CliRunner().invoke(cli_module.cli, args)
    assert result.exit_code == 0, result.output
    assert calls == [2]
