"""The ``slimfx`` command: report, compile, demo.

Bad input prints one line on stderr and exits with status 2, with no traceback and no
partial output file.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch

from slimfx import parallel
from slimfx.demo import TARGET as DEMO_TARGET
from slimfx.errors import InvalidArgumentError, OutputError, ShapeError, SlimfxError, StrictFailure
from slimfx.fidelity import DEFAULT_WARN_BELOW

if TYPE_CHECKING:
    from slimfx.api import CompileResult
    from slimfx.backends.early_exit_onnx import EarlyExitFiles
    from slimfx.files.atomic import StagedOutputs

EXIT_BAD_INPUT = 2
EXIT_STRICT = 1  # --strict and the compile warned
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it
DEFAULT_PASSES = "fold-bn"
LAYER_TIMING_RUNS = 10  # runs per node for the HTML pages' measured per-layer time


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_input_shapes(text: str) -> list[tuple[int, ...]]:
    """``"1,3,224,224"`` -> [(1, 3, 224, 224)]; several inputs are separated by ``;``."""
    shapes = []
    for part in text.split(";"):
        try:
            shape = tuple(int(d) for d in part.split(","))
        except ValueError:
            shape = ()
        if not shape or any(d <= 0 for d in shape):
            raise ShapeError(
                f"invalid --input-shape {text!r}: expected comma-separated positive integers such as 1,3,224,224 "
                "(several inputs separated by ';')"
            )
        shapes.append(shape)
    return shapes


def check_writable(path: str) -> None:
    """Fail before any work when ``path`` cannot be written."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory")
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write {path}: folder {folder} is not writable")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="torchvision:NAME, package.module:factory, file.py:factory, or a slimfx model file"
    )
    parser.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (';' between several inputs)")
    parser.add_argument("--batch", type=int, help="batch size: replaces the first dimension of every example input")
    parser.add_argument(
        "--leaf-module",
        action="append",
        default=[],
        metavar="PATH",
        help="module path to keep whole when tracing (repeatable)",
    )
    parser.add_argument(
        "--concrete-arg",
        action="append",
        default=[],
        type=_concrete_arg,
        metavar="NAME=VALUE",
        help="fix an argument of the model's forward to a Python literal while tracing (True, 3, 'mean', None), "
        "for a top-level branch on it (repeatable)",
    )
    parser.add_argument(
        "--no-fallback",
        action="store_true",
        help="fail when the model does not trace, instead of keeping a submodule whole (opaque) "
        "or tracing at the example's fixed shapes",
    )
    parser.add_argument(
        "--trust-model-file",
        action="store_true",
        help="allow loading a pickled model file, which can run code: only for files you trust",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for random weights (torchvision:NAME) and example inputs (default 0)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slimfx", description="Graph-rewriting compiler for efficient PyTorch models.")
    parser.add_argument("--version", action="version", version=f"slimfx {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    report = sub.add_parser("report", help="where the cost goes, node by node")
    _add_model_arguments(report)
    report.add_argument(
        "--format",
        choices=["table", "md", "csv", "json", "dot"],
        default="table",
        help="table (default), md (Markdown), csv (shares as fractions), json (docs/report-schema.md), "
        "dot (Graphviz, every node)",
    )
    report.add_argument(
        "--top", type=int, help="only the N nodes (or module types) with most MACs; says what share of MACs they hold"
    )
    report.add_argument(
        "--by",
        choices=["node", "module-type"],
        default="node",
        help="one row per node (default) or per module type, convs split into dense, grouped and depthwise",
    )
    report.add_argument("-o", "--output", help="write the report to this file instead of stdout")
    _add_prediction_arguments(report)
    report.add_argument(
        "--html",
        metavar="OUT.html",
        help="also write one self-contained HTML page: totals, a sortable table of every node with its measured "
        f"eager latency (median of {LAYER_TIMING_RUNS} runs), plots (needs the plot extra)",
    )

    comp = sub.add_parser("compile", help="run a pass pipeline; print before/after and every decision")
    _add_model_arguments(comp)
    comp.add_argument(
        "--passes",
        help="pipeline spec: NAME[:option=value,...] items separated by commas, e.g. "
        f"'prune-channels:ratio=0.5,fold-bn,quantize' (default: {DEFAULT_PASSES}, or what --target plans). Passes: "
        f"{', '.join(_pass_names())}; 'slimfx passes NAME' lists a pass's options",
    )
    comp.add_argument(
        "--target",
        metavar="UNIT=VALUE",
        help="plan the pipeline to reach a budget instead of --passes: latency=0.5 (of the original in the float "
        "flavour of --runtime) or latency=8ms, macs=0.3, size=0.25 or size=2MB; channel widths per group by "
        "sensitivity measured on --calib, int8 on an int8 --runtime, distill with --train",
    )
    comp.add_argument(
        "--max-drop",
        type=float,
        metavar="POINTS",
        help="with --target: give back pruned choices until accuracy (labelled --eval or --calib) or top-1 "
        "agreement fell by at most this many points (default: no bound)",
    )
    comp.add_argument(
        "--plan-only",
        action="store_true",
        help="with --target: print the plan and its Pareto front without building the model",
    )
    comp.add_argument("--format", choices=["table", "md", "json"], default="table")
    comp.add_argument(
        "--onnx",
        metavar="OUT.onnx",
        help="also export the compiled model to ONNX and time it against the original in onnxruntime",
    )
    comp.add_argument(
        "--runtime",
        metavar="R",
        help="measure the compiled model in runtime R and the original in R's float flavour, side by side: "
        "torch, torch-bf16, torch-int8, onnxruntime, onnxruntime-int8, openvino, openvino-int8, or auto "
        "(every installed runtime; the fastest is marked). Default: torch eager only",
    )
    comp.add_argument(
        "--profile",
        metavar="FILE.json",
        help="the device profile the --runtime rows' predicted latency comes from (default: this machine's "
        "cached profile, made on first use)",
    )
    comp.add_argument(
        "--openvino",
        metavar="OUT.xml",
        help="also write the compiled model as OpenVINO IR (OUT.xml and OUT.bin; int8 when the passes quantize)",
    )
    comp.add_argument(
        "--calib",
        metavar="SPEC",
        help="calibration data for passes that need it: random:N (N random batches shaped like the "
        "example inputs, a stand-in), a file written by torch.save (a tensor, an (X, y) pair or a list of "
        "batches), or a NumPy .npy/.npz file",
    )
    comp.add_argument(
        "--train",
        metavar="FILE.pt",
        help="training data for distill: a file written by torch.save, as for --calib; (inputs, labels) "
        "batches give accuracy, inputs alone agreement with the original",
    )
    comp.add_argument(
        "--eval",
        metavar="FILE.pt",
        help="evaluation data every pass, the pipeline and the --runtime comparison are scored on against the "
        "original: a file written by torch.save, as for --calib; (inputs, labels) batches add accuracy to "
        "top-1 agreement (default: the last tenth of the --calib batches, held out from the passes)",
    )
    comp.add_argument(
        "--warn-below",
        type=_agreement,
        default=DEFAULT_WARN_BELOW,
        metavar="AGREEMENT",
        help=f"warn when top-1 agreement with the original falls under this share (default {DEFAULT_WARN_BELOW})",
    )
    comp.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="go on, with a warning, when the model's outputs hold inf or nan (nothing can then be verified)",
    )
    comp.add_argument(
        "--html",
        metavar="OUT.html",
        help="also write one self-contained HTML page: totals, per-layer plots before/after, the runtime "
        "table, each pass's decisions, every node (needs the plot extra)",
    )
    comp.add_argument("-o", "--output", help="save the compiled model here (slimfx format; 'slimfx report' loads it)")
    comp.add_argument(
        "--repeats",
        type=int,
        default=20,
        help="timed runs for measured latency before/after (median; 0 skips timing; default 20)",
    )
    comp.add_argument(
        "--strict",
        action="store_true",
        help="fail on any warning (a target that cannot be reached, agreement under --warn-below, a slower "
        "runtime, ...): print the report, write no file, exit 1",
    )

    device = sub.add_parser(
        "profile-device",
        help="measure this machine for latency prediction: roofline parameters per runtime, written as JSON",
    )
    device.add_argument(
        "--runtime",
        action="append",
        choices=list(PREDICTED_RUNTIMES),
        help="a runtime to profile (repeat for several; default: every installed one of "
        f"{', '.join(PREDICTED_RUNTIMES)})",
    )
    device.add_argument("--threads", type=int, help="threads to measure with (default: torch's count)")
    device.add_argument(
        "-o", "--output", metavar="FILE.json", help="write the profile here (default: the user's cache folder)"
    )

    listing = sub.add_parser("passes", help="list the passes, or one pass's options with their values and defaults")
    listing.add_argument("name", nargs="?", help="a pass name, e.g. quantize")

    demo = sub.add_parser(
        "demo",
        help="train a small CNN on scikit-learn's digits, compile it to a latency target (planned pruning and "
        "int8, distillation, at most 1 point lost) and show accuracy and measured speed",
    )
    demo.add_argument(
        "--model",
        help="instead, show the pipeline (without distillation) on this MODEL at random init with random "
        "calibration data: agreement with the original, not accuracy",
    )
    demo.add_argument("--input-shape", help="example input shape for --model, e.g. 1,3,224,224")
    demo.add_argument("--trust-model-file", action="store_true", help="as for compile")
    demo.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default 0)")
    demo.add_argument("--repeats", type=int, default=20, help="timed runs per runtime (median; default 20)")
    demo.add_argument("--target", default=DEMO_TARGET, help=f"the trained demo's target (default {DEMO_TARGET})")
    demo.add_argument(
        "--runtime",
        help="the runtime the trained demo aims at (default onnxruntime-int8, torch-int8 without onnxruntime)",
    )
    return parser


