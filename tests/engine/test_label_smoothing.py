"""train.label_smoothing: the cross-entropy against smoothed targets in training, the plain one for
validation, and one error line where there is no cross-entropy to smooth."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlkit.engine.loop import loss_for
from dlkit.errors import ConfigError
from dlkit.recipes import load_recipe
from dlkit.runner import run


def test_the_smoothed_loss_is_cross_entropy_against_the_smoothed_targets():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    s = 0.1
    targets = F.one_hot(y, 4).float() * (1 - s) + s / 4  # 0.925 on the true class, 0.025 elsewhere
    by_hand = -(targets * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(loss_for("multiclass", "auto", s)(logits, y), by_hand)
    assert loss_for("multiclass") is F.cross_entropy  # no smoothing: the plain function, nothing wrapped


@pytest.mark.parametrize(("task", "name"), [("binary", "auto"), ("regression", "auto"), ("multiclass", "mse")])
def test_smoothing_a_loss_that_is_not_cross_entropy_is_one_error_line(task, name):
    with pytest.raises(ConfigError, match=r"^train.label_smoothing applies to cross-entropy"):
        loss_for(task, name, 0.1)


def test_the_field_is_validated_and_a_run_reports_plain_validation_losses():
    with pytest.raises(ConfigError, match=r"train.label_smoothing"):
        load_recipe("digits-mlp", ["train.label_smoothing=1.0"])
    plain = run("digits-mlp", epochs=2, out="plain", report=False).history
    smooth = run("digits-mlp", epochs=2, out="smooth", overrides=["train.label_smoothing=0.3"],
                 report=False).history
    # a smoothed cross-entropy never falls below the entropy of the smoothed targets (10 classes, s = 0.3:
    # 0.73 on the true class, 0.03 on each other): 1.176
    targets = torch.full((10,), 0.03)
    targets[0] = 0.73
    floor = -(targets * targets.log()).sum().item()
    assert all(epoch["train_loss"] >= floor for epoch in smooth)
    assert smooth[0]["train_loss"] > plain[0]["train_loss"]
    # validation reports the plain cross-entropy, which can and does go below it
    assert smooth[-1]["val_loss"] < floor - 0.2
