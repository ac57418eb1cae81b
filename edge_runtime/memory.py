"""The memory plan: what a model will hold once loaded, computed from its bundle before anything loads.

    plan = plan_memory(bundle, context=2048, draft="path/to/draft-bundle", budget=parse_size("1.5GB"))
    plan.total, plan.max_context(), plan.to_dict(), plan_table(plan)
    check_plan(plan)       # MemoryBudgetError naming what does not fit and by how much

The budget bounds the peak resident set (RSS) of the process that runs the model, so every term is what ONNX
Runtime and numpy make resident. Measured with onnxruntime 1.32 on Linux x86-64 by reading /proc/self/status around
each load step (docs/memory.md has the numbers and the commands):

- weights, per graph session. ONNX Runtime memory-maps the external data; a MatMul/Gemm with a constant weight
  *prepacks* it into its own buffer (MLAS SGEMM packed B for float, the QNBitGemm layout for MatMulNBits) and unmaps
  the original, so a weight read by one node costs its bytes once. A weight read by two nodes stays mapped *and* is
  packed: the tied embedding, which the Gather reads as stored and the LM head packs. So
      float:      data + graph + tied_head_params x bytes/param + SESSION_FIXED
                  (SmolLM2 fp32: data 515.1 MiB, session +622.8 MiB = data + 108.0 MiB tied head - 0.3 MiB; the
                  peak while creating the session equals the steady state)
      quantized:  QUANT_PACK_FACTOR x (data + graph) + 1.5 x tied_head_params x bits / 8 + SESSION_FIXED
                  (SmolLM2 int4, MatMulNBits block 32, accuracy level 4, head shared with GatherBlockQuantized:
                  data 84.3 MiB, session +130 MiB steady, +143 MiB peak while packing)
- KV cache: 2 (K, V) x layers x kv_heads x head_dim x itemsize(kv_dtype) per position, times the capacity (a draft's
  cache holds draft_max + 1 more). All of it is resident after the first run: GroupQueryAttention touches it all.
- workspace, per model: the logits buffer [max_logits, vocab] fp32 + the sampler's float64 rows + ONNX Runtime's
  arena for a prefill chunk, ARENA_MARGIN x (4 hidden + qkv + 4 intermediate) floats per chunk token (SmolLM2,
  chunk 256: 9.2 MiB of tensors, +16 MiB measured) + one fp32 score row per chunk token and cached position
  (measured: +15.7 MiB at context 1024, +17.8 MiB at 8192).
- overhead: RUNTIME_BASELINE (Python + onnxruntime + numpy + tokenizers + jinja2 + click and the library code a
  session touches: `edge-rt generate` on the tiny model, whose weights are < 1 MB, peaks at 76.5 MiB) plus the
  tokenizer (TOKENIZER_RSS_FACTOR x tokenizer.json: 30 MiB for SmolLM2's 2.7 MB file).

Plan against measurement (peak RSS of a process generating 300 tokens, context 2048): SmolLM2 fp32 842 vs 807 MiB,
fp32 with a float16 KV cache 796 vs 762 MiB, int4 362 vs 312 MiB; the tiny model 81 vs 75 MiB.

The default budget is the machine's available memory (MemAvailable in /proc/meminfo, os.sysconf elsewhere): it is
conservative by what the process already holds. Where neither can be read there is no default budget (no check).
"""
from __future__ import annotations

import inspect
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .decoder import Decoder
from .drafters import split_draft
from .errors import BundleError, InvalidArgumentError, MemoryBudgetError
from .kvcache import KVCache
from .manifest import GraphSpec