def _concrete_arg(text: str) -> tuple[str, object]:
    """``--concrete-arg NAME=VALUE``: the name and the value as a Python literal."""
    import ast

    name, eq, raw = text.partition("=")
    if not eq or not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. return_loss=False), not {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(
            f"{text!r}: VALUE must be a Python literal (True, 3, 0.5, 'text', None); quote text as 'text'"
        ) from None
    return name.strip(), value


def _agreement(text: str) -> float:
    """``--warn-below``: a share between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a top-1 agreement between 0 and 1, e.g. 0.95, not {text!r}")
    return value


def _example_inputs(args: argparse.Namespace, default: tuple[int, ...] | None) -> tuple[torch.Tensor, ...]:
    if args.input_shape:
        shapes = parse_input_shapes(args.input_shape)
    elif default:
        shapes = [default]
    else:
        raise ShapeError(f"model {args.model!r} has no default input shape; pass --input-shape, e.g. 1,3,224,224")
    batch = getattr(args, "batch", None)
    if batch is not None:
        if batch < 1:
            raise ShapeError(f"--batch must be at least 1, got {batch}")
        shapes = [(batch, *s[1:]) if s else s for s in shapes]
    generator = torch.Generator().manual_seed(args.seed)
    return tuple(torch.randn(s, generator=generator) for s in shapes)


def _emit(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text)
        return
    from slimfx.files.atomic import atomic_write

    atomic_write(output, lambda f: f.write(text.encode()))
    print(f"wrote {output}", file=sys.stderr)


PREDICTED_RUNTIMES = ("torch", "torch-int8", "onnxruntime", "onnxruntime-int8")  # cost_model.latency.FUSION_RULES


def _add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runtime",
        choices=list(PREDICTED_RUNTIMES),
        help="add each node's predicted latency on this runtime and its share of time (a device profile is "
        "measured on first use and cached; the model's kernels are timed once and kept in it)",
    )
    parser.add_argument(
        "--profile", metavar="FILE.json", help="the device profile to predict from (from slimfx profile-device)"
    )
    parser.add_argument("--threads", type=int, help="threads to run and predict with (default: torch's count)")


def _apply_threads(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise OutputError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def cmd_profile_device(args: argparse.Namespace) -> None:
    from slimfx.backends.profiler import available_runtimes, profile_device
    from slimfx.cost_model.device import Machine, default_profile_path, library_versions, save_profile
    from slimfx.report.tables import render_profile

    if args.output:
        if not args.output.endswith(".json"):
            raise OutputError(f"-o {args.output}: a device profile is JSON; name the file *.json")
        check_writable(args.output)
    _apply_threads(args)
    runtimes = args.runtime or list(available_runtimes())
    threads = torch.get_num_threads()
    profile = profile_device(runtimes, threads, progress=_terminal_progress())
    path = args.output or default_profile_path(Machine.here(), library_versions(), threads)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_profile(profile, path)
    _clear_progress()
    sys.stdout.write(render_profile(profile))
    print(f"wrote {path}", file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> None:
    from slimfx import analyze
    from slimfx.files.model_spec import resolve_model
    from slimfx.report.graphviz import to_dot
    from slimfx.report.html import report_html, require_matplotlib
    from slimfx.report.tables import render_report

    if args.top is not None and args.top < 1:
        raise OutputError(f"--top must be at least 1, got {args.top}")
    if args.format == "dot" and (args.top is not None or args.by != "node"):
        raise OutputError("--format dot draws every node: --top and --by do not apply to it")
    for path in (args.output, args.html):
        if path:
            check_writable(path)
    if args.html:
        require_matplotlib()
    if args.profile and not args.runtime:
        raise OutputError("--profile gives the device profile for --runtime predictions: add --runtime R")
    _apply_threads(args)
    if args.runtime:
        from slimfx.backends.profiler import check_prediction_runtime

        check_prediction_runtime(args.runtime, args.profile)  # before loading anything
    torch.manual_seed(args.seed)  # random-init weights are the same on every run with the same seed
    loaded = resolve_model(args.model, trust=args.trust_model_file)
    inputs = _example_inputs(args, loaded.input_shape)
    report = analyze(
        loaded.module,
        inputs,
        name=loaded.name,
        leaf_modules=args.leaf_module,
        concrete_args=dict(args.concrete_arg) or None,
        capture_fallback=not args.no_fallback,
        layer_timing=LAYER_TIMING_RUNS if args.html else 0,
        runtime=args.runtime,
        profile=args.profile,
        progress=_terminal_progress(),
    )
    _clear_progress()
    text = to_dot(report) if args.format == "dot" else render_report(report, args.format, args.top, args.by)
    if args.html:
        _write_html(report_html(report), args.html)
    _emit(text, args.output)


def cmd_compile(args: argparse.Namespace) -> None:
    from slimfx import compile, plan_target
    from slimfx.backends.early_exit import EarlyExitModel
    from slimfx.backends.runtimes import choose_runtimes, get_runtime
    from slimfx.files.atomic import StagedOutputs, atomic_write
    from slimfx.files.calib_spec import calibration_batches
    from slimfx.files.model_spec import resolve_model
    from slimfx.passes.manager import PassManager, check_data
    from slimfx.passes.registry import resolve_passes
    from slimfx.report.html import compile_html, require_matplotlib
    from slimfx.report.tables import plan_text, render_compile
    from slimfx.target.request import check_target_request

    if args.plan_only and not args.target:
        raise OutputError("--plan-only prints the plan for a --target: add --target UNIT=VALUE")
    goal = check_target_request(args.target, args.passes, args.runtime, args.calib, args.max_drop)
    # a bad spec or order fails before loading anything, and so does a pass needing --calib or --train without it
    pipeline = PassManager(resolve_passes(args.passes or DEFAULT_PASSES)).passes
    check_data(pipeline, args.calib, args.train)
    quantized = any(p.quantizes for p in pipeline) if goal is None else get_runtime(args.runtime or "torch").runs_int8
    _check_outputs(args, exits=any(p.makes_early_exits for p in pipeline))
    if args.profile and not args.runtime:
        raise OutputError("--profile gives the device profile for --runtime predictions: add --runtime R")
    if args.runtime:
        choose_runtimes(args.runtime, quantized)  # an unknown, missing or mismatched runtime too
    if args.openvino:
        choose_runtimes(_openvino_runtime(quantized), quantized)
    for path in (args.output, args.onnx, args.openvino, args.html):
        if path:
            check_writable(path)
    if args.html:
        require_matplotlib()
    torch.manual_seed(args.seed)  # random-init weights are the same on every run with the same seed
    _join_process_group()  # under torchrun: distill trains with DDP, quantize calibrates on shards
    main_rank = parallel.is_main()
    loaded = resolve_model(args.model, trust=args.trust_model_file)
    inputs = _example_inputs(args, loaded.input_shape)
    calib = calibration_batches(args.calib, inputs, seed=args.seed + 1) if args.calib else None
    train = calibration_batches(args.train, inputs, seed=args.seed + 2, flag="--train") if args.train else None
    evaluation = calibration_batches(args.eval, inputs, seed=args.seed + 3, flag="--eval") if args.eval else None
    if args.plan_only:
        plan = plan_target(
            loaded.module,
            inputs,
            args.target,
            calib_data=calib,
            runtime=args.runtime,
            leaf_modules=args.leaf_module,
            concrete_args=dict(args.concrete_arg) or None,
            profile=args.profile,
            progress=_terminal_progress() if main_rank else None,
            seed=args.seed,
        )
        _clear_progress()
        if main_rank:
            sys.stdout.write(plan_text(plan) if args.format != "json" else plan.to_json())
        return
    result = compile(
        loaded.module,
        inputs,
        args.passes,
        seed=args.seed,
        name=loaded.name,
        leaf_modules=args.leaf_module,
        concrete_args=dict(args.concrete_arg) or None,
        latency_repeats=max(args.repeats, 0) if main_rank else 0,
        calib_data=calib,
        train_data=train,
        eval_data=evaluation,
        allow_non_finite=args.allow_non_finite,
        capture_fallback=not args.no_fallback,
        progress=_terminal_progress() if main_rank else None,
        runtime=args.runtime,
        layer_timing=LAYER_TIMING_RUNS if args.html and args.repeats > 0 and main_rank else 0,
        profile=args.profile,
        warn_below=args.warn_below,
        target=args.target,
        max_drop=args.max_drop,
    )
    if not main_rank:  # only rank 0 prints and writes files
        return
    _clear_progress()
    with StagedOutputs() as outputs:  # every output file, or none (an error or Ctrl-C removes them all)
        exit_parts = None
        if args.onnx and isinstance(result.module, EarlyExitModel):
            exit_parts = _stage_early_exit_onnx(result, args.onnx, outputs)
        elif args.onnx:
            staged = outputs.path(args.onnx)
            result.measure_onnx(loaded.module, staged, repeats=max(args.repeats, 1), named=args.onnx)
        if args.output:
            result.save(outputs.path(args.output))
        if args.openvino:
            result.save_runtime_artifact(_openvino_runtime(quantized), outputs.path(args.openvino, (".bin",)))
        if args.html:
            staged = outputs.path(args.html)
            atomic_write(staged, lambda f: f.write(compile_html(result.report).encode()))
        if args.strict and result.report.warnings():
            sys.stdout.write(render_compile(result.report, args.format))
            found = result.report.warnings()
            raise StrictFailure(
                f"--strict: {len(found)} warning(s), the first: {found[0]}; no file was written"
            )  # the staged outputs are removed
        outputs.commit()
    if args.html:
        print(f"wrote {args.html}", file=sys.stderr)
    sys.stdout.write(render_compile(result.report, args.format))
    if args.output:
        print(f"saved the compiled model to {args.output}", file=sys.stderr)
    if args.openvino:
        print(f"wrote OpenVINO IR {args.openvino} and {Path(args.openvino).with_suffix('.bin')}", file=sys.stderr)
    if exit_parts is not None:
        print(
            f"wrote the early-exit model as ONNX: the manifest {exit_parts.manifest} and its "
            f"{len(exit_parts.stages)} stages and {len(exit_parts.heads)} exit heads beside it "
            "(slimfx.OnnxEarlyExit runs them in onnxruntime)",
            file=sys.stderr,
        )


def _stage_early_exit_onnx(result: CompileResult, onnx_path: str, outputs: StagedOutputs) -> EarlyExitFiles:
    """Write an early-exit model's ONNX parts and manifest as staged outputs; their final names."""
    from slimfx.backends.early_exit_onnx import EarlyExitFiles, export_early_exit_onnx, part_suffixes

    heads = len(result.module.heads)
    final = EarlyExitFiles.beside(onnx_path, heads)
    staged = outputs.path(final.manifest, part_suffixes(heads))
    return export_early_exit_onnx(result.module, result.graph.example_inputs, EarlyExitFiles.at(staged, heads), final)


_OUTPUT_SUFFIXES = {"onnx": (".onnx",), "openvino": (".xml",), "html": (".html", ".htm")}
_FOREIGN_FOR_SLIMFX_FILE = {".onnx": "--onnx", ".xml": "--openvino", ".bin": "--openvino", ".html": "--html"}


def _check_outputs(args: argparse.Namespace, exits: bool) -> None:
    """Before any work: each output's suffix fits its format, no two outputs share a path, and
    early-exit models are not asked for a format that cannot hold them."""
    if args.output and Path(args.output).suffix in _FOREIGN_FOR_SLIMFX_FILE:
        flag = _FOREIGN_FOR_SLIMFX_FILE[Path(args.output).suffix]
        raise OutputError(
            f"-o {args.output}: -o writes slimfx's own model format (e.g. OUT.pt); for that format use {flag}"
        )
    for flag, suffixes in _OUTPUT_SUFFIXES.items():
        path = getattr(args, flag)
        if path and Path(path).suffix not in suffixes:
            raise OutputError(f"--{flag} {path}: the file name must end in {' or '.join(suffixes)}")
    paths = [(f, getattr(args, f)) for f in ("output", "onnx", "openvino", "html") if getattr(args, f)]
    if args.openvino:
        paths.append(("openvino (weights)", str(Path(args.openvino).with_suffix(".bin"))))
    seen: dict[Path, str] = {}
    for flag, path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            raise OutputError(f"--{flag} and --{seen[resolved]} both write {path}: give each output its own file")
        seen[resolved] = flag
    if exits and args.openvino:
        raise OutputError(
            "an early-exit model (add-exits) cannot be written as one OpenVINO model: --onnx OUT.onnx writes its "
            "stages and heads as ONNX parts with a manifest, -o saves it in slimfx's format"
        )


def _write_html(page: str, path: str) -> None:
    from slimfx.files.atomic import atomic_write

    atomic_write(path, lambda f: f.write(page.encode()))
    print(f"wrote {path}", file=sys.stderr)


def _openvino_runtime(quantized: bool) -> str:
    return "openvino-int8" if quantized else "openvino"


def _pass_names() -> list[str]:
    from slimfx.passes.registry import PASSES

    return sorted(PASSES)


def _version() -> str:
    from slimfx import __version__

    return __version__


def _join_process_group() -> None:
    """Under ``torchrun`` (WORLD_SIZE > 1 in the environment), join its process group: gloo on CPU."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _terminal_progress() -> Callable[[str], None] | None:
    """A one-line progress display on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        return None

    def show(message: str) -> None:
        sys.stderr.write("\r" + message[:110].ljust(110))
        sys.stderr.flush()

    return show


def _clear_progress() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r" + " " * 110 + "\r")


def cmd_demo(args: argparse.Namespace) -> None:
    if args.model is None:
        from slimfx.demo import run_demo

        run_demo(
            lambda text: sys.stdout.write(text),
            repeats=max(args.repeats, 1),
            target=args.target,
            runtime=args.runtime,
            progress=_terminal_progress(),
        )
        return
    if args.target != DEMO_TARGET or args.runtime is not None:
        raise InvalidArgumentError(
            "--target and --runtime aim the trained demo; with --model the demo runs a fixed pipeline in every "
            "installed runtime (for a target on your model: slimfx compile MODEL --target ... --runtime ...)"
        )
    _demo_on_model(args)


def _demo_on_model(args: argparse.Namespace) -> None:
    """The demo on a user's model at random init: where the cost goes, then the pipeline on
    random calibration data in every installed runtime (no labels: agreement, not accuracy)."""
    from slimfx import analyze, compile
    from slimfx.demo import UNTRAINED_PIPELINE as passes
    from slimfx.files.calib_spec import calibration_batches
    from slimfx.files.model_spec import resolve_model
    from slimfx.report.tables import render_compile, render_report

    torch.manual_seed(args.seed)
    loaded = resolve_model(args.model, trust=args.trust_model_file)
    inputs = _example_inputs(args, loaded.input_shape)
    print(f"== slimfx report {args.model} --top 10  (where the cost goes)\n")
    sys.stdout.write(render_report(analyze(loaded.module, inputs, name=loaded.name), "table", top=10))
    print(f"\n== slimfx compile {args.model} --passes {passes!r} --calib random:8 --runtime auto\n")
    result = compile(
        loaded.module,
        inputs,
        passes,
        name=loaded.name,
        calib_data=calibration_batches("random:8", inputs, seed=args.seed + 1),
        runtime="auto",
        latency_repeats=max(args.repeats, 1),
        progress=_terminal_progress(),
    )
    _clear_progress()
    sys.stdout.write(render_compile(result.report))


def cmd_passes(args: argparse.Namespace) -> None:
    from tabulate import tabulate

    from slimfx.passes.registry import PASSES, describe_options, pass_class

    if args.name is None:
        rows = [[name, cls.summary] for name, cls in sorted(PASSES.items())]
        sys.stdout.write(tabulate(rows, headers=["pass", "what it does"], tablefmt="simple") + "\n")
        sys.stdout.write(
            "\nslimfx passes NAME lists a pass's options; a spec is NAME:option=value,... (see --passes)\n"
        )
        return
    cls = pass_class(args.name)
    options = describe_options(cls)
    sys.stdout.write(f"{cls.name}: {cls.summary}\n\n")
    if not options:
        sys.stdout.write("no options\n")
        return
    rows = [[o.name, o.kind, o.default, o.help] for o in options]
    sys.stdout.write(tabulate(rows, headers=["option", "values", "default", "meaning"], tablefmt="simple") + "\n")
    example = f"{cls.name}:{options[0].name}={options[0].default if options[0].default != 'none' else '...'}"
    sys.stdout.write(f"\ne.g. --passes '{example}'\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; Ctrl-C anywhere, parsing included, is a clean interrupt (status 130)."""
    try:
        return _run_command(argv)
    except KeyboardInterrupt:
        print("slimfx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run_command(argv: Sequence[str] | None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchvision")
    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # usage errors (status 2) and --help (status 0)
        return int(stop.code or 0)
    command = {
        "report": cmd_report,
        "compile": cmd_compile,
        "demo": cmd_demo,
        "passes": cmd_passes,
        "profile-device": cmd_profile_device,
    }[args.command]
    try:
        command(args)
    except StrictFailure as exc:
        print(f"slimfx: {exc}", file=sys.stderr)
        return EXIT_STRICT
    except SlimfxError as exc:
        print(f"slimfx: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
