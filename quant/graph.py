"""The float decoder graph as quantization sees it: its linear layers, and rewriting them to MatMulNBits.

A *linear* is a MatMul whose weight is an initializer ([K, N]) or the LM head, which export writes as
`Gemm(h, W[V, H], transB=1)`. Each linear has a short name taken from its node (`layers.3.mlp.down_proj`,
`lm_head`) and is quantized block-wise along K to 4 or 8 bits. Embedding tables are quantized too:

    MatMul(x, W[K, N])            -> MatMulNBits(x, B[N, K/bs, bs*bits/8], scales[N, K/bs], zero_points)
    Gemm(h, W[V, H], transB=1)    -> MatMulNBits over W^T, the same layout
    Gather(W[V, H], ids), tied    -> GatherBlockQuantized(Reshape(B, [V, -1]), ids, scales, zero_points): the
                                     LM head's bytes at the LM head's bits
    Gather(E[V, H], ids), untied  -> GatherBlockQuantized over E at 8 bits, its own bytes (a lookup costs no
                                     compute, so 4 bits would only save disk)

MatMulNBits stores B as [N, K/bs, blob] and GatherBlockQuantized wants [V, H*bits/8]: the same bytes, so a tied
embedding reads the LM head's quantized weights through a Reshape that ONNX Runtime folds at load. On disk the
bytes are stored once, as the float graph stored the tied matrix once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

from edge_runtime.errors import QuantizationError

QUANTIZED_OPS = frozenset({"MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul", "MatMulInteger",
                           "QuantizeLinear", "DequantizeLinear", "QGemm", "QLinearMatMul"})
MS = "com.microsoft"
HEAD = "lm_head"


@dataclass(frozen=True)
class Linear:
    name: str            # layers.3.mlp.down_proj, lm_head
    node: str            # the node's name in the graph
    weight: str          # the weight initializer
    k: int               # input features
    n: int               # output features
    transposed: bool     # the initializer is stored [N, K] (the Gemm LM head) rather than [K, N]

    @property
    def params(self) -> int:
        return self.k * self.n


def linear_name(node_name: str) -> str:
    """`model.layers.3.mlp.down_proj/MatMul` -> `layers.3.mlp.down_proj`; `/lm_head/Gemm` -> `lm_head`."""
    base = node_name.strip("/")
    if "/" in base:
        base = base.rsplit("/", 1)[0]
    return base.removeprefix("model.").removeprefix("model/")


def load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))  # external data is read from the graph's folder
    except Exception as e:  # protobuf and file errors come in many types
        raise QuantizationError(f"cannot read the ONNX graph {path}: {e}; re-export the bundle") from None


def save(model: onnx.ModelProto, path: Path) -> tuple[str, ...]:
    """Write the graph and one external data file next to it (`<name>.data`); returns the data file names."""
    path = Path(path)
    data = path.name + ".data"
    if (path.parent / data).exists():
        os.remove(path.parent / data)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    return (data,) if (path.parent / data).exists() else ()


def quantized_ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS}


def find_linears(model: onnx.ModelProto) -> list[Linear]:
    """Every MatMul with an initializer weight, and the Gemm(transB=1) LM head, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            k, n = inits[node.input[1]].dims
            out.append(Linear(linear_name(node.name), node.name, node.input[1], k, n, transposed=False))
        elif node.op_type == "Gemm" and node.input[1] in inits and len(node.input) == 2:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB") != 1 or attrs.get("transA", 0) != 0 or attrs.get("alpha", 1.0) != 1.0:
                continue
            n, k = inits[node.input[1]].dims
            out.append(Linear(linear_name(node.name), node.name, node.input[1], k, n, transposed=True))
    names = [lin.name for lin in out]
    if len(set(names)) != len(names):
        raise QuantizationError("the graph has two linear layers with the same name; re-export the bundle")
    return out


@dataclass(frozen=True)
class Embedding:
    node: str              # the Gather
    table: str             # its float initializer [V, H]
    v: int
    h: int
    tied: str | None       # the name of the linear that reads the same initializer (the LM head), if any


