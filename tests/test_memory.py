"""The memory plan: sizes, the numbers against what is allocated, budget enforcement before allocation, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edge_runtime import Engine, MemoryBudgetError
from edge_runtime.bundle import Bundle
from edge_runtime.cli import cli
from edge_runtime.errors import InvalidArgumentError
from edge_runtime.kvcache import KVCache
from edge_runtime.memory import (SESSION_FIXED, MiB, available_memory, format_size, parse_size, plan_memory,
                                  plan_table)

BIG = parse_size("64GB")  # a budget nothing here comes near


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ---- sizes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("1.5GB", 1536 * MiB), ("1.5gb", 1536 * MiB), ("800MB", 800 * MiB), ("800 MiB", 800 * MiB), ("2G", 2048 * MiB),
    ("512k", 512 * 1024), ("4096", 4096), (".5GB", 512 * MiB), (123, 123),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "1.5XB", "-1GB", "0", "1,5GB", "one GB"])
def test_parse_size_rejects_what_is_not_a_size(text):
    with pytest.raises(InvalidArgumentError, match="not a size|more than 0"):
        parse_size(text)


def test_format_size():
    assert [format_size(n) for n in (512, 36 * 1024, 622.8 * MiB, 1536 * MiB)] == \
        ["512 B", "36.0 KB", "622.8 MB", "1.50 GB"]


def test_available_memory_reads_the_machine():
    avail = available_memory()
    assert avail is not None and 0 < avail
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert avail <= total


# ---- the plan against what the engine allocates -----------------------------------------------------------------

@pytest.mark.parametrize("context", [1, 64, 300])
def test_plan_kv_bytes_are_exactly_what_the_engine_allocates(tiny_bundle, context):
    engine = Engine(Bundle.load(tiny_bundle), context=context, memory_budget=BIG)
    plan = engine.memory_plan
    a = engine.manifest.architecture
    assert plan.target.kv_bytes == engine.decoder.kv.nbytes == engine.decoder.kv.data.nbytes
    assert plan.target.kv_bytes_per_token == KVCache.bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim) \
        == 2 * a.num_layers * a.num_kv_heads * a.head_dim * 4
    assert plan.target.capacity == engine.context == context
    assert plan.draft is None
    assert plan.total == plan.overhead + plan.weights + plan.kv_bytes + plan.workspace


def test_plan_counts_a_model_draft_with_its_own_cache(tiny_bundle):
    engine = Engine(Bundle.load(tiny_bundle), context=100, draft="target", draft_max=3, memory_budget=BIG)
    plan = engine.memory_plan
    assert plan.draft is not None and plan.draft.role == "draft"
    assert plan.draft.kv_bytes == engine.drafter.model.decoder.kv.nbytes  # capacity 100 + 3 + 1
    assert plan.draft.capacity == 104
    assert plan.kv_bytes == engine.decoder.kv.nbytes + engine.drafter.model.decoder.kv.nbytes
    assert plan.weights == 2 * plan.target.weights  # a second session over the same graph


def test_plan_weights_are_the_files_plus_the_tied_head_copy(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    a, spec = bundle.manifest.architecture, bundle.manifest.graph("target")
    files = sum((tiny_bundle / f).stat().st_size for f in (spec.file, *spec.data_files))
    plan = plan_memory(bundle, 64)
    assert a.tie_word_embeddings
    assert plan.target.file_bytes == files
    assert plan.target.weights == files + a.vocab_size * a.hidden_size * 4 + SESSION_FIXED


def test_max_context_is_the_last_context_whose_total_fits(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    plan = plan_memory(bundle, 64)
    budget = plan.total_at(200)
    assert plan.max_context(budget) == 200
    assert plan_memory(bundle, 200, budget=budget).shortfall == 0
    assert plan_memory(bundle, 201, budget=budget).shortfall > 0
    assert plan.max_context(plan.total_at(1) - 1) == 0
    assert plan.max_context(BIG) == bundle.manifest.architecture.max_position_embeddings


# ---- enforcement: before anything large is allocated -------------------------------------------------------------

@pytest.fixture
def no_allocation(monkeypatch):
    """Fail the test if the engine gets as far as creating a session and its KV cache."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the decoder was allocated before the budget was checked")
    monkeypatch.setattr("edge_runtime.engine.make_decoder", refuse)


def test_a_budget_below_the_weights_fails_before_allocating(tiny_bundle, no_allocation):
    bundle = Bundle.load(tiny_bundle)
    plan = plan_memory(bundle, 64)
    budget = plan.total_at(1) - 1
    with pytest.raises(MemoryBudgetError, match=r"the weights do not fit in the memory budget of .*, 1 B over; "
                                                r"raise --memory-budget"):
        Engine(bundle, context=64, memory_budget=budget)


