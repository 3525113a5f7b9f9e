"""Early-exit models as ONNX: one file per stage and per exit head, and a manifest that ties them.

ONNX has no way to shrink a batch between two layers, which is what makes exits pay, so the
model leaves as parts: ``OUT.exits.json`` (the manifest: the parts in order, the thresholds,
the exit rule) beside ``OUT.exits.stageK.onnx`` and ``OUT.exits.headK.onnx``. ``OnnxEarlyExit``
loads the manifest and runs the parts in onnxruntime with the same routing as the torch
runtime (``early_exit.take_exits``): rows whose head is confident leave, the rest go on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimfx.backends import onnx as ort_tools
from slimfx.backends.early_exit import EarlyExitModel, take_exits
from slimfx.errors import BackendError

MANIFEST_SCHEMA = "slimfx.early-exit-onnx/1"
MANIFEST_SUFFIX = ".exits.json"
EXIT_RULE = "a row leaves at head K when the entropy (nats) of softmax(head K's output) is at most thresholds[K]"


@dataclass(frozen=True)
class EarlyExitFiles:
    """Where an early-exit model's parts go: the manifest, then each stage's and head's file."""

    manifest: Path
    stages: tuple[Path, ...]
    heads: tuple[Path, ...]

    @classmethod
    def beside(cls, onnx_path: str | Path, heads: int) -> EarlyExitFiles:
        """The files for ``--onnx OUT.onnx``: ``OUT.exits.json``, ``OUT.exits.stageK.onnx``,
        ``OUT.exits.headK.onnx``."""
        return cls.at(Path(onnx_path).with_suffix(MANIFEST_SUFFIX), heads)

    @classmethod
    def at(cls, manifest: str | Path, heads: int) -> EarlyExitFiles:
        """The parts beside ``manifest``, named by ``part_suffixes``."""
        manifest = Path(manifest)
        suffixes = part_suffixes(heads)
        return cls(
            manifest,
            tuple(manifest.with_suffix(s) for s in suffixes[: heads + 1]),
            tuple(manifest.with_suffix(s) for s in suffixes[heads + 1 :]),
        )


def part_suffixes(heads: int) -> tuple[str, ...]:
    """Each part's suffix in place of the manifest's ``.json``: the stages, then the heads."""
    return tuple(f".stage{k}.onnx" for k in range(heads + 1)) + tuple(f".head{k}.onnx" for k in range(heads))


def export_early_exit_onnx(
    model: EarlyExitModel, example_inputs: Sequence[torch.Tensor], files: EarlyExitFiles, names: EarlyExitFiles
) -> EarlyExitFiles:
    """Write every stage and head of ``model`` as ONNX at ``files`` (batch dynamic) and the manifest
    naming them as ``names`` says (their final places, when ``files`` are staged). Each part is
    exported on the features the part before it gives for the example inputs."""
    features: tuple[torch.Tensor, ...] = tuple(example_inputs)
    with torch.no_grad():
        for k, stage in enumerate(model.stages):
            ort_tools.export_onnx(stage, features, files.stages[k])
            output = stage(*features)
            if k < len(model.heads):
                ort_tools.export_onnx(model.heads[k], (output,), files.heads[k])
            features = (output,)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "stages": [p.name for p in names.stages],
        "heads": [p.name for p in names.heads],
        "thresholds": list(model.thresholds),
        "exit_rule": EXIT_RULE,
        "input_shapes": [list(t.shape) for t in example_inputs],
    }
    files.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    return names


class OnnxEarlyExit:
    """An exported early-exit model run in onnxruntime: ``model(x)`` gives the outputs, and
    ``model(x, return_exits=True)`` each row's exit index too, as the torch runtime does."""

    def __init__(self, manifest: str | Path, threads: int | None = None):
        path = Path(manifest)
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot read the early-exit manifest {path}: {exc}") from None
        if data.get("schema") != MANIFEST_SCHEMA:
            raise BackendError(
                f"{path} is not an early-exit manifest ({MANIFEST_SCHEMA}); slimfx compile --onnx writes one"
            )
        missing = [name for name in (*data["stages"], *data["heads"]) if not (path.parent / name).is_file()]
        if missing:
            raise BackendError(f"{path} names parts that are not beside it: {', '.join(missing)}")
        self.thresholds = [float(t) for t in data["thresholds"]]
        self.stages = [_Part(ort_tools.session(path.parent / n, threads)) for n in data["stages"]]
        self.heads = [_Part(ort_tools.session(path.parent / n, threads)) for n in data["heads"]]

    def __call__(self, *inputs: torch.Tensor, return_exits: bool = False) -> Any:
        outputs, exits = take_exits(self.stages, self.heads, self.thresholds, inputs)
        return (outputs, exits) if return_exits else outputs


class _Part:
    """One onnxruntime session called like a module on tensors."""

    def __init__(self, session: Any):
        self.session = session

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        (output, *_) = ort_tools.run(self.session, inputs)
        return torch.from_numpy(output)