def find_embeddings(model: onnx.ModelProto, linears: list[Linear]) -> list[Embedding]:
    """The embedding tables: Gathers (on axis 0) over a 2-D float32 initializer [V, H]."""
    inits = {t.name: t for t in model.graph.initializer}
    by_weight = {lin.weight: lin.name for lin in linears if lin.transposed}
    out = []
    for node in model.graph.node:
        t = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if t is None or len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT:
            continue
        if any(a.name == "axis" and a.i != 0 for a in node.attribute):
            continue
        v, h = t.dims
        out.append(Embedding(node.name, t.name, v, h, by_weight.get(t.name)))
    return out


def as_kn(weight: np.ndarray, lin: Linear) -> np.ndarray:
    """The linear's initializer as [K, N] (the LM head is stored [N, K]); also the inverse."""
    return weight.T if lin.transposed else weight


# ---- block quantization ------------------------------------------------------------------------------------

@dataclass
class Blocks:
    """One weight quantized block-wise along K: the MatMulNBits inputs."""
    packed: np.ndarray       # uint8 [N, K/bs, bs*bits/8]
    scales: np.ndarray       # float32 [N, K/bs]
    zero_points: np.ndarray | None  # uint8 [N, ceil(K/bs * bits/8)] (4 bits: two per byte, low nibble first);
    bits: int                       # None: symmetric, the kernels' default zero point 2^(bits-1)
    block_size: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)

    def dequantize(self) -> np.ndarray:
        """The float weight [K, N] that MatMulNBits computes with (before any activation quantization)."""
        n, kb, _ = self.packed.shape
        if self.bits == 4:
            q = np.stack([self.packed & 0x0F, self.packed >> 4], axis=-1).reshape(n, kb, self.block_size)
        else:
            q = self.packed
        if self.zero_points is None:
            zp = np.full((n, kb), 1 << (self.bits - 1), np.uint8)
        elif self.bits == 4:
            zp = np.stack([self.zero_points & 0x0F, self.zero_points >> 4], axis=-1).reshape(n, -1)[:, :kb]
        else:
            zp = self.zero_points
        w = (q.astype(np.float32) - zp[:, :, None].astype(np.float32)) * self.scales[:, :, None]
        return np.ascontiguousarray(w.reshape(n, kb * self.block_size)[:, :self.k].T)


SCALE_SEARCH = np.linspace(0.85, 1.15, 16, dtype=np.float32)  # block scale = (max - min) / 15 * f, for each f
ROWS_PER_SLICE = 2048
EMBEDDING_BITS = 8  # an untied embedding table (a lookup: its bits cost disk, not compute)


