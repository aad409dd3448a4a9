"""Hugging Face ViT image classifiers (`ViTForImageClassification`, e.g. Google's ImageNet-21k ViT-B/16)
as a transfer base, behind dlkit's model surface: frozen, staged and unfrozen as MobileNetV2 and VGG16 are.

`model.weights` is a hub id pinned to a revision after `@`
(`google/vit-base-patch16-224-in21k@b4569560...`) or a folder written by save_pretrained; weights load
from safetensors only and no remote code runs. The checkpoint's own normalisation (its
preprocessor_config.json's image_mean and image_std: 0.5 and 0.5 for Google's ViTs, not ImageNet's)
runs inside the model, so the data stay RGB in [0, 1] and a bundle, `predict` and the ONNX export
carry it. Images of another size than the checkpoint's are read with its position embeddings
interpolated (transformers' `interpolate_pos_encoding`); their sides must be multiples of the patch.

A new head is one Linear on the class token, initialised to zero as the ViT paper fine-tunes
(Dosovitskiy et al. 2021, section 3.2). `blocks`: the embeddings, each encoder layer (the last with
the final LayerNorm), the head. The model declares its patch grid, so attention rollout explains it.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

from dlkit.errors import ConfigError
from dlkit.models import Family, register_model
from dlkit.models.hf_text import HubSurface, classifier_path, encoder_blocks, hf_config, load_classifier
from dlkit.models.torchvision_layout import image_channels

GOOGLE_MEAN_STD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # what Google's ViT checkpoints were trained with


class HubViT(HubSurface):
    """A Hugging Face ViT classifier: RGB images (N, 3, H, W) in [0, 1] in, logits out."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], mean: list[float], std: list[float],
                 report: str | None = None, label_names: list[str] | None = None) -> None:
        super().__init__()
        config = model.config
        _, height, width = input_shape
        patch = int(config.patch_size)
        if height % patch or width % patch:
            raise ConfigError(f"input_shape {tuple(input_shape)} does not split into the checkpoint's {patch}x{patch} "
                              f"patches; set data.image_size to a multiple of {patch} (its own: {config.image_size})")
        self.model = model
        self.load_report, self.label_names = report, label_names
        self.attention_grid = (height // patch, width // patch)
        self.interpolate = (height, width) != (config.image_size, config.image_size)
        # the checkpoint's normalisation, not saved in the weights: `bundle_args` carries it
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)
        base = model.base_model
        object.__setattr__(self, "_head", nn.ModuleList([m for m in model.children() if m is not base]))
        object.__setattr__(self, "_trunk_blocks", encoder_blocks(base))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits for a batch of images in [0, 1]."""
        return self.model(pixel_values=(x - self.mean) / self.std, interpolate_pos_encoding=self.interpolate).logits

    def attention_maps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Class logits and each layer's attention probabilities (N, heads, T, T), the class token first;
        the fused attention kernel returns none, so the plain one runs for this call."""
        implementation = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        try:
            out = self.model(pixel_values=(x - self.mean) / self.std, interpolate_pos_encoding=self.interpolate,
                             output_attentions=True)
        finally:
            self.model.set_attn_implementation(implementation)
        return out.logits, list(out.attentions)

    def bundle_args(self) -> dict[str, Any]:
        """Builder arguments that rebuild this model with no download: its config and normalisation."""
        return {"config": self.model.config.to_dict(), "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist()}


def checkpoint_mean_std(source: str) -> tuple[list[float], list[float], str]:
    """The image_mean and image_std of a checkpoint's preprocessor_config.json, and a note when it has
    none (then Google's 0.5 / 0.5)."""
    from transformers.utils import cached_file

    from dlkit.hub import hf_load

    path = hf_load(lambda s, local, rev: cached_file(
        s, "preprocessor_config.json", revision=rev, local_files_only=local,
        _raise_exceptions_for_missing_entries=False), source, "model.weights")
    if path is None:
        return *GOOGLE_MEAN_STD, "; no preprocessor_config.json: mean and std 0.5 assumed"
    spec = json.loads(open(path, encoding="utf-8").read())
    return list(spec.get("image_mean", GOOGLE_MEAN_STD[0])), list(spec.get("image_std", GOOGLE_MEAN_STD[1])), ""


# Google's ViT-B/16 pre-trained on ImageNet-21k (no head), pinned to one commit; without weights or a
# config, hf_vit builds its architecture (transformers' ViTConfig defaults) at random
DEFAULT_CHECKPOINT = "google/vit-base-patch16-224-in21k@b4569560a39a0f1af58e3ddaf17facf20ab919b0"


@register_model("hf_vit", Family(hub_default=DEFAULT_CHECKPOINT, hub_images=True))
def hf_vit(
    num_classes: int = 1000,
    input_shape: tuple[int, ...] = (3, 224, 224),
    config: dict[str, Any] | None = None,
    weights: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    dropout: float | None = None,
) -> HubViT:
    """A Hugging Face ViT image classifier on RGB images of `input_shape`.

    From `weights` (hub id or folder: config, weights and normalisation loaded), else from `config`
    (a bundle's, random weights to be overwritten), else ViT-B/16's architecture at random. `mean` and
    `std` override the normalisation; `dropout` sets the transformer's hidden dropout (0 in Google's).
    """
    import transformers

    from dlkit.hub import quiet_transformers

    quiet_transformers()
    if image_channels(input_shape, 1, "hf_vit") != 3:
        raise ConfigError(f"hf_vit reads RGB images, got {input_shape[0]} channel(s); set data.channels: 3")
    if weights is not None:
        loaded = load_classifier(weights, num_classes, "hf_vit", "AutoModelForImageClassification", "vit")
        ckpt_mean, ckpt_std, note = checkpoint_mean_std(weights)
        model, report, names = loaded.model, loaded.report + note, loaded.label_names
        if loaded.new_head:
            _zero_classifier(model)
    else:
        cfg = hf_config({"model_type": "vit", **(config or {})}, model_type="vit")
        cfg.num_labels = num_classes
        model = transformers.AutoModelForImageClassification.from_config(cfg).eval()
        (ckpt_mean, ckpt_std), report, names = GOOGLE_MEAN_STD, None, None
    if dropout is not None:
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {dropout}")
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = dropout
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = dropout
    return HubViT(model, tuple(input_shape), mean or ckpt_mean, std or ckpt_std, report, names)


def _zero_classifier(model: nn.Module) -> None:
    """Zero the new classifier's weights and bias: every class starts equally likely."""
    head = model.get_submodule(classifier_path(model))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
