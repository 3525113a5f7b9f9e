"""distill: win back what earlier passes cost, by training the compiled graph from the original.

The teacher is the model as it was before the pipeline (the manager keeps a copy); the data
is the training data (``train_data``, CLI ``--train``), labels used when present. After a
structural pass it is KD (with FitNet hints, found automatically); after ``quantize`` it is
Apprentice (KD through the fake-quantized forward). The last tenth of the batches is held
out: it picks the epoch that is kept and shows accuracy (with labels) or agreement with the
teacher before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slimfx.data import Batch
from slimfx.details import Details
from slimfx.errors import PassSpecError
from slimfx.ir.graph import Graph
from slimfx.passes.base import Action, DataNeed, Decision, Pass, PassContext, PassResult
from slimfx.passes.registry import register
from slimfx.train.distill import DistillOutcome, Fidelity, Method, distill, fidelity

HELD_OUT_SHARE = 0.1


@dataclass(frozen=True)
class DistillDetails(Details):
    """A distillation run: losses per epoch, the epoch kept, the hint points, held-out
    fidelity before and after (accuracy with labels, agreement with the teacher always)."""

    method: str
    apprentice: bool
    train_losses: tuple[float, ...]
    held_out_losses: tuple[float, ...]
    best_epoch: int
    hints: tuple[str, ...]
    held_out_rows: int
    agreement_before: float
    agreement_after: float
    accuracy_before: float | None
    accuracy_after: float | None
    teacher_accuracy: float | None
    seconds: float

    def summary_lines(self) -> tuple[str, ...]:
        epochs = ", ".join(f"{t:.4f}/{h:.4f}" for t, h in zip(self.train_losses, self.held_out_losses))
        kept = f"kept epoch {self.best_epoch}" if self.best_epoch else "kept the starting weights (epoch 0)"
        lines = [f"loss per epoch (train/held-out): {epochs}; {kept}"]
        if self.hints:
            lines.append("hint points: " + ", ".join(self.hints))
        return tuple(lines)


@register
@dataclass(frozen=True)
class Distill(Pass):
    """Train the compiled graph from the model before the pipeline.

    ``method=kd`` (default): ``alpha * CE + (1 - alpha) * T^2 * KL`` at ``temperature`` (pure
    soft targets without labels), plus FitNet hints weighted ``hint-weight`` at ``hints``
    (``auto``: block outputs found in both graphs; ``none``; or module paths). After quantize
    it is Apprentice. ``method=joint`` (ProjectionNet; ``train-teacher=true`` trains the
    teacher too) and ``method=mutual`` (the student and a copy of the original teach each
    other) train from labels. The epoch with the lowest held-out loss is kept.
    """

    name = "distill"
    exact = False
    uses_teacher = True
    summary = "recover accuracy by distillation from the original model (KD + hints; Apprentice after quantize)"
    option_help = {
        "epochs": "training epochs (the best epoch by held-out loss is kept, the starting weights included)",
        "lr": "learning rate (Adam)",
        "temperature": "softening T of both models' outputs in the KL term",
        "alpha": "weight of cross-entropy on labels; 1 - alpha goes to the soft targets",
        "hints": "FitNet hint points: auto (stage ends), none, or node names",
        "hint_weight": "weight of the relative-MSE hint loss",
        "method": "kd (KD + hints; Apprentice after quantize), joint (ProjectionNet) or mutual (deep mutual learning)",
        "train_teacher": "with method=joint: train the teacher too",
    }

    epochs: int = 3
    lr: float = 1e-3
    temperature: float = 4.0
    alpha: float = 0.5
    hints: tuple[str, ...] = ("auto",)
    hint_weight: float = 0.05
    method: Literal["kd", "joint", "mutual"] = "kd"
    train_teacher: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise self.invalid("epochs", self.epochs, "an integer >= 1")
        if self.lr <= 0:
            raise self.invalid("lr", self.lr, "a learning rate > 0")
        if self.temperature <= 0:
            raise self.invalid("temperature", self.temperature, "a number > 0")
        if not 0 <= self.alpha <= 1:
            raise self.invalid("alpha", self.alpha, "a number in [0, 1]")
        if self.hint_weight < 0:
            raise self.invalid("hint-weight", self.hint_weight, "a number >= 0")

    def data_need(self) -> DataNeed:
        return DataNeed.TRAINING if self.method == "kd" else DataNeed.TRAINING_LABELLED

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        batches = ctx.train_batches(self.spec())
        teacher = ctx.teacher
        if teacher is None:
            raise PassSpecError("distill runs under the pass manager, which hands it the original graph as teacher")
        train, held_out = _split(batches)
        measured_on = held_out or train
        before = fidelity(graph.module, teacher.module, measured_on)
        hints = None if self.hints in (("none",), ()) else (() if self.hints == ("auto",) else self.hints)
        ctx.report_progress(f"distill: {self.method} for {self.epochs} epochs on {len(train)} batches")
        outcome = distill(
            graph,
            teacher,
            train,
            held_out,
            method=Method(self.method),
            epochs=self.epochs,
            lr=self.lr,
            temperature=self.temperature,
            alpha=self.alpha,
            hints=hints,
            hint_weight=self.hint_weight,
            train_teacher=self.train_teacher,
            progress=ctx.progress,
        )
        after = fidelity(graph.module, teacher.module, measured_on)
        teacher_accuracy = fidelity(teacher.module, teacher.module, measured_on).accuracy
        graph.invalidate()  # the weights changed: measured analyses are stale
        decision = self._decision(outcome, before, after, teacher_accuracy, held_out)
        warnings = (
            ()
            if held_out
            else ("distill: one batch of training data, so nothing was held out: the figures are on the training data",)
        )
        return PassResult(changed=True, decisions=(decision,), warnings=warnings)

    def _decision(
        self,
        outcome: DistillOutcome,
        before: Fidelity,
        after: Fidelity,
        teacher_accuracy: float | None,
        held_out: list[Batch],
    ) -> Decision:
        what = (
            "apprentice (KD on the quantized graph)"
            if outcome.apprentice and outcome.method is Method.KD
            else str(outcome.method)
        )
        hints = f" with {len(outcome.hints)} hint points" if outcome.hints else ""
        where = "held-out" if held_out else "training"
        if before.accuracy is not None:
            change = f"{where} accuracy {before.accuracy:.1%} -> {after.accuracy:.1%} (teacher {teacher_accuracy:.1%})"
        else:
            change = f"{where} agreement with the teacher {before.agreement:.1%} -> {after.agreement:.1%}"
        kept = (
            f"kept epoch {outcome.best_epoch} (lowest {where} loss)"
            if outcome.best_epoch
            else f"kept the weights it started from (no epoch lowered the {where} loss)"
        )
        reason = f"{what}{hints}, {self.epochs} epochs in {outcome.seconds:.1f} s: {change}; {kept}"
        details = DistillDetails(
            str(outcome.method),
            outcome.apprentice,
            outcome.train_losses,
            outcome.held_out_losses,
            outcome.best_epoch,
            tuple(f"{p.student} ({p.student_channels} -> {p.teacher_channels} channels)" for p in outcome.hints),
            after.rows,
            before.agreement,
            after.agreement,
            before.accuracy,
            after.accuracy,
            teacher_accuracy,
            outcome.seconds,
        )
        return Decision("model", Action.TRAINED, reason, details=details)


def _split(batches: list[Batch]) -> tuple[list[Batch], list[Batch]]:
    """Training and held-out batches: the last tenth held out (at least one, when there are two or more)."""
    if len(batches) < 2:
        return batches, []
    held = max(1, round(HELD_OUT_SHARE * len(batches)))
    return batches[:-held], batches[-held:]