def test_a_context_that_does_not_fit_fails_and_names_the_largest_that_does(tiny_bundle, no_allocation):
    bundle = Bundle.load(tiny_bundle)
    budget = plan_memory(bundle, 64).total_at(300)
    with pytest.raises(MemoryBudgetError) as e:
        Engine(bundle, context=400, memory_budget=budget)
    per_token = plan_memory(bundle, 400).target
    over = 100 * (per_token.kv_bytes_per_token + per_token.workspace_per_position)
    assert str(e.value).startswith(f"context 400 does not fit in the memory budget of {format_size(budget)}: "
                                   f"the KV cache takes {format_size(per_token.kv_bytes)}")
    assert f"{format_size(over)} over; the largest context that fits is 300 (pass --context 300)" in str(e.value)


def test_the_default_budget_is_the_available_memory(tiny_bundle, monkeypatch):
    bundle = Bundle.load(tiny_bundle)
    monkeypatch.setattr("edge_runtime.memory.available_memory", lambda: parse_size("1MB"))
    with pytest.raises(MemoryBudgetError, match=r"memory budget of 1.0 MB"):
        Engine(bundle, context=64)
    monkeypatch.setattr("edge_runtime.memory.available_memory", lambda: None)  # unknown: no check
    assert Engine(bundle, context=64).memory_plan.budget is None


# ---- CLI --------------------------------------------------------------------------------------------------------

def test_cli_generate_with_a_budget_below_the_weights_is_one_error_line(tiny_bundle):
    result = invoke("generate", tiny_bundle, "-p", "hi", "--memory-budget", "1MB")
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the weights do not fit in the memory budget of 1.0 MB: ")


def test_cli_chat_with_a_context_that_does_not_fit_is_one_error_line(tiny_bundle):
    budget = plan_memory(Bundle.load(tiny_bundle), 64).total_at(256)
    result = CliRunner().invoke(cli, ["chat", str(tiny_bundle), "--context", "500", "--memory-budget", str(budget)],
                                input="hello\n")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: context 500 does not fit")
    assert "the largest context that fits is 256" in lines[0]


def test_cli_bad_budget_is_one_error_line(tiny_bundle):
    result = invoke("generate", tiny_bundle, "-p", "hi", "--memory-budget", "lots")
    assert result.exit_code == 1
    assert result.stderr == "Error: memory size 'lots' is not a size; write e.g. 1.5GB, 800MB or a number of bytes\n"


def test_cli_generate_within_the_budget_answers(tiny_bundle):
    result = invoke("generate", tiny_bundle, "-p", "hello", "--max-tokens", "4", "--memory-budget", "1GB")
    assert result.exit_code == 0, result.stderr


def test_cli_plan_prints_the_table(tiny_bundle):
    result = invoke("plan", tiny_bundle, "--context", 256, "--memory-budget", "1GB")
    assert result.exit_code == 0, result.stderr
    plan = plan_memory(Bundle.load(tiny_bundle), 256, budget=parse_size("1GB"))
    assert result.stdout == plan_table(plan) + "\n"
    for row in ("weights (as loaded)", "KV bytes/token", "KV cache at context 256", "workspace", "runtime overhead",
                "total", "budget", "fits", "largest context that fits"):
        assert row in result.stdout
    assert format_size(plan.target.kv_bytes) in result.stdout


def test_cli_plan_json_with_a_draft(tiny_bundle):
    result = invoke("plan", tiny_bundle, "--draft", tiny_bundle, "--context", 128, "--memory-budget", "200MB",
                    "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["context"] == 128 and data["budget"] == 200 * MiB
    assert data["target"]["kv_bytes"] == data["target"]["kv_bytes_per_token"] * 128
    assert data["draft"]["capacity"] == 128 + 4 + 1
    assert data["kv_bytes"] == data["target"]["kv_bytes"] + data["draft"]["kv_bytes"]
    assert data["total"] == data["overhead"] + data["weights"] + data["kv_bytes"] + data["workspace"]
    assert data["fits"] is True


def test_cli_plan_says_when_it_does_not_fit(tiny_bundle):
    result = invoke("plan", tiny_bundle, "--memory-budget", "1MB")
    assert result.exit_code == 0
    assert "no, " in result.stdout and result.stderr.startswith("does not fit: the weights do not fit")


def test_kv_cache_allocation_uses_the_plan_dtype(tiny_bundle):
    engine = Engine(Bundle.load(tiny_bundle), context=32, memory_budget=BIG)
    assert engine.decoder.kv.data.dtype == np.float32 and engine.memory_plan.target.kv_dtype == "float32"


def test_plan_counts_every_static_variant_session(static_bundle):
    """AR-1 / AR-5 / AR-64 are three sessions over one weights file, each holding it; on the CPU each folds the
    weights to float32 (the measured 2.1-2.3 GB of SmolLM2 w8a16 against 606 MB planned before this)."""
    from edge_runtime.memory import STATIC_QNN_FACTOR
    b = Bundle.load(static_bundle)
    spec = b.manifest.graph("target")
    variants = [g for g in b.manifest.graphs if g.role == "target"]
    assert len(variants) == 3
    data = sum(b.file(f).stat().st_size for f in (spec.file, *spec.data_files))
    qnn = plan_memory(b, 32, ep="qnn").target.weights
    cpu = plan_memory(b, 32, ep="cpu").target.weights
    assert qnn == int(3 * STATIC_QNN_FACTOR * data) + SESSION_FIXED
    assert cpu > 3 * data
