"""`model.onnx` beside a run's weights: exported, checked against PyTorch, recorded in bundle.json.

The TorchScript exporter (`torch.onnx.export(dynamo=False)`) is used, not the dynamo one. On torch
2.13 both export every family once the two data-dependent forwards are rewritten (below), but the
dynamo exporter took 3-11 s per small model against 0.1-0.4 s (seed CNN, ResNet-20, MobileNetV2,
a tiny DistilBERT), and it specialised the LSTM's batch axis; tracing gives dynamic axes exactly
where they are named. It is deprecated upstream: the dynamo path is the move once it is as quick.

Two families decide shapes from values, which a trace would freeze; they export an equivalent forward:
- the LSTM over token ids cuts the columns that are padding in every row: a forward-only layer's
  output at step t reads steps <= t only, so the full width gives the same logits; a bidirectional
  layer runs its backward weights over each row's reversed real tokens instead of a packed sequence.
- DistilBERT cuts the same columns; masked columns get no attention, so the full width is the same.
And the exporter refuses an adaptive average pool whose output does not divide its input (VGG16 at
150x150: 4x4 -> 7x7); at a fixed image size that pool is a fixed linear map, exported as two matmuls.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dlkit.errors import DataError, DlkitError
from dlkit.files import write_atomic_path
from dlkit.models.distilbert import TextTransformer
from dlkit.models.ensemble import Ensemble
from dlkit.models.lstm import RecurrentTrunk
from dlkit.models.surface import Classifier
from dlkit.rundir import RunDir

ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 17  # LSTM/GRU, LayerNorm and every op the families use; read by any onnxruntime >= 1.14
TOLERANCE = 1e-4  # largest absolute difference on logits that export accepts (measured: <= 1e-5, see tests)
SAMPLE = 256  # test inputs the parity check runs (at batch 1 and at this size)


class ExportError(DlkitError):
    """A model cannot be exported, or its export does not compute what PyTorch computes."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_onnx` wrote and how closely it matches PyTorch."""

    path: Path
    opset: int
    max_abs_diff: float
    checked_on: str
    seconds: float


def session(path: Path | str, threads: int | None = None):
    """An ONNX Runtime CPU session: every graph optimisation, `threads` intra-op threads (default: its own),
    which sleep between runs instead of spinning: a server calls the model in bursts, and a spinning
    thread takes a core from the event loop and the clients in between (on 2 shared cores, dlkit serve
    answered the breast-cancer LSTM 1.3-1.5x faster at concurrency 32 without spinning)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---- forwards a trace can follow --------------------------------------------------------------


def _left_align_full(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lstm.left_align without the cut: real ids moved to the front of each row, the width kept."""
    real = ids != 0
    lengths = real.sum(1)
    pos = torch.where(real, real.long().cumsum(1) - 1, (~real).long().cumsum(1) - 1 + lengths.unsqueeze(1))
    return torch.zeros_like(ids).scatter(1, pos, ids), lengths.clamp(min=1)


def _reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's first `length` steps in reverse order (the rest kept): its own inverse."""
    steps = torch.ones_like(x[:, :, 0], dtype=torch.long).cumsum(1) - 1
    last = lengths.unsqueeze(1) - 1
    idx = torch.where(steps <= last, last - steps, steps)
    return x.gather(1, idx.unsqueeze(2).expand_as(x))


