"""The Keras-like layer table: real shapes per leaf layer, totals that match the model."""
from __future__ import annotations

import json

import torch

from dlkit.models import build
from dlkit.models.summary import summarize


def test_seed_cnn_rows_show_keras_shapes() -> None:
    summary = summarize(build("seed_cnn"), (1, 28, 28))
    shapes = {row.name: row.output_shape for row in summary.rows}
    assert shapes["features.0.conv"] == (None, 32, 26, 26)
    assert shapes["features.0.relu"] == (None, 32, 13, 13)
    assert shapes["features.1.conv"] == (None, 64, 11, 11)
    assert shapes["head.0"] == (None, 1600)
    assert shapes["head.4"] == (None, 10)
    assert summary.rows[0].name == "features.0.conv" and summary.rows[0].kind == "Conv2d"
    assert [row.params for row in summary.rows if row.params] == [320, 18_496, 204_928, 1_290]


def test_totals_match_the_parameters_and_count_only_trainable_ones() -> None:
    model = build("seed_cnn3")
    for p in model.features.parameters():
        p.requires_grad_(False)
    summary = summarize(model, (1, 28, 28))
    assert summary.params == sum(p.numel() for p in model.parameters()) == 93_322
    assert summary.trainable_params == sum(p.numel() for p in model.head.parameters()) == 576 * 64 + 64 + 650
    assert sum(row.params for row in summary.rows) == summary.params


def test_text_has_a_header_every_layer_and_the_totals() -> None:
    text = summarize(build("mlp"), (1, 28, 28)).to_text()
    lines = text.splitlines()
    assert lines[0].split() == ["Layer", "(type)", "Output", "shape", "Params"]
    assert "features.1.0 (Linear)" in text and "100,480" in text
    assert "Total params: 109,386" in text
    assert "Trainable params: 109,386" in text
    assert "Non-trainable params: 0" in text
    assert len({len(line) for line in lines[:-3]}) == 1  # the table's lines are aligned


def test_token_model_summary_uses_long_ids_and_is_json_able() -> None:
    model = build("lstm", input_shape=(10,), vocab_size=1000, embed_dim=64, stacked=(64, 32), dense=16)
    summary = summarize(model, (10,))
    shapes = {row.name: row.output_shape for row in summary.rows}
    assert shapes["features.embed"] == (None, 10, 64)
    assert shapes["features.rnns.1"] == (None, 10, 32)
    assert shapes["head.2"] == (None, 1)
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["params"] == 110_369
    assert data["rows"][0]["output_shape"] == [None, 10, 64]


def test_summary_leaves_the_model_as_it_found_it() -> None:
    model = build("seed_cnn", batch_norm=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summarize(model, (1, 28, 28))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
