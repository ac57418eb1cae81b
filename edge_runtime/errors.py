"""Typed errors raised by the library. The CLI turns them into one-line click errors at its edge.

Every message says what is wrong and what to do about it.
"""


class EdgeRuntimeError(Exception):
    """Base of every error the library raises on purpose."""


class InvalidArgumentError(EdgeRuntimeError, ValueError):
    """A parameter is out of range (temperature < 0, top_p outside (0, 1], ...)."""


class ModelNotFoundError(EdgeRuntimeError):
    """A model name is neither a bundle folder nor a known model card."""


class BundleError(EdgeRuntimeError):
    """A bundle is missing a file, has a bad manifest, a sha256 mismatch, or a graph ONNX Runtime cannot load."""


class TemplateError(EdgeRuntimeError):
    """The chat template failed to render."""


class ContextFullError(EdgeRuntimeError):
    """The KV cache has no room for the tokens asked for."""


class MemoryBudgetError(EdgeRuntimeError):
    """What must be loaded does not fit in the memory budget."""


class ExportError(EdgeRuntimeError):
    """A source model cannot be fetched, exported or verified."""


class QuantizationError(EdgeRuntimeError):
    """A bundle cannot be quantized: already quantized, unknown recipe, bad calibration text, size budget too small."""


class ExecutionProviderError(EdgeRuntimeError):
    """An execution provider (QNN) is not installed, cannot be registered, or cannot run a bundle's graph."""


class DraftTrainingError(EdgeRuntimeError):
    """A draft cannot be trained: bad prompt file, output folder exists, nothing to resume, unsupported target."""
