"""Loads a source model (Hugging Face folder or GGUF file) with transformers and turns it into builder weights."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import ExportError
from edge_runtime.manifest import Architecture

from .builder import LayerWeights, ModelWeights

# model_type -> the family name recorded in the manifest. All of them are the Llama block (RMSNorm, rotary, GQA,
# SwiGLU); Qwen2 adds q/k/v biases, Mistral a sliding window.
SUPPORTED = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


@dataclass
class Source:
    model: object          # transformers PreTrainedModel, float32, eval mode
    tokenizer: object      # transformers PreTrainedTokenizerFast
    description: str


def _check_architecture(model_type: str | None, where: str) -> None:
    if model_type not in SUPPORTED:
        raise ExportError(
            f"unsupported architecture {model_type!r} in {where}; edge-runtime exports {', '.join(sorted(SUPPORTED))}"
        )


def _gguf_architecture(path: Path) -> str | None:
    try:
        from gguf import GGUFReader
        reader = GGUFReader(str(path))
    except Exception as e:  # a truncated or foreign file: gguf raises many kinds
        raise ExportError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode()


def load_source(path: str | Path) -> Source:
    """A folder with config.json + weights, or a .gguf file (any quantized type transformers dequantizes)."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"source {path} does not exist; pass a Hugging Face folder, a .gguf file or a model card name")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.is_file():
        if path.suffix != ".gguf":
            raise ExportError(f"{path} is a file but not a .gguf; pass a .gguf file or a Hugging Face folder")
        _check_architecture(_gguf_architecture(path), str(path))
        kwargs = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    else:
        config = path / "config.json"
        if not config.is_file():
            raise ExportError(f"{path} has no config.json; pass a Hugging Face model folder or a .gguf file")
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (ValueError, OSError) as e:
            raise ExportError(f"{config} is not valid JSON ({e})") from None
        _check_architecture(model_type, str(config))
        kwargs = dict(pretrained_model_name_or_path=str(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(**kwargs)
        model = AutoModelForCausalLM.from_pretrained(**kwargs, dtype=torch.float32)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for broken sources
        raise ExportError(f"cannot load {path} with transformers ({type(e).__name__}: {e})") from None
    model.eval()
    return Source(model=model, tokenizer=tokenizer, description=str(path))


def architecture_of(model, max_positions: int | None = None) -> Architecture:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim % 16:
        raise ExportError(f"head_dim {head_dim} is not a multiple of 16, which ONNX Runtime's GroupQueryAttention needs")
    return Architecture(
        family=SUPPORTED[c.model_type],
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=head_dim,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        max_position_embeddings=min(c.max_position_embeddings, max_positions or c.max_position_embeddings),
        rope_theta=float(getattr(c, "rope_theta", 10000.0)),
        rms_norm_eps=float(c.rms_norm_eps),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
    )


def weights_of(model, arch: Architecture) -> ModelWeights:
    """Pull float32 numpy weights out of a transformers Llama-family model, laid out [in, out] for MatMul."""
    import torch

    def np_(t) -> np.ndarray:
        return t.detach().to(torch.float32).cpu().numpy()

    def lin(m) -> np.ndarray:
        return np_(m.weight).T  # Linear stores [out, in]

    def bias(m) -> np.ndarray | None:
        return None if m.bias is None else np_(m.bias)

    layers = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        qkv_bias = None
        if a.q_proj.bias is not None:
            qkv_bias = np.concatenate([bias(a.q_proj), bias(a.k_proj), bias(a.v_proj)])
        mlp_biases = None
        if mlp.gate_proj.bias is not None:
            mlp_biases = (bias(mlp.gate_proj), bias(mlp.up_proj), bias(mlp.down_proj))
        layers.append(LayerWeights(
            input_norm=np_(layer.input_layernorm.weight),
            qkv=np.concatenate([lin(a.q_proj), lin(a.k_proj), lin(a.v_proj)], axis=1),
            o=lin(a.o_proj), o_bias=bias(a.o_proj),
            post_norm=np_(layer.post_attention_layernorm.weight),
            gate=lin(mlp.gate_proj), up=lin(mlp.up_proj), down=lin(mlp.down_proj),
            qkv_bias=qkv_bias, mlp_biases=mlp_biases,
        ))
    # The model's own rotary module gives cos/sin with any rope scaling (llama3, yarn, ...) applied.
    positions = torch.arange(arch.max_position_embeddings)[None]
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    half = arch.head_dim // 2
    embed = np_(model.model.embed_tokens.weight)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    window = getattr(model.config, "sliding_window", None) if getattr(model.config, "use_sliding_window", True) else None
    return ModelWeights(
        embed=embed,
        layers=layers,
        final_norm=np_(model.model.norm.weight),
        lm_head=None if tied else np_(model.lm_head.weight),
        cos=np_(cos[0, :, :half]), sin=np_(sin[0, :, :half]),
        sliding_window=window,
    )
