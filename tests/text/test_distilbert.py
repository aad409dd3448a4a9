"""DistilBERT through transformers, on tiny checkpoints built from a config with a local WordPiece
vocabulary: loading, the folded two-logit head, parity with `transformers.pipeline`, padding,
fine-tuning and reloading, and the one-line errors for what a user can get wrong."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from dlkit.data.text import HubTokenizer
from dlkit.errors import ConfigError
from dlkit.evaluate.retest import evaluate_run
from dlkit.models import build
from dlkit.predict import Predictor
from dlkit.runner import run

SENTENCES = ["This is a great product, I love it!", "Terrible quality, very disappointed.",
             "Average performance, nothing special.", "the plot was boring and the acting awful"]


def test_a_two_logit_head_is_folded_into_one_logit_with_equal_probabilities(tiny_sst2) -> None:
    from transformers import AutoModelForSequenceClassification

    ours = build("distilbert", num_classes=1, input_shape=(32,), weights=str(tiny_sst2))
    theirs = AutoModelForSequenceClassification.from_pretrained(tiny_sst2).eval()
    tok = HubTokenizer.load(str(tiny_sst2), 32)
    ids = tok.encode(SENTENCES)
    with torch.no_grad():
        p_ours = torch.sigmoid(ours(ids)).squeeze(1)
        p_theirs = torch.softmax(theirs(input_ids=ids, attention_mask=ids != 0).logits, dim=1)[:, 1]
    assert torch.allclose(p_ours, p_theirs, atol=1e-6)
    assert p_ours.max() - p_ours.min() > 0.3  # the tiny classifier's answers depend on the words
    assert ours.load_report == f"distilbert: 40 of 40 tensors from {tiny_sst2}; its two-logit head folded into one logit"
    assert ours.label_names == ["NEGATIVE", "POSITIVE"]


def test_padding_never_changes_the_logits(tiny_sst2) -> None:
    model = build("distilbert", num_classes=1, input_shape=(48,), weights=str(tiny_sst2))
    with torch.no_grad():
        short = model(HubTokenizer.load(str(tiny_sst2), 16).encode(SENTENCES))
        long = model(HubTokenizer.load(str(tiny_sst2), 48).encode(SENTENCES))
        alone = torch.cat([model(HubTokenizer.load(str(tiny_sst2), 16).encode([s])) for s in SENTENCES])
    assert torch.allclose(short, long, atol=1e-5) and torch.allclose(short, alone, atol=1e-5)


def test_sentiment_recipe_predicts_what_the_pipeline_predicts(tiny_sst2) -> None:
    from transformers import pipeline

    result = run("sentiment-distilbert", overrides=[f"model.weights={tiny_sst2}"], out="run")
    assert result.summary["n_train"] == 0 and result.summary["epochs_run"] == 0
    assert result.summary["notes"][0].endswith("its two-logit head folded into one logit")
    # the run dir alone (bundle + safetensors) predicts; the tokenizer travels in bundle.json
    shutil.move(str(tiny_sst2), str(tiny_sst2) + ".away")
    try:
        ours = Predictor.from_run("run").predict(SENTENCES)
    finally:
        shutil.move(str(tiny_sst2) + ".away", str(tiny_sst2))
    theirs = pipeline("sentiment-analysis", model=str(tiny_sst2))(SENTENCES)
    assert [r["label"] for r in ours] == [t["label"] for t in theirs]
    assert [r["confidence"] for r in ours] == pytest.approx([t["score"] for t in theirs], abs=2e-6)
    assert {r["label"] for r in ours} == {"POSITIVE", "NEGATIVE"}


def test_fine_tuning_learns_and_the_bundle_reloads_to_the_same_answers(tiny_base, imdb_archive, tmp_path,
                                                                       monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = run("imdb-distilbert", out="ft", overrides=[
        f"model.weights={tiny_base}", f"data.data_dir={imdb_archive}", "data.verify=false", "data.text.max_len=64",
        "train.epochs=6", "train.batch_size=32", "train.optimizer.lr=2e-3", "train.schedule.warmup_epochs=0.3"])
    summary = result.summary
    assert "new (trained from scratch): classifier.bias, classifier.weight, pre_classifier.bias" in summary["notes"][0]
    assert summary["test_accuracy"] >= 0.9, summary
    again = evaluate_run("ft")  # model rebuilt from bundle.json's config, weights from model.safetensors
    assert again["test_accuracy"] == summary["test_accuracy"]
    assert again["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)


def test_model_mistakes_are_one_line_config_errors(tmp_path, tiny_sst2) -> None:
    with pytest.raises(ConfigError, match=r"^model.weights ./missing/folder: no such folder"):
        build("distilbert", num_classes=1, input_shape=(16,), weights="./missing/folder")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_sst2, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"no \.safetensors weights in the folder; dlkit loads no pickled checkpoints"):
        build("distilbert", num_classes=1, input_shape=(16,), weights=str(pickled))
    with pytest.raises(ConfigError, match=r"^data.text.max_len is 600 but the model reads at most 512 tokens"):
        build("distilbert", num_classes=1, input_shape=(600,), weights=str(tiny_sst2))


def dlkit(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (the hub client reads HF_HOME and HF_HUB_OFFLINE when imported)."""
    return subprocess.run([sys.executable, "-m", "dlkit", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@pytest.mark.slow
def test_hub_ids_load_from_hf_home_offline_and_fail_in_one_line_when_absent(hf_home, tmp_path) -> None:
    offline = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    ok = dlkit("run", "sentiment-distilbert", "--set", "model.weights=dlkit-test/tiny-sst2", "--out", "hub", env=offline)
    assert ok.returncode == 0, ok.stderr
    assert "tensors from dlkit-test/tiny-sst2" in (tmp_path / "hub" / "summary.json").read_text()

    empty = {"HF_HOME": str(tmp_path / "empty-home"), "HF_HUB_OFFLINE": "1"}
    gone = dlkit("run", "sentiment-distilbert", "--out", "x", env=empty)
    assert gone.returncode == 2 and "Traceback" not in gone.stderr
    sst2, commit = "distilbert/distilbert-base-uncased-finetuned-sst-2-english", "714eb0fa89d2f80546fda750413ed43d93601a13"
    assert gone.stderr.strip().splitlines() == [
        f"error: data.text.tokenizer {sst2}@{commit}: not in the Hugging Face cache "
        f"{tmp_path / 'empty-home' / 'hub'} and the hub cannot be reached (HF_HUB_OFFLINE is set); on a machine with "
        f"internet run `hf download {sst2} --revision {commit}` and copy its HF_HOME here "
        "(or point HF_HOME at it), or give a local folder saved with save_pretrained"]
    assert not (tmp_path / "x").exists()  # nothing half-written

    # not offline by setting, but the hub does not answer: the same line at once, without a minute of retries
    unreachable = {"HF_HOME": str(tmp_path / "empty-home"), "HF_ENDPOINT": "http://127.0.0.1:1"}
    no_net = dlkit("run", "sentiment-distilbert", "--set", "model.weights=distilbert/distilbert-base-uncased",
                   env=unreachable)
    assert no_net.returncode == 2
    assert no_net.stderr.startswith(
        "error: data.text.tokenizer distilbert/distilbert-base-uncased: not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE" not in no_net.stderr
