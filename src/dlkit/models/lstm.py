"""Recurrent classifiers (S0.2 imdb-lstm, S3.B tiny-text-lstm, S4.2 breast-cancer-lstm).

One trunk reads either token ids (embedding first) or tabular rows (cut into time steps), runs a
stack of LSTM or GRU layers and hands the last hidden state to a small dense head.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dlkit.errors import ConfigError, did_you_mean
from dlkit.models import register_model
from dlkit.models.surface import Classifier


def left_align(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the real (non-zero) ids of each row to its front, cut the columns that are padding in every
    row, and return them with each row's length."""
    # Keras pads at the front, others at the back: aligning first makes any padding give the same answer
    order = torch.argsort((ids == 0).to(torch.uint8), dim=1, stable=True)
    lengths = (ids != 0).sum(dim=1).clamp(min=1)  # an all-pad row reads one pad (a zero embedding)
    return ids.gather(1, order)[:, : int(lengths.max())], lengths


def run_layer(rnn: nn.RNNBase, x: torch.Tensor, lengths: torch.Tensor | None,
              recurrent_dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one recurrent layer over left-aligned rows; return its output sequence and the hidden state
    (N, directions*H) at each row's last real step.

    A forward-only layer runs unpacked: step t reads steps <= t only, so the output at step
    `length - 1` is exactly what packing would give, and the fused kernel keeps its speed (packed
    input on CPU measured 4.6x slower). A bidirectional layer's backward pass must start at each
    row's own end, so it is packed.
    """
    weights = None
    if recurrent_dropout and rnn.training:
        # DropConnect on the hidden-to-hidden weights, one mask per batch (Merity et al. 2017)
        weights = {name: F.dropout(w, recurrent_dropout) if name.startswith("weight_hh") else w
                   for name, w in rnn.named_parameters()}
    call = (lambda inp: functional_call(rnn, weights, (inp,))) if weights is not None else rnn
    if lengths is None:
        out, hidden = call(x)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # an LSTM also returns its cell state
        return out, torch.cat(list(hidden), dim=-1)
    if not rnn.bidirectional:
        out, _ = call(x)
        return out, out[torch.arange(len(out), device=out.device), lengths.to(out.device) - 1]
    steps = x.shape[1]
    out, hidden = call(pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False))
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=steps)
    return out, torch.cat(list(hidden), dim=-1)


class RecurrentTrunk(nn.Module):
    """Token ids (N, T) or tabular rows (N, F) -> the last hidden state of a stack of recurrent layers."""

    def __init__(
        self,
        in_features: int,
        sizes: Sequence[int],
        cell: type[nn.RNNBase],
        bidirectional: bool,
        dropout: float,
        steps: int | None = None,
        embed: nn.Embedding | None = None,
        recurrent_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.steps = steps
        self.embed = embed
        self.drop = nn.Dropout(dropout)  # on each layer's inputs, as Keras' LSTM(dropout=...)
        self.recurrent_dropout = recurrent_dropout
        directions = 2 if bidirectional else 1
        widths = [in_features, *(size * directions for size in sizes)]
        self.rnns = nn.ModuleList(
            cell(width, size, batch_first=True, bidirectional=bidirectional) for width, size in zip(widths, sizes)
        )
        self.out_features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden state of the top layer, read at each row's last real step."""
        if self.embed is None:
            x, lengths = x.reshape(len(x), self.steps, -1), None
        else:
            ids, lengths = left_align(x)
            x = self.embed(ids)
        for rnn in self.rnns:
            x, hidden = run_layer(rnn, self.drop(x), lengths, self.recurrent_dropout)
        return hidden


def recurrent_cell(name: str) -> type[nn.RNNBase]:
    """The recurrent layer class called `name`; an unknown name is a ConfigError."""
    cells = {"lstm": nn.LSTM, "gru": nn.GRU}
    if name not in cells:
        raise ConfigError(f"model.cell must be one of {', '.join(cells)}, got '{name}'{did_you_mean(name, cells)}")
    return cells[name]


@register_model("lstm")
def lstm(
    num_classes: int = 1,
    input_shape: tuple[int, ...] = (30,),
    steps: int | None = None,
    vocab_size: int | None = None,
    embed_dim: int = 128,
    hidden: int = 64,
    layers: int = 1,
    stacked: tuple[int, ...] | None = None,
    bidirectional: bool = False,
    dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    dense: int | None = None,
    cell: str = "lstm",
) -> Classifier:
    """An LSTM/GRU classifier over token ids (`vocab_size` set, id 0 = padding) or tabular rows.

    Tabular rows of F features become `steps` time steps of F // steps features (default: one
    feature per step). `stacked=(64, 32)` stacks layers of those sizes, else `layers` x `hidden`;
    `dense` adds Dense(dense) relu before the output layer. `dropout` drops each layer's inputs;
    `recurrent_dropout` drops hidden-to-hidden weights (DropConnect, one mask per batch), standing
    in for Keras' per-step recurrent dropout, which has no fused kernel.
    """
    for field, p in (("dropout", dropout), ("recurrent_dropout", recurrent_dropout)):
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"model.{field} must be in [0, 1), got {p}")
    rnn_cell = recurrent_cell(cell)
    sizes = tuple(stacked) if stacked is not None else (hidden,) * layers
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"model.stacked / model.layers must give at least one layer of size >= 1, got {sizes}")
    if vocab_size is None:
        features = math.prod(input_shape)
        steps = features if steps is None else steps
        if steps < 1 or features % steps:
            raise ConfigError(
                f"model.steps={steps} does not divide the {features} input features; pick a divisor of {features}"
            )
        trunk = RecurrentTrunk(features // steps, sizes, rnn_cell, bidirectional, dropout, steps=steps,
                               recurrent_dropout=recurrent_dropout)
    else:
        if steps is not None:
            raise ConfigError("model.steps applies to tabular input only; remove it when model.vocab_size is set")
        embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        trunk = RecurrentTrunk(embed_dim, sizes, rnn_cell, bidirectional, dropout, embed=embed,
                               recurrent_dropout=recurrent_dropout)
    width = trunk.out_features
    head: list[nn.Module] = []
    if dense is not None:
        head += [nn.Linear(width, dense), nn.ReLU()]
        width = dense
    head.append(nn.Linear(width, num_classes))
    input_dtype = torch.float32 if vocab_size is None else torch.long
    return Classifier(trunk, nn.Sequential(*head), input_dtype=input_dtype)