def quantize_blocks(weight_kn: np.ndarray, bits: int, block_size: int, importance: np.ndarray | None = None,
                    search: bool = True, symmetric: bool = True) -> Blocks:
    """Block quantization of W [K, N] along K, in MatMulNBits' layout.

    symmetric (the default): no zero points; a block's scale maps its largest-magnitude weight to -2^(bits-1)
    (the scale takes that weight's sign, so the extreme side gets the extra level). MatMulNBits' int8-activation
    kernel is faster without zero points: SmolLM2 cpu-int4 13.55 vs 15.16 ms per step (1 thread), as
    onnxruntime-genai's builder does. Asymmetric: each block's [min, max] (holding 0) over 2^bits - 1 steps.
    4 bits with search: per block, the scale among the plain one * SCALE_SEARCH with the least squared error,
    each input feature k weighted by `importance[k]` (mean squared activation on calibration text, when given),
    so the error lands where inputs are small. On SmolLM2 (all linears 4-bit, asymmetric) this cut the KL of
    plain round-to-nearest by 37% (0.385 -> 0.244 on the calibration windows).
    """
    validate_block_size(block_size)
    w = np.ascontiguousarray(weight_kn, dtype=np.float32)
    if not symmetric and (not search or bits != 4):
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, bits=bits, is_symmetric=False)
        packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(w)
        return Blocks(packed, scales, zero_points, bits, block_size, w.shape[0])
    factors = SCALE_SEARCH if search and bits == 4 else np.ones(1, np.float32)
    k, n = w.shape
    kb = -(-k // block_size)
    wb = np.zeros((n, kb * block_size), np.float32)
    wb[:, :k] = w.T  # padded with zeros, as ONNX Runtime pads
    wb = wb.reshape(n, kb, block_size)
    imp = np.ones(kb * block_size, np.float32)
    if importance is not None:
        imp[:k] = np.asarray(importance, np.float32) / max(float(np.mean(importance)), 1e-30) + 1e-6
    imp = imp.reshape(kb, block_size)
    levels, half = (1 << bits) - 1, 1 << (bits - 1)
    q = np.empty(wb.shape, np.uint8)
    scales = np.empty((n, kb), np.float32)
    zps = np.empty((n, kb), np.uint8)
    for r in range(0, n, ROWS_PER_SLICE):  # temporaries stay a few times the slice, not the matrix
        x = wb[r:r + ROWS_PER_SLICE]
        if symmetric:
            extreme = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)  # signed, [rows, kb, 1]
            base, z = extreme / -half, np.full(extreme.shape, half, np.float32)
        else:
            lo = np.minimum(x.min(-1, keepdims=True), 0)  # the range holds 0, as in ONNX Runtime's kernel
            hi = np.maximum(x.max(-1, keepdims=True), 0)
            base = (hi - lo) / levels
        best_err = np.full(base.shape, np.inf, np.float32)
        best_s, best_z = np.ones_like(base), np.zeros_like(base)
        for f in factors:
            s = base * f
            s[s == 0] = 1
            if not symmetric:
                z = np.clip(np.round(-lo / s), 0, levels)
            err = (imp * np.square((np.clip(np.round(x / s + z), 0, levels) - z) * s - x)).sum(-1, keepdims=True)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s, best_s)
            best_z = np.where(better, z, best_z)
        q[r:r + ROWS_PER_SLICE] = np.clip(np.round(x / best_s + best_z), 0, levels)
        scales[r:r + ROWS_PER_SLICE] = best_s[..., 0]
        zps[r:r + ROWS_PER_SLICE] = best_z[..., 0]
    if bits == 8:
        return Blocks(q, scales, None if symmetric else zps, bits, block_size, k)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)  # two per byte, low nibble first
    if symmetric:
        return Blocks(packed, scales, None, bits, block_size, k)
    if kb % 2:
        zps = np.concatenate([zps, np.zeros((n, 1), np.uint8)], axis=1)
    return Blocks(packed, scales, zps[:, 0::2] | (zps[:, 1::2] << 4), bits, block_size, k)


