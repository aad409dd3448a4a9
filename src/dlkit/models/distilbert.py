"""DistilBERT (Sanh et al. 2019) through Hugging Face `transformers`, behind dlkit's model surface.

`model.weights` is a hub id pinned to a revision after `@`
(`distilbert/distilbert-base-uncased-finetuned-sst-2-english@714eb0fa...`; the tokenizer follows it) or
a folder written by save_pretrained; weights load from safetensors only and no remote code runs. The bundle keeps
the model's config, so `predict` rebuilds it offline and loads dlkit's own model.safetensors.

Two classes are one logit in dlkit (a sigmoid); a checkpoint's two-logit head is folded into one
(z = z1 - z0, so sigmoid(z) equals the softmax probability of class 1 that the pipeline reports).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dlkit.errors import ConfigError
from dlkit.models import Family, register_model
from dlkit.models.surface import ModelSurface


class TextTransformer(ModelSurface):
    """A sequence classifier: token ids (N, T) padded with `pad_id` in, logits out.

    The attention mask is read off the ids; columns that are padding in every row are cut first,
    so a batch of short texts costs what its longest text costs.
    """

    def __init__(self, model: nn.Module, pad_id: int, report: str | None = None,
                 label_names: list[str] | None = None) -> None:
        super().__init__()
        self.model = model
        self.pad_id = pad_id
        self.input_dtype = torch.long
        self.load_report = report  # what loading the weights did, for the run's notes
        self.label_names = label_names  # the checkpoint's own trained label names, when it had a head
        # a view over the classifier layers, kept out of the module tree (its weights live under `model`)
        object.__setattr__(self, "_head", nn.ModuleList([model.pre_classifier, model.classifier]))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of token ids."""
        mask = ids != self.pad_id
        used = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
        return self.model(input_ids=ids[:, :used], attention_mask=mask[:, :used]).logits

    @property
    def cam_layer(self) -> None:
        """No conv layer: Grad-CAM does not apply (token importance explains text models)."""
        return None

    @property
    def features(self) -> nn.Module:
        """The transformer trunk."""
        return self.model.distilbert

    @property
    def head(self) -> nn.ModuleList:
        """The classification layers on the [CLS] token."""
        return self._head

    @property
    def blocks(self) -> list[nn.Module]:
        """Embeddings, each transformer layer, then the head."""
        trunk = self.model.distilbert
        return [trunk.embeddings, *trunk.transformer.layer, self.head]

    def bundle_args(self) -> dict[str, Any]:
        """Builder arguments that rebuild this architecture with no download: its config."""
        return {"config": self.model.config.to_dict()}


def _hf_config(config: dict[str, Any]) -> Any:
    """A DistilBertConfig from its dict (as saved in a bundle); a bad dict is a ConfigError line."""
    from transformers import DistilBertConfig

    try:
        return DistilBertConfig.from_dict({**config, "problem_type": None})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.config is not a DistilBERT config: {' '.join(str(exc).split())[:200]}") from None


def _check_length(max_len: int, positions: int) -> None:
    if max_len > positions:
        raise ConfigError(f"data.text.max_len is {max_len} but the model reads at most {positions} tokens; "
                          f"set data.text.max_len <= {positions}")


def _fold_two_logits(model: nn.Module) -> None:
    """Replace a two-logit classifier by one logit z1 - z0 (sigmoid(z1 - z0) = softmax(z)[1])."""
    old = model.classifier
    new = nn.Linear(old.in_features, 1)
    with torch.no_grad():
        new.weight.copy_(old.weight[1:2] - old.weight[0:1])
        new.bias.copy_(old.bias[1:2] - old.bias[0:1])
    model.classifier = new
    model.config.problem_type = None  # dlkit computes the loss itself; HF would refuse "single_label" with 1 output
    model.config.num_labels = 1


def load_hub_model(source: str, num_classes: int) -> TextTransformer:
    """A sequence classifier from a hub id or folder, its head fitted to `num_classes` outputs."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dlkit.hub import hf_load

    config = hf_load(lambda s, local, rev: AutoConfig.from_pretrained(
        s, revision=rev, trust_remote_code=False, local_files_only=local), source, "model.weights")
    if config.model_type != "distilbert":
        raise ConfigError(f"model.weights {source} is a '{config.model_type}' model; model 'distilbert' needs a "
                          "DistilBERT checkpoint")
    has_head = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    fold = has_head and config.num_labels == 2 and num_classes == 1
    keep = has_head and (fold or config.num_labels == num_classes)
    kwargs: dict[str, Any] = {} if keep else {"num_labels": num_classes, "ignore_mismatched_sizes": True}
    model, info = hf_load(lambda s, local, rev: AutoModelForSequenceClassification.from_pretrained(
        s, revision=rev, use_safetensors=True, trust_remote_code=False, dtype=torch.float32,
        output_loading_info=True, local_files_only=local, **kwargs), source, "model.weights")
    if fold:
        _fold_two_logits(model)
    new = sorted(set(info.get("missing_keys", [])) | {k[0] if isinstance(k, tuple) else k
                                                      for k in info.get("mismatched_keys", [])})
    total = len(model.state_dict())
    line = f"distilbert: {total - len(new)} of {total} tensors from {source}"
    line += f"; new (trained from scratch): {', '.join(new)}" if new else ""
    line += "; its two-logit head folded into one logit" if fold else ""
    names = [config.id2label[i] for i in range(config.num_labels)] if keep else None
    if names and all(n.startswith("LABEL_") for n in names):
        names = None
    return TextTransformer(model.eval(), int(config.pad_token_id or 0), line, names)


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
        model = load_hub_model(weights, num_classes)
    else:
        from transformers import DistilBertConfig, DistilBertForSequenceClassification

        cfg = _hf_config(config) if config is not None else DistilBertConfig()
        cfg.num_labels = num_classes
        model = TextTransformer(DistilBertForSequenceClassification(cfg).eval(), int(cfg.pad_token_id or 0))
    _check_length(int(input_shape[0]), model.model.config.max_position_embeddings)
    if dropout is not None:
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {dropout}")
        model.model.dropout.p = dropout
        model.model.config.seq_classif_dropout = dropout
    return model
