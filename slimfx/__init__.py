"""slimfx: a graph-rewriting compiler for efficient neural networks in PyTorch."""
