"""Attention rollout: where in an image a Vision Transformer looks, the transformer's counterpart of
Grad-CAM (which needs a conv map at the top, and a ViT has none).

Attention rollout (Abnar and Zuidema, ACL 2020) follows the attention from the output back to the
patches. Each block b gives its attention probabilities A_b (N, heads, T, T); the heads are averaged
and the residual connection added as the identity, rows renormalised: W_b = (mean_h A_b + I) / 2.
Their product R = W_L ... W_1 says how much of each input token reaches each output token. The class
token's row of R over the patch tokens (the mean of all rows when the model pools by mean) is the
map on the patch grid, upsampled to the input and scaled to [0, 1]. One forward pass, no gradient.

Rollout shows what the model attends to, not which class that supports: the map is the same for
every target class. We measured the class-specific, gradient-weighted variant (Chefer, Gur and Wolf,
ICCV 2021) on the Grad-CAM tests' striped-patch images (a 2-block ViT; the hottest patch on the
pattern or not): its hottest patch left the pattern as the model trained on (96% on it after 150
steps, 81% after 600), where plain rollout's stayed at 95%; so dlkit draws plain rollout.

`heat_maps` chooses for any model: attention rollout where the model declares `attention_grid`,
Grad-CAM where it has a `cam_layer`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlkit.engine.runtime import model_device
from dlkit.errors import InputError
from dlkit.evaluate.gradcam import CamResult, check_fp32, gradcam, target_scores

GRADCAM = "Grad-CAM"
ROLLOUT = "Attention rollout"


def heat_maps(model: nn.Module, x: Tensor, target: Tensor | int | None = None) -> tuple[str, CamResult]:
    """The heat maps that explain an image model, and the method's name: attention rollout for a model
    that declares an `attention_grid` (a ViT), Grad-CAM for one with a `cam_layer` (a conv model)."""
    if model.attention_grid is not None:
        return ROLLOUT, attention_rollout(model, x, target)
    return GRADCAM, gradcam(model, x, target)


def explains_images(model: nn.Module) -> bool:
    """Whether `heat_maps` can explain the model: it declares attention maps or a Grad-CAM layer."""
    return model.attention_grid is not None or model.cam_layer is not None


def attention_rollout(model: nn.Module, x: Tensor, target: Tensor | int | None = None) -> CamResult:
    """Attention rollout of images `x` (N, C, H, W), as maps (N, H, W) in [0, 1], with what the model
    predicts; `target` only names the class reported beside each map (rollout is the same for all).
    The model is left as it was (its train/eval flags)."""
    grid = model.attention_grid
    if grid is None:
        raise InputError(f"model {type(model).__name__} has no attention maps to explain; attention rollout "
                         "needs a Vision Transformer")
    if x.dim() != 4:
        raise InputError(f"attention rollout needs a batch of images shaped (N, C, H, W), got shape {tuple(x.shape)}")
    check_fp32(model)
    device = model_device(model)
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            logits, maps = model.attention_maps(x.detach().to(device, torch.float32))
    finally:
        for module, training in modes.items():
            module.train(training)
    probs, predicted, chosen, _ = target_scores(logits.float(), target)
    relevance = rollout(maps)
    rows, cols = grid
    prefix = relevance.shape[-1] - rows * cols  # the class token, if the model has one
    if prefix not in (0, 1):
        raise InputError(f"{type(model).__name__}'s attention covers {relevance.shape[-1]} tokens, which is not "
                         f"its {rows}x{cols} patch grid plus at most a class token")
    pooled = relevance[:, 0] if prefix else relevance.mean(1)
    cam = pooled[:, prefix:].reshape(-1, 1, rows, cols)
    heat = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    heat = heat / heat.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(heat.dtype).tiny)
    return CamResult(heat.contiguous().cpu(), predicted.cpu(), chosen.cpu(), probs.cpu())


def rollout(maps: list[Tensor]) -> Tensor:
    """R = W_L ... W_1 with W_b = (mean over heads of A_b + I) / 2, rows renormalised; (N, T, T)."""
    n, _, t, _ = maps[0].shape
    eye = torch.eye(t, dtype=torch.float32, device=maps[0].device)
    relevance = eye.expand(n, t, t)
    for attention in maps:
        mixed = (attention.float().mean(1) + eye) / 2
        relevance = (mixed / mixed.sum(-1, keepdim=True)) @ relevance
    return relevance