MiB = 1 << 20
RUNTIME_BASELINE = 72 * MiB       # `edge-rt generate` of the tiny model (weights < 1 MB) peaks at 76.5 MiB
TOKENIZER_RSS_FACTOR = 11         # resident bytes per byte of tokenizer.json (30 MiB for 2.7 MB, measured)
SESSION_FIXED = 4 * MiB           # graph, kernels, thread pool of one session beyond its weights
QUANT_PACK_FACTOR = 1.45          # quantized graphs: peak resident per byte on disk (SmolLM2 int4: 1.41, peak)
ARENA_MARGIN = 2.0                # ONNX Runtime's arena rounds and keeps freed blocks: 16 MiB for 9.4 MiB of tensors
SAMPLER_ROWS = 4                  # float64 [vocab] rows a sampling step may hold at once
# Static (NPU) graphs: one session per variant (AR-1, AR-k, AR-N), each holding the shared weights file its own way.
STATIC_QNN_FACTOR = 1.8           # QNN HTP: resident bytes per data byte and variant (SmolLM2 w8a16, C 256, 3
                                  # variants + an INT4 CPU draft: 950 MB peak RSS; the simulator's own copies)
STATIC_CPU_MARGIN = 1.35          # CPU EP: QDQ weights are folded to float32 per variant (2.1-2.3 GB measured)

_DECODER = inspect.signature(Decoder.__init__).parameters
DEFAULT_CHUNK = _DECODER["max_chunk"].default      # prefill chunk the Decoder runs (256)
DEFAULT_LOGITS = _DECODER["max_logits"].default    # logits rows the Decoder keeps (16)
NON_MODEL_DRAFTS = (None, "none", "ngram")


def _bits(precision: str) -> int:
    """Weight bits of a graph's precision label: fp32 32, fp16 16, *int8*/q8 8, *int4*/q4 4 (mixed: the largest)."""
    p = precision.lower()
    found = [b for b, keys in ((32, ("fp32", "float32")), (16, ("fp16", "float16", "bf16")), (8, ("int8", "q8")),
                               (4, ("int4", "q4"))) if any(k in p for k in keys)]
    return max(found) if found else 32  # unknown: assume float32, the upper bound


# ---- sizes --------------------------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MiB, "mb": MiB, "mib": MiB,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str | int) -> int:
    """"1.5GB" -> 1610612736 bytes. Units are powers of 1024 (KB = KiB, MB = MiB, GB = GiB); a bare number is bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise InvalidArgumentError(f"memory size {text!r} is not a size; write e.g. 1.5GB, 800MB or a number of bytes")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise InvalidArgumentError(f"memory size {text!r} must be more than 0 bytes")
    return size


def format_size(n: int | float) -> str:
    """Bytes as a short human size in powers of 1024: 1.50 GB, 622.8 MB, 36.0 KB, 512 B."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, scale in (("GB", 1 << 30), ("MB", MiB), ("KB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{sign}{value:.2f} {unit}" if unit == "GB" else f"{sign}{value:.1f} {unit}"
    return f"{sign}{int(n)} B"


def available_memory() -> int | None:
    """Bytes the machine can still give a process: MemAvailable (Linux), else free physical pages; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def default_budget() -> int | None:
    return available_memory()


# ---- the plan -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelMemory:
    """One graph's share: weights as ONNX Runtime holds them, its KV cache and its workspace."""
    name: str
    role: str                      # target, draft
    precision: str
    kv_dtype: str
    file_bytes: int                # the graph and its external data on disk
    weights: int                   # resident once the session is created (see the module docstring)
    kv_bytes_per_token: int        # 2 x layers x kv_heads x head_dim x itemsize
    capacity: int                  # positions the KV cache holds
    workspace_fixed: int           # logits buffer, sampler rows, prefill-chunk activations
    workspace_per_position: int    # attention scores of a prefill chunk, per cached position

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.capacity

    @property
    def workspace(self) -> int:
        return self.workspace_fixed + self.workspace_per_position * self.capacity

    @property
    def total(self) -> int:
        return self.total_at(self.capacity)

    def total_at(self, capacity: int) -> int:
        """Weights, KV cache and workspace with a cache of `capacity` positions."""
        return (self.weights + self.workspace_fixed
                + (self.kv_bytes_per_token + self.workspace_per_position) * capacity)


