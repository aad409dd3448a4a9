"""A Keras-like `model.summary()`: one row per leaf layer with its output shape and parameters."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from dlkit.models.surface import DlkitModel


@dataclass
class SummaryRow:
    """One leaf layer: its dotted name, type, output shape (batch as None) and own parameter count."""

    name: str
    kind: str
    output_shape: tuple[int | None, ...] | None
    params: int


@dataclass
class ModelSummary:
    """The layer table of a model plus its total and trainable parameter counts."""

    rows: list[SummaryRow] = field(default_factory=list)
    params: int = 0
    trainable_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (shapes as lists)."""
        rows = [{**asdict(row), "output_shape": shape_list(row.output_shape)} for row in self.rows]
        return {"rows": rows, "params": self.params, "trainable_params": self.trainable_params}

    def to_text(self) -> str:
        """An aligned table with a header and a totals footer, like Keras' model.summary()."""
        header = ("Layer (type)", "Output shape", "Params")
        cells = [(f"{r.name} ({r.kind})", format_shape(r.output_shape), f"{r.params:,}") for r in self.rows]
        widths = [max(len(line[i]) for line in [header, *cells]) for i in range(3)]
        rule = "=" * (sum(widths) + 4)
        lines = [format_line(header, widths), rule, *(format_line(c, widths) for c in cells), rule]
        lines += [
            f"Total params: {self.params:,}",
            f"Trainable params: {self.trainable_params:,}",
            f"Non-trainable params: {self.params - self.trainable_params:,}",
        ]
        return "\n".join(lines)


def format_line(cells: tuple[str, str, str], widths: list[int]) -> str:
    """Name and shape left-aligned, parameter count right-aligned."""
    return f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]:>{widths[2]}}"


def format_shape(shape: tuple[int | None, ...] | None) -> str:
    """`(None, 32, 26, 26)`, or `?` when the layer returned no tensor."""
    return "?" if shape is None else "(" + ", ".join(str(s) for s in shape) + ")"


def shape_list(shape: tuple[int | None, ...] | None) -> list[int | None] | None:
    """A shape as a JSON list."""
    return None if shape is None else list(shape)


def output_shape(out: Any) -> tuple[int | None, ...] | None:
    """The shape of a layer's (first) output tensor with the batch dimension shown as None."""
    if isinstance(out, PackedSequence):  # packed data hides the batch: report it padded, (N, T, H)
        return (None, len(out.batch_sizes), out.data.shape[-1])
    if isinstance(out, torch.Tensor):
        return (None, *out.shape[1:])
    if isinstance(out, (tuple, list)) and out:
        return output_shape(out[0])
    return None


def summarize(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype | None = None) -> ModelSummary:
    """Run a dummy batch of one through `model` and tabulate its leaf layers in call order.

    `input_shape` excludes the batch; `dtype` defaults to the model's `input_dtype` (float32 if
    unset). Integer inputs are ones, so token models read a real (non-pad) id at every step.
    """
    if dtype is None:
        dtype = model.input_dtype if isinstance(model, DlkitModel) else torch.float32
    rows: dict[str, SummaryRow] = {}

    def record(name: str, module: nn.Module, out: Any) -> None:
        if name not in rows:  # a layer called twice keeps its first output shape
            params = sum(p.numel() for p in module.parameters())
            rows[name] = SummaryRow(name, type(module).__name__, output_shape(out), params)

    leaves = [(name, m) for name, m in model.named_modules() if name and not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: record(name, m, o)) for name, m in leaves]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dummy = (torch.ones if not dtype.is_floating_point else torch.zeros)((1, *input_shape), dtype=dtype, device=device)
    was_training = model.training
    try:
        model.eval()  # no batch-norm statistics updated, no dropout
        with torch.no_grad():
            model(dummy)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelSummary(list(rows.values()), params, trainable)
