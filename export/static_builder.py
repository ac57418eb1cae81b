"""Builds the static-shape decoder graphs an NPU (QNN HTP) runs: standard ONNX operators only, every shape fixed.

One graph per variant, all reading the same weights (one external data file):
  AR-1 (a decode or draft step), AR-k (k = gamma + 1: verifying drafts), AR-N (a prefill chunk).

Inputs (n tokens of the variant, C the context, kv = kv heads, d = head_dim):
  input_ids      [1, n]        int32   a short chunk is left-padded; its pad positions are masked out
  position_ids   [1, n]        int32   rotary positions (pad rows: 0)
  attention_mask [1, C + n]    float   1 = attend: the valid cache slots, then the n new positions
  past_key.i     [1, kv, d, C] float   keys stored transposed, so scores are one MatMul with no per-step Transpose
  past_value.i   [1, kv, C, d] float
Outputs (only what is new; the runtime writes it at its write pointer):
  logits         [1, L, V]             the last L = min(n, logits) positions
  new_key.i      [1, kv, d, n]
  new_value.i    [1, kv, n, d]

Per layer (3-D tensors throughout; grouped-query attention without repeating K/V: the g = heads / kv query heads
that share a kv head become g * n rows of one MatMul):
  RMSNorm -> q/k/v MatMul -> rotary (x * cos + swap_halves(x) * sin_signed) -> Concat(past, new)
  -> MatMul(q, K) + mask bias -> Softmax -> MatMul(p, V) -> o MatMul -> Add -> RMSNorm
  -> gate/up MatMul -> x * Sigmoid(x) * up -> down MatMul -> Add
The 1/sqrt(d) attention scale is folded into the q projection weights. RMSNorm is spelled out in elementary
operators, scaled to be safe in float16 (see rms_norm): HTP's fused RmsNorm took no float input on the simulator,
and its 16-bit form drifted from an exact QDQ run by ~1% per layer on SmolLM2's outlier-heavy residual stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_runtime.manifest import Architecture

from .builder import ModelWeights, _Graph

OPSET = 23
NORM_FLOOR = 1e-4     # RMSNorm divides by max(max|x|, this): an all-zero row stays zero
IR_VERSION = 11
MASK_VALUE = 100.0  # added (negated) to masked scores: exp(-100) is 0 in float, and a 16-bit quantized Add
                    # over [-100 - s, s] keeps ~0.003 resolution for the real scores


@dataclass(frozen=True)
class StaticShapes:
    context: int  # C: cache slots the graph reads
    tokens: int   # n: positions per call
    logits: int   # L: last positions that reach the LM head

    @property
    def name(self) -> str:
        return f"ar{self.tokens}"

    def as_dict(self) -> dict[str, int]:
        return {"context": self.context, "tokens": self.tokens, "logits": self.logits}


def variants(context: int, tokens: tuple[int, ...], max_logits: int) -> list[StaticShapes]:
    """AR-1, AR-k, AR-N...: each variant gives the logits of its last min(n, max_logits) positions."""
    return [StaticShapes(context, n, min(n, max_logits)) for n in sorted(set(tokens))]


def _causal(n: int, context: int) -> np.ndarray:
    """[n, C + n]: 1 where new position i may look: every cache slot (the mask input narrows them), new j <= i."""
    allowed = np.ones((n, context + n), np.float32)
    allowed[:, context:] = np.tril(np.ones((n, n), np.float32))
    return allowed


def _rotary_tables(weights: ModelWeights, context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos [C, d] and sign-folded sin [C, d] so rotary is x * cos + swap_halves(x) * sin."""
    if weights.cos.shape[0] < context:
        raise ValueError(f"the rotary cache holds {weights.cos.shape[0]} positions, fewer than context {context}")
    cos, sin = weights.cos[:context].astype(np.float32), weights.sin[:context].astype(np.float32)
    return np.concatenate([cos, cos], axis=1), np.concatenate([-sin, sin], axis=1)