@dataclass(frozen=True)
class MemoryPlan:
    context: int
    target: ModelMemory
    draft: ModelMemory | None
    draft_extra: int               # the draft's cache holds this many positions more than the context
    overhead: int                  # runtime baseline + tokenizer
    budget: int | None             # what the plan is checked against (None: no check)
    max_positions: int             # the longest context the model takes

    @property
    def models(self) -> tuple[ModelMemory, ...]:
        return (self.target,) if self.draft is None else (self.target, self.draft)

    @property
    def weights(self) -> int:
        return sum(m.weights for m in self.models)

    @property
    def kv_bytes(self) -> int:
        return sum(m.kv_bytes for m in self.models)

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(m.kv_bytes_per_token for m in self.models)

    @property
    def workspace(self) -> int:
        return sum(m.workspace for m in self.models)

    @property
    def total(self) -> int:
        return self.overhead + sum(m.total for m in self.models)

    def total_at(self, context: int) -> int:
        """The total for another context, everything else equal."""
        t = self.overhead + self.target.total_at(context)
        if self.draft is not None:
            t += self.draft.total_at(min(context + self.draft_extra, self.max_positions))
        return t

    def max_context(self, budget: int | None = None) -> int:
        """The largest context whose total fits the budget (0 if not even one position does)."""
        budget = self.budget if budget is None else budget
        if budget is None:
            return self.max_positions
        lo, hi = 0, self.max_positions
        while lo < hi:  # total_at grows with the context: bisect for the last one that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.total_at(mid) <= budget else (lo, mid - 1)
        return lo

    @property
    def shortfall(self) -> int:
        """Bytes over the budget (0 when it fits or there is no budget)."""
        return 0 if self.budget is None else max(0, self.total - self.budget)

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("target", "draft"):
            if (m := getattr(self, key)) is not None:
                out[key].update(kv_bytes=m.kv_bytes, workspace=m.workspace, total=m.total)
        out.update(weights=self.weights, kv_bytes_per_token=self.kv_bytes_per_token, kv_bytes=self.kv_bytes,
                   workspace=self.workspace, total=self.total, max_context=self.max_context(),
                   fits=self.shortfall == 0, shortfall=self.shortfall)
        return out


def _weights(file_bytes: int, bits: int, tied_head_params: int) -> int:
    """Peak resident bytes of one session's weights (module docstring). A tied head is read by two nodes: the
    embedding keeps the stored bytes mapped and the LM head packs its own copy."""
    if bits >= 16:  # float: each packed weight replaces its mapped original one for one
        return file_bytes + tied_head_params * bits // 8 + SESSION_FIXED
    # quantized: MatMulNBits packs blocks with scales and block sums, and creating the session briefly holds more
    return int(QUANT_PACK_FACTOR * file_bytes) + int(1.5 * tied_head_params * bits / 8) + SESSION_FIXED


def _static_weights(bundle: Bundle, spec: GraphSpec, file_bytes: int, ep: str | None) -> int:
    """A static graph's variants (AR-1, AR-k, AR-N) are sessions of their own over one weights file: on QNN each
    holds STATIC_QNN_FACTOR x the data, on the CPU each folds the QDQ weights to float32 (w8: 4x, w4: 8x)."""
    variants = sum(1 for g in bundle.manifest.graphs if g.role == spec.role and g.kind == "static")
    if (ep or spec.execution_provider) == "cpu":
        bits = 4 if "w4" in spec.precision else 8 if "w8" in spec.precision else 32
        per_variant = STATIC_CPU_MARGIN * file_bytes * 32 / bits
    else:
        per_variant = STATIC_QNN_FACTOR * file_bytes
    return int(max(variants, 1) * per_variant) + SESSION_FIXED


