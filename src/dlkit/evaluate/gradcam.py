"""Grad-CAM (Selvaraju et al. 2017): where in an image a conv model looks for the class it explains.

One forward and one backward explain a whole batch. The cam layer's activation A (N, K, h, w)
is taken by a forward hook; the gradient of each image's target score with respect to A, averaged
over space, weighs A's K maps: cam = relu(sum_k w_k A_k), upsampled to the input and scaled to [0, 1].
The model is left exactly as it was: same train/eval flags, no `.grad` on any parameter.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from dlkit.engine.runtime import model_device
from dlkit.errors import InputError
from dlkit.evaluate.metrics import probabilities
from dlkit.files import write_atomic
from dlkit.models.ensemble import Ensemble


@dataclass
class CamResult:
    """Grad-CAM maps of a batch and what the model said about each image (all on the CPU)."""

    heatmaps: Tensor  # (N, H, W) in [0, 1] at the input's size, each scaled by its own max; all zero when
    # no place in the layer raised the score (every weighted sum negative: the evidence is what is absent)
    predicted: Tensor  # (N,) predicted class index
    target: Tensor  # (N,) the class each map explains
    probabilities: Tensor  # (N, num_classes); binary (one logit): (1 - p, p)


def gradcam(model: nn.Module, x: Tensor, target: Tensor | int | None = None,
            layer: nn.Module | None = None) -> CamResult:
    """Grad-CAM maps of images `x` (N, C, H, W) for class `target` (default: the predicted one)."""
    layer = layer if layer is not None else model.cam_layer
    if layer is None and isinstance(model, Ensemble):
        raise InputError("an ensemble has no one conv layer to explain (Grad-CAM follows one model's); "
                         "explain one of its members' runs")
    if layer is None:
        raise InputError(f"model {type(model).__name__} has no conv layer to explain; Grad-CAM needs a conv model")
    if x.dim() != 4:
        raise InputError(f"Grad-CAM needs a batch of images shaped (N, C, H, W), got shape {tuple(x.shape)}")
    check_fp32(model)
    device = model_device(model)
    modes = {module: module.training for module in model.modules()}
    activations: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _module, _inputs, output: _keep(output, activations))
    try:
        model.eval()
        # inference_mode(False) and enable_grad: a caller inside no_grad / inference_mode still gets gradients
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            logits = model(x.detach().to(device, torch.float32, copy=True))
            return _explain(logits, activations, target, x.shape[-2:])
    finally:
        handle.remove()
        for module, training in modes.items():
            module.train(training)


NO_EVIDENCE = "no positive evidence"  # what a caption says of an all-zero map


def evidence(heatmap: Tensor) -> bool:
    """Whether a Grad-CAM map shows anything (is not all zero)."""
    return bool(heatmap.amax() > 0)


def check_fp32(model: nn.Module) -> None:
    """Refuse a model whose floating-point weights are not fp32 (a heat map's sums need the precision)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()} - {torch.float32}
    if dtypes:
        found = ", ".join(sorted(str(d) for d in dtypes))
        raise InputError(f"heat maps run in fp32 but the model holds {found} weights; call model.float() first")


def _keep(output: object, activations: list[Tensor]) -> Tensor:
    """Forward hook body: store the cam layer's output as a fresh leaf that needs a gradient, pass on a copy."""
    if not isinstance(output, Tensor) or output.dim() != 4:
        got = f"shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
        raise InputError(f"the Grad-CAM layer must output one (N, K, h, w) tensor, got {got}; pick another layer")
    # a leaf of its own: the gradient stops here, so a frozen trunk (or none needing grad) still works
    leaf = output.detach().requires_grad_(True)
    activations.append(leaf)
    return leaf.clone()  # the rest of the model may work in place on its input; the leaf must stay intact


def _explain(logits: Tensor, activations: list[Tensor], target: Tensor | int | None,
             size: torch.Size) -> CamResult:
    """Weigh the stored activation by the spatially averaged gradient of each image's target score."""
    if len(activations) != 1:
        raise InputError(f"the Grad-CAM layer ran {len(activations)} times in one forward pass; "
                         "pick a layer the model calls exactly once")
    probs, predicted, chosen, scores = target_scores(logits, target)
    activation = activations[0]
    # images are independent in eval mode, so the gradient of the sum gives each image its own
    (grad,) = torch.autograd.grad(scores.sum(), activation)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation.detach()).sum(dim=1, keepdim=True))
    maps = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    maps = maps / maps.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)  # zero stays zero
    return CamResult(maps.contiguous().cpu(), predicted.cpu(), chosen.cpu(), probs.cpu())


