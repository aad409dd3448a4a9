"""The text recipes end to end: imdb-lstm on an archive in the official layout, tiny-text-lstm as
written, and `dlkit predict RUN "some text"` answering from the bundle alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dlkit.config import ModelCfg
from dlkit.errors import ConfigError
from dlkit.models import build
from dlkit.predict import Predictor
from dlkit.recipes import load_recipe
from dlkit.runner import run


def test_the_lstm_learns_a_keyword_task(imdb_archive, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = run("imdb-lstm", out="lstm", overrides=[
        f"data.data_dir={imdb_archive}", "data.verify=false", "data.text.max_words=200", "data.text.max_len=80",
        "model.vocab_size=200", "model.embed_dim=32", "model.hidden=32", "train.epochs=20", "train.optimizer.lr=3e-3"])
    assert result.summary["test_accuracy"] > 0.95, result.summary
    best = Predictor.from_run("lstm")
    answers = best.predict(["The plot was wonderful and the cast was great", "A boring waste of a film"])
    assert [a["label"] for a in answers] == ["pos", "neg"]
    bundle = json.loads((tmp_path / "lstm" / "bundle.json").read_text())
    assert bundle["preprocessing"]["tokenizer"]["kind"] == "words"
    vocab = bundle["preprocessing"]["tokenizer"]["vocab"]
    assert {"wonderful", "great", "boring", "waste", "the"} <= set(vocab) and "br" not in vocab


def test_the_unpacked_forward_pass_equals_the_packed_one() -> None:
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    model = build("lstm", num_classes=1, input_shape=(12,), vocab_size=40, embed_dim=8, stacked=(8, 6)).eval()
    lengths = torch.tensor([12, 3, 7, 1, 9])
    ids = torch.zeros(5, 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 40, (int(n),))
    trunk = model.features
    with torch.no_grad():
        x = pack_padded_sequence(trunk.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        for rnn in trunk.rnns:
            x, (hidden, _) = rnn(x)
        reference = model.head(hidden[-1])
        assert torch.allclose(model(ids), reference, atol=1e-6)


def test_recurrent_dropout_drops_recurrent_weights_only_while_training() -> None:
    torch.manual_seed(0)
    model = build("lstm", num_classes=1, input_shape=(10,), vocab_size=30, embed_dim=8, hidden=8,
                  recurrent_dropout=0.5)
    ids = torch.randint(1, 30, (4, 10))
    model.eval()
    assert torch.equal(model(ids), model(ids))
    model.train()
    out = model(ids)
    assert not torch.allclose(out, model.eval()(ids))
    model.train()
    model(ids).sum().backward()
    grad = model.features.rnns[0].weight_hh_l0.grad
    assert 0.3 < float((grad == 0).float().mean()) < 0.7  # about half the connections dropped this batch
    assert float((model.features.rnns[0].weight_ih_l0.grad == 0).float().mean()) < 0.1
    with pytest.raises(ConfigError, match=r"^model.recurrent_dropout must be in \[0, 1\), got 1.0$"):
        build("lstm", vocab_size=30, input_shape=(10,), recurrent_dropout=1.0)


def test_a_vocabulary_larger_than_the_embedding_is_refused_before_training(imdb_archive, tmp_path,
                                                                            monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"^model.vocab_size is 10 but the tokenizer makes (\d+) ids; set "
                                          r"model.vocab_size >= \1 or lower data.text.max_words$"):
        run("imdb-lstm", out="small", overrides=[f"data.data_dir={imdb_archive}", "data.verify=false",
                                                 "data.text.max_words=300", "model.vocab_size=10"])
    assert not (tmp_path / "small").exists()


def test_without_vocab_size_the_embedding_fits_the_vocabulary() -> None:
    recipe = load_recipe("tiny-text-lstm", epochs=1)
    recipe.model = ModelCfg(name="lstm", embed_dim=8, hidden=8)
    result = run(recipe, out="fit")
    vocab = len(json.loads((result.run_dir / "bundle.json").read_text())["preprocessing"]["tokenizer"]["vocab"])
    assert Predictor.from_run("fit").model.features.embed.num_embeddings == vocab + 2


@pytest.mark.slow
def test_tiny_text_lstm_runs_as_written_and_predicts_from_the_cli(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "dlkit", "run", "tiny-text-lstm", "--out", "tiny"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert (summary["n_train"], summary["n_val"], summary["n_test"]) == (7, 0, 3)
    assert summary["test_accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
    said = subprocess.run([sys.executable, "-m", "dlkit", "predict", "tiny", "I love this fantastic phone"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert said.returncode == 0, said.stderr
    answer = json.loads(said.stdout)
    assert answer["input"] == "I love this fantastic phone" and answer["label"] in ("negative", "positive")
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert answer["confidence"] == max(answer["probabilities"].values())
    empty = subprocess.run([sys.executable, "-m", "dlkit", "predict", "tiny", " "], capture_output=True, text=True,
                           env=env, timeout=300)
    assert empty.returncode == 2 and empty.stderr.startswith("error: empty text: give the text to classify")
    assert "Traceback" not in empty.stderr


@pytest.mark.slow
def test_run_with_seeds_runs_each_seed_and_prints_their_comparison(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "dlkit", "run", "tiny-text-lstm", "--seeds", "3", "--quiet",
                           "--out", "multi", "--epochs", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == ["multi/seed-0", "multi/seed-1", "multi/seed-2"]
    seeds = [json.loads((tmp_path / "multi" / f"seed-{k}" / "summary.json").read_text())["seed"] for k in range(3)]
    assert seeds == [0, 1, 2]
    row = [c.strip() for c in lines[5].strip("|").split("|")]
    assert row[:2] == ["tiny-text-lstm", "3"] and "[" in row[2]  # mean ± std [95% interval]


def test_a_text_run_killed_mid_epoch_resumes_exactly(imdb_archive, tmp_path, monkeypatch, resume_check) -> None:
    # length-bucketed batches: the checkpoint keeps the epoch's batches, not a permutation to draw again
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    overrides = [f"data.data_dir={imdb_archive}", "data.verify=false", "data.text.max_words=200",
                 "data.text.max_len=80", "model.vocab_size=200", "model.embed_dim=32", "model.hidden=32",
                 "train.epochs=2", "train.checkpoint_every=6"]
    full = resume_check.same_after_resume(monkeypatch, "imdb-lstm", overrides, 27, "kill")  # 20 steps an epoch
    assert full.summary["epochs_run"] == 2