def blocks_nbytes(k: int, n: int, bits: int, block_size: int, symmetric: bool = True) -> int:
    """Bytes of B + scales (+ zero points) for a [K, N] weight, without quantizing it."""
    kb = -(-k // block_size)
    return n * kb * block_size * bits // 8 + n * kb * 4 + (0 if symmetric else n * -(-kb * bits // 8))


def embedding_nbytes(e: Embedding, block_size: int) -> int:
    """Bytes an embedding table adds once its linears are quantized: none when tied (it reads the LM head's),
    EMBEDDING_BITS otherwise, and its float bytes when its rows do not split into blocks (it stays float)."""
    if e.h % block_size:
        return e.v * e.h * 4
    return 0 if e.tied else blocks_nbytes(e.h, e.v, EMBEDDING_BITS, block_size)


def is_head(lin: Linear) -> bool:
    return lin.name == HEAD or lin.transposed


def validate_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizationError(f"block size {block_size} is not a power of two >= 16 (MatMulNBits needs one); "
                                "use 32, 64 or 128")


# ---- rewriting -----------------------------------------------------------------------------------------------

def rewrite(model: onnx.ModelProto, quantized: dict[str, Blocks], accuracy_level: int) -> dict[str, str]:
    """Replace each linear named in `quantized` by MatMulNBits over its blocks, and each embedding Gather by
    GatherBlockQuantized (a tied one over its LM head's bytes). Changes the model in place, drops the float weights
    nothing reads any more, and returns how each embedding table was stored ({table: "int8" | "float" | ...})."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    linears = find_linears(model)
    embeddings = {e.node: e for e in find_embeddings(model, linears)}
    by_node = {lin.node: lin for lin in linears if lin.name in quantized}
    block_size = next(iter(quantized.values())).block_size if quantized else 32
    new_inits: list[onnx.TensorProto] = []
    stored: dict[str, tuple[str, str, str, int]] = {}  # linear name -> (B, scales, zero points, bits)
    tables: dict[str, str] = {}

    def add_blocks(q: Blocks, prefix: str) -> tuple[str, str, str, int]:
        """The initializers' names: B, scales, zero points ("" when symmetric: the kernels' default)."""
        arrays = {f"{prefix}.B": q.packed, f"{prefix}.scales": q.scales, f"{prefix}.zero_points": q.zero_points}
        new_inits.extend(numpy_helper.from_array(a, n) for n, a in arrays.items() if a is not None)
        b, scales, zps = (n if a is not None else "" for n, a in arrays.items())
        return b, scales, zps, q.bits

    nodes = []
    for node in graph.node:
        lin = by_node.get(node.name)
        if lin is not None:
            q = quantized[lin.name]
            b, scales, zps, bits = stored[lin.name] = add_blocks(q, f"{lin.name}.weight_q{q.bits}")
            attrs = dict(K=lin.k, N=lin.n, bits=bits, block_size=q.block_size)
            if accuracy_level:
                attrs["accuracy_level"] = accuracy_level
            nodes.append(helper.make_node("MatMulNBits", [node.input[0], b, scales, zps][:4 if zps else 3],
                                          list(node.output),
                                          name=f"{_base(node.name)}/MatMulNBits", domain=MS, **attrs))
        else:
            nodes.append(node)
    out = []
    for node in nodes:
        e = embeddings.get(node.name)
        if e is None:
            out.append(node)
            continue
        if e.tied and e.tied in stored and e.h % block_size == 0:
            b, scales, zps, bits = stored[e.tied]
        elif not e.tied and e.h % block_size == 0:
            q = quantize_blocks(numpy_helper.to_array(inits[e.table]).T, EMBEDDING_BITS, block_size)
            b, scales, zps, bits = add_blocks(q, f"{e.table}_q{EMBEDDING_BITS}")
        else:  # its rows do not split into blocks, or its tied head stays float
            tables[e.table] = "float"
            out.append(node)
            continue
        tables[e.table] = f"int{bits}" + (f" (shares {e.tied})" if e.tied else "")
        shape = f"{b}.gather_shape"
        new_inits.append(numpy_helper.from_array(np.array([e.v, -1], np.int64), shape))
        base = _base(node.name)
        # MatMulNBits keeps B as [N, K/bs, blob], GatherBlockQuantized reads [V, H*bits/8]: the same bytes. The
        # Reshape reads only initializers (folded at load), so right before the lookup is a valid place for it.
        out += [helper.make_node("Reshape", [b, shape], [f"{b}_2d"], name=f"{base}/Reshape"),
                helper.make_node("GatherBlockQuantized", [f"{b}_2d", node.input[1], scales, zps][:4 if zps else 3],
                                 list(node.output),
                                 name=f"{base}/GatherBlockQuantized", domain=MS, bits=bits, block_size=block_size,
                                 gather_axis=0, quantize_axis=1)]
    graph.ClearField("node")
    graph.node.extend(out)
    graph.initializer.extend(new_inits)
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)
    if not any(op.domain == MS for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    return tables


def _base(node_name: str) -> str:
    """`model.layers.0.attn.qkv_proj/MatMul` -> `model.layers.0.attn.qkv_proj`: the new node's name prefix."""
    return node_name.rsplit("/", 1)[0] if "/" in node_name.strip("/") else node_name
