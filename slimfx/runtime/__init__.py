"""Running compiled models: timing helpers (and, later, exits and ONNX sessions)."""
