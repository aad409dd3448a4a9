"""Which tokens a text model's prediction rests on, by occlusion.

Each token is replaced, one at a time, by the tokenizer's unknown-word id (the padding id when it
has none); its importance is how much the predicted class's probability drops. A token the model
ignores scores exactly 0, one arguing against the prediction scores below 0. All the occluded
copies of a few texts go through the model as one batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dlkit.data.bundle import Task
from dlkit.data.text import OOV, OOV_TOKEN, PAD_TOKEN, HubTokenizer, Tokenizer, WordTokenizer
from dlkit.engine.runtime import eval_mode, model_device
from dlkit.evaluate.metrics import probabilities

MAX_TOKENS = 60  # tokens scored per text: a figure of more is unreadable


@dataclass
class TokenScores:
    """One text's scored tokens (ids in reading order) and the prediction they are scored against."""

    ids: list[int]
    scores: list[float]  # probability of `label` minus its probability with the token occluded
    label: int
    confidence: float


def mask_id(tokenizer: Tokenizer) -> int:
    """The id an occluded token becomes: the unknown-word id, else padding."""
    if isinstance(tokenizer, WordTokenizer):
        return OOV
    unk = getattr(tokenizer.backend.model, "unk_token", None)
    found = tokenizer.backend.token_to_id(unk) if unk else None
    return tokenizer.pad_id if found is None else int(found)


def token_names(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """The text of each token id."""
    if isinstance(tokenizer, HubTokenizer):
        return [tokenizer.backend.id_to_token(i) or f"[{i}]" for i in ids]
    names = [PAD_TOKEN, OOV_TOKEN, *tokenizer.vocab]
    return [names[i] if 0 <= i < len(names) else f"[{i}]" for i in ids]


@torch.no_grad()
def occlusion_importance(model: nn.Module, ids: Tensor, task: Task, pad_id: int, occlude_with: int,
                         max_tokens: int = MAX_TOKENS) -> list[TokenScores]:
    """Importance of each of the first `max_tokens` non-padding tokens of each row of `ids` (N, L)."""
    device = model_device(model)
    rows, spans = [], []
    for row in ids:
        positions = torch.nonzero(row != pad_id).flatten()[:max_tokens]
        occluded = row.repeat(len(positions) + 1, 1)  # the text itself, then one copy per occluded token
        occluded[torch.arange(1, len(positions) + 1), positions] = occlude_with
        spans.append(positions)
        rows.append(occluded)
    with eval_mode(model):
        probs = probabilities(model(torch.cat(rows).to(device)).float().cpu(), task)
    out, start = [], 0
    for row, positions in zip(ids, spans):
        block = probs[start : start + len(positions) + 1]
        start += len(positions) + 1
        label = int(block[0].argmax())
        drop = block[0, label] - block[1:, label]
        out.append(TokenScores(row[positions].tolist(), drop.tolist(), label, float(block[0, label])))
    return out
