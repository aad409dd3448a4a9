"""hf_text: any Hugging Face sequence-classification encoder by id, on tiny BERT and RoBERTa checkpoints
built from configs with local tokenizers (a WordPiece vocabulary; a byte-level BPE trained here):
parity with transformers, padding, blocks read off the model, fine-tuning through the imdb-roberta
recipe and reloading, and the one-line errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dlkit.config import UnfreezeCfg
from dlkit.data.text import HubTokenizer
from dlkit.engine.freeze import set_trainable
from dlkit.errors import ConfigError
from dlkit.evaluate.retest import evaluate_run
from dlkit.models import build
from dlkit.runner import run

SENTENCES = ["This is a great product, I love it!", "Terrible quality, very disappointed.",
             "Average performance, nothing special.", "the plot was boring and the acting awful"]
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
LABELS = {"id2label": {0: "NEGATIVE", 1: "POSITIVE"}, "label2id": {"NEGATIVE": 0, "POSITIVE": 1}}


def _conftest():
    """tests/text/conftest.py's helpers (tests run under --import-mode=importlib)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("text_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT sentiment classifier and its WordPiece tokenizer, as save_pretrained writes them."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    helpers = _conftest()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(helpers.VOCAB) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(helpers.VOCAB), max_position_embeddings=64,
                                                     **SMALL, **LABELS))
    helpers.teach_sentiment(model, tokenizer)
    model.save_pretrained(folder)
    return folder


