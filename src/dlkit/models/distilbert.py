"""DistilBERT (Sanh et al. 2019) through Hugging Face `transformers`, behind dlkit's model surface.

`model.weights` is a hub id pinned to a revision after `@`
(`distilbert/distilbert-base-uncased-finetuned-sst-2-english@714eb0fa...`; the tokenizer follows it) or
a folder written by save_pretrained; weights load from safetensors only and no remote code runs. The bundle keeps
the model's config, so `predict` rebuilds it offline and loads dlkit's own model.safetensors.

The machinery is `hf_text`'s (any sequence-classification encoder); this family accepts DistilBERT
checkpoints only and, without weights, builds distilbert-base-uncased's architecture. A checkpoint's
two-logit head is folded into one logit (z = z1 - z0, the same probabilities) as there.
"""
from __future__ import annotations

from typing import Any

from dlkit.models import Family, register_model
from dlkit.models.hf_text import TextTransformer, finish, from_config, hf_config, load_hub_model

__all__ = ["TextTransformer", "distilbert"]

# the checkpoint whose tokenizer a distilbert without model.weights reads, pinned to one commit
DEFAULT_CHECKPOINT = "distilbert/distilbert-base-uncased@12040accade4e8a0f71eabdb258fecc2e7e948be"


@register_model("distilbert", Family(hub_default=DEFAULT_CHECKPOINT))
def distilbert(
    num_classes: int = 2,
    input_shape: tuple[int, ...] = (128,),
    config: dict[str, Any] | None = None,
    weights: str | None = None,
    dropout: float | None = None,
) -> TextTransformer:
    """DistilBERT for sequence classification over `input_shape[0]` tokens.

    From `weights` (hub id or folder: config and weights loaded), else from `config` (a bundle's,
    random weights to be overwritten), else distilbert/distilbert-base-uncased's architecture at random.
    `dropout` overrides the classifier's dropout (seq_classif_dropout, 0.2 in the checkpoints).
    """
    from dlkit.hub import quiet_transformers

    quiet_transformers()
    if weights is not None:
        model = load_hub_model(weights, num_classes, "distilbert", model_type="distilbert")
    else:
        model = from_config(hf_config(config or {}, model_type="distilbert"), num_classes)
    if dropout is not None:
        model.model.config.seq_classif_dropout = dropout  # the config a bundle keeps says it too
    return finish(model, input_shape, dropout)
