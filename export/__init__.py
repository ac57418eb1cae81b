"""Build time: source model -> ONNX bundle. Imports torch, transformers and gguf (the `export` extra)."""