def write_tiny_roberta(folder: Path, *, head: bool) -> Path:
    """A 2-layer RoBERTa (a sentiment classifier, or the bare encoder) with a byte-level BPE tokenizer
    trained on the test words; RoBERTa pads with id 1 and counts positions from 2."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel, RobertaTokenizerFast

    helpers = _conftest()
    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(helpers.WORDS), *SENTENCES, " ".join(helpers.FILLER)]
    bpe.train_from_iterator(corpus * 20, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    tokenizer = RobertaTokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)
    assert tokenizer.pad_token_id == 1 and tokenizer("a good film")["input_ids"][0] == 0  # <s> first, as RoBERTa
    config = RobertaConfig(vocab_size=bpe.get_vocab_size(), max_position_embeddings=66, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, type_vocab_size=1, **SMALL, **(LABELS if head else {}))
    torch.manual_seed(1)
    if head:
        model = RobertaForSequenceClassification(config)
        helpers.teach_sentiment(model, tokenizer)
    else:
        model = RobertaModel(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory) -> Path:
    return write_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"), head=True)


@pytest.fixture(scope="module")
def tiny_roberta_base(tmp_path_factory) -> Path:
    return write_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta-base"), head=False)


@pytest.mark.parametrize("family", ["tiny_bert", "tiny_roberta"])
def test_two_logit_heads_fold_into_one_logit_with_transformers_probabilities(family, request) -> None:
    from transformers import AutoModelForSequenceClassification

    folder = request.getfixturevalue(family)
    ours = build("hf_text", num_classes=1, input_shape=(32,), weights=str(folder))
    theirs = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = HubTokenizer.load(str(folder), 32)
    ids = tok.encode(SENTENCES)
    with torch.no_grad():
        p_ours = torch.sigmoid(ours(ids)).squeeze(1)
        p_theirs = torch.softmax(theirs(input_ids=ids, attention_mask=ids != tok.pad_id).logits, dim=1)[:, 1]
    assert ours.pad_id == tok.pad_id == (1 if family == "tiny_roberta" else 0)
    assert torch.allclose(p_ours, p_theirs, atol=1e-6)
    assert p_ours.max() - p_ours.min() > 0.3  # the tiny classifier's answers depend on the words
    total = len(theirs.state_dict())
    assert ours.load_report == f"hf_text: {total} of {total} tensors from {folder}; its two-logit head folded into one logit"
    assert ours.label_names == ["NEGATIVE", "POSITIVE"]
    # padding never changes the logits (RoBERTa pads with 1, BERT with 0)
    with torch.no_grad():
        short = ours(HubTokenizer.load(str(folder), 20).encode(SENTENCES))
        alone = torch.cat([ours(HubTokenizer.load(str(folder), 20).encode([s])) for s in SENTENCES])
    assert torch.allclose(short, ours(ids), atol=1e-5) and torch.allclose(short, alone, atol=1e-5)


def test_blocks_are_read_off_the_model_and_stage_the_unfreezing(tiny_bert) -> None:
    model = build("hf_text", num_classes=3, input_shape=(32,), weights=str(tiny_bert))
    bert = model.model.bert
    embeddings, first, last, head = model.blocks
    assert embeddings is bert.embeddings and first is bert.encoder.layer[0]
    assert list(last) == [bert.encoder.layer[1], bert.pooler]  # the pooler runs after the last layer
    assert list(head) == [model.model.dropout, model.model.classifier] and head is model.head
    assert model.features is bert
    assert "new (trained from scratch): classifier.bias, classifier.weight" in model.load_report
    set_trainable(model, "base", UnfreezeCfg(last_blocks=1))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith(("model.bert.encoder.layer.1.", "model.bert.pooler.", "model.classifier."))}
    # ALBERT shares one layer group between all its layers: it is one block, counted once
    albert = build("hf_text", num_classes=2, input_shape=(16,), config={
        "model_type": "albert", "vocab_size": 50, "embedding_size": 8, "max_position_embeddings": 32, **SMALL})
    core = albert.model.albert
    before, shared, head = albert.blocks
    assert list(before) == [core.embeddings, core.encoder.embedding_hidden_mapping_in]  # all that runs first
    assert list(shared) == [core.encoder.albert_layer_groups[0], core.pooler] and head is albert.head


def test_fine_tuning_a_roberta_encoder_through_its_recipe_and_reloading(tiny_roberta_base, imdb_archive, tmp_path,
                                                                         monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = run("imdb-roberta", out="ft", overrides=[
        f"model.weights={tiny_roberta_base}", f"data.data_dir={imdb_archive}", "data.verify=false",
        "data.text.max_len=64", "train.epochs=6", "train.batch_size=32", "train.optimizer.lr=2e-3",
        "train.schedule.warmup_epochs=0.3"])
    summary = result.summary
    assert summary["notes"][0].startswith("hf_text: ") and "classifier.out_proj.weight" in summary["notes"][0]
    assert summary["test_accuracy"] >= 0.9, summary
    again = evaluate_run("ft")  # rebuilt from bundle.json's config (AutoConfig.for_model), weights from safetensors
    assert again["test_accuracy"] == summary["test_accuracy"]
    assert again["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)


def test_mistakes_are_one_line_config_errors(tiny_bert) -> None:
    with pytest.raises(ConfigError, match=r"^model.config needs a model_type \(e.g. bert, roberta\)"):
        build("hf_text", num_classes=2, input_shape=(16,), config={"vocab_size": 50})
    with pytest.raises(ConfigError, match=r"^model.config: Unrecognized configuration class .*ViTConfig"):
        build("hf_text", num_classes=2, input_shape=(16,), config={"model_type": "vit", **SMALL})
    with pytest.raises(ConfigError, match=r"^data.text.max_len is 100 but the model reads at most 64 tokens"):
        build("hf_text", num_classes=1, input_shape=(100,), weights=str(tiny_bert))
    with pytest.raises(ConfigError, match=r"is a 'bert' model; model 'distilbert' needs a 'distilbert' checkpoint "
                                          r"\(model 'hf_text' takes any\)"):
        build("distilbert", num_classes=1, input_shape=(16,), weights=str(tiny_bert))


def test_every_packaged_hub_recipe_pins_its_checkpoint_and_tokenizer_to_a_full_commit():
    import re

    from dlkit.models import FAMILIES, family, with_model_defaults
    from dlkit.recipes import load_recipe, recipe_registry

    commit = re.compile(r"^[\w.-]+/[\w.-]+@[0-9a-f]{40}$")
    pinned = []
    for name in recipe_registry().names():
        recipe = with_model_defaults(load_recipe(name))
        if family(recipe.model.name).hub_default is None:
            continue
        assert recipe.model.weights is None or commit.match(recipe.model.weights), (name, recipe.model.weights)
        pinned.append(name)
    assert {"imdb-bert", "imdb-roberta", "imdb-distilbert"} <= set(pinned)
    assert all(commit.match(f.hub_default) for f in FAMILIES.values() if f.hub_default is not None)
