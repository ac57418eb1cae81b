"""Builds the CPU decoder graph of a Llama-family model from its weights.

The graph (opset 17 + com.microsoft contrib ops, what onnxruntime-genai's builder emits too):
  input_ids [1, S] -> Gather(embed) -> per layer:
      (Skip)SimplifiedLayerNorm -> MatMul(qkv fused) -> GroupQueryAttention(rotary inside, KV shared in place)
      -> MatMul(o) -> SkipSimplifiedLayerNorm -> MatMul(gate|up fused) -> Split -> SiLU(gate)*up -> MatMul(down)
  -> final norm -> hidden_states [1, S, H] (every position: the features an EAGLE draft reads)
  -> last `logits_to_keep` positions only -> Gemm(transB) with the (tied) LM head -> logits [1, k, V]

past_key.i / present_key.i are one buffer [1, kv_heads, capacity, head_dim] that the runtime binds to both, so a
step writes only its new K/V and never copies the cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.manifest import Architecture

OPSET = 17
INT64_MAX = np.iinfo(np.int64).max


@dataclass
class LayerWeights:
    """Weights of one decoder layer, already laid out for MatMul: [in, out]."""
    input_norm: np.ndarray            # [H]
    qkv: np.ndarray                   # [H, (heads + 2 kv_heads) * head_dim]
    o: np.ndarray                     # [heads * head_dim, H]
    post_norm: np.ndarray             # [H]
    gate: np.ndarray                  # [H, I]
    up: np.ndarray                    # [H, I]
    down: np.ndarray                  # [I, H]
    qkv_bias: np.ndarray | None = None
    o_bias: np.ndarray | None = None
    mlp_biases: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # gate, up, down


@dataclass
class ModelWeights:
    embed: np.ndarray                 # [V, H]
    layers: list[LayerWeights]
    final_norm: np.ndarray            # [H]
    lm_head: np.ndarray | None        # [V, H]; None when tied to embed
    cos: np.ndarray                   # [max_pos, head_dim / 2] rotary cache (any rope scaling already applied)
    sin: np.ndarray
    sliding_window: int | None = None


@dataclass
class _Graph:
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outputs = [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    def matmul(self, x: str, w: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        (y,) = self.node("MatMul", [x, self.init(f"{name}.weight", w)], f"{name}/MatMul")
        if bias is not None:
            (y,) = self.node("Add", [y, self.init(f"{name}.bias", bias)], f"{name}/Add")
        return y

    def mlp(self, h: str, lw: LayerWeights, i: int, fuse_gate_up: bool = True) -> str:
        """Layer i's SwiGLU MLP on h [.., H]: down(silu(gate(h)) * up(h)), silu as x * sigmoid(x). fuse_gate_up: gate
        and up as one MatMul over [H, 2I] (gate's columns first), then Split: one CPU parallel section less per
        layer, 3-4% of an INT4 decode step on SmolLM2, same tokens."""
        w, p = f"model.layers.{i}", f"/model/layers.{i}"
        gb, ub, db = lw.mlp_biases or (None, None, None)
        if fuse_gate_up:
            gate_up = self.matmul(h, np.concatenate([lw.gate, lw.up], axis=1), f"{w}.mlp.gate_up_proj",
                                  None if gb is None else np.concatenate([gb, ub]))
            gate, up = self.node("Split", [gate_up], f"{p}/mlp/Split", n_out=2, axis=-1)  # opset 17: equal halves
        else:
            gate = self.matmul(h, lw.gate, f"{w}.mlp.gate_proj", gb)
            up = self.matmul(h, lw.up, f"{w}.mlp.up_proj", ub)
        (sig,) = self.node("Sigmoid", [gate], f"{p}/mlp/act/Sigmoid")
        (silu,) = self.node("Mul", [gate, sig], f"{p}/mlp/act/Mul")
        (act,) = self.node("Mul", [silu, up], f"{p}/mlp/Mul")
        return self.matmul(act, lw.down, f"{w}.mlp.down_proj", db)


KV_DTYPES = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16)}


def build_decoder(arch: Architecture, weights: ModelWeights, kv_dtype: str = "float32") -> onnx.ModelProto:
    """kv_dtype float16: GroupQueryAttention runs in float16 (Cast of the fused QKV in, of its output back out),
    so the cache it writes in place is float16 and half the bytes; everything else stays float32."""
    g = _Graph()
    f32 = TensorProto.FLOAT
    kv_type, kv_np = KV_DTYPES[kv_dtype]
    nh, kvh, hd, eps = arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.rms_norm_eps
    n_layers = len(weights.layers)

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, [1, "keep", arch.vocab_size]),
               helper.make_tensor_value_info("hidden_states", f32, [1, "sequence", arch.hidden_size])]
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", kv_type, [1, kvh, "capacity", hd]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", kv_type, [1, kvh, "capacity", hd]))

    embed = g.init("model.embed_tokens.weight", weights.embed)
    (x,) = g.node("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather")
    cos = g.init("cos_cache", weights.cos.astype(kv_np))  # GroupQueryAttention takes them in its own type
    sin = g.init("sin_cache", weights.sin.astype(kv_np))

    residual = None  # residual stream; None before the first layer's norm
    for i, lw in enumerate(weights.layers):
        p = f"/model/layers.{i}"
        if residual is None:
            (h,) = g.node("SimplifiedLayerNormalization", [x, g.init(f"model.layers.{i}.input_layernorm.weight", lw.input_norm)],
                          f"{p}/input_layernorm/LayerNorm", axis=-1, epsilon=eps)
            residual = x
        else:
            h, _, _, residual = g.node("SkipSimplifiedLayerNormalization",
                                       [x, residual, g.init(f"model.layers.{i}.input_layernorm.weight", lw.input_norm)],
                                       f"{p}/input_layernorm/SkipLayerNorm", n_out=4, domain="com.microsoft", epsilon=eps)
        qkv = g.matmul(h, lw.qkv, f"model.layers.{i}.attn.qkv_proj", lw.qkv_bias)
        if kv_type != f32:
            (qkv,) = g.node("Cast", [qkv], f"{p}/attn/qkv/Cast", to=kv_type)
        attn, _, _ = g.node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_sequence_length", cos, sin],
            f"{p}/attn/GroupQueryAttention", n_out=3, domain="com.microsoft",
            num_heads=nh, kv_num_heads=kvh, do_rotary=1, rotary_interleaved=0, scale=float(hd ** -0.5),
            local_window_size=int(weights.sliding_window or -1),
        )
        g.nodes[-1].output[1:] = [f"present_key.{i}", f"present_value.{i}"]
        if kv_type != f32:
            (attn,) = g.node("Cast", [attn], f"{p}/attn/output/Cast", to=f32)
        o = g.matmul(attn, lw.o, f"model.layers.{i}.attn.o_proj", lw.o_bias)
        h, _, _, residual = g.node("SkipSimplifiedLayerNormalization",
                                   [o, residual, g.init(f"model.layers.{i}.post_attention_layernorm.weight", lw.post_norm)],
                                   f"{p}/post_attention_layernorm/SkipLayerNorm", n_out=4, domain="com.microsoft", epsilon=eps)
        x = g.mlp(h, lw, i)

    # The final norm runs on every position (n x H, cheap): its output is `hidden_states`, the features an EAGLE
    # draft reads. Only the last k positions reach the LM head: decode asks for 1, verification for gamma + 1.
    g.node("SkipSimplifiedLayerNormalization", [x, residual, g.init("model.norm.weight", weights.final_norm)],
           "/model/norm/SkipLayerNorm", n_out=4, domain="com.microsoft", epsilon=eps)
    g.nodes[-1].output[0] = "hidden_states"
    (neg_k,) = g.node("Neg", ["logits_to_keep"], "/model/logits_to_keep/Neg")
    ends = g.init("slice_ends", np.array([INT64_MAX], np.int64))
    axes = g.init("slice_axes", np.array([1], np.int64))
    (h,) = g.node("Slice", ["hidden_states", neg_k, ends, axes], "/model/last_hidden/Slice")
    (h2d,) = g.node("Reshape", [h, g.init("hidden_2d", np.array([-1, arch.hidden_size], np.int64))], "/lm_head/Reshape")
    # Gemm with transB reads the [V, H] matrix as stored, so a tied head shares the embedding's bytes.
    head = embed if weights.lm_head is None else g.init("lm_head.weight", weights.lm_head)
    (logits2d,) = g.node("Gemm", [h2d, head], "/lm_head/Gemm", transB=1)
    zero = g.init("axes_0", np.array([0], np.int64))
    g.nodes.append(helper.make_node("Unsqueeze", [logits2d, zero], ["logits"], name="/lm_head/Unsqueeze"))

    graph = helper.make_graph(g.nodes, "edge_runtime_decoder", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="edge-runtime")
    model.ir_version = 8
    return model


def save_model(model: onnx.ModelProto, path, data_name: str) -> None:
    """Write the graph with every weight in one external data file next to it (protobuf caps files at 2 GB)."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)


@dataclass
class EagleWeights:
    """An EAGLE draft (Li et al. 2024): input at position t = (embedding of token t+1, target feature f_t)."""
    embed: np.ndarray                 # [V, H] the target's (INT8 in the bundle: distill/model.py)
    fc: np.ndarray                    # [2H, H] (embedding, feature) -> H
    fc_bias: np.ndarray               # [H]
    layer: LayerWeights
    final_norm: np.ndarray            # [H]: the predicted feature is normed like the target's
    head: np.ndarray                  # [N, H] reduced-vocabulary LM head (row i: target id vocab_map[i])
    cos: np.ndarray                   # [max_pos, head_dim / 2]
    sin: np.ndarray


def build_eagle(arch: Architecture, w: EagleWeights) -> onnx.ModelProto:
    """The EAGLE draft graph: its own one-layer KV cache (past/present shared in place, as build_decoder).

    input_ids [1, S], features [1, S, H] -> Concat -> fc -> decoder layer -> final norm (last position only)
    -> hidden_states [1, 1, H] (the predicted next feature) -> Gemm(transB) head -> logits [1, 1, N]
    """
    g = _Graph()
    f32 = TensorProto.FLOAT
    nh, kvh, hd, eps, H = arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.rms_norm_eps, arch.hidden_size
    rows = w.head.shape[0]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"]),
              helper.make_tensor_value_info("features", f32, [1, "sequence", H]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("logits", f32, [1, 1, rows]),
               helper.make_tensor_value_info("hidden_states", f32, [1, 1, H])]
    for kind in ("key", "value"):
        inputs.append(helper.make_tensor_value_info(f"past_{kind}.0", f32, [1, kvh, "capacity", hd]))
        outputs.append(helper.make_tensor_value_info(f"present_{kind}.0", f32, [1, kvh, "capacity", hd]))
    embed = g.init("model.embed_tokens.weight", w.embed)
    (e,) = g.node("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather")
    (x,) = g.node("Concat", [e, "features"], "/model/fc/Concat", axis=-1)
    x = g.matmul(x, w.fc, "model.fc", w.fc_bias)
    lw, p = w.layer, "/model/layers.0"
    (h,) = g.node("SimplifiedLayerNormalization", [x, g.init("model.layers.0.input_layernorm.weight", lw.input_norm)],
                  f"{p}/input_layernorm/LayerNorm", axis=-1, epsilon=eps)
    qkv = g.matmul(h, lw.qkv, "model.layers.0.attn.qkv_proj")
    attn, _, _ = g.node(
        "GroupQueryAttention",
        [qkv, "", "", "past_key.0", "past_value.0", "seqlens_k", "total_sequence_length",
         g.init("cos_cache", w.cos.astype(np.float32)), g.init("sin_cache", w.sin.astype(np.float32))],
        f"{p}/attn/GroupQueryAttention", n_out=3, domain="com.microsoft",
        num_heads=nh, kv_num_heads=kvh, do_rotary=1, rotary_interleaved=0, scale=float(hd ** -0.5))
    g.nodes[-1].output[1:] = ["present_key.0", "present_value.0"]
    o = g.matmul(attn, lw.o, "model.layers.0.attn.o_proj")
    h, _, _, residual = g.node("SkipSimplifiedLayerNormalization",
                               [o, x, g.init("model.layers.0.post_attention_layernorm.weight", lw.post_norm)],
                               f"{p}/post_attention_layernorm/SkipLayerNorm", n_out=4, domain="com.microsoft", epsilon=eps)
    x = g.mlp(h, lw, 0)
    # the last position only: it carries the next feature (catch-up runs many positions, drafting one)
    last = [g.init("last_start", np.array([-1], np.int64)), g.init("slice_ends", np.array([INT64_MAX], np.int64)),
            g.init("slice_axes", np.array([1], np.int64))]
    (x,) = g.node("Slice", [x, *last], "/model/last_x/Slice")
    (residual,) = g.node("Slice", [residual, *last], "/model/last_residual/Slice")
    g.node("SkipSimplifiedLayerNormalization", [x, residual, g.init("model.norm.weight", w.final_norm)],
           "/model/norm/SkipLayerNorm", n_out=4, domain="com.microsoft", epsilon=eps)
    g.nodes[-1].output[0] = "hidden_states"
    (h2d,) = g.node("Reshape", ["hidden_states", g.init("hidden_2d", np.array([1, H], np.int64))], "/lm_head/Reshape")
    (logits2d,) = g.node("Gemm", [h2d, g.init("lm_head.weight", w.head)], "/lm_head/Gemm", transB=1)
    g.nodes.append(helper.make_node("Unsqueeze", [logits2d, g.init("axes_0", np.array([0], np.int64))], ["logits"],
                                    name="/lm_head/Unsqueeze"))
    graph = helper.make_graph(g.nodes, "edge_runtime_eagle", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="edge-runtime")
    model.ir_version = 8
    return model
