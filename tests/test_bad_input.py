"""Bad input to the CLI: a non-zero exit, one `Error: ...` line on stderr naming the problem, no traceback,
nothing half-written."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime.bundle import sha256_file
from edge_runtime.cli import cli

UNKNOWN_CARD = "no-such-model"


def invoke(*args, input: str | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def assert_one_line_error(result, word: str) -> str:
    """The failure a person should see: exit != 0, stderr is `Error: <...word...>` on one line, stdout empty."""
    assert result.exit_code != 0, f"expected a failure, got exit 0 with stdout {result.stdout!r}"
    # CliRunner swallows uncaught exceptions (their traceback would go nowhere): a clean exit is a SystemExit
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    out = result.stdout + result.stderr
    assert "Traceback" not in out
    lines = result.stderr.splitlines()  # also splits at "\r": a progress bar left behind counts as a line
    assert len(lines) == 1, f"stderr is not one line: {result.stderr!r}"
    line = lines[0]
    assert line.startswith("Error: "), line
    assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    assert result.stdout == "", f"half-written output: {result.stdout!r}"
    return line


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_no_leftovers(parent: Path, out: Path, expected: set[str]) -> None:
    """The export's output folder was not created and no temp folder (`.name.tmp-pid`) was left beside it."""
    assert not out.exists()
    names = {p.name for p in parent.iterdir()}
    assert not [n for n in names if n.startswith(".")], names
    assert names == expected


# ---- broken bundles -----------------------------------------------------------------------------------------

@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle, free to corrupt."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 3])


def _truncated_graph(bundle: Path) -> None:
    truncate(bundle / "model.onnx")


def _truncated_graph_with_matching_sha(bundle: Path) -> None:
    # the manifest agrees with the broken file, so the sha256 check passes and ONNX Runtime itself must fail
    truncate(bundle / "model.onnx")
    digest = sha256_file(bundle / "model.onnx")
    edit_manifest(bundle, lambda m: m["files"].__setitem__("model.onnx", digest))


def _future_format_version(bundle: Path) -> None:
    edit_manifest(bundle, lambda m: m.__setitem__("format_version", 99))


def _wrong_tokenizer_sha(bundle: Path) -> None:
    edit_manifest(bundle, lambda m: m["files"].__setitem__("tokenizer.json", "0" * 64))


def _manifest_not_json(bundle: Path) -> None:
    (bundle / "manifest.json").write_text('{"format_version": 1, "name": "tiny-llama",')  # cut off mid-write


BROKEN_BUNDLES = {
    "truncated-graph": (_truncated_graph, "corrupt"),
    "truncated-graph-sha-updated": (_truncated_graph_with_matching_sha, "cannot load"),
    "format-version-99": (_future_format_version, "format version"),
    "wrong-tokenizer-sha": (_wrong_tokenizer_sha, "tokenizer.json is corrupt"),
    "manifest-not-json": (_manifest_not_json, "not valid JSON"),
}
COMMANDS = {"generate": ["-p", "hello", "--max-tokens", "4"], "chat": ["--max-tokens", "4"]}


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_bundle_folder(tmp_path, command):
    line = assert_one_line_error(invoke(command, tmp_path / "nope", *COMMANDS[command], input="hello\n"),
                                 "does not exist")
    assert str(tmp_path / "nope") in line
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", BROKEN_BUNDLES)
def test_broken_bundle(bundle_copy, case, command):
    breaks, word = BROKEN_BUNDLES[case]
    breaks(bundle_copy)
    before = snapshot(bundle_copy)
    assert_one_line_error(invoke(command, bundle_copy, *COMMANDS[command], input="hello\n"), word)
    assert snapshot(bundle_copy) == before  # loading never writes to a bundle


# ---- export -------------------------------------------------------------------------------------------------

def test_export_of_an_unsupported_architecture(tiny_hf, tmp_path):
    src = Path(shutil.copytree(tiny_hf, tmp_path / "gpt2-src"))
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    line = assert_one_line_error(invoke("export", src, "-o", out), "unsupported architecture")
    assert "gpt2" in line
    assert_no_leftovers(tmp_path, out, {"gpt2-src"})


def test_export_of_a_missing_path(tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(invoke("export", tmp_path / "nope", "-o", out), "does not exist")
    assert_no_leftovers(tmp_path, out, set())


def test_export_of_a_garbage_gguf(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(os.urandom(4096))
    out = tmp_path / "out"
    assert_one_line_error(invoke("export", gguf, "-o", out), "not a readable GGUF")
    assert_no_leftovers(tmp_path, out, {"model.gguf"})


def test_export_to_an_existing_folder_without_force(tiny_hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(out)
    assert_one_line_error(invoke("export", tiny_hf, "-o", out), "already exists")
    assert snapshot(out) == before
    assert {p.name for p in tmp_path.iterdir()} == {"out"}


# ---- unknown model cards ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["generate", UNKNOWN_CARD, "-p", "hello"],
    ["chat", UNKNOWN_CARD],
    ["export", UNKNOWN_CARD],
    ["export", UNKNOWN_CARD, "-o", "{tmp}/out"],
    ["fetch", UNKNOWN_CARD],
], ids=["generate", "chat", "export", "export-o", "fetch"])
def test_unknown_card(tmp_path, argv):
    argv = [a.format(tmp=tmp_path) for a in argv]
    line = assert_one_line_error(invoke(*argv, input="hello\n"), "no model card")
    assert UNKNOWN_CARD in line
    assert list(tmp_path.iterdir()) == []
    home = Path(os.environ["EDGE_RT_HOME"])
    assert not (home / "bundles" / UNKNOWN_CARD).exists() and not (home / "sources" / UNKNOWN_CARD).exists()


# ---- out-of-range options -----------------------------------------------------------------------------------

def _max_positions(bundle: Path) -> int:
    return json.loads((bundle / "manifest.json").read_text())["architecture"]["max_position_embeddings"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("option, value, word", [
    ("--temperature", "-1", "temperature"),
    ("--top-p", "0", "top_p"),
    ("--top-p", "1.5", "top_p"),
    ("--top-k", "-1", "top_k"),
    ("--max-tokens", "0", "max-tokens"),
    ("--context", "0", "context 0"),
    ("--context", "max+1", "context"),
])
def test_out_of_range_option(tiny_bundle, command, option, value, word):
    if value == "max+1":
        value = str(_max_positions(tiny_bundle) + 1)
        word = f"context {value}"
    extra = ["-p", "hello"] if command == "generate" else []
    line = assert_one_line_error(invoke(command, tiny_bundle, *extra, option, value, input="hello\n"), word)
    assert "out of range" in line or "must be" in line
