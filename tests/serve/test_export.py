"""ONNX export: every family's graph computes PyTorch's logits at any batch size (and token length),
a run records its export in bundle.json, a mismatch leaves no file, and OnnxBackend serves the run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dlkit.errors import RunDirError
from dlkit.files import sha256_file
from dlkit.models import build
from dlkit.rundir import RunDir
from dlkit.serve.export import ExportError, export_model, export_onnx, session
from dlkit.serve.onnx_backend import OnnxBackend

TINY_BERT = {"vocab_size": 50, "dim": 16, "n_layers": 1, "n_heads": 2, "hidden_dim": 32, "max_position_embeddings": 64}
TOKENS = {"vocab_size": 50, "embed_dim": 8, "hidden": 16}


def narrow_head(model: nn.Module, width: int = 16) -> nn.Module:
    """The same layers with 16-wide dense layers: a torchvision-layout VGG / AlexNet head holds 4096-wide
    layers (VGG11 at 32x32: 128M parameters, a 0.5 GB graph), the same ops at any width."""
    dense = [i for i, m in enumerate(model.head.classifier) if isinstance(m, nn.Linear)]
    for k, i in enumerate(dense):
        old = model.head.classifier[i]
        model.head.classifier[i] = nn.Linear(old.in_features if k == 0 else width,
                                             old.out_features if k == len(dense) - 1 else width)
    return model


FAMILIES: list[tuple[str, dict[str, Any], tuple[int, ...], int]] = [
    ("seed_cnn", {}, (1, 28, 28), 10),
    ("seed_cnn", {"batch_norm": True}, (3, 32, 32), 10),
    ("seed_cnn3", {}, (1, 28, 28), 10),
    ("lenet", {}, (1, 28, 28), 10),
    ("alexnet32", {"dense": 64}, (3, 32, 32), 10),
    ("zfnet", {"dense": 64}, (3, 32, 32), 10),
    ("alexnet", {}, (3, 64, 64), 10),
    ("resnet20", {}, (3, 32, 32), 10),
    ("resnet20", {"shortcut": "B"}, (3, 32, 32), 10),
    ("resnet18", {}, (1, 28, 28), 10),
    ("resnet50", {}, (3, 32, 32), 10),
    ("vgg11", {}, (3, 32, 32), 10),
    ("vgg16_bn", {}, (3, 32, 32), 10),
    ("mobilenet_v2", {"width_mult": 0.5}, (3, 32, 32), 10),
    ("mlp", {}, (1, 28, 28), 10),
    ("lstm", {}, (30,), 1),  # tabular, one feature a step
    ("lstm", {"steps": 5, "bidirectional": True, "cell": "gru"}, (30,), 2),
    ("lstm", TOKENS, (12,), 1),
    ("lstm", {**TOKENS, "stacked": (8, 4), "dense": 8}, (12,), 3),
    ("lstm", {**TOKENS, "layers": 2, "bidirectional": True}, (12,), 1),
    ("distilbert", {"config": TINY_BERT}, (16,), 1),
    ("distilbert", {"config": TINY_BERT}, (16,), 3),
    # members exported inside one graph: a conv and a dense net averaged; two token LSTMs (each traced its
    # own way) voting; an LSTM over table rows and a dense net averaged, a regression
    ("ensemble", {"members": [{"name": "seed_cnn", "args": {}}, {"name": "mlp", "args": {}}]}, (1, 28, 28), 10),
    ("ensemble", {"members": [{"name": "lstm", "args": TOKENS}, {"name": "lstm", "args": {**TOKENS, "bidirectional": True}}],
                  "method": "vote", "member_weights": [2, 1], "task": "binary"}, (12,), 1),
    ("ensemble", {"members": [{"name": "lstm", "args": {}}, {"name": "mlp", "args": {}}], "task": "regression"}, (30,), 1),
    ("hf_text", {"config": {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}}, (16,), 1),
    ("hf_text", {"config": {"model_type": "roberta", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 34,
                            "type_vocab_size": 1}}, (16,), 3),
    ("vit", {"patch": 4, "dim": 32, "depth": 2, "heads": 2}, (3, 32, 32), 10),
    ("hf_vit", {"config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "intermediate_size": 64}}, (3, 32, 32), 3),
    ("vit", {"patch": 7, "dim": 32, "depth": 1, "heads": 4, "pool": "mean"}, (1, 28, 28), 10),
]
SKIPPED = {"vgg16": "vgg11 and vgg16_bn export the same layers (VGG16 is only deeper)",
           "resnet56": "resnet20 exports the same blocks (56 is only deeper)",
           "vit_tiny_patch4": "vit exports the same blocks (ViT-Tiny is only wider and deeper)",
           "vit_tiny_patch7": "vit exports the same blocks (ViT-Tiny is only wider and deeper)"}


def ids(n: int, length: int, seed: int) -> torch.Tensor:
    """Token ids with padding after (row 0), before (row 1), none, and a row of padding only (row 2)."""
    x = torch.randint(1, 50, (n, length), generator=torch.Generator().manual_seed(seed))
    for row, cut in enumerate((slice(length // 2, None), slice(0, 3), slice(None))[:n]):
        x[row, cut] = 0
    return x


def batch(model: nn.Module, shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    if model.input_dtype == torch.long:
        return ids(n, shape[0], seed)
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def onnx_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session(path).run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize(("name", "kwargs", "shape", "classes"), FAMILIES,
                         ids=[f"{f[0]}-{i}" for i, f in enumerate(FAMILIES)])
def test_every_family_exports_with_pytorchs_logits_at_any_batch(tmp_path, name, kwargs, shape, classes):
    torch.manual_seed(0)
    model = build(name, num_classes=classes, input_shape=shape, **kwargs).eval()
    if name in ("alexnet", "vgg11", "vgg16_bn"):
        narrow_head(model)
    path = tmp_path / "model.onnx"
    diff = export_model(model, path, batch(model, shape, 8, seed=1))
    assert diff <= 3e-5  # measured <= 1.1e-5 (ResNet-50's 50 layers at random weights); most below 1e-6
    # the same file at batch 1 and 7 (and, for token ids, at other lengths than the traced one)
    lengths = [shape[0] // 2 + 1, shape[0] * 2] if model.input_dtype == torch.long else [None]
    for n in (1, 7):
        for length in lengths:
            x = batch(model, (length,) if length else shape, n, seed=2)
            if n == 1 and length:
                x = x[3:4] if len(x) > 3 else ids(4, length, 2)[1:2]  # a row padded at the front
            with torch.no_grad():
                expected = model(x)
            got = onnx_logits(path, x)
            assert got.shape == (n, classes)
            assert (got - expected).abs().max().item() <= 3e-5


def test_skipped_families_are_only_deeper_copies_of_tested_ones():
    from dlkit.models import MODELS

    tested = {f[0] for f in FAMILIES}
    assert set(MODELS.names()) == tested | set(SKIPPED)


def test_a_graph_that_differs_from_pytorch_is_refused_and_leaves_no_file(tmp_path):
    class Branchy(nn.Module):  # a value-dependent branch: the trace keeps the branch its example took
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x * 3

    inputs = torch.tensor([[1.0, 2.0], [3.0, 4.0], [-5.0, -6.0]])  # traced on sum 10: x * 2; the batch: x * 3
    with pytest.raises(ExportError, match=r"^the ONNX model differs from PyTorch by 6 \(more than 0.0001\) on "
                                          r"the check inputs; no model.onnx written$"):
        export_model(Branchy(), tmp_path / "model.onnx", inputs)
    assert list(tmp_path.iterdir()) == []


def test_a_model_the_exporter_cannot_read_says_why_in_one_line(tmp_path):
    class Eigen(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eigvals(x).real

    with pytest.raises(ExportError, match=r"^Eigen cannot be exported to ONNX \(opset 17\): ") as info:
        export_model(Eigen(), tmp_path / "model.onnx", torch.randn(3, 2, 2))
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ---- a trained run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    import dlkit

    out = tmp_path_factory.mktemp("digits") / "run"
    dlkit.run("digits-cnn", epochs=1, out=out, report=False)
    return out


@pytest.fixture
def run_copy(digits_run, tmp_path) -> Path:
    return Path(shutil.copytree(digits_run, tmp_path / "run"))


def test_export_writes_model_onnx_and_records_it_in_the_bundle(run_copy):
    import onnxruntime

    result = export_onnx(run_copy)
    bundle = RunDir.open(run_copy).verify()
    n_test = RunDir.open(run_copy).summary()["n_test"]
    assert result.path == run_copy / "model.onnx" and result.opset == 17
    assert result.checked_on == f"test split ({min(256, n_test)})"
    assert 0 <= result.max_abs_diff <= 1e-5
    assert bundle["files"]["model.onnx"] == sha256_file(run_copy / "model.onnx")
    assert bundle["exports"] == {"onnx": {
        "file": "model.onnx", "opset": 17, "max_abs_diff": result.max_abs_diff, "checked_on": result.checked_on,
        "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}}
    assert sorted(p.name for p in run_copy.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_onnx_backend_gives_the_predictors_logits(run_copy):
    from dlkit.data import load_data
    from dlkit.engine.loop import predict_outputs
    from dlkit.predict import Predictor

    run = RunDir.open(run_copy)
    backend = OnnxBackend.from_run(run)  # no model.onnx yet: exported first
    assert (run_copy / "model.onnx").is_file() and backend.dtype == "float32" and backend.input_kind == "image"
    recipe = run.recipe()
    x = load_data(recipe.data, recipe.seed).test.inputs()[:100]
    predictor = Predictor.from_run(run_copy)
    expected = predict_outputs(predictor.model, x, device=torch.device("cpu"))
    got = backend(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape == (len(x), 10)
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.equal(backend(x[:1]).argmax(1), expected[:1].argmax(1))


def test_a_flipped_byte_in_model_onnx_is_refused(run_copy):
    export_onnx(run_copy)
    path = run_copy / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RunDirError, match=r"model.onnx does not match the sha256 in bundle.json"):
        OnnxBackend.from_run(RunDir.open(run_copy))


def test_token_ids_reach_the_graph_as_int64():
    backend = OnnxBackend(sess=None, bundle={"input_kind": "tokens"})
    assert backend.dtype == "int64"


def dlkit_cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlkit", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "NO_COLOR": "1"}, timeout=300)


def test_cli_export_prints_one_json_line(run_copy, tmp_path):
    proc = dlkit_cli("export", run_copy, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    recorded = RunDir.open(run_copy).bundle()["exports"]["onnx"]
    assert line["file"] == str(run_copy / "model.onnx") and line["format"] == "onnx" and line["opset"] == 17
    assert line["max_abs_diff"] == recorded["max_abs_diff"] and line["checked_on"] == recorded["checked_on"]


def test_cli_export_refuses_an_unknown_format_in_one_line(run_copy, tmp_path):
    proc = dlkit_cli("export", run_copy, "--format", "tflite", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "error: --format must be onnx, got 'tflite'\n"
    assert not (run_copy / "model.onnx").exists()
