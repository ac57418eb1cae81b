"""edge-runtime: on-device LLM inference on ONNX Runtime (CPU and Qualcomm NPU), with speculative decoding.

    import edge_runtime as ert
    engine = ert.Engine.load("smollm2-135m")          # a card name or a bundle folder
    print(engine.generate("What is the capital of France?"))
"""
from .engine import Engine, GenerationStats
from .errors import (BundleError, ContextFullError, EdgeRuntimeError, ExportError, InvalidArgumentError,
                     MemoryBudgetError, ModelNotFoundError, TemplateError)
from .sampling import SamplingParams
from .session import share_thread_pool

__version__ = "0.1.0"

__all__ = ["Engine", "GenerationStats", "SamplingParams", "EdgeRuntimeError", "BundleError", "ContextFullError",
           "ExportError", "InvalidArgumentError", "MemoryBudgetError", "ModelNotFoundError", "TemplateError",
           "share_thread_pool"]
