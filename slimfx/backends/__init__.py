"""Runtimes and exporters: ONNX export and sessions, the torch int8 lowering, the early-exit module, timing."""
