"""What summary.json records about the claim's training set and the weights that were tested."""
from __future__ import annotations

import pytest

from dlkit.config import parse_recipe
from dlkit.engine import outcome  # not `from ... import tested_weights`: pytest would collect it as a test
from dlkit.engine.loop import History
from dlkit.engine.outcome import expect_vs_achieved, training_set_line


def recipe(early_stopping: dict | None = None, n_train: int | None = 60000):
    train = {"epochs": 10} | ({"early_stopping": early_stopping} if early_stopping else {})
    return parse_recipe({"name": "r", "data": {"name": "digits"}, "model": {"name": "mlp"}, "train": train,
                         "expect": {"source": "S0.1", "claims": {"test_accuracy": 0.99}, "n_train": n_train}})


def history(epochs: int, notes: list[str], stages: list[tuple[int, int]] = ((1, 10),)) -> History:
    return History(epochs=[{"epoch": e} for e in range(1, epochs + 1)], notes=notes,
                   stages=[{"first_epoch": a, "last_epoch": b} for a, b in stages])


def test_the_last_epochs_weights_unless_early_stopping_restored_the_best():
    assert outcome.tested_weights(recipe(), history(10, [])) == "last (epoch 10)"
    es = {"monitor": "val_accuracy", "patience": 2}
    notes = ["early stopping at epoch 9: val_accuracy has not improved for 2 epochs (best 0.9 at epoch 7)",
             "restored the weights of epoch 7"]
    assert outcome.tested_weights(recipe(es), history(9, notes)) == "best (epoch 7, val_accuracy)"
    # a first stage restored its best, the second (fine-tuning) trained on to its end: its last weights
    assert outcome.tested_weights(recipe(es), history(15, notes, [(1, 9), (10, 15)])) == "last (epoch 15)"


@pytest.mark.parametrize("ours, line", [
    (4000, "trained on 4,000 of the claim's 60,000 examples"),
    (60000, "trained on 60,000 examples, as the claim"),
    (70000, "trained on 70,000 examples, more than the claim's 60,000"),
])
def test_the_training_set_beside_the_claims(ours, line):
    assert training_set_line(ours, 60000) == line
    expect = expect_vs_achieved(recipe(), {"test_accuracy": 0.98}, ours)
    assert expect["n_train"] == 60000 and expect["training_set"] == line
    assert "n_train" not in expect_vs_achieved(recipe(n_train=None), {"test_accuracy": 0.98}, ours)


def test_n_train_must_be_positive():
    from dlkit.errors import ConfigError

    with pytest.raises(ConfigError, match="expect.n_train"):
        recipe(n_train=0)
