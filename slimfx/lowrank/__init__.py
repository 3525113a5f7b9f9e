"""Low-rank factorization math: decompositions of conv and linear weights, and the methods built on them."""
