"""Text data: labelled texts become fixed-length token ids, by dlkit's word vocabulary (the LSTM
recipes) or by a Hugging Face tokenizer (DistilBERT). The tokenizer travels in bundle.json, so
`predict` and `serve` tokenize exactly as training did.

Data sets: `imdb` (the official aclImdb archive), `text_csv` (the user's CSV of text and label
columns) and `sentences` (examples written into the recipe, as S3.B's ten).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dlkit.config import DataCfg, TextCfg
from dlkit.data import DataShape, register_dataset
from dlkit.data.bundle import DataBundle, TensorSplit
from dlkit.data.inputs import TEXT_FIELD_LIMIT, csv_records
from dlkit.data.split import stratified_split, stratified_subset
from dlkit.errors import DataError, InputError

PAD, OOV = 0, 1
PAD_TOKEN, OOV_TOKEN = "<pad>", "<oov>"
# runs of letters or digits, keeping inner apostrophes (don't, it's); everything else separates words
_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def words(text: str, lowercase: bool = True) -> list[str]:
    """The words of `text`: HTML line breaks and punctuation split, case folded when `lowercase`."""
    text = _BREAK.sub(" ", text)
    return _WORD.findall(text.lower() if lowercase else text)


def fit_length(ids: Sequence[int], max_len: int, padding: str, truncating: str, pad_id: int) -> list[int]:
    """`ids` cut to `max_len` (losing the start for "pre", the end for "post") and padded at the
    "pre" (front) or "post" (back) end, as Keras' pad_sequences does."""
    ids = list(ids)
    if len(ids) > max_len:
        ids = ids[-max_len:] if truncating == "pre" else ids[:max_len]
    fill = [pad_id] * (max_len - len(ids))
    return fill + ids if padding == "pre" else ids + fill