def _graph_memory(bundle: Bundle, spec: GraphSpec, role: str, capacity: int, chunk: int,
                  ep: str | None = None) -> ModelMemory:
    a = bundle.manifest.architecture
    layers = spec.num_layers or a.num_layers
    try:
        file_bytes = sum(bundle.file(f).stat().st_size for f in (spec.file, *spec.data_files))
        kv_dtype = np.dtype(spec.kv_dtype)
    except (OSError, TypeError) as e:
        raise BundleError(f"cannot size graph {spec.file} of {bundle.path} ({e}); re-export the bundle") from None
    bits = _bits(spec.precision)
    if spec.kind == "static":
        weights = _static_weights(bundle, spec, file_bytes, ep)
    else:
        weights = _weights(file_bytes, bits, a.vocab_size * a.hidden_size if a.tie_word_embeddings else 0)
    qkv = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
    chunk_activations = 4 * (4 * a.hidden_size + qkv + 4 * a.intermediate_size) * chunk
    logits = DEFAULT_LOGITS * a.vocab_size * 4 + SAMPLER_ROWS * a.vocab_size * 8
    return ModelMemory(  # every term: see the module docstring
        name=bundle.manifest.name, role=role, precision=spec.precision, kv_dtype=spec.kv_dtype,
        file_bytes=file_bytes, weights=weights,
        kv_bytes_per_token=KVCache.bytes_per_token(layers, a.num_kv_heads, a.head_dim, kv_dtype),
        capacity=capacity,
        workspace_fixed=logits + int(ARENA_MARGIN * chunk_activations),
        # one fp32 score row per cached position; a dynamic graph's decoder also keeps the final hidden state of
        # every position (the features an EAGLE draft reads; bundles exported before it: 4 bytes x H too many)
        workspace_per_position=4 * chunk + (4 * a.hidden_size if spec.kind == "gqa" else 0),
    )


def draft_graph(bundle: Bundle, draft: Bundle | str | Path | None) -> tuple[Bundle, GraphSpec] | None:
    """The graph a --draft value loads, or None for a model-free draft (none, ngram)."""
    if isinstance(draft, Bundle):
        return draft, draft.manifest.graph("target")
    if isinstance(draft, str):
        draft = split_draft(draft)[0]  # ngram+self loads the self-draft
    if draft in NON_MODEL_DRAFTS:
        return None
    if draft in ("self", "target"):
        spec = bundle.manifest.graph("draft" if draft == "self" else "target")
        if spec is None:
            raise BundleError(f"bundle {bundle.path} has no self-draft graph; export it with "
                              "`edge-rt export ... --draft self` or pick another --draft")
        return bundle, spec
    from .cards import resolve_bundle
    other = Bundle.load(resolve_bundle(draft), verify=False)  # the manifest and file sizes are all a plan reads
    return other, other.manifest.graph("target")


def plan_memory(bundle: Bundle, context: int | None = None, draft: Bundle | str | Path | None = None, *,
                draft_max: int = 4, chunk: int = DEFAULT_CHUNK, budget: int | None = None, ep: str | None = None,
                draft_ep: str | None = None) -> MemoryPlan:
    """What loading `bundle` (and its draft) with `context` positions will hold, from the manifest and file sizes.
    ep / draft_ep: where the target / draft run [each graph's own]; static graphs hold more on the CPU."""
    m = bundle.manifest
    context = m.defaults.context if context is None else context
    if not 0 < context <= m.architecture.max_position_embeddings:
        raise InvalidArgumentError(
            f"context {context} is out of range; this model takes 1..{m.architecture.max_position_embeddings}")
    target = _graph_memory(bundle, m.graph("target"), "target", context, chunk, ep)
    draft_model, extra = None, 0
    if (found := draft_graph(bundle, draft)) is not None:
        extra = draft_max + 1  # the draft runs up to draft_max tokens past the target's write pointer
        # as the Engine allocates it: cut to the positions the draft holds (a static draft's C)
        capacity = min(context + extra, m.architecture.max_position_embeddings,
                       found[0].manifest.architecture.max_position_embeddings)
        draft_model = _graph_memory(*found, "draft", capacity, chunk, draft_ep)
    try:
        tokenizer = bundle.file(m.tokenizer).stat().st_size
    except OSError:
        tokenizer = 0
    return MemoryPlan(context=context, target=target, draft=draft_model, draft_extra=extra,
                      overhead=RUNTIME_BASELINE + TOKENIZER_RSS_FACTOR * tokenizer, budget=budget,
                      max_positions=m.architecture.max_position_embeddings)


