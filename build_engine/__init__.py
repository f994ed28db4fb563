"""Build step: checkpoint -> ONNX graph -> (quantize) -> (compile) -> engine bundle."""
