"""Build time: float bundle -> INT4/INT8 bundle with a quality report (see the quantization issue)."""