def target_scores(logits: Tensor, target: Tensor | int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Probabilities, predicted classes, the class each map explains and its score (the logit that
    argues for it), from a batch of logits (N, classes); one logit argues for class 1, its negative for 0."""
    if logits.dim() != 2:
        raise InputError(f"a heat map needs class logits shaped (N, classes), got shape {tuple(logits.shape)}")
    binary = logits.shape[1] == 1
    probs = probabilities(logits.detach(), "binary" if binary else "multiclass")
    predicted = probs.argmax(1)
    chosen = _targets(target, predicted, probs.shape[1])
    if binary:
        scores = logits[:, 0] * (2 * chosen - 1).to(logits.dtype)
    else:
        scores = logits.gather(1, chosen[:, None])[:, 0]
    return probs, predicted, chosen, scores


def _targets(target: Tensor | int | None, predicted: Tensor, num_classes: int) -> Tensor:
    """The class each image's map explains: `target` broadcast to the batch, or the prediction."""
    if target is None:
        return predicted
    chosen = torch.as_tensor(target, device=predicted.device).long().reshape(-1)
    if chosen.numel() not in (1, len(predicted)):
        raise InputError(f"a heat map needs one target or one per image ({len(predicted)}), got {chosen.numel()}")
    bad = chosen[(chosen < 0) | (chosen >= num_classes)]
    if bad.numel():
        raise InputError(f"heat map targets must be class indices in 0..{num_classes - 1}, got {bad[0].item()}")
    return chosen.expand(len(predicted))


def overlay(image: Tensor | np.ndarray, heatmap: Tensor | np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image (C, H, W) or (H, W) in [0, 1] as uint8 RGB (H, W, 3), a jet colour map blended in by heat."""
    img = np.nan_to_num(np.asarray(image.detach().cpu() if isinstance(image, Tensor) else image, dtype=np.float32))
    heat = np.nan_to_num(np.asarray(heatmap.detach().cpu() if isinstance(heatmap, Tensor) else heatmap,
                                    dtype=np.float32))
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise InputError(f"overlay needs an image shaped (1 or 3, H, W) or (H, W), got shape {np.shape(image)}")
    if heat.shape != img.shape[1:]:
        raise InputError(f"heat map shape {heat.shape} does not match the image's {img.shape[1:]}")
    rgb = np.broadcast_to(img, (3, *heat.shape)).transpose(1, 2, 0).clip(0, 1)
    heat = heat.clip(0, 1)
    weight = alpha * heat[..., None]  # cold pixels show the plain image
    blended = (1 - weight) * rgb + weight * jet(heat)
    return np.round(blended * 255).astype(np.uint8)


def jet(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map: values in [0, 1] to RGB in [0, 1] (blue, cyan, yellow, red), shape (..., 3)."""
    ramps = [np.clip(1.5 - np.abs(4 * values - centre), 0, 1) for centre in (3, 2, 1)]
    return np.stack(ramps, axis=-1)


# the colour scale beside an explained picture: a bar in the jet map, `high` at its top, `low` at its foot
COLORBAR_PAD = 6
COLORBAR_BAR = 12


def save_overlay(path: str | Path, image: Tensor | np.ndarray, heatmap: Tensor | np.ndarray,
                 title: str | None = None, colorbar: bool = False) -> Path:
    """Write `overlay(image, heatmap)` as a PNG at `path`, with the colour scale to its right if
    `colorbar` and a `title` strip above it if given; atomically. The picture keeps the image's size:
    the scale and the title are added beside and above it."""
    picture = Image.fromarray(overlay(image, heatmap))
    if colorbar:
        picture = _with_colorbar(picture)
    if title:
        picture = _with_title(picture, title)
    return write_atomic(path, lambda out: picture.save(out, format="PNG"))


def _with_colorbar(picture: Image.Image) -> Image.Image:
    """`picture` with a jet bar as tall as it on its right (high heat at the top), labelled high and low."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(picture)
    label_w = max(draw.textbbox((0, 0), word, font=font)[2] for word in ("high", "low"))
    x0 = picture.width + COLORBAR_PAD
    canvas = Image.new("RGB", (x0 + COLORBAR_BAR + COLORBAR_PAD + label_w + COLORBAR_PAD, picture.height), "white")
    canvas.paste(picture, (0, 0))
    values = np.linspace(1.0, 0.0, picture.height, dtype=np.float32)
    bar = np.round(jet(values) * 255).astype(np.uint8)[:, None, :].repeat(COLORBAR_BAR, axis=1)
    canvas.paste(Image.fromarray(bar), (x0, 0))
    text = ImageDraw.Draw(canvas)
    label_x = x0 + COLORBAR_BAR + COLORBAR_PAD
    text.text((label_x, 0), "high", fill="black", font=font)
    low_h = text.textbbox((0, 0), "low", font=font)[3]
    text.text((label_x, picture.height - low_h - 1), "low", fill="black", font=font)
    return canvas


def _with_title(picture: Image.Image, title: str) -> Image.Image:
    """`picture` under a white strip holding `title` in Pillow's built-in font (widened if the text needs it)."""
    font = ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(picture).textbbox((0, 0), title, font=font)
    pad = 2
    canvas = Image.new("RGB", (max(picture.width, right - left + 2 * pad), picture.height + bottom - top + 2 * pad),
                       "white")
    ImageDraw.Draw(canvas).text((pad - left, pad - top), title, fill="black", font=font)
    canvas.paste(picture, (0, canvas.height - picture.height))
    return canvas
