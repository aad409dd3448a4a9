"""Text data sets: imdb from its official archive, the user's CSV, sentences in the recipe; the
vocabulary is fitted on the training split only; batches bucket rows of similar length."""
from __future__ import annotations

import pytest
import torch

from dlkit.config import DataCfg, TextCfg, TextSample
from dlkit.data import load_data
from dlkit.data.bundle import TensorSplit, bucketed
from dlkit.data.text import OOV, WordTokenizer
from dlkit.errors import DataError


def test_imdb_from_the_official_archive(imdb_archive, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = DataCfg(name="imdb", data_dir=str(imdb_archive), verify=False, val_split=0.25,
                  text=TextCfg(max_words=50, max_len=40))
    data = load_data(cfg, seed=0)
    assert data.classes == ["neg", "pos"] and data.task == "binary" and data.input_kind == "tokens"
    assert (len(data.train), len(data.val), len(data.test)) == (600, 200, 400)  # official test split kept
    assert data.train.class_counts(2) == [300, 300] and data.test.class_counts(2) == [200, 200]
    assert data.train.x.shape == (600, 40) and data.train.x.dtype == torch.long
    assert torch.equal(data.train.lengths, (data.train.x != 0).sum(1))
    assert data.val.lengths is None  # only training batches are shuffled
    tok = WordTokenizer.from_dict(data.preprocessing["tokenizer"])
    assert tok.vocab_size == 50 == data.meta["vocab_size"]
    assert "br" not in tok.vocab and "the" in tok.vocab  # the markup is gone
    assert data.train.x.max() < 50
    assert data.meta["source"] == ("IMDb reviews (Maas et al. 2011), aclImdb files (official format, not verified: "
                                   "data.verify=false or an extracted folder): 800 train / 400 test (official test "
                                   "split as test)")


def test_imdb_says_official_only_for_the_checked_archive(imdb_archive, tmp_path, monkeypatch) -> None:
    from dlkit.data import imdb
    from dlkit.data.download import RemoteFile
    from dlkit.files import sha256_file

    archive = imdb_archive / imdb.ARCHIVE.name
    monkeypatch.setattr(imdb, "ARCHIVE", RemoteFile(archive.name, sha256_file(archive), imdb.ARCHIVE.urls))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = DataCfg(name="imdb", data_dir=str(imdb_archive), text=TextCfg(max_words=50, max_len=40))
    assert imdb.is_verified(cfg) and not imdb.is_verified(cfg.model_copy(update={"verify": False}))
    assert load_data(cfg, seed=0).meta["source"] == (
        "IMDb reviews (Maas et al. 2011), official aclImdb archive: 800 train / 400 test (official test split as test)")
    unpacked = next((tmp_path / "cache" / "dlkit" / "datasets" / "imdb").glob("aclImdb-*"))
    assert not imdb.is_verified(cfg.model_copy(update={"data_dir": str(unpacked)}))  # a folder has no digest


def test_the_vocabulary_comes_from_the_training_split_only() -> None:
    samples = [TextSample(text="alpha beta", label="a"), TextSample(text="gamma delta", label="b"),
               TextSample(text="zeta", label="a", split="val"), TextSample(text="omega alpha", label="b", split="test")]
    data = load_data(DataCfg(name="sentences", text=TextCfg(samples=samples, max_len=3, padding="post")), seed=0)
    tok = WordTokenizer.from_dict(data.preprocessing["tokenizer"])
    assert sorted(tok.vocab) == ["alpha", "beta", "delta", "gamma"]
    assert data.val.x.tolist() == [[OOV, 0, 0]]
    assert data.test.x.tolist() == [[OOV, tok.index["alpha"], 0]]
    assert data.test.y.tolist() == [1.0]


def test_sentences_need_samples_and_a_test_split() -> None:
    with pytest.raises(DataError, match=r"^data set 'sentences' needs data.text.samples"):
        load_data(DataCfg(name="sentences"), seed=0)
    only_train = [TextSample(text="good", label="p"), TextSample(text="bad", label="n")]
    with pytest.raises(DataError, match=r"^data set .sentences. has no test split; set data.test_split > 0$"):
        load_data(DataCfg(name="sentences", test_split=0.0, val_split=0.0, text=TextCfg(samples=only_train)), seed=0)


def test_text_csv_reads_named_columns_and_splits_three_ways(tmp_path) -> None:
    rows = ["review,stars,sentiment"] + [f'"text {i}, with a comma",{i % 5},{"pos" if i % 3 else "neg"}'
                                         for i in range(60)]
    (tmp_path / "reviews.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = DataCfg(name="text_csv", path=str(tmp_path / "reviews.csv"), val_split=0.1, test_split=0.2,
                  text=TextCfg(text_column="review", label_column="sentiment", max_len=6))
    data = load_data(cfg, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (42, 6, 12)
    assert data.classes == ["neg", "pos"]
    assert data.meta["source"] == "CSV file reviews.csv: 60 texts, text column 'review', label column 'sentiment'"


@pytest.mark.parametrize(("content", "message"), [
    ("text,label\nfine,\n", r"line 2 has an empty 'label'"),
    ("body,label\nfine,pos\n", r"no column 'text' \(columns: body, label\); set data.text.text_column"),
    ("text,label\n" + "same,one\n" * 5, r"has 1 class \(one\); classifying needs 2 or more"),
])
def test_text_csv_mistakes_are_one_line(tmp_path, content: str, message: str) -> None:
    (tmp_path / "t.csv").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_data(DataCfg(name="text_csv", path=str(tmp_path / "t.csv")), seed=0)


def test_text_csv_without_a_file() -> None:
    with pytest.raises(DataError, match=r"^data set 'text_csv' needs --data FILE.csv"):
        load_data(DataCfg(name="text_csv"), seed=0)
    with pytest.raises(DataError, match=r"^data file nope.csv does not exist"):
        load_data(DataCfg(name="text_csv", path="nope.csv"), seed=0)


def test_bucketed_batches_cover_every_row_once_with_similar_lengths() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 201, (3200,), generator=g)
    batches = bucketed(lengths, 32, torch.Generator().manual_seed(1))
    assert sorted(torch.cat(batches).tolist()) == list(range(3200))
    spread = torch.tensor([float(lengths[b].max() - lengths[b].min()) for b in batches]).mean()
    shuffled = torch.randperm(3200, generator=g).split(32)
    random_spread = torch.tensor([float(lengths[b].max() - lengths[b].min()) for b in shuffled]).mean()
    assert spread < 0.1 * random_spread  # padding to each batch's longest row costs little
    again = bucketed(lengths, 32, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # seeded
    split = TensorSplit(torch.zeros(3200, 2), torch.zeros(3200), lengths=lengths)
    firsts = [x.shape[0] for x, _ in split.batches(32, shuffle=True, generator=torch.Generator().manual_seed(1))]
    assert sum(firsts) == 3200
