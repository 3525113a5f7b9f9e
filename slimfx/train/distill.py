"""Recovery by distillation: the compressed model (student) learns from the original (teacher).

Methods, each a loss over a batch:

- **KD** (Hinton et al.): ``alpha * CE(labels) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))``;
  without labels, pure soft-target KD, so unlabeled data works.
- **FitNet hints** (Romero et al.), added to KD: MSE between student and teacher features at
  matched nodes (relative to the teacher feature's mean square), through a learned 1x1 conv
  where the widths differ. Points are found
  automatically (nodes that dominate the output in the teacher and keep their name in the
  student: block outputs) or named by module path. The regressors are dropped after training.
- **Apprentice** (Mishra & Marr): KD on a quantized student, whose forward is fake-quantized
  and whose rounding passes gradients straight through; BatchNorms stay frozen.
- **Joint** (ProjectionNet): ``l1 * CE(teacher) + l2 * CE(student) + l3 * KD``, the teacher
  trained too when asked; needs labels.
- **Mutual** (deep mutual learning): the student and a trainable copy of the original teach
  each other, each with ``CE + KL(other || self)``; needs labels.

All run on slimfx's one loop (``train.loop.fit``); the best epoch by held-out loss is kept.
"""

from __future__ import annotations

import copy
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from slimfx import parallel
from slimfx.data import Batch
from slimfx.errors import DataError, InvalidArgumentError
from slimfx.ir import ops
from slimfx.ir.dominators import output_dominators
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import with_outputs
from slimfx.quant.layers import QuantizedLayer
from slimfx.train.loop import fit

MAX_AUTO_HINTS = 4


class Method(enum.StrEnum):
    KD = "kd"
    JOINT = "joint"
    MUTUAL = "mutual"


# -- losses (pure) -------------------------------------------------------------------------------
def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch."""
    target = F.softmax(teacher / temperature, dim=-1)
    return F.kl_div(F.log_softmax(student / temperature, dim=-1), target, reduction="batchmean") * temperature**2


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Hinton's KD loss; pure soft-target KD when there are no labels."""
    soft = soft_target_loss(student, teacher.detach(), temperature)
    if labels is None:
        return soft
    return alpha * F.cross_entropy(student, labels) + (1 - alpha) * soft


def hint_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNet's feature MSE, relative to the teacher feature's mean square, so that a hint weighs
    the same whatever the scale of the features at its point."""
    target = teacher.detach()
    return F.mse_loss(student, target) / target.pow(2).mean().clamp_min(1e-12)


def joint_loss(
    teacher: torch.Tensor,
    student: torch.Tensor,
    labels: torch.Tensor,
    *,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    temperature: float = 4.0,
) -> torch.Tensor:
    """ProjectionNet's ``l1 * CE(teacher) + l2 * CE(student) + l3 * soft-target(student | teacher)``."""
    l1, l2, l3 = weights
    return (
        l1 * F.cross_entropy(teacher, labels)
        + l2 * F.cross_entropy(student, labels)
        + l3 * soft_target_loss(student, teacher.detach(), temperature)
    )


