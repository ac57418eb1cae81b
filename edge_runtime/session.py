"""Creating ONNX Runtime sessions: options, providers, and load errors turned into BundleError."""
from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from .errors import BundleError


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


# Workers of the process-wide pool, once share_thread_pool() made it (or found one made); None: each session its own.
_shared_threads: int | None = None


def share_thread_pool(threads: int | None = None) -> int:
    """Run every session this module creates on one process-wide pool of `threads` workers; returns its size.

    A target and its draft run in turn, so one pool serves both and its workers can keep spinning between runs
    (as onnxruntime-genai's do) instead of stopping at the end of each. ONNX Runtime then refuses any session of
    the process that asks for a pool of its own, so only a process that runs nothing but edge-runtime calls this
    (the CLI does); the first call sizes the pool, later ones get that size."""
    global _shared_threads
    if _shared_threads is None:
        threads = threads or default_threads()
        try:
            ort.set_global_thread_pool_sizes(threads, 1)
        except Exception:  # Fail: "Global thread pools have already been created" (by the embedding application)
            threads = 0  # of a size we cannot read
        _shared_threads = threads
    return _shared_threads


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    if _shared_threads is not None:
        so.use_per_session_threads = False  # and no thread counts: ORT warns that a session's own are ignored
    else:
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        # A pool of its own: its workers spin inside a run (fast hand-offs between a step's ~100 parallel sections)
        # but stop at its end, or they would take the cores from the other session of a target + draft pair.
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def create_session(path: Path, threads: int | None = None, providers: list | None = None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads),
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types for broken graphs
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"ONNX Runtime cannot load {path}: {first_line}; re-export the bundle") from None
