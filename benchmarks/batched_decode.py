"""How many target tokens per second this machine can make for a distillation set: batch-1 decode vs B sequences
decoded together through the same graph (train-draft's data budget, issue 7).

    python benchmarks/batched_decode.py [BUNDLE] [--batch 1 16 32 64] [--steps 32] [--threads 2] [--check]

The bundle's target graph is loaded with its batch dimension made symbolic (input_ids, seqlens_k, the KV buffers,
hidden_states); GroupQueryAttention takes one sequence length per row, so each row keeps its own cache row and
position. Each row is prefilled alone (a batch-1 binding of its cache row), then all rows decode greedily together,
one token each per call. --check compares row 0 with the runtime's batch-1 Decoder token for token.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_vs_optimum import bundle_dir  # noqa: E402

from edge_runtime.bundle import Bundle  # noqa: E402
from edge_runtime.decoder import Decoder  # noqa: E402
from edge_runtime.session import create_session, session_options  # noqa: E402

CAPACITY = 512


def batched_session(bundle: Bundle, threads: int) -> ort.InferenceSession:
    spec = bundle.manifest.graph("target")
    model = onnx.load(str(bundle.file(spec.file)), load_external_data=False)
    batched = {"input_ids", "seqlens_k", "hidden_states"}
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name in batched or vi.name.startswith(("past_", "present_")):
            vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    so = session_options(threads)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(bundle.path))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class BatchedDecoder:
    """B rows, one KV allocation [2, layers, B, kv_heads, CAPACITY, head_dim]; row r's cache is kv[:, :, r]."""

    def __init__(self, session: ort.InferenceSession, bundle: Bundle, batch: int):
        a = bundle.manifest.architecture
        self.session, self.layers, self.batch = session, a.num_layers, batch
        self.kv = np.zeros((2, a.num_layers, batch, a.num_kv_heads, CAPACITY, a.head_dim), np.float32)
        self.pos = np.zeros(batch, np.int32)

    def run(self, ids: np.ndarray, rows: slice) -> np.ndarray:
        """ids [rows, n] at each row's position; logits [rows * 1, vocab] of each row's last position."""
        b = self.session.io_binding()
        b.bind_output("logits")
        for i in range(self.layers):
            for k, kind in enumerate(("key", "value")):
                buf = self.kv[k, i, rows]
                b.bind_input(f"past_{kind}.{i}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
                b.bind_output(f"present_{kind}.{i}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        n = ids.shape[1]
        seqlens = self.pos[rows] + n - 1
        b.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        b.bind_cpu_input("seqlens_k", seqlens.astype(np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(int(seqlens.max()) + 1, np.int32))
        b.bind_cpu_input("logits_to_keep", np.array([1], np.int64))
        b.bind_output("hidden_states")
        self.session.run_with_iobinding(b)
        self.pos[rows] += n
        return b.copy_outputs_to_cpu()[0].reshape(ids.shape[0], -1)


def prompts(batch: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 2000, size=int(rng.integers(20, 60))).tolist() for _ in range(batch)]


def measure(bundle: Bundle, session, batch: int, steps: int) -> tuple[float, list[int]]:
    """(tokens per second of the batched decode, row 0's greedy tokens)."""
    dec = BatchedDecoder(session, bundle, batch)
    last = np.zeros(batch, np.int64)
    for r, p in enumerate(prompts(batch)):
        last[r] = int(np.argmax(dec.run(np.array([p]), slice(r, r + 1))[-1]))
    row0 = [int(last[0])]
    t0 = time.perf_counter()
    for _ in range(steps):
        last = np.argmax(dec.run(last.reshape(batch, 1), slice(0, batch)), axis=-1)
        row0.append(int(last[0]))
    return batch * steps / (time.perf_counter() - t0), row0


def batch1_tokens(bundle: Bundle, steps: int, threads: int) -> list[int]:
    a = bundle.manifest.architecture
    dec = Decoder(create_session(bundle.file(bundle.manifest.graph("target").file), threads), a, a.num_layers,
                  CAPACITY)
    token = int(np.argmax(dec.prefill(prompts(1)[0])[-1]))
    tokens = [token]
    for _ in range(steps):
        token = int(np.argmax(dec.forward((token,))[-1]))
        tokens.append(token)
    return tokens


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle", nargs="?", default=None, help="a bundle folder [the SmolLM2 card's bundle]")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 32, 64])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--check", action="store_true", help="row 0 must equal the batch-1 Decoder's greedy tokens")
    args = p.parse_args(argv)
    bundle = Bundle.load(args.bundle or bundle_dir())
    session = batched_session(bundle, args.threads)
    print(f"{bundle.path}: greedy decode, {args.steps} steps after the prefill, {args.threads} threads")
    for batch in args.batch:
        tps, row0 = measure(bundle, session, batch, args.steps)
        same = "" if not args.check else f"  row 0 == batch-1 decode: {row0 == batch1_tokens(bundle, args.steps, args.threads)}"
        print(f"batch {batch:3d}: {tps:7.1f} tok/s{same}")


if __name__ == "__main__":
    main()