def mutual_loss(logits: Sequence[torch.Tensor], labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Deep mutual learning over peers: each ``CE + mean over the others of KL(other || self)``."""
    total = logits[0].new_zeros(())
    for i, mine in enumerate(logits):
        others = [soft_target_loss(mine, other.detach(), temperature) for j, other in enumerate(logits) if j != i]
        total = total + F.cross_entropy(mine, labels) + sum(others) / max(len(others), 1)
    return total


# -- hint points -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HintPoint:
    """A feature the student matches: node names in both graphs and their channel counts."""

    student: str
    teacher: str
    student_channels: int
    teacher_channels: int
    module: str | None = None  # the module path it was named by, if any

    def regressor(self, rank: int) -> nn.Module:
        """Identity where the widths match, else a learned 1x1 conv (student -> teacher width)."""
        if self.student_channels == self.teacher_channels:
            return nn.Identity()
        conv = nn.Conv2d if rank == 4 else nn.Conv1d if rank == 3 else nn.Conv3d
        return conv(self.student_channels, self.teacher_channels, 1, bias=False)


def hint_points(
    student: Graph, teacher: Graph, named: Sequence[str] = (), limit: int = MAX_AUTO_HINTS
) -> list[HintPoint]:
    """Where the student matches the teacher's features.

    With ``named`` module paths: the last node inside each module (an error names a path the
    teacher has no node for, or whose node the student lost). Otherwise: the teacher's
    feature maps (rank 3 or more) that dominate its output and whose node the student still
    has with the same batch and spatial shape; of those, the last at each resolution (the
    end of each stage), at most ``limit`` of them spread evenly, the deepest always included.
    """
    student_nodes = {n.name: n for n in student.nodes()}
    if named:
        points = []
        for path in named:
            node = _last_node_in(teacher, path)
            if node is None:
                raise InvalidArgumentError(f"distill: hint point '{path}' names no module of the model")
            point = _point(student, teacher, student_nodes.get(node.name), node, path)
            if point is None:
                raise InvalidArgumentError(
                    f"distill: hint point '{path}' (node '{node.name}') is gone from the compiled model or "
                    "changed shape there; name another module"
                )
            points.append(point)
        return points
    stage_ends: dict[tuple[int, ...], HintPoint] = {}  # the last block output at each resolution
    for node in output_dominators(teacher):
        point = _point(student, teacher, student_nodes.get(node.name), node)
        if point is not None and not ops.ADAPTIVE_POOLS.matches(node, teacher.submodule):
            stage_ends.pop(teacher.info(node).out_shape[2:], None)
            stage_ends[teacher.info(node).out_shape[2:]] = point
    candidates = list(stage_ends.values())
    if len(candidates) <= limit:
        return candidates
    step = len(candidates) / limit
    return [candidates[min(len(candidates) - 1, round((i + 1) * step) - 1)] for i in range(limit)]


def _point(
    student: Graph, teacher: Graph, mine: fx.Node | None, theirs: fx.Node, module: str | None = None
) -> HintPoint | None:
    if mine is None or theirs.op in ("placeholder", "output", "get_attr"):
        return None
    a, b = student.info(mine).out_shape, teacher.info(theirs).out_shape
    if a is None or b is None or len(a) < 3 or len(a) != len(b) or len(a) > 5:
        return None
    if a[0] != b[0] or a[2:] != b[2:]:
        return None
    return HintPoint(mine.name, theirs.name, a[1], b[1], module)


def _last_node_in(graph: Graph, path: str) -> fx.Node | None:
    """The last node that runs inside module ``path`` (by call target or fx's module stack)."""
    inside = None
    for node in graph.nodes():
        target = str(node.target) if node.op == "call_module" else ""
        stack = [str(p) for p, _ in node.meta.get("nn_module_stack", {}).values()]
        if target == path or target.startswith(path + ".") or path in stack:
            inside = node
    return inside


# -- training ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fidelity:
    """Top-1 agreement with the teacher, and accuracy when the batches have labels."""

    agreement: float
    accuracy: float | None
    rows: int


@dataclass(frozen=True)
class DistillOutcome:
    """What a distillation run did: losses per epoch (train and held-out), the epoch kept,
    the hint points, and the time it took."""

    method: Method
    apprentice: bool
    train_losses: tuple[float, ...]
    held_out_losses: tuple[float, ...]
    best_epoch: int
    hints: tuple[HintPoint, ...] = field(default_factory=tuple)
    seconds: float = 0.0


def fidelity(module: nn.Module, teacher: nn.Module, batches: Sequence[Batch]) -> Fidelity:
    """How often ``module`` picks the teacher's class (and the label's, when there are labels)."""
    agree = correct = rows = 0
    labelled = all(b.labels is not None for b in batches)
    with torch.no_grad():
        for batch in batches:
            mine, theirs = _logits(module(*batch.inputs)).argmax(-1), _logits(teacher(*batch.inputs)).argmax(-1)
            agree += int((mine == theirs).sum())
            if labelled:
                correct += int((mine == batch.labels).sum())
            rows += len(mine)
    return Fidelity(agree / max(rows, 1), correct / max(rows, 1) if labelled else None, rows)


def distill(
    student: Graph,
    teacher: Graph,
    train: Sequence[Batch],
    held_out: Sequence[Batch] = (),
    *,
    method: Method = Method.KD,
    epochs: int = 3,
    lr: float = 1e-3,
    temperature: float = 4.0,
    alpha: float = 0.5,
    hints: Sequence[str] | None = (),
    hint_weight: float = 0.05,
    joint_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    train_teacher: bool = False,
    progress: Callable[[str], None] | None = None,
) -> DistillOutcome:
    """Train ``student`` (its module, in place) from ``teacher`` on ``train`` batches.

    ``hints``: ``None`` for no hints, ``()`` for automatic points, or module paths (KD only).
    After each epoch the loss on ``held_out`` (without hint terms; the train loss when there is
    no held-out data) decides the epoch whose weights are kept; the weights before training
    compete as epoch 0, so the held-out loss never ends higher than it began. The teacher is
    left unchanged unless ``train_teacher`` (joint) or ``method`` is mutual, which train a copy of it.
    """
    _check(train, method, epochs, temperature, alpha)
    _check_shards(train, student.fixed_shapes)
    start = time.perf_counter()
    points = tuple(hint_points(student, teacher, hints)) if method is Method.KD and hints is not None else ()
    peer = copy.deepcopy(teacher.module) if method is Method.MUTUAL or train_teacher else teacher.module
    peer.requires_grad_(peer is not teacher.module)
    regressors = nn.ModuleList(p.regressor(len(student.info(student.node(p.student)).out_shape or ())) for p in points)
    trainee = _Trainee(
        with_outputs(student.module, [p.student for p in points], "distill"),
        with_outputs(peer, [p.teacher for p in points], "distill"),
        regressors,
        _Settings(method, temperature, alpha, hint_weight, joint_weights, trains_peer=peer is not teacher.module),
    )
    # several processes: DDP averages the gradients, each rank training on its share of every batch
    runner = nn.parallel.DistributedDataParallel(trainee) if parallel.is_distributed() else trainee
    apprentice = _has_quantized_layers(student.module)
    frozen = [t.path for t in student.taken_layers]
    held_out_losses: list[float] = []

    def held_out_loss() -> float:
        """The loss without hint terms on all held-out batches (every rank on all of them: the
        same figure, so the same epoch is kept everywhere)."""
        _set_mode(student.module, peer, False, apprentice, frozen)
        with torch.no_grad():
            value = sum(float(trainee(b, training=False)) for b in held_out) / len(held_out)
        _set_mode(student.module, peer, True, apprentice, frozen)
        return value

    # the weights before training compete too (epoch 0): distillation never hands back worse
    start_loss = held_out_loss() if held_out else float("inf")
    best = {"epoch": -1, "loss": start_loss, "state": copy.deepcopy(student.module.state_dict())}

    def after_epoch(epoch: int, train_loss: float) -> None:
        value = held_out_loss() if held_out else float(parallel.all_sum([train_loss])[0]) / parallel.world()[1]
        held_out_losses.append(value)
        if value < best["loss"]:
            best.update(epoch=epoch, loss=value, state=copy.deepcopy(student.module.state_dict()))

    label = f"distill ({'apprentice' if apprentice and method is Method.KD else method})"
    _set_mode(student.module, peer, True, apprentice, frozen)
    try:
        train_losses = fit(
            [p for p in trainee.parameters() if p.requires_grad],
            list(train),
            lambda batch: runner(_my_rows(batch)),
            epochs=epochs,
            lr=lr,
            label=label,
            progress=progress,
            after_epoch=after_epoch,
            shuffle=True,
        )
    finally:
        _set_mode(student.module, peer, False, apprentice, frozen)
        teacher.module.eval()
    student.module.load_state_dict(best["state"])
    return DistillOutcome(
        method,
        apprentice,
        tuple(train_losses),
        tuple(held_out_losses),
        int(best["epoch"]) + 1,
        points,
        time.perf_counter() - start,
    )


@dataclass(frozen=True)
class _Settings:
    method: Method
    temperature: float
    alpha: float
    hint_weight: float
    joint_weights: tuple[float, float, float]
    trains_peer: bool


class _Trainee(nn.Module):
    """The student, the teacher (or trainable peer) and the hint regressors as one module whose
    forward is the loss of a batch: what DistributedDataParallel wraps."""

    def __init__(self, student: nn.Module, teacher: nn.Module, regressors: nn.ModuleList, settings: _Settings):
        super().__init__()
        self.student, self.teacher, self.regressors, self.settings = student, teacher, regressors, settings

    def forward(self, batch: Batch, training: bool = True) -> torch.Tensor:
        """The batch's loss; held-out evaluation (``training=False``) leaves the hint terms out."""
        s = self.settings
        *features, logits = self.student(*batch.inputs)
        with torch.set_grad_enabled(training and s.trains_peer):
            *targets, teacher_logits = self.teacher(*batch.inputs)
        logits, teacher_logits = _logits(logits), _logits(teacher_logits)
        if s.method is Method.JOINT:
            return joint_loss(teacher_logits, logits, batch.labels, weights=s.joint_weights, temperature=s.temperature)
        if s.method is Method.MUTUAL:
            return mutual_loss([logits, teacher_logits], batch.labels)
        value = kd_loss(logits, teacher_logits, batch.labels, temperature=s.temperature, alpha=s.alpha)
        if not training:
            return value
        for regressor, feature, target in zip(self.regressors, features, targets):
            value = value + s.hint_weight * hint_loss(regressor(feature), target)
        return value


def _check_shards(train: Sequence[Batch], fixed_shapes: bool) -> None:
    """Under torch.distributed each rank trains on an equal share of every batch's rows: the
    same check on every rank (the data is the same), so all fail together or none."""
    size = parallel.world()[1]
    if size > 1 and fixed_shapes:
        raise DataError(
            f"distill on {size} processes splits every batch's rows, but this model was traced at fixed shapes "
            "and runs on its example's batch size only: run it in one process"
        )
    uneven = [i for i, b in enumerate(train) if b.rows % size]
    if size > 1 and uneven:
        raise DataError(
            f"distill on {size} processes splits every batch's rows evenly: batch {uneven[0]} has "
            f"{train[uneven[0]].rows} rows; give batches whose row count is a multiple of {size}"
        )


def _my_rows(batch: Batch) -> Batch:
    """This rank's share of the batch's rows (all of them in a single process)."""
    labels = None if batch.labels is None else parallel.shard_rows(batch.labels)
    return Batch(tuple(parallel.shard_rows(t) for t in batch.inputs), labels)


def _check(train: Sequence[Batch], method: Method, epochs: int, temperature: float, alpha: float) -> None:
    if epochs < 1:
        raise InvalidArgumentError(f"distill: epochs must be at least 1, got {epochs}")
    if temperature <= 0:
        raise InvalidArgumentError(f"distill: temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise InvalidArgumentError(f"distill: alpha must be in [0, 1], got {alpha}")
    if not train:
        raise DataError("distill: the training data holds no batches")
    if method in (Method.JOINT, Method.MUTUAL) and any(b.labels is None for b in train):
        raise DataError(f"distill: method={method} trains from labels; give (inputs, labels) batches")


def _logits(output: object) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        what = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise InvalidArgumentError(
            f"distill needs a model whose output is one (batch, classes) tensor of class scores; it returns {what}"
        )
    return output


def _set_mode(
    student: nn.Module, peer: nn.Module, training: bool, freeze_batchnorm: bool, frozen: Sequence[str] = ()
) -> None:
    student.train(training)
    for path in frozen:  # norms that were functional with fixed statistics stay fixed
        module = student.get_submodule(path) if _has_submodule(student, path) else None
        if module is not None:
            module.eval()
    peer.train(training and any(p.requires_grad for p in peer.parameters()))  # a frozen teacher stays in eval
    if freeze_batchnorm:  # Apprentice: the quantized graph's statistics stay as calibrated
        for m in student.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _has_quantized_layers(module: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLayer) for m in module.modules())
