"""Any Hugging Face sequence-classification encoder (BERT, DistilBERT, RoBERTa, ALBERT, ELECTRA,
DeBERTa, ...) by model id, through transformers' Auto classes, behind dlkit's model surface.

`model.weights` is a hub id pinned to a revision after `@` (`google-bert/bert-base-uncased@86b5e09...`;
the tokenizer follows it) or a folder written by save_pretrained; weights load from safetensors only
and no remote code runs. The bundle keeps the model's config, so `predict` rebuilds it offline
(`AutoConfig.for_model`) and loads dlkit's own model.safetensors.

No list of architectures: the surface is read off the model itself. `features` is its base model
(transformers' `base_model`: the encoder), `head` every module the classifier adds on top of it, and
`blocks` the encoder's layers (its largest ModuleList: BERT's `encoder.layer`, DistilBERT's
`transformer.layer`, ALBERT's one shared layer group) with what runs before them (the embeddings) as
the first block and what runs after them (BERT's pooler, a final norm) joined to the last layer.

Two classes are one logit in dlkit (a sigmoid); a checkpoint's two-logit head is folded into one
(z = z1 - z0, so sigmoid(z) equals the softmax probability of class 1 that the pipeline reports).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dlkit.errors import ConfigError
from dlkit.models import Family, register_model
from dlkit.models.surface import ModelSurface


class HubSurface(ModelSurface):
    """The surface of a Hugging Face model wrapped by dlkit (`self.model`, its classifier layers in
    `self._head`, its trunk cut into `self._trunk_blocks`): the trunk is the base model, no conv layer
    for Grad-CAM, blocks for staged unfreezing."""

    model: nn.Module
    _head: nn.ModuleList
    _trunk_blocks: list[nn.Module]

    @property
    def cam_layer(self) -> None:
        """No conv layer: Grad-CAM does not apply (token importance or attention rollout explains these)."""
        return None

    @property
    def features(self) -> nn.Module:
        """The transformer trunk (the base model)."""
        return self.model.base_model

    @property
    def head(self) -> nn.ModuleList:
        """The classification layers on top of the trunk."""
        return self._head

    @property
    def blocks(self) -> list[nn.Module]:
        """The embeddings, each encoder layer (the last with what follows it), then the head."""
        return [*self._trunk_blocks, self.head]


class TextTransformer(HubSurface):
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
        # views kept out of the module tree (their weights live under `model`): a second reference
        # would list every weight twice in state_dict
        base = model.base_model
        object.__setattr__(self, "_head", nn.ModuleList([m for m in model.children() if m is not base]))
        object.__setattr__(self, "_trunk_blocks", encoder_blocks(base))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of token ids."""
        mask = ids != self.pad_id
        used = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
        return self.model(input_ids=ids[:, :used], attention_mask=mask[:, :used]).logits

    def bundle_args(self) -> dict[str, Any]:
        """Builder arguments that rebuild this architecture with no download: its config."""
        return {"config": self.model.config.to_dict()}


def encoder_blocks(base: nn.Module) -> list[nn.Module]:
    """The base model's parameter groups, input side first: what runs before its layer stack (one
    block), each layer, what runs after the stack joined to the last layer. The stack is the
    ModuleList holding the most parameters; modules run in the order a model registers them, as
    transformers' models do."""
    stacks = [(name, m) for name, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not stacks:
        raise ConfigError(f"{type(base).__name__} has no list of layers; dlkit cannot split it into blocks")
    path, stack = max(stacks, key=lambda s: _size(s[1]))  # max keeps the first (outermost) of equals
    before: list[nn.Module] = []
    after: list[nn.Module] = []
    node = base
    for part in path.split("."):
        children = list(node.named_children())
        names = [n for n, _ in children]
        at = names.index(part)
        before += [m for _, m in children[:at]]
        after = [m for _, m in children[at + 1:]] + after
        node = getattr(node, part)
    before = [m for m in before if _size(m)]
    after = [m for m in after if _size(m)]
    layers = list(stack)
    last = layers.pop() if not after else nn.ModuleList([layers.pop(), *after])
    head = [] if not before else [before[0] if len(before) == 1 else nn.ModuleList(before)]
    return [*head, *layers, last]


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def hf_config(config: dict[str, Any], model_type: str | None = None) -> Any:
    """A transformers config from its dict (as saved in a bundle), of `model_type` when given; a bad
    dict is one ConfigError line."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k != "model_type"}
    kind = config.get("model_type") or model_type
    if kind is None:
        raise ConfigError("model.config needs a model_type (e.g. bert, roberta) to say which architecture it configures")
    if model_type is not None and kind != model_type:
        raise ConfigError(f"model.config is a '{kind}' config; this model needs a '{model_type}' one")
    try:
        return AutoConfig.for_model(kind, **{**fields, "problem_type": None})
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"model.config is not a valid '{kind}' config: {' '.join(str(exc).split())[:200]}") from None


def from_config(config: Any, num_classes: int) -> TextTransformer:
    """A sequence classifier of `config`'s architecture with random weights and `num_classes` outputs."""
    from transformers import AutoModelForSequenceClassification

    config.num_labels = num_classes
    try:
        model = AutoModelForSequenceClassification.from_config(config)
    except ValueError as exc:  # an architecture without a sequence-classification head
        raise ConfigError(f"model.config: {' '.join(str(exc).split())[:200]}") from None
    return TextTransformer(model.eval(), int(config.pad_token_id or 0))


def classifier_path(model: nn.Module) -> str:
    """The path of the classifier's output layer: the last Linear outside the base model giving num_labels."""
    base = model.base_model
    inside = {id(m) for m in base.modules()}
    found = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside
             and m.out_features == model.config.num_labels]
    if not found:
        raise ConfigError(f"{type(model).__name__} has no output layer of {model.config.num_labels} logits")
    return found[-1]