@dataclass
class WordTokenizer:
    """Words to ids: 0 is padding, 1 any word outside the vocabulary, 2.. the vocabulary by frequency."""

    vocab: list[str]
    max_len: int
    padding: str = "pre"
    truncating: str = "pre"
    lowercase: bool = True
    pad_id: int = field(default=PAD, init=False)

    @classmethod
    def fit(cls, texts: Sequence[str], cfg: TextCfg) -> WordTokenizer:
        """The `cfg.max_words - 2` most frequent words of `texts` seen at least `cfg.min_count` times
        (ties broken alphabetically, so the vocabulary never depends on the order of the texts)."""
        counts = Counter(w for text in texts for w in words(text, cfg.lowercase))
        ranked = sorted((w for w, c in counts.items() if c >= cfg.min_count), key=lambda w: (-counts[w], w))
        return cls(ranked[: cfg.max_words - 2], cfg.max_len, cfg.padding, cfg.truncating, cfg.lowercase)

    @cached_property
    def index(self) -> dict[str, int]:
        """word -> id."""
        return {w: i + 2 for i, w in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        """Ids in use, counting PAD and OOV: the embedding's minimum number of rows."""
        return len(self.vocab) + 2

    def tokens(self, text: str) -> list[str]:
        """The words `encode` reads, in order, before truncation."""
        return words(text, self.lowercase)

    def ids(self, text: str) -> list[int]:
        """Each word's id (OOV for unknown words), before truncation and padding."""
        index = self.index
        return [index.get(w, OOV) for w in self.tokens(text)]

    def encode(self, texts: Sequence[str]) -> Tensor:
        """Token ids (N, max_len), int64, truncated and padded as configured."""
        rows = [fit_length(self.ids(t), self.max_len, self.padding, self.truncating, PAD) for t in texts]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_len)

    def decode(self, ids: Sequence[int]) -> str:
        """The words behind `ids`, padding dropped, unknown words shown as <oov>."""
        names = [PAD_TOKEN, OOV_TOKEN, *self.vocab]
        return " ".join(names[int(i)] for i in ids if int(i) != PAD)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, tagged with kind "words"."""
        return {"kind": "words", "vocab": self.vocab, "max_len": self.max_len, "padding": self.padding,
                "truncating": self.truncating, "lowercase": self.lowercase}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WordTokenizer:
        """Inverse of `to_dict`."""
        return cls(list(d["vocab"]), int(d["max_len"]), d["padding"], d["truncating"], bool(d["lowercase"]))


@dataclass
class HubTokenizer:
    """A Hugging Face fast tokenizer, kept as its tokenizer.json text so a bundle carries it whole.

    Texts are truncated to `max_len` tokens (special tokens included) and padded after the text
    with the tokenizer's pad id, which the model masks out.
    """

    spec: str  # the tokenizer.json text
    max_len: int
    pad_id: int
    source: str = ""

    @classmethod
    def load(cls, source: str, max_len: int) -> HubTokenizer:
        """The tokenizer of a hub id (`@revision` pinned) or a save_pretrained folder (HF_HOME, HF_HUB_OFFLINE respected)."""
        from transformers import AutoTokenizer

        from dlkit.hub import hf_load

        tok = hf_load(lambda s, local, rev: AutoTokenizer.from_pretrained(
            s, revision=rev, trust_remote_code=False, local_files_only=local), source, "data.text.tokenizer")
        if not getattr(tok, "is_fast", False) or tok.pad_token_id is None:
            raise DataError(f"data.text.tokenizer {source}: dlkit needs a fast tokenizer with a padding token")
        return cls(tok.backend_tokenizer.to_str(), max_len, int(tok.pad_token_id), source)

    @cached_property
    def backend(self) -> Any:
        """The `tokenizers.Tokenizer`, truncating to max_len, not padding."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(self.spec)
        tok.no_padding()
        tok.enable_truncation(self.max_len)
        return tok

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def tokens(self, text: str) -> list[str]:
        """The tokens the model reads, special tokens included."""
        return list(self.backend.encode(text).tokens)

    def encode(self, texts: Sequence[str]) -> Tensor:
        """Token ids (N, max_len), int64, padded after each text with `pad_id`."""
        encodings = self.backend.encode_batch(list(texts))
        rows = [fit_length(e.ids, self.max_len, "post", "post", self.pad_id) for e in encodings]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_len)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, tagged with kind "hub"."""
        return {"kind": "hub", "spec": self.spec, "max_len": self.max_len, "pad_id": self.pad_id,
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HubTokenizer:
        """Inverse of `to_dict`."""
        return cls(d["spec"], int(d["max_len"]), int(d["pad_id"]), d.get("source", ""))


Tokenizer = WordTokenizer | HubTokenizer


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer saved by `to_dict`."""
    kinds = {"words": WordTokenizer, "hub": HubTokenizer}
    if d.get("kind") not in kinds:
        raise ValueError(f"tokenizer kind {d.get('kind')!r}; expected 'words' or 'hub'")
    return kinds[d["kind"]].from_dict(d)