def _at(out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """out[n, lengths[n] - 1] for each row, by gather (no data-dependent indexing)."""
    idx = (lengths - 1).view(-1, 1, 1).expand(-1, 1, out.shape[2])
    return out.gather(1, idx).squeeze(1)


class _OneWay(nn.Module):
    """A bidirectional layer's two directions as two forward-only layers of the same weights."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        state = rnn.state_dict()
        self.ahead, self.back = (type(rnn)(rnn.input_size, rnn.hidden_size, batch_first=True) for _ in range(2))
        self.ahead.load_state_dict({k: v for k, v in state.items() if not k.endswith("_reverse")})
        self.back.load_state_dict({k.removesuffix("_reverse"): v for k, v in state.items() if k.endswith("_reverse")})

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ahead, _ = self.ahead(x)
        back, _ = self.back(_reverse_within(x, lengths))
        out = torch.cat([ahead, _reverse_within(back, lengths)], dim=2)
        return out, torch.cat([_at(ahead, lengths), _at(back, lengths)], dim=1)


class _TracedRecurrent(nn.Module):
    """RecurrentTrunk's eval forward with no shape taken from values or from Python's len()."""

    def __init__(self, trunk: RecurrentTrunk) -> None:
        super().__init__()
        self.trunk = trunk
        self.layers = nn.ModuleList(_OneWay(r) if r.bidirectional and trunk.embed is not None else r
                                    for r in trunk.rnns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.trunk
        if trunk.embed is None:
            x = x.reshape(x.shape[0], trunk.steps, -1)
            for rnn in self.layers:
                x, hidden = rnn(x)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            return torch.cat(list(hidden), dim=-1)
        ids, lengths = _left_align_full(x)
        x = trunk.embed(ids)
        for rnn in self.layers:
            if isinstance(rnn, _OneWay):
                x, hidden = rnn(x, lengths)
            else:
                x, _ = rnn(x)
                hidden = _at(x, lengths)
        return hidden


class _TracedTransformer(nn.Module):
    """TextTransformer's forward over the whole width (the padding masked, not cut)."""

    def __init__(self, model: TextTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model(input_ids=ids, attention_mask=ids != self.model.pad_id).logits


def _pool_matrix(out: int, size: int) -> torch.Tensor:
    """(out, size): row i averages input cells floor(i*size/out) .. ceil((i+1)*size/out) - 1, as torch does."""
    m = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class _PoolAsMatmul(nn.Module):
    """AdaptiveAvgPool2d for one input size: rows @ x @ cols."""

    def __init__(self, out_hw: tuple[int, int], in_hw: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", _pool_matrix(out_hw[0], in_hw[0]))
        self.register_buffer("cols", _pool_matrix(out_hw[1], in_hw[1]).T.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows @ x @ self.cols


@contextmanager
def _pools_as_matmul(model: nn.Module, example: torch.Tensor) -> Iterator[None]:
    """Swap, for the export only, each adaptive average pool the exporter refuses for a `_PoolAsMatmul`."""
    sizes: dict[str, tuple[int, int]] = {}
    pools = {name: m for name, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)}
    hooks = [m.register_forward_hook(lambda m, inp, out, name=name: sizes.__setitem__(name, tuple(inp[0].shape[-2:])))
             for name, m in pools.items()]
    try:
        if pools:
            with torch.no_grad():
                model(example)
    finally:
        for hook in hooks:
            hook.remove()
    swapped = {}
    for name, in_hw in sizes.items():
        out = pools[name].output_size
        out_hw = tuple(i if o is None else o for o, i in zip(out if isinstance(out, tuple) else (out, out), in_hw))
        if any(i % o for o, i in zip(out_hw, in_hw)):
            parent, _, child = name.rpartition(".")
            swapped[name] = pools[name]
            setattr(model.get_submodule(parent), child, _PoolAsMatmul(out_hw, in_hw))
    try:
        yield
    finally:
        for name, pool in swapped.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, pool)


def traceable(model: nn.Module) -> nn.Module:
    """`model`, or an equivalent module whose forward a trace follows for any batch size and length."""
    if isinstance(model, Ensemble):
        return model.mapped(traceable)
    if isinstance(model, TextTransformer):
        return _TracedTransformer(model)
    if isinstance(model, Classifier) and isinstance(model.features, RecurrentTrunk):
        return nn.Sequential(_TracedRecurrent(model.features), model.head)
    return model


# ---- export and check -------------------------------------------------------------------------


def max_abs_diff(model: nn.Module, path: Path | str, inputs: torch.Tensor) -> float:
    """The largest |ONNX Runtime - PyTorch| over `inputs`, run one at a time and as one batch."""
    sess = session(path)
    worst = 0.0
    with torch.no_grad():
        for batch in (inputs[:1], inputs):
            ours = sess.run(None, {"input": batch.numpy()})[0]
            theirs = model(batch).float().numpy()
            if ours.shape != theirs.shape:
                raise ExportError(f"the ONNX model gives shape {list(ours.shape)}, PyTorch {list(theirs.shape)}")
            worst = max(worst, float(np.abs(ours.astype(np.float64) - theirs).max()))
    return worst


def export_model(model: nn.Module, path: Path | str, inputs: torch.Tensor, *, opset: int = DEFAULT_OPSET,
                 tolerance: float = TOLERANCE) -> float:
    """Write `model` (eval mode) to `path` as ONNX, input "input" (dynamic batch, and length for token
    ids) and output "logits", and return its largest difference from PyTorch on `inputs`; over
    `tolerance` (or not exportable) is an ExportError and leaves no file."""
    model = model.eval()
    tokens = not inputs.dtype.is_floating_point
    axes = {"input": {0: "batch", **({1: "length"} if tokens else {})}, "logits": {0: "batch"}}
    example = inputs[:2] if len(inputs) >= 2 else inputs.repeat(2, *([1] * (inputs.dim() - 1)))
    diff: list[float] = []

    def produce(tmp: Path) -> None:
        try:
            with warnings.catch_warnings(), torch.no_grad(), _pools_as_matmul(model, example):
                warnings.simplefilter("ignore")  # the tracer's notes and the exporter's deprecation notice
                # eval before export: the exporter restores the wrapper's mode afterwards, and a new
                # wrapper is in training mode, which would switch the model's dropout back on
                torch.onnx.export(traceable(model).eval(), (example,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["logits"], dynamic_axes=axes)
        except Exception as exc:  # the exporter raises many types; each is one line for the user
            raise ExportError(f"{type(model).__name__} cannot be exported to ONNX (opset {opset}): "
                              f"{' '.join(str(exc).split())[:300]}") from None
        diff.append(max_abs_diff(model, tmp, inputs))
        if not diff[0] <= tolerance:
            raise ExportError(f"the ONNX model differs from PyTorch by {diff[0]:.3g} (more than {tolerance:g}) "
                              f"on the check inputs; no {Path(path).name} written")

    write_atomic_path(path, produce)
    return diff[0]


def check_inputs(run: RunDir, model: nn.Module, n: int = SAMPLE) -> tuple[torch.Tensor, str]:
    """Up to `n` of the run's test inputs, or (data not at hand) a seeded random batch, and which."""
    from dlkit.data import load_data

    recipe = run.recipe()
    try:
        data = load_data(recipe.data, recipe.seed)
        x, _ = next(data.test.batches(n))
        return x.contiguous(), f"test split ({len(x)})"
    except (DataError, StopIteration) as exc:
        why = str(exc) or "empty test split"
    bundle = run.bundle()
    shape = bundle["input_shape"]
    g = torch.Generator().manual_seed(0)
    if bundle["input_kind"] == "tokens":
        vocab = next(m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding))
        x = torch.randint(1, max(2, vocab), (16, *shape), generator=g)
        x[:, shape[0] // 2:] *= torch.rand(16, 1, generator=g) < 0.5  # half the rows padded after the middle
    else:
        x = torch.randn(16, *shape, generator=g)
    return x, f"random batch (16, seed 0): the test data are not at hand ({why[:120]})"


def export_onnx(run_dir: str | Path, *, opset: int | None = None) -> ExportResult:
    """Export a finished run's model to `model.onnx` in its folder, checked against PyTorch on its
    test inputs (at batch 1 and N) and recorded in bundle.json (file digest, opset, difference)."""
    import onnxruntime

    from dlkit.engine.checkpoint import load_run_model

    start = time.perf_counter()
    run = RunDir.open(run_dir)
    model = load_run_model(run)
    inputs, checked_on = check_inputs(run, model)
    opset = DEFAULT_OPSET if opset is None else opset
    path = run.path / ONNX_FILE
    diff = export_model(model, path, inputs, opset=opset)
    run.record_export("onnx", {"file": ONNX_FILE, "opset": opset, "max_abs_diff": diff, "checked_on": checked_on,
                               "onnxruntime": onnxruntime.__version__, "torch": torch.__version__})
    return ExportResult(path, opset, diff, checked_on, round(time.perf_counter() - start, 3))