def fold_two_logits(model: nn.Module) -> None:
    """Replace a two-logit classifier output by one logit z1 - z0 (sigmoid(z1 - z0) = softmax(z)[1])."""
    path = classifier_path(model)
    old = model.get_submodule(path)
    new = nn.Linear(old.in_features, 1)
    with torch.no_grad():
        new.weight.copy_(old.weight[1:2] - old.weight[0:1])
        new.bias.copy_(old.bias[1:2] - old.bias[0:1])
    model.set_submodule(path, new)
    model.config.problem_type = None  # dlkit computes the loss itself; HF would refuse "single_label" with 1 output
    model.config.num_labels = 1


@dataclass
class Loaded:
    """A Hugging Face classifier loaded from a hub id or folder, and what loading it did."""

    model: nn.Module
    report: str  # one line: tensors loaded, those trained from scratch, a folded head
    label_names: list[str] | None  # the checkpoint's own trained class names, when its head was kept
    new_head: bool  # the classifier was built fresh for this task


def load_classifier(source: str, num_classes: int, name: str, auto_class: str,
                    model_type: str | None = None, other: str = "") -> Loaded:
    """A classifier (`auto_class`, e.g. AutoModelForSequenceClassification) from a hub id or folder, its
    head fitted to `num_classes` outputs; `name` opens the report line, `model_type` (when given) is the
    one architecture accepted, and `other` the model a refused checkpoint would suit."""
    import transformers

    from dlkit.hub import hf_load

    auto = getattr(transformers, auto_class)
    config = hf_load(lambda s, local, rev: transformers.AutoConfig.from_pretrained(
        s, revision=rev, trust_remote_code=False, local_files_only=local), source, "model.weights")
    if model_type is not None and config.model_type != model_type:
        raise ConfigError(f"model.weights {source} is a '{config.model_type}' model; model '{name}' needs a "
                          f"'{model_type}' checkpoint" + (f" (model '{other}' takes any)" if other else ""))
    head_class = auto_class.removeprefix("AutoModel")  # ForSequenceClassification, ForImageClassification
    has_head = any(a.endswith(head_class) for a in config.architectures or [])
    fold = has_head and config.num_labels == 2 and num_classes == 1
    keep = has_head and (fold or config.num_labels == num_classes)
    kwargs: dict[str, Any] = {} if keep else {"num_labels": num_classes, "ignore_mismatched_sizes": True}
    model, info = hf_load(lambda s, local, rev: auto.from_pretrained(
        s, revision=rev, use_safetensors=True, trust_remote_code=False, dtype=torch.float32,
        output_loading_info=True, local_files_only=local, **kwargs), source, "model.weights")
    if fold:
        fold_two_logits(model)
    new = sorted(set(info.get("missing_keys", [])) | {k[0] if isinstance(k, tuple) else k
                                                      for k in info.get("mismatched_keys", [])})
    total = len(model.state_dict())
    line = f"{name}: {total - len(new)} of {total} tensors from {source}"
    line += f"; new (trained from scratch): {', '.join(new)}" if new else ""
    line += "; its two-logit head folded into one logit" if fold else ""
    names = [config.id2label[i] for i in range(config.num_labels)] if keep else None
    if names and all(n.startswith("LABEL_") for n in names):
        names = None
    return Loaded(model.eval(), line, names, not keep)


def load_hub_model(source: str, num_classes: int, name: str, model_type: str | None = None) -> TextTransformer:
    """A sequence classifier from a hub id or folder, its head fitted to `num_classes` outputs."""
    loaded = load_classifier(source, num_classes, name, "AutoModelForSequenceClassification", model_type,
                             "hf_text" if model_type else "")
    return TextTransformer(loaded.model, int(loaded.model.config.pad_token_id or 0), loaded.report,
                           loaded.label_names)


def finish(model: TextTransformer, input_shape: tuple[int, ...], dropout: float | None) -> TextTransformer:
    """Check the text length against the model's positions and set the head's dropout when given."""
    max_len, positions = int(input_shape[0]), getattr(model.model.config, "max_position_embeddings", None)
    if positions is not None and max_len > positions:
        raise ConfigError(f"data.text.max_len is {max_len} but the model reads at most {positions} tokens; "
                          f"set data.text.max_len <= {positions}")
    if dropout is not None:
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {dropout}")
        for module in model.head.modules():
            if isinstance(module, nn.Dropout):
                module.p = dropout
    return model


# the checkpoint whose tokenizer an hf_text without model.weights reads, pinned to one commit; without
# weights or a config the model is its architecture (transformers' BertConfig defaults) at random
DEFAULT_CHECKPOINT = "google-bert/bert-base-uncased@86b5e0934494bd15c9632b12f734a8a67f723594"


@register_model("hf_text", Family(hub_default=DEFAULT_CHECKPOINT))
def hf_text(
    num_classes: int = 2,
    input_shape: tuple[int, ...] = (128,),
    config: dict[str, Any] | None = None,
    weights: str | None = None,
    dropout: float | None = None,
) -> TextTransformer:
    """Any Hugging Face sequence-classification encoder over `input_shape[0]` tokens.

    From `weights` (hub id or folder: config and weights loaded), else from `config` (a bundle's, with
    its model_type; random weights to be overwritten), else bert-base-uncased's architecture at random.
    `dropout` overrides the dropout of the classification head (each Dropout in it).
    """
    from dlkit.hub import quiet_transformers

    quiet_transformers()
    if weights is not None:
        model = load_hub_model(weights, num_classes, "hf_text")
    else:
        from transformers import BertConfig

        model = from_config(hf_config(config) if config is not None else BertConfig(), num_classes)
    return finish(model, input_shape, dropout)