@dataclass
class TextPrep:
    """Texts -> token ids (N, max_len) with the tokenizer fitted (or loaded) at training time."""

    tokenizer: Tokenizer

    def apply(self, texts: Sequence[str]) -> Tensor:
        """Token ids for raw texts; an empty text is refused."""
        if not texts or any(not t.strip() for t in texts):
            raise InputError("empty text: give the text to classify, e.g. dlkit predict RUN \"a fine film\"")
        return self.tokenizer.encode(texts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, tagged with kind "text"."""
        return {"kind": "text", "tokenizer": self.tokenizer.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextPrep:
        """Inverse of `to_dict`."""
        return cls(tokenizer_from_dict(d["tokenizer"]))


def read_text(source: str) -> str:
    """A predict argument: the contents of an existing .txt file, else the text itself."""
    path = Path(source).expanduser()
    if path.suffix.lower() == ".txt" and path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {path} as UTF-8 text: {exc}") from None
    return source


def make_tokenizer(train_texts: Sequence[str], cfg: TextCfg) -> Tokenizer:
    """The recipe's tokenizer: a word vocabulary fitted on the training texts, or a hub tokenizer."""
    name = cfg.tokenizer or "words"
    if name == "words":
        return WordTokenizer.fit(train_texts, cfg)
    return HubTokenizer.load(name, cfg.max_len)


@dataclass
class Texts:
    """Labelled texts of one split."""

    texts: list[str]
    labels: list[str]

    def take(self, idx: np.ndarray) -> Texts:
        """The examples at `idx`."""
        return Texts([self.texts[i] for i in idx], [self.labels[i] for i in idx])


def text_bundle(train: Texts, test: Texts | None, cfg: DataCfg, seed: int, source: str,
                val: Texts | None = None, classes: list[str] | None = None) -> DataBundle:
    """Split (val from train unless given, test from train unless given), tokenize, and bundle.

    Classes are the labels sorted (unless given); two classes make a binary task (one logit).
    """
    classes = classes or sorted(set(train.labels) | set(test.labels if test else []) | set(val.labels if val else []))
    if len(classes) < 2:
        raise DataError(f"data set '{cfg.name}' has {len(classes)} class ({', '.join(classes)}); "
                        "classifying needs 2 or more")
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for label in train.labels], dtype=np.int64)
    fractions = (1.0, 0.0, 0.0)
    if val is None:
        fractions = (fractions[0] - cfg.val_split, cfg.val_split, 0.0)
    if test is None:
        if cfg.test_split <= 0:
            raise DataError(f"data set '{cfg.name}' has no test split; set data.test_split > 0")
        fractions = (fractions[0] - cfg.test_split, fractions[1], cfg.test_split)
    tr, va, te = stratified_split(y, fractions, seed) if len(y) else (np.arange(0, dtype=np.int64),) * 3
    parts = {"train": train.take(tr), "val": val or train.take(va), "test": test or train.take(te)}
    if cfg.subset is not None:
        keep = stratified_subset(np.array([index[lb] for lb in parts["train"].labels]), cfg.subset, seed)
        parts["train"] = parts["train"].take(keep)
    if not parts["train"].texts and (cfg.text.tokenizer or "words") == "words":
        raise DataError(f"data set '{cfg.name}' has no training examples to build a vocabulary from; "
                        "add some with split: train")
    tokenizer = make_tokenizer(parts["train"].texts, cfg.text)
    binary = len(classes) == 2
    splits: dict[str, TensorSplit] = {}
    for name, part in parts.items():
        unknown = sorted(set(part.labels) - set(classes))
        if unknown:
            raise DataError(f"data set '{cfg.name}': {name} label '{unknown[0]}' is not one of {', '.join(classes)}")
        x = tokenizer.encode(part.texts)
        labels = torch.tensor([index[lb] for lb in part.labels], dtype=torch.int64)
        lengths = (x != tokenizer.pad_id).sum(1) if name == "train" else None
        splits[name] = TensorSplit(x, labels.float() if binary else labels, lengths=lengths)
    if not len(splits["test"]):
        raise DataError(f"data set '{cfg.name}' has no test examples; add some with split: test")
    counts = {name: s.class_counts(len(classes)) for name, s in splits.items()}
    return DataBundle(
        train=splits["train"],
        val=splits["val"] if len(splits["val"]) else None,
        test=splits["test"],
        classes=classes,
        input_shape=(cfg.text.max_len,),
        task="binary" if binary else "multiclass",
        input_kind="tokens",
        preprocessing=TextPrep(tokenizer).to_dict(),
        meta={"source": source, "class_counts": counts, "seed": seed, "vocab_size": tokenizer.vocab_size,
              "pad_id": tokenizer.pad_id},
    )


def _text_shape(num_classes: int | None) -> Callable[[DataCfg], DataShape]:
    """A shape function for text data sets whose classes are known (or given by data.num_classes)."""

    def shape(cfg: DataCfg) -> DataShape:
        n = cfg.num_classes or num_classes or 2
        return DataShape((cfg.text.max_len,), n, "binary" if n == 2 else "multiclass")

    return shape


