"""Hub ids carry their revision (`owner/name@rev`): split once, passed to every from_pretrained call,
pinned in the packaged recipes for the model and its tokenizer alike; a wrong one is one line."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dlkit
from dlkit import hub
from dlkit.data.text import HubTokenizer
from dlkit.errors import ConfigError
from dlkit.models import build, family
from dlkit.recipes import load_recipe

HUB_ID = "dlkit-test/tiny-sst2"  # the hf_home fixture's hub id

SST2 = "distilbert/distilbert-base-uncased-finetuned-sst-2-english@714eb0fa89d2f80546fda750413ed43d93601a13"
BASE = "distilbert/distilbert-base-uncased@12040accade4e8a0f71eabdb258fecc2e7e948be"
CACHED = "0123456789abcdef0123456789abcdef01234567"  # the hf_home fixture's snapshot


def test_a_revision_is_split_off_hub_ids_only(tmp_path):
    assert hub.split_revision(SST2) == (SST2.split("@")[0], "714eb0fa89d2f80546fda750413ed43d93601a13")
    assert hub.split_revision("distilbert/distilbert-base-uncased") == ("distilbert/distilbert-base-uncased", None)
    folder = tmp_path / "weights@v2"
    folder.mkdir()
    assert hub.split_revision(str(folder)) == (str(folder), None)  # a folder keeps its @
    with pytest.raises(ConfigError, match=r"^owner/name@: expected a hub id and its revision as owner/name@REVISION"):
        hub.split_revision("owner/name@")


def test_packaged_text_recipes_pin_model_and_tokenizer_to_one_commit():
    sentiment = load_recipe("sentiment-distilbert")
    assert sentiment.model.weights == SST2 and sentiment.data.text.tokenizer == SST2
    imdb = load_recipe("imdb-distilbert")
    assert imdb.model.weights == BASE and imdb.data.text.tokenizer == BASE
    assert family("distilbert").hub_default == BASE  # the tokenizer of a distilbert without weights


def test_every_from_pretrained_call_passes_a_revision():
    calls = 0
    for path in Path(dlkit.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                calls += 1
                assert "revision" in {k.arg for k in node.keywords}, f"{path.name}:{node.lineno} has no revision="
    assert calls == 3  # the tokenizer, the model's config, the model


@pytest.fixture
def offline_cache(hf_home, monkeypatch):
    """The hf_home fixture's cache, offline, for this process (the hub client reads both at call time)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def test_a_pinned_revision_loads_from_the_cache_and_an_unknown_one_is_one_line(offline_cache):
    model = build("distilbert", num_classes=1, input_shape=(16,), weights=f"{HUB_ID}@{CACHED}")
    assert model.load_report == f"distilbert: 40 of 40 tensors from {HUB_ID}@{CACHED}; its two-logit head folded into one logit"
    tok = HubTokenizer.load(f"{HUB_ID}@{CACHED}", 16)
    assert tok.source == f"{HUB_ID}@{CACHED}" and tok.encode(["a great film"]).shape == (1, 16)
    with pytest.raises(ConfigError) as err:
        build("distilbert", num_classes=1, input_shape=(16,), weights=f"{HUB_ID}@feedbeef")
    assert str(err.value) == (
        f"model.weights {HUB_ID}@feedbeef: not in the Hugging Face cache {offline_cache / 'hub'} and the hub cannot "
        f"be reached (HF_HUB_OFFLINE is set); on a machine with internet run `hf download {HUB_ID} --revision "
        "feedbeef` and copy its HF_HOME here (or point HF_HOME at it), or give a local folder saved with save_pretrained")


def test_hf_load_hands_the_revision_to_the_loader(monkeypatch):
    monkeypatch.setattr(hub, "hub_cached", lambda repo, revision=None: True)
    seen = hub.hf_load(lambda s, local, rev: (s, local, rev), f"{HUB_ID}@{CACHED}", "model.weights")
    assert seen == (HUB_ID, True, CACHED)
