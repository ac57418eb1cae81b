"""The runtime a laptop app embeds must not pull in the build-time stack."""
from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "optimum", "onnx", "gguf", "accelerate")


def test_loading_and_generating_imports_no_build_time_library(tiny_bundle):
    code = f"""
import sys
import edge_runtime
from edge_runtime.cli import cli
engine = edge_runtime.Engine.load({str(tiny_bundle)!r})
text = engine.generate("hello", max_tokens=4)
assert engine.last_stats.generated_tokens >= 1 or engine.last_stats.finish_reason == "stop"
print(",".join(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported: {done.stdout.strip()}"