def build_static_decoder(arch: Architecture, weights: ModelWeights, shapes: StaticShapes) -> onnx.ModelProto:
    g = _Graph()
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    nh, kvh, hd, eps = arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.rms_norm_eps
    C, n, L = shapes.context, shapes.tokens, shapes.logits
    groups, half, H = nh // kvh, hd // 2, arch.hidden_size
    if weights.sliding_window and weights.sliding_window < C:
        raise ValueError(f"sliding window {weights.sliding_window} < context {C}: static graphs attend to the whole "
                         "context; export with --context at most the window")

    inputs = [
        helper.make_tensor_value_info("input_ids", i32, [1, n]),
        helper.make_tensor_value_info("position_ids", i32, [1, n]),
        helper.make_tensor_value_info("attention_mask", f32, [1, C + n]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, [1, L, arch.vocab_size])]
    for i in range(len(weights.layers)):
        inputs += [helper.make_tensor_value_info(f"past_key.{i}", f32, [1, kvh, hd, C]),
                   helper.make_tensor_value_info(f"past_value.{i}", f32, [1, kvh, C, hd])]
        outputs += [helper.make_tensor_value_info(f"new_key.{i}", f32, [1, kvh, hd, n]),
                    helper.make_tensor_value_info(f"new_value.{i}", f32, [1, kvh, n, hd])]

    def const(name: str, values, dtype=np.int64) -> str:
        return g.init(name, np.asarray(values, dtype))

    norm_floor = g.init("norm_floor", np.array(NORM_FLOOR, np.float32))
    norm_eps = g.init("norm_eps", np.array(eps, np.float32))

    def rms_norm(x: str, weight: np.ndarray, name: str, init_name: str) -> str:
        """x / sqrt(mean(x^2) + eps) * w, computed on x / max|x| so that float16 (HTP's float) neither overflows
        nor underflows: SmolLM2's residual stream reaches |x| ~ 22500, whose square is 8000x float16's largest.
        (x/m) / sqrt(mean((x/m)^2) + eps/m^2) is the same value, and mean((x/m)^2) >= 1/hidden."""
        (a,) = g.node("Abs", [x], f"{name}/Abs")
        (m,) = g.node("ReduceMax", [a, axis_last], f"{name}/ReduceMax", keepdims=1)
        (m,) = g.node("Max", [m, norm_floor], f"{name}/Floor")
        # divide by sqrt(m) twice: HTP divides by multiplying with the reciprocal, and 1/m for m > 16384 is a
        # float16 subnormal that the NPU flushes to zero (measured: the norm of SmolLM2's sink token became 0/0)
        (r,) = g.node("Sqrt", [m], f"{name}/SqrtMax")
        (xs,) = g.node("Div", [x, r], f"{name}/Scale1")
        (xs,) = g.node("Div", [xs, r], f"{name}/Scale2")
        (sq,) = g.node("Mul", [xs, xs], f"{name}/Square")
        (ms,) = g.node("ReduceMean", [sq, axis_last], f"{name}/ReduceMean", keepdims=1)
        (e,) = g.node("Div", [norm_eps, m], f"{name}/ScaledEps1")
        (e,) = g.node("Div", [e, m], f"{name}/ScaledEps2")                  # eps / m^2 (0 once m is large)
        (ms,) = g.node("Add", [ms, e], f"{name}/AddEps")
        (rms,) = g.node("Sqrt", [ms], f"{name}/Sqrt")
        (y,) = g.node("Div", [xs, rms], f"{name}/Div")
        (y,) = g.node("Mul", [y, g.init(init_name, weight)], f"{name}/Mul")
        return y

    def reshape(x: str, shape_name: str, name: str) -> str:
        (y,) = g.node("Reshape", [x, shape_name], name)
        return y

    # shapes and constants shared by every layer
    s_q3 = const("shape_q_tokens", [n, nh, hd])         # [n, heads, d]
    s_kv3 = const("shape_kv_tokens", [n, kvh, hd])      # [n, kv, d]
    s_qgrp = const("shape_q_grouped", [kvh, groups * n, hd])
    s_heads = const("shape_heads", [nh, n, hd])
    s_attn = const("shape_attn_out", [1, n, nh * hd])
    s_past_k = const("shape_past_key", [kvh, hd, C])
    s_past_v = const("shape_past_value", [kvh, C, hd])
    s_new_k = const("shape_new_key", [1, kvh, hd, n])
    s_new_v = const("shape_new_value", [1, kvh, n, hd])
    lo, hi, last = const("rot_lo", [0]), const("rot_mid", [half]), const("rot_hi", [hd])
    axis_last = const("axis_last", [-1])

    embed = g.init("model.embed_tokens.weight", weights.embed)
    (x,) = g.node("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather")

    cos_table, sin_table = _rotary_tables(weights, C)
    (cos,) = g.node("Gather", [g.init("rotary_cos", cos_table), "position_ids"], "/model/rotary/cos/Gather")
    (sin,) = g.node("Gather", [g.init("rotary_sin", sin_table), "position_ids"], "/model/rotary/sin/Gather")

    # mask -> additive bias [groups * n, C + n]: 0 where attended, -MASK_VALUE elsewhere
    (allowed,) = g.node("Mul", ["attention_mask", g.init("causal_allowed", _causal(n, C))], "/model/mask/Mul")
    (shifted,) = g.node("Sub", [allowed, g.init("one", np.array(1.0, np.float32))], "/model/mask/Sub")
    (bias,) = g.node("Mul", [shifted, g.init("mask_value", np.array(MASK_VALUE, np.float32))], "/model/mask/Scale")
    if groups > 1:
        (bias,) = g.node("Concat", [bias] * groups, "/model/mask/Concat", axis=0)

    def rotary(t: str, name: str) -> str:
        """t [heads, n, d] -> t * cos + swap_halves(t) * sin_signed (non-interleaved rotary)."""
        (t1,) = g.node("Slice", [t, lo, hi, axis_last], f"{name}/Slice_lo")
        (t2,) = g.node("Slice", [t, hi, last, axis_last], f"{name}/Slice_hi")
        (swapped,) = g.node("Concat", [t2, t1], f"{name}/Concat", axis=-1)
        (a,) = g.node("Mul", [t, cos], f"{name}/Mul_cos")
        (b,) = g.node("Mul", [swapped, sin], f"{name}/Mul_sin")
        (y,) = g.node("Add", [a, b], f"{name}/Add")
        return y

    scale = hd ** -0.5
    for i, lw in enumerate(weights.layers):
        p, w = f"/model/layers.{i}", f"model.layers.{i}"
        h = rms_norm(x, lw.input_norm, f"{p}/input_layernorm/RMSNorm", f"{w}.input_layernorm.weight")
        qd, kd = nh * hd, kvh * hd
        qb = kb = vb = None
        if lw.qkv_bias is not None:
            qb, kb, vb = lw.qkv_bias[:qd] * scale, lw.qkv_bias[qd:qd + kd], lw.qkv_bias[qd + kd:]
        q = g.matmul(h, lw.qkv[:, :qd] * scale, f"{w}.attn.q_proj", qb)
        k = g.matmul(h, lw.qkv[:, qd:qd + kd], f"{w}.attn.k_proj", kb)
        v = g.matmul(h, lw.qkv[:, qd + kd:], f"{w}.attn.v_proj", vb)

        (q,) = g.node("Transpose", [reshape(q, s_q3, f"{p}/attn/q/Reshape")], f"{p}/attn/q/Transpose", perm=[1, 0, 2])
        (k,) = g.node("Transpose", [reshape(k, s_kv3, f"{p}/attn/k/Reshape")], f"{p}/attn/k/Transpose", perm=[1, 0, 2])
        (v,) = g.node("Transpose", [reshape(v, s_kv3, f"{p}/attn/v/Reshape")], f"{p}/attn/v/Transpose", perm=[1, 0, 2])
        q = rotary(q, f"{p}/attn/q_rotary")                                   # [heads, n, d]
        k = rotary(k, f"{p}/attn/k_rotary")                                   # [kv, n, d]
        (k,) = g.node("Transpose", [k], f"{p}/attn/k/Transpose_dn", perm=[0, 2, 1])  # [kv, d, n]
        g.nodes.append(helper.make_node("Reshape", [k, s_new_k], [f"new_key.{i}"], name=f"{p}/attn/new_key/Reshape"))
        g.nodes.append(helper.make_node("Reshape", [v, s_new_v], [f"new_value.{i}"],
                                        name=f"{p}/attn/new_value/Reshape"))

        past_k = reshape(f"past_key.{i}", s_past_k, f"{p}/attn/past_key/Reshape")
        past_v = reshape(f"past_value.{i}", s_past_v, f"{p}/attn/past_value/Reshape")
        (keys,) = g.node("Concat", [past_k, k], f"{p}/attn/keys/Concat", axis=2)      # [kv, d, C + n]
        (values,) = g.node("Concat", [past_v, v], f"{p}/attn/values/Concat", axis=1)  # [kv, C + n, d]
        qg = reshape(q, s_qgrp, f"{p}/attn/q_grouped/Reshape")                        # [kv, g * n, d]
        (scores,) = g.node("MatMul", [qg, keys], f"{p}/attn/scores/MatMul")          # [kv, g * n, C + n]
        (scores,) = g.node("Add", [scores, bias], f"{p}/attn/scores/Add")
        (probs,) = g.node("Softmax", [scores], f"{p}/attn/Softmax", axis=-1)
        (ctx,) = g.node("MatMul", [probs, values], f"{p}/attn/context/MatMul")       # [kv, g * n, d]
        ctx = reshape(ctx, s_heads, f"{p}/attn/context/Reshape")                      # [heads, n, d]
        (ctx,) = g.node("Transpose", [ctx], f"{p}/attn/context/Transpose", perm=[1, 0, 2])
        ctx = reshape(ctx, s_attn, f"{p}/attn/context/Reshape_out")                   # [1, n, heads * d]
        o = g.matmul(ctx, lw.o, f"{w}.attn.o_proj", lw.o_bias)
        (x,) = g.node("Add", [x, o], f"{p}/attn/residual/Add")

        h = rms_norm(x, lw.post_norm, f"{p}/post_attention_layernorm/RMSNorm", f"{w}.post_attention_layernorm.weight")
        # gate and up stay two MatMuls here: the fusion saves a CPU thread-pool section, and the QNN recipes pick
        # bits per linear by these names
        (x,) = g.node("Add", [x, g.mlp(h, lw, i, fuse_gate_up=False)], f"{p}/mlp/residual/Add")

    if L < n:  # only the last L positions reach the norm and the LM head
        (x,) = g.node("Slice", [x, const("logits_start", [n - L]), const("logits_end", [n]), const("axis_1", [1])],
                      "/model/last_positions/Slice")
    h = rms_norm(x, weights.final_norm, "/model/norm/RMSNorm", "model.norm.weight")
    h2d = reshape(h, const("shape_hidden_2d", [L, H]), "/lm_head/Reshape")
    # Gemm with transB reads the [V, H] matrix as stored, so a tied head shares the embedding's bytes.
    head = embed if weights.lm_head is None else g.init("lm_head.weight", weights.lm_head)
    (logits2d,) = g.node("Gemm", [h2d, head], "/lm_head/Gemm", transB=1)
    g.nodes.append(helper.make_node("Reshape", [logits2d, const("shape_logits", [1, L, arch.vocab_size])], ["logits"],
                                    name="/lm_head/Reshape_out"))

    graph = helper.make_graph(g.nodes, f"edge_runtime_static_{shapes.name}", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-runtime")
    model.ir_version = IR_VERSION
    return model


def save_variants(models: dict[str, onnx.ModelProto], folder, data_name: str, threshold: int = 1024,
                  align: int = 4096) -> list[str]:
    """Write each model as `folder/<key>.onnx`, all reading their weights from one external data file.

    Tensors of at least `threshold` bytes go to `data_name`, each distinct content once (the variants share every
    weight; what differs, such as the causal mask constant, gets its own bytes). Offsets are page-aligned so ONNX
    Runtime can map them. Returns the written file names (graphs, then the data file).
    """
    import hashlib
    from pathlib import Path

    from onnx.external_data_helper import set_external_data

    folder = Path(folder)
    offsets: dict[bytes, tuple[int, int]] = {}
    written = []
    with open(folder / data_name, "wb") as data:
        for key, model in models.items():
            for tensor in model.graph.initializer:
                if tensor.data_location == TensorProto.EXTERNAL:
                    raise ValueError(f"{key}: initializer {tensor.name} still lives in external data; load it first")
                raw = tensor.raw_data
                if len(raw) < threshold:
                    continue
                digest = hashlib.sha256(raw).digest() + bytes(str((tensor.data_type, tuple(tensor.dims))), "utf8")
                if digest not in offsets:
                    offset = -data.tell() % align + data.tell()
                    data.seek(offset)
                    data.write(raw)
                    offsets[digest] = (offset, len(raw))
                offset, length = offsets[digest]
                set_external_data(tensor, data_name, offset, length)
                tensor.ClearField("raw_data")
            onnx.save_model(model, str(folder / f"{key}.onnx"))
            written.append(f"{key}.onnx")
    return [*written, data_name]
