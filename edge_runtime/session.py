"""Creating ONNX Runtime sessions: options, providers, and load errors turned into BundleError."""
from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from .errors import BundleError


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    # Workers spin inside a run (fast hand-offs between a step's ~100 parallel sections) but stop at its end: a
    # target and its draft run in turn, each with its own pool, and workers spinning on after a run take the
    # cores from the other session (benchmarks/README.md, "threads").
    so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def create_session(path: Path, threads: int | None = None, providers: list | None = None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads),
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types for broken graphs
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"ONNX Runtime cannot load {path}: {first_line}; re-export the bundle") from None
