"""dlkit's word tokenizer: words, vocabulary order, OOV, Keras-style truncation and padding, round trips."""
from __future__ import annotations

import json

import pytest
import torch

from dlkit.config import TextCfg
from dlkit.data.preprocess import prep_from_dict, read_input
from dlkit.data.text import OOV, PAD, TextPrep, WordTokenizer, fit_length, tokenizer_from_dict, words
from dlkit.errors import InputError


def test_words_fold_case_split_punctuation_and_keep_inner_apostrophes() -> None:
    assert words("Don't STOP<br />believing... it's 10/10!") == ["don't", "stop", "believing", "it's", "10", "10"]
    assert words("Café, naïve  résumé") == ["café", "naïve", "résumé"]
    assert words("snake_case and--dashes", lowercase=False) == ["snake", "case", "and", "dashes"]
    assert words("<BR/>Hello<br>there") == ["hello", "there"]


def test_vocabulary_ranks_by_frequency_then_alphabet_and_caps_at_max_words() -> None:
    texts = ["b a c a", "c a b d", "e"]  # a:3, b:2, c:2, d:1, e:1
    tok = WordTokenizer.fit(texts, TextCfg(max_words=5, max_len=4))
    assert tok.vocab == ["a", "b", "c"]  # 5 ids = PAD, OOV and three words
    assert tok.vocab_size == 5
    assert tok.ids("a b c d e") == [2, 3, 4, OOV, OOV]
    # the order of the texts never changes the vocabulary
    assert WordTokenizer.fit(texts[::-1], TextCfg(max_words=5, max_len=4)).vocab == tok.vocab


def test_min_count_sends_rare_words_to_oov() -> None:
    tok = WordTokenizer.fit(["x x y"], TextCfg(min_count=2, max_len=3))
    assert tok.vocab == ["x"]
    assert tok.ids("x y z") == [2, OOV, OOV]


@pytest.mark.parametrize(("padding", "truncating", "expected"), [
    ("pre", "pre", [[0, 0, 1, 2], [3, 4, 5, 6]]),
    ("post", "pre", [[1, 2, 0, 0], [3, 4, 5, 6]]),
    ("pre", "post", [[0, 0, 1, 2], [1, 2, 3, 4]]),
    ("post", "post", [[1, 2, 0, 0], [1, 2, 3, 4]]),
])
def test_fit_length_matches_keras_pad_sequences(padding: str, truncating: str, expected: list[list[int]]) -> None:
    # Keras: pad_sequences([[1, 2], [1, 2, 3, 4, 5, 6]], maxlen=4, padding=..., truncating=...)
    got = [fit_length(row, 4, padding, truncating, PAD) for row in ([1, 2], [1, 2, 3, 4, 5, 6])]
    assert got == expected


def test_encode_decode_round_trip_and_oov() -> None:
    tok = WordTokenizer.fit(["the film was great", "the plot was thin"], TextCfg(max_len=8, padding="post"))
    x = tok.encode(["The film was GREAT!", "the acting was superb"])
    assert x.dtype == torch.long and x.shape == (2, 8)
    assert tok.decode(x[0].tolist()) == "the film was great"
    assert tok.decode(x[1].tolist()) == "the <oov> was <oov>"
    assert (x[1] == OOV).sum() == 2 and (x[:, 4:] == PAD).all()


def test_the_tokenizer_survives_json_and_tokenizes_identically() -> None:
    tok = WordTokenizer.fit(["a b c", "c d e f"], TextCfg(max_len=5, padding="pre", truncating="post"))
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    texts = ["a c f g", "f e d c b a"]
    assert torch.equal(again.encode(texts), tok.encode(texts))
    spec = prep_from_dict(json.loads(json.dumps(TextPrep(tok).to_dict())))
    assert torch.equal(read_input("a c f g", spec), tok.encode(["a c f g"]))


def test_predict_reads_a_txt_file_or_takes_the_text_itself(tmp_path) -> None:
    tok = WordTokenizer.fit(["good bad"], TextCfg(max_len=3))
    spec = TextPrep(tok)
    (tmp_path / "review.txt").write_text("bad good good", encoding="utf-8")
    assert read_input(str(tmp_path / "review.txt"), spec).tolist() == [[2, 3, 3]]
    assert read_input("review.txt", spec).tolist() == [[2, 3, 3]]  # relative to the working folder
    assert read_input("good", spec).tolist() == [[0, 0, 3]]
    with pytest.raises(InputError, match=r"^empty text: give the text to classify"):
        read_input("   ", spec)
