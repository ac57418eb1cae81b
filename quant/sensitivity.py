"""Calibration: what each linear's inputs look like, and how much each linear hurts when quantized alone.

The float graph becomes a *probe*: every linear's weight is turned into a graph input, so one ONNX Runtime
session runs the model with any mix of float and fake-quantized weights (quantized to the MatMulNBits grid, then
dequantized) without rebuilding the graph. On the float run it also returns each linear's input activations, whose
mean square per input feature is the `importance` the 4-bit scale search weights its error by.

A linear's sensitivity is the mean KL(float || probe) over the calibration positions when only that linear is
quantized. It is measured end to end because local error misleads: on SmolLM2 one MLP down projection (layer 11)
costs ten times the median and nothing local about it says so.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from edge_runtime.errors import QuantizationError
from edge_runtime.session import session_options

from .graph import Blocks, Linear, as_kn, find_linears

WINDOW = 128      # calibration tokens per forward pass
MAX_WINDOWS = 2   # windows spread evenly over the calibration text


@dataclass(frozen=True)
class Sensitivity:
    name: str
    kl: float      # mean KL(float || only this linear quantized), nats per position
    params: int


def calibration_windows(ids: list[int], window: int = WINDOW, max_windows: int = MAX_WINDOWS) -> list[list[int]]:
    """Up to max_windows non-overlapping windows spread evenly over the tokens (prose, dialogue, code, ...)."""
    if len(ids) < 2:
        raise QuantizationError("the calibration text is shorter than two tokens; give a longer text")
    n = max(1, len(ids) // window)
    picks = np.unique(np.linspace(0, n - 1, min(n, max_windows)).round().astype(int))
    return [ids[i * window:(i + 1) * window] for i in picks]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits - logits.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Probe:
    """The float graph with every linear's weight as an input, run on calibration windows."""

    def __init__(self, model: onnx.ModelProto, ids: list[int], threads: int | None = None):
        self.linears = find_linears(model)
        self.windows = calibration_windows(ids)
        inits = {t.name: t for t in model.graph.initializer}
        self.float_weights = {lin.weight: numpy_helper.to_array(inits[lin.weight]) for lin in self.linears}
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        kept = [t for t in probe.graph.initializer if t.name not in self.float_weights]
        probe.graph.ClearField("initializer")
        probe.graph.initializer.extend(kept)
        probe.graph.input.extend(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(w.dtype), w.shape)
                                 for name, w in self.float_weights.items())
        producers = {n.name: n for n in probe.graph.node}
        self._inputs = {lin.name: producers[lin.node].input[0] for lin in self.linears}  # activation feeding each
        probe.graph.output.extend(helper.make_empty_tensor_value_info(x) for x in sorted(set(self._inputs.values())))
        self.session = ort.InferenceSession(probe.SerializeToString(), sess_options=session_options(threads),
                                            providers=["CPUExecutionProvider"])
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self._kv = [(i.name, i.shape, dtypes.get(i.type, np.float32)) for i in self.session.get_inputs()
                    if i.name.startswith("past_")]
        self.reference, self.importance = self._float_run()

    def _feeds(self, ids: list[int], weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(ids)
        feeds = {"input_ids": np.asarray([ids], np.int64), "seqlens_k": np.array([n - 1], np.int32),
                 "total_sequence_length": np.array(n, np.int32), "logits_to_keep": np.array([n], np.int64)}
        for name, shape, dtype in self._kv:  # [1, kv_heads, capacity, head_dim]: an empty cache of n positions
            feeds[name] = np.zeros((1, shape[1], n, shape[3]), dtype)
        feeds.update(weights)
        return feeds

    def _float_run(self) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
        """The float model's (log-probs, probs) per window, and each linear's mean squared input per feature."""
        names = sorted(set(self._inputs.values()))
        sums = {x: 0.0 for x in names}
        count = {x: 0 for x in names}
        reference = []
        for ids in self.windows:
            logits, *acts = self.session.run(["logits", *names], self._feeds(ids, self.float_weights))
            logp = _log_softmax(logits[0])
            reference.append((logp, np.exp(logp)))
            for x, a in zip(names, acts):
                a = a.reshape(-1, a.shape[-1]).astype(np.float64)
                sums[x] = sums[x] + np.square(a).sum(0)
                count[x] += a.shape[0]
        return reference, {lin: (sums[x] / count[x]).astype(np.float32) for lin, x in self._inputs.items()}

    def kl(self, replaced: dict[str, np.ndarray]) -> float:
        """Mean KL(float || model with the `replaced` weights, by initializer name) over the calibration positions."""
        weights = {**self.float_weights, **replaced}
        total, count = 0.0, 0
        for ids, (ref, p) in zip(self.windows, self.reference):
            (logits,) = self.session.run(["logits"], self._feeds(ids, weights))
            total += float((p * (ref - _log_softmax(logits[0]))).sum())
            count += len(ids)
        return total / count

    def fake(self, lin: Linear, blocks: Blocks) -> dict[str, np.ndarray]:
        """The replacement that makes the probe compute `lin` with quantized weights."""
        return {lin.weight: np.ascontiguousarray(as_kn(blocks.dequantize(), lin))}

    def sensitivities(self, blocks: dict[str, Blocks],
                      progress: Callable[[int, int], None] | None = None) -> list[Sensitivity]:
        """Each linear in `blocks` quantized alone; most sensitive first."""
        out = []
        todo = [lin for lin in self.linears if lin.name in blocks]
        for i, lin in enumerate(todo):
            if progress:
                progress(i, len(todo))
            out.append(Sensitivity(lin.name, self.kl(self.fake(lin, blocks[lin.name])), lin.params))
        return sorted(out, key=lambda s: s.kl, reverse=True)
