"""What a plan changes, in the form the passes take: the channels each group keeps and, on an
int8 runtime, which layers stay in float and which store weights narrower than int8."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from slimfx.passes.quantize import Quantize
from slimfx.quant.schemes import SCHEME_BITS

FLOAT = "float"  # a layer's setting when it is not quantized
FLOAT_BITS = 32


@dataclass(frozen=True)
class Settings:
    """Channel widths per group (by first source layer) and the quantization of each layer."""

    widths: Mapping[str, int] = field(default_factory=dict)
    quantize: bool = False  # whether the deployed model is quantized at all
    float_layers: tuple[str, ...] = ()  # quantizable layers left in float
    layer_weights: Mapping[str, str] = field(default_factory=dict)  # layer -> scheme, where not int8

    @property
    def keep(self) -> tuple[str, ...]:
        """``prune-channels:keep`` entries."""
        return tuple(f"{source}@{width}" for source, width in self.widths.items())

    def quantize_pass(self, calib: str = "entropy") -> Quantize | None:
        """The ``quantize`` pass these settings deploy with, or None when nothing is quantized."""
        if not self.quantize:
            return None
        weights = tuple(f"{layer}@{scheme}" for layer, scheme in self.layer_weights.items())
        return Quantize(calib=calib, exclude=self.float_layers, layer_weights=weights)  # type: ignore[arg-type]

    def weight_bits(self, layers: Sequence[str]) -> dict[str, int]:
        """Bits per weight of each of ``layers`` as deployed."""
        if not self.quantize:
            return dict.fromkeys(layers, FLOAT_BITS)
        floats = set(self.float_layers)
        return {
            layer: FLOAT_BITS if layer in floats else SCHEME_BITS[self.layer_weights.get(layer, "int8")]
            for layer in layers
        }