@register_dataset("imdb", shape=_text_shape(2),
                  description="IMDb reviews (Maas et al. 2011): 50,000 labelled; downloaded, sha256-checked")
def load_imdb(cfg: DataCfg, seed: int) -> DataBundle:
    """IMDb movie reviews (Maas et al. 2011): the official 25,000 train / 25,000 test, neg and pos."""
    from dlkit.data.imdb import is_verified, read_imdb

    reviews = read_imdb(cfg)
    parts = {name: Texts([r.text for r in rs], [r.label for r in rs]) for name, rs in reviews.items()}
    files = ("official aclImdb archive" if is_verified(cfg) else
             "aclImdb files (official format, not verified: data.verify=false or an extracted folder)")
    source = (f"IMDb reviews (Maas et al. 2011), {files}: {len(parts['train'].texts)} train / "
              f"{len(parts['test'].texts)} test (official test split as test)")
    return text_bundle(parts["train"], parts["test"], cfg, seed, source, classes=["neg", "pos"])


@register_dataset("text_csv", shape=_text_shape(None), description="your texts: a CSV of text and label (--data FILE.csv)")
def load_text_csv(cfg: DataCfg, seed: int) -> DataBundle:
    """The user's CSV (data.path) with a text and a label column (data.text.text_column / label_column)."""
    if not cfg.path:
        raise DataError("data set 'text_csv' needs --data FILE.csv (a CSV with a header row)")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; give a CSV with '{cfg.text.text_column}' and "
                        f"'{cfg.text.label_column}' columns")
    text_col, label_col = cfg.text.text_column, cfg.text.label_column
    try:
        records = csv_records(path.read_text(encoding="utf-8-sig"), TEXT_FIELD_LIMIT)
    except UnicodeDecodeError:
        raise DataError(f"data file {path} is not UTF-8 text; save it as UTF-8 CSV") from None
    except OSError as exc:
        raise DataError(f"data file {path} cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise DataError(f"data file {path} is not a readable CSV: {exc}") from None
    header = [c.strip() for c in records[0][1]] if records else []
    missing = [c for c in (text_col, label_col) if c not in header]
    if missing:
        raise DataError(
            f"data file {path}: no column '{missing[0]}' (columns: {', '.join(header) or 'none'}); set "
            f"data.text.text_column / data.text.label_column"
        )
    t, lb = header.index(text_col), header.index(label_col)
    rows = [(r[t] if t < len(r) else "", (r[lb] if lb < len(r) else "").strip()) for _, r in records[1:]]
    for (line, _), (_, label) in zip(records[1:], rows):
        if not label:
            raise DataError(f"data file {path}: line {line} has an empty '{label_col}'")
    texts = Texts([t for t, _ in rows], [lb for _, lb in rows])
    source = f"CSV file {path.name}: {len(rows)} texts, text column '{text_col}', label column '{label_col}'"
    return text_bundle(texts, None, cfg, seed, source)


@register_dataset("sentences", shape=_text_shape(None), description="labelled sentences written in the recipe itself")
def load_sentences(cfg: DataCfg, seed: int) -> DataBundle:
    """Labelled texts written into the recipe (data.text.samples), each naming its split."""
    samples = cfg.text.samples
    if not samples:
        raise DataError("data set 'sentences' needs data.text.samples: a list of {text, label, split}")
    parts = {name: Texts([s.text for s in samples if s.split == name], [s.label for s in samples if s.split == name])
             for name in ("train", "val", "test")}
    counts = ", ".join(f"{len(p.texts)} {name}" for name, p in parts.items() if p.texts)
    source = f"{len(samples)} sentences written in the recipe ({counts})"
    return text_bundle(parts["train"], parts["test"] if parts["test"].texts else None, cfg, seed, source,
                       val=parts["val"] if parts["val"].texts else None)
