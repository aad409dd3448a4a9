"""The recurrent classifier: padding never changes the answer, tabular rows become sequences, it learns."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dlkit.errors import ConfigError
from dlkit.models import build


def pad(rows: list[list[int]], length: int, front: bool = False) -> torch.Tensor:
    """Token rows padded with id 0 to `length`, at the back (or front, as Keras does)."""
    padded = [[0] * (length - len(r)) + r if front else r + [0] * (length - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"stacked": (8, 6), "dense": 4},
        {"bidirectional": True, "cell": "gru"},
        {"layers": 2, "bidirectional": True},
    ],
)
def test_padding_never_changes_the_logits(kwargs: dict) -> None:
    torch.manual_seed(0)
    model = build("lstm", num_classes=2, input_shape=(20,), vocab_size=30, embed_dim=8, hidden=8, **kwargs).eval()
    rows = [[5, 3, 9], [1, 2, 3, 4, 5, 6, 7], [29], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7]]
    with torch.no_grad():
        short = model(pad(rows, 10))
        long = model(pad(rows, 20))
        front = model(pad(rows, 16, front=True))
        alone = torch.cat([model(torch.tensor([r])) for r in rows])
    for other in (long, front, alone):
        assert torch.allclose(short, other, atol=1e-6)
    assert not torch.allclose(short[0], short[1], atol=1e-3)  # the ids do matter


def test_token_mode_reads_long_ids() -> None:
    model = build("lstm", input_shape=(10,), vocab_size=30)
    assert model.input_dtype == torch.long
    assert model.features.embed.padding_idx == 0
    assert build("lstm").input_dtype == torch.float32


def test_tabular_rows_become_sequences_of_consecutive_features() -> None:
    model = build("lstm", input_shape=(30,), steps=10, hidden=4)
    assert model.features.rnns[0].input_size == 3
    seen = []
    model.features.rnns[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.randn(5, 30)
    assert model(x).shape == (5, 1)
    assert seen[0].shape == (5, 10, 3)
    assert torch.equal(seen[0][:, 1], x[:, 3:6])


def test_one_feature_per_step_by_default() -> None:
    model = build("lstm", input_shape=(30,))
    assert model.features.steps == 30 and model.features.rnns[0].input_size == 1


def test_steps_that_do_not_divide_the_features_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.steps=7 does not divide the 30 input features"):
        build("lstm", input_shape=(30,), steps=7)


def test_steps_with_token_ids_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.steps applies to tabular input only"):
        build("lstm", input_shape=(10,), vocab_size=30, steps=5)


def test_unknown_cell_names_the_field_and_choices() -> None:
    with pytest.raises(ConfigError, match=r"model\.cell must be one of lstm, gru, got 'lsmt' \(did you mean 'lstm'\?\)"):
        build("lstm", cell="lsmt")


def test_stacked_tiny_text_lstm_has_the_expected_layers() -> None:
    # S3.B: Embedding(1000, 64), LSTM64 (sequences), LSTM32, Dense16 relu, Dense1
    model = build("lstm", input_shape=(10,), vocab_size=1000, embed_dim=64, stacked=(64, 32), dense=16)
    assert [rnn.hidden_size for rnn in model.features.rnns] == [64, 32]
    assert [m.out_features for m in model.head if isinstance(m, nn.Linear)] == [16, 1]
    # Keras counts 109,985: PyTorch keeps two bias vectors per gate, 4 * (64 + 32) more
    assert sum(p.numel() for p in model.parameters()) == 109_985 + 4 * (64 + 32)


def test_lstm_learns_whether_a_sequence_sums_above_zero() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    y = (x.sum(dim=1) > 0).float().unsqueeze(1)
    model = build("lstm", input_shape=(20,), hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
    accuracy = ((model(x) > 0).float() == y).float().mean().item()
    assert accuracy > 0.9
