"""MODEL specs -> nn.Module.

``torchvision:NAME`` and ``timm:NAME`` (random weights), ``package.module:factory``, ``path/to/file.py:factory``,
or a file written by ``slimfx compile``. A pickle that could run code when loaded is refused
unless the caller passes ``trust=True``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from slimfx.errors import ModelSpecError, UnsafeModelFileError
from slimfx.files.model_format import is_slimfx_file, module_from_payload

_INPUT_SIZE = {"inception_v3": 299}
_VIDEO_SHAPE = (1, 3, 16, 112, 112)


@dataclass
class LoadedModel:
    """A model ready to capture: the module (in eval mode), a name, its usual input shape."""

    module: nn.Module
    name: str
    input_shape: tuple[int, ...] | None


def load_model(spec: str, *, trust: bool = False) -> nn.Module:
    """The model a MODEL spec names, in eval mode, ready to call or compile; its usual input
    shape, when known, is its ``example_input_shape`` attribute."""
    loaded = resolve_model(spec, trust=trust)
    if loaded.input_shape is not None:
        loaded.module.example_input_shape = loaded.input_shape
    return loaded.module


def resolve_model(spec: str, *, trust: bool = False) -> LoadedModel:
    """Resolve a MODEL spec into the module (in eval mode: slimfx compiles for inference), a
    name and its usual input shape."""
    if spec.startswith("torchvision:"):
        loaded = _torchvision(spec.removeprefix("torchvision:"))
    elif spec.startswith("timm:"):
        loaded = _timm(spec.removeprefix("timm:"))
    elif ":" in spec and not Path(spec).is_file():
        loaded = _factory(spec)
    elif Path(spec).is_file():
        _check_file_type(Path(spec))
        loaded = _model_file(Path(spec), trust)
    else:
        raise ModelSpecError(
            f"cannot resolve model {spec!r}: expected torchvision:NAME, timm:NAME, package.module:factory, "
            "path/to/file.py:factory, or a file written by 'slimfx compile'"
        )
    loaded.module.eval()
    return loaded


def _torchvision(name: str) -> LoadedModel:
    try:
        import torchvision
    except ImportError:
        raise ModelSpecError("torchvision is not installed; pip install torchvision") from None
    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise ModelSpecError(f"torchvision has no model {name!r}{hint}")
    module = torchvision.models.get_model(name, weights=None)
    if name in torchvision.models.list_models(module=torchvision.models.video):
        shape: tuple[int, ...] = _VIDEO_SHAPE
    else:
        size = _INPUT_SIZE.get(name, 224)
        shape = (1, 3, size, size)
    return LoadedModel(module, name, shape)


def _timm(name: str) -> LoadedModel:
    """A timm model with random weights (nothing is downloaded) at timm's default input size."""
    try:
        import timm
    except ImportError:
        raise ModelSpecError('timm is not installed: pip install -e ".[timm]"') from None
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ModelSpecError(f"timm has no model {name!r}{hint}")
    module = timm.create_model(name, pretrained=False)
    size = tuple(module.pretrained_cfg.get("input_size", (3, 224, 224)))
    return LoadedModel(module, name, (1, *size))


def _factory(spec: str) -> LoadedModel:
    where, _, fn_name = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ModelSpecError(f"model file {where!r} does not exist")
        module_name = f"_slimfx_user_{path.stem}"
        import_spec = importlib.util.spec_from_file_location(module_name, path)
        if import_spec is None or import_spec.loader is None:
            raise ModelSpecError(f"cannot import {where!r} as a Python file")
        source = importlib.util.module_from_spec(import_spec)
        sys.modules[module_name] = source
        _exec(lambda: import_spec.loader.exec_module(source), spec)
    else:
        source = _exec(lambda: importlib.import_module(where), spec)
    factory = getattr(source, fn_name, None)
    if not callable(factory):
        raise ModelSpecError(f"{where} has no callable {fn_name!r}")
    module = factory if isinstance(factory, nn.Module) else _exec(factory, spec)  # a model instance is the model
    if not isinstance(module, nn.Module):
        raise ModelSpecError(f"{spec} returned a {type(module).__name__}, not a torch.nn.Module")
    shape = getattr(module, "example_input_shape", None)
    return LoadedModel(module, fn_name, tuple(shape) if shape else None)


def _check_file_type(path: Path) -> None:
    """A file slimfx cannot load as a model is named for what it is, with what to give instead."""
    suffix = path.suffix.lower()
    if suffix == ".py":
        names = _top_level_callables(path)
        shown = ", ".join(f"{path}:{n}" for n in names[:3]) or f"{path}:build"
        raise ModelSpecError(
            f"{path} is Python source: name the function (or class) in it that builds the model, e.g. {shown}"
        )
    if suffix == ".onnx":
        raise ModelSpecError(
            f"{path} is an ONNX file; slimfx compiles PyTorch models: give the PyTorch model it was exported "
            "from (torchvision:NAME, timm:NAME, file.py:factory); onnxruntime runs the .onnx file itself"
        )


def _top_level_callables(path: Path) -> list[str]:
    """Functions and classes defined at the top of a Python file (read, not run)."""
    import ast

    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]


def _exec(fn: object, spec: str) -> object:
    try:
        return fn()  # type: ignore[operator]
    except ModuleNotFoundError as exc:
        raise ModelSpecError(f"cannot import {spec!r}: {exc}") from None
    except Exception as exc:
        raise ModelSpecError(f"loading {spec!r} failed: {type(exc).__name__}: {exc}") from exc


def _model_file(path: Path, trust: bool) -> LoadedModel:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as exc:
        if not trust:
            raise UnsafeModelFileError(
                f"{path} is not a slimfx model file and loading it would unpickle arbitrary Python objects, "
                "which can run code; if you trust its source, pass --trust-model-file (Python: trust=True)"
            ) from exc
        payload = _trusted_load(path)
    except Exception as exc:
        raise ModelSpecError(f"cannot read model file {path}: {exc}") from None
    if is_slimfx_file(payload):
        module, shapes, name = module_from_payload(payload)
        return LoadedModel(module, name, tuple(shapes[0]) if shapes else None)
    if isinstance(payload, nn.Module):
        return LoadedModel(payload, path.stem, None)
    raise ModelSpecError(
        f"{path} holds a {type(payload).__name__}, not a model; a state_dict needs its model class "
        "(use package.module:factory and load the weights there)"
    )


def _trusted_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelSpecError(f"cannot load model file {path}: {exc}") from None
