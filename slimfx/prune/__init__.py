"""Channel pruning math: importance criteria, how many and which channels, slicing layers."""
