"""Build time: float bundle -> INT4/INT8 bundle with a quality report (see the quantization issue).

    quant.recipes.quantize_graph(src_onnx, dst_onnx, recipe, **options) -> report   one graph file
    quant.bundle.quantize_bundle(bundle, out, recipe, draft_recipe=None, calibration=None, **options)
    quant.eval.evaluate(model, text, reference=None) -> EvalReport                   perplexity, agreement, KL, speed

CPU recipes (recipes.py): cpu-int4, cpu-int4-fast, cpu-int4-all, cpu-int8, auto (--max-size). QNN recipes: qnn.py.
"""
