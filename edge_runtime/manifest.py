"""The bundle manifest: the contract between export (build time) and the runtime.

Loaded into frozen dataclasses; unknown keys are dropped so older runtimes read newer manifests of the same
format version.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _from_dict(cls, data: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Architecture:
    family: str  # llama, mistral, qwen2 (all share the Llama block)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int  # length of the rotary cache baked into the graph
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class TokenIds:
    eos: tuple[int, ...]  # generation stops at any of these
    bos: int | None = None
    pad: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenIds:
        data = dict(data)
        data["eos"] = tuple(data.get("eos") or ())
        return _from_dict(cls, data)


@dataclass(frozen=True)
class GraphSpec:
    role: str  # "target" or "draft"
    file: str  # the .onnx file, relative to the bundle
    kind: str = "gqa"  # "gqa": dynamic shapes, KV shared in place through GroupQueryAttention
    #                    "static": fixed shapes for an NPU, one graph per variant (static_shapes tokens 1, k, N)
    precision: str = "fp32"
    execution_provider: str = "cpu"
    kv_dtype: str = "float32"
    num_layers: int | None = None  # a self-draft may have fewer layers than the architecture
    data_files: tuple[str, ...] = ()
    static_shapes: dict[str, int] | None = None  # kind "static": {"context": C, "tokens": n, "logits": L}
    # a compiled form of this graph (`edge-rt compile`): {"ep": "qnn", "file": the EPContext .onnx,
    # "binaries": [context binaries], "provider_options": {...}}; every file is listed with its sha256 in `files`
    ep_context: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        data = dict(data)
        data["data_files"] = tuple(data.get("data_files") or ())
        return _from_dict(cls, data)


@dataclass(frozen=True)
class Defaults:
    context: int = 2048
    max_tokens: int = 512
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    draft: str = "none"  # the speculative draft used when none is asked for: none, ngram, self, ngram+self, ...


@dataclass(frozen=True)
class Manifest:
    format_version: int
    name: str
    architecture: Architecture
    tokens: TokenIds
    graphs: tuple[GraphSpec, ...]
    tokenizer: str  # tokenizer.json, relative to the bundle
    chat_template: str | None
    files: dict[str, str]  # every file of the bundle but the manifest -> sha256
    defaults: Defaults = field(default_factory=Defaults)
    source: dict[str, Any] = field(default_factory=dict)  # where it came from, how it was verified
    # a draft with a reduced output vocabulary (`edge-rt train-draft`): .npy int64 [vocab_size], the target id of each
    # logit row; it reads target ids (its embedding covers the target's whole vocabulary)
    vocab_map: str | None = None

    def graph(self, role: str) -> GraphSpec | None:
        return next((g for g in self.graphs if g.role == role), None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"manifest format version {version!r} is not supported (this runtime reads version {FORMAT_VERSION}); "
                "re-export the bundle with this version of edge-runtime"
            )
        try:
            return cls(
                format_version=version,
                name=data["name"],
                architecture=_from_dict(Architecture, data["architecture"]),
                tokens=TokenIds.from_dict(data["tokens"]),
                graphs=tuple(GraphSpec.from_dict(g) for g in data["graphs"]),
                tokenizer=data["tokenizer"],
                chat_template=data.get("chat_template"),
                files=dict(data["files"]),
                defaults=_from_dict(Defaults, data.get("defaults", {})),
                source=dict(data.get("source", {})),
                vocab_map=data.get("vocab_map"),
            )
        except (KeyError, TypeError) as e:
            raise BundleError(f"manifest is malformed ({e!r} missing or of the wrong type); re-export the bundle") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, folder: Path) -> None:
        (Path(folder) / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