def check_plan(plan: MemoryPlan) -> MemoryPlan:
    """Raise MemoryBudgetError naming what does not fit and by how much; return the plan when it fits."""
    budget = plan.budget
    if budget is None or plan.total <= budget:
        return plan
    what = " + ".join(f"{m.name} {m.role} {format_size(m.weights)}" for m in plan.models)
    if plan.total_at(1) > budget:  # not even one position: the weights themselves do not fit
        fixed = plan.total_at(1)
        raise MemoryBudgetError(
            f"the weights do not fit in the memory budget of {format_size(budget)}: {what} as ONNX Runtime holds them, "
            f"{format_size(fixed)} with the runtime and workspace, {format_size(fixed - budget)} over; raise "
            "--memory-budget or use a smaller or quantized model")
    kv = " + ".join(f"{format_size(m.kv_bytes)} ({format_size(m.kv_bytes_per_token)}/token, {m.kv_dtype})"
                    for m in plan.models)
    raise MemoryBudgetError(
        f"context {plan.context} does not fit in the memory budget of {format_size(budget)}: the KV cache takes {kv}, "
        f"the whole plan {format_size(plan.total)}, {format_size(plan.shortfall)} over; the largest context that fits "
        f"is {plan.max_context()} (pass --context {plan.max_context()}) or raise --memory-budget")


def check_memory(bundle: Bundle, context: int, budget: int | None = None, draft: str | Path | None = None,
                 draft_max: int = 4, ep: str | None = None, draft_ep: str | None = None) -> MemoryPlan:
    """The Engine's check before it allocates: plan against `budget` (None: the machine's available memory)."""
    budget = default_budget() if budget is None else budget
    return check_plan(plan_memory(bundle, context, draft, draft_max=draft_max, budget=budget, ep=ep,
                                  draft_ep=draft_ep))


def plan_table(plan: MemoryPlan, budget_note: str = "") -> str:
    """The plan as `edge-rt plan` prints it: one row per item, a column per model and the total."""
    models = plan.models
    head = ["", *(f"{m.role} ({m.precision})" for m in models), "total"]
    rows = [
        ["weights (as loaded)", *(format_size(m.weights) for m in models), format_size(plan.weights)],
        ["KV bytes/token", *(f"{format_size(m.kv_bytes_per_token)} {m.kv_dtype}" for m in models),
         format_size(plan.kv_bytes_per_token)],
        [f"KV cache at context {plan.context}", *(format_size(m.kv_bytes) for m in models), format_size(plan.kv_bytes)],
        ["workspace", *(format_size(m.workspace) for m in models), format_size(plan.workspace)],
        ["runtime overhead", *("" for _ in models), format_size(plan.overhead)],
        ["total", *(format_size(m.total) for m in models), format_size(plan.total)],
    ]
    if plan.budget is not None:
        fits = (f"yes, {format_size(plan.budget - plan.total)} spare" if plan.shortfall == 0
                else f"no, {format_size(plan.shortfall)} over")
        largest = plan.max_context()
        rows += [["budget", *("" for _ in models), format_size(plan.budget) + budget_note],
                 ["fits", *("" for _ in models), fits],
                 ["largest context that fits", *("" for _ in models),
                  f"{largest}" + (" (model limit)" if largest == plan.max_positions else "")]]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [head, *rows]]
    name = " + ".join(dict.fromkeys(m.name for m in models))
    return f"memory plan: {name}, context {plan.context}\n" + "\n".join(lines)
