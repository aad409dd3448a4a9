"""Text fixtures: tiny DistilBERT checkpoints built from a config with a local WordPiece vocabulary,
saved as Hugging Face saves them (safetensors), and a Hugging Face cache holding one under a hub id."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

WORDS = ("the a an is was this that it i you and or but not very so too of to in on for with my".split()
         + "good great love loved excellent wonderful fantastic best enjoyed fine".split()
         + "bad terrible awful boring worst hate hated poor waste disappointed".split()
         + "movie film product quality performance plot acting story nothing special average".split())
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *".,!?'", *WORDS, "##s", "##ed", "##ing", "##ly"]
TINY = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": 512}
HUB_ID = "dlkit-test/tiny-sst2"


def write_tiny_distilbert(folder: Path, *, head: bool, seed: int = 0) -> Path:
    """A 2-layer DistilBERT (with a NEGATIVE/POSITIVE head, or the bare encoder) and its tokenizer."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertModel, DistilBertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    DistilBertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    if head:
        config = DistilBertConfig(vocab_size=len(VOCAB), id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                  label2id={"NEGATIVE": 0, "POSITIVE": 1}, **TINY)
        model = DistilBertForSequenceClassification(config)
        teach_sentiment(model, DistilBertTokenizer(vocab=str(folder / "vocab.txt")))
    else:
        model = DistilBertModel(DistilBertConfig(vocab_size=len(VOCAB), **TINY))
    model.save_pretrained(folder)
    return folder


POSITIVE = ("good", "great", "love", "excellent", "wonderful", "fantastic", "best", "enjoyed")
NEGATIVE = ("bad", "terrible", "awful", "boring", "worst", "hate", "poor", "waste")


def teach_sentiment(model: torch.nn.Module, tokenizer) -> None:
    """A few dozen steps on generated sentences, so the tiny classifier's answers depend on the words."""
    g = torch.Generator().manual_seed(0)
    fillers = ("the movie was", "this film is", "i think the plot is", "the acting was very")
    texts, labels = [], []
    for i in range(64):
        words = POSITIVE if i % 2 else NEGATIVE
        texts.append(f"{fillers[i % 4]} {words[int(torch.randint(8, (1,), generator=g))]}")
        labels.append(i % 2)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = model(**batch, labels=torch.tensor(labels)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="session")
def tiny_sst2(tmp_path_factory) -> Path:
    """A folder holding a tiny sentiment classifier, as save_pretrained writes it."""
    return write_tiny_distilbert(tmp_path_factory.mktemp("tiny-sst2"), head=True)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A folder holding a tiny DistilBERT encoder without a classifier (like distilbert-base-uncased)."""
    return write_tiny_distilbert(tmp_path_factory.mktemp("tiny-base"), head=False, seed=1)


@pytest.fixture
def hf_home(tmp_path, tiny_sst2) -> Path:
    """An HF_HOME whose hub cache holds the tiny classifier as `dlkit-test/tiny-sst2` (the hub's layout)."""
    home = tmp_path / "hf-home"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(tiny_sst2, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return home


def _imdb_layout():
    """tests/imdb_layout.py, loaded by path (tests run under --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location("imdb_layout", Path(__file__).parents[1] / "imdb_layout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FILLER = ("the movie film story plot actor director scene camera music script cast ending character it was "
          "and a of to in this that with for on as but at by from").split()


def keyword_reviews(n_per_label: int, seed: int, split: str) -> dict[str, str]:
    """Reviews of 5-60 filler words where one sentiment word decides the label (pos / neg), with
    official file names <id>_<rating>.txt under {split}/{neg,pos}/."""
    rng = np.random.default_rng(seed)
    reviews = {}
    for label, keywords, ratings in (("pos", POSITIVE, (7, 10)), ("neg", NEGATIVE, (1, 4))):
        for i in range(n_per_label):
            body = list(rng.choice(FILLER, size=int(rng.integers(5, 60))))
            body.insert(int(rng.integers(0, len(body) + 1)), str(rng.choice(keywords)))
            rating = int(rng.integers(ratings[0], ratings[1] + 1))
            reviews[f"{split}/{label}/{i}_{rating}.txt"] = " ".join(body).capitalize() + ".<br /><br />The end."
    return reviews


@pytest.fixture(scope="session")
def imdb_archive(tmp_path_factory) -> Path:
    """An aclImdb_v1.tar.gz in the official layout holding learnable keyword reviews (400 + 200 per label)."""
    folder = tmp_path_factory.mktemp("imdb")
    reviews = keyword_reviews(400, 0, "train") | keyword_reviews(200, 1, "test")
    _imdb_layout().write_imdb_archive(folder / "aclImdb_v1.tar.gz", reviews)
    return folder
