"""Weights on disk: safetensors (no pickle), bit-identical reloads, clear errors for bad files."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dlkit.engine import Checkpoint, FitState
from dlkit.engine.checkpoint import load_weights, read_meta, save_weights
from dlkit.errors import RunDirError
from dlkit.models import build


def make_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build("seed_cnn", num_classes=3, input_shape=(1, 12, 12), batch_norm=True)


def test_save_then_load_gives_identical_tensors_and_outputs(tmp_path):
    model = make_cnn(0)
    model.train()
    model(torch.randn(4, 1, 12, 12))  # move the batch-norm running stats off their defaults
    path = tmp_path / "w" / "model.safetensors"
    save_weights(model, path, {"epoch": 3})
    assert read_meta(path) == {"epoch": 3}  # in the weights file itself: no second file to disagree
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]  # no temporary left

    fresh = make_cnn(1)
    assert not torch.equal(fresh.head[1].weight, model.head[1].weight)
    assert load_weights(fresh, path) is fresh
    a, b = model.state_dict(), fresh.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    x = torch.randn(5, 1, 12, 12)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))


def test_the_file_is_plain_safetensors(tmp_path):
    model = make_cnn(0)
    path = tmp_path / "model.safetensors"
    save_weights(model, path)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == set(model.state_dict())
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert len(raw) == 8 + header_len + end
    assert not raw.startswith((b"\x80", b"PK"))  # neither a pickle nor torch.save's zip
    state = load_file(str(path))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert read_meta(path) is None  # no meta given, none in the header


def test_tied_weights_are_saved_once_and_reload(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.embed.weight

    torch.manual_seed(0)
    model = Tied()
    path = tmp_path / "tied.safetensors"
    save_weights(model, path)
    assert set(load_file(str(path))) == {"embed.weight"}
    torch.manual_seed(1)
    fresh = load_weights(Tied(), path)
    assert torch.equal(fresh.out.weight, model.embed.weight)
    assert fresh.out.weight is fresh.embed.weight


def test_missing_corrupt_and_mismatched_files_are_run_dir_errors(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(RunDirError) as info:
        load_weights(make_cnn(0), missing)
    assert str(info.value) == f"weights file {missing} not found; was the run finished?"

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(RunDirError) as info:
        load_weights(make_cnn(0), corrupt)
    message = str(info.value)
    assert message.startswith(f"weights file {corrupt} is corrupt (")
    assert message.endswith("); re-run the recipe")
    assert "\n" not in message

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(RunDirError, match=r"is corrupt \(.*header too small\); re-run the recipe$"):
        load_weights(make_cnn(0), empty)

    truncated = tmp_path / "truncated.safetensors"
    save_weights(make_cnn(0), truncated)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(RunDirError, match="is corrupt"):
        load_weights(make_cnn(0), truncated)

    other = tmp_path / "mlp.safetensors"
    save_weights(build("mlp", num_classes=3, input_shape=(4,), hidden=[2]), other)
    with pytest.raises(RunDirError) as info:
        load_weights(make_cnn(0), other)
    assert str(info.value).startswith(f"weights file {other} does not fit the model (missing ['features.0.conv.weight'")


def test_checkpoint_writes_last_every_epoch_and_best_only_on_improvement(tmp_path):
    directory = tmp_path / "checkpoints"
    callback = Checkpoint(directory, monitor="val_accuracy")
    state = FitState(model=nn.Linear(2, 1), stage=0)
    best_epochs, last_epochs = [], []
    for accuracy in (0.5, 0.7, 0.6, 0.7, 0.8, 0.75):
        state.epoch += 1
        with torch.no_grad():
            state.model.weight.fill_(state.epoch)
        callback.on_epoch_end(state, {"val_accuracy": accuracy, "val_loss": 1.0})
        last_epochs.append(read_meta(directory / "last.safetensors")["epoch"])
        best_epochs.append(read_meta(directory / "best.safetensors")["epoch"])
    assert last_epochs == [1, 2, 3, 4, 5, 6]
    assert best_epochs == [1, 2, 2, 2, 5, 5]  # a tie (0.7 at epoch 4) is not an improvement
    best = read_meta(directory / "best.safetensors")
    assert best == {"epoch": 5, "stage": 0, "metrics": {"val_accuracy": 0.8, "val_loss": 1.0}, "monitor": "val_accuracy"}
    assert torch.equal(load_file(str(directory / "best.safetensors"))["weight"], torch.full((1, 2), 5.0))
    assert torch.equal(load_file(str(directory / "last.safetensors"))["weight"], torch.full((1, 2), 6.0))
    assert sorted(p.name for p in directory.iterdir()) == ["best.safetensors", "last.safetensors"]


def test_checkpoint_best_and_last_can_be_switched_off(tmp_path):
    state = FitState(model=nn.Linear(2, 1), epoch=1)
    Checkpoint(tmp_path / "a", best=False).on_epoch_end(state, {"val_loss": 1.0})
    Checkpoint(tmp_path / "b", last=False).on_epoch_end(state, {"val_loss": 1.0})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["last.safetensors"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["best.safetensors"]
