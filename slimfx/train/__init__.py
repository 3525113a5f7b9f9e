"""Training helpers that prepare a model for slimfx's passes."""

from slimfx.train.qat import qat
from slimfx.train.sparsity import bn_sparsity_penalty

__all__ = ["bn_sparsity_penalty", "qat"]
