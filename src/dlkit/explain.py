"""`dlkit explain`: where a finished run's image model looked for an image a user gives (Grad-CAM for a conv
model, attention rollout for a Vision Transformer)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from dlkit.data.inputs import read_image
from dlkit.data.mnist_layout import FRAME, Placement
from dlkit.data.preprocess import ImagePrep, prep_from_dict
from dlkit.errors import InputError
from dlkit.evaluate.attention import heat_maps
from dlkit.evaluate.gradcam import NO_EVIDENCE, evidence, save_overlay
from dlkit.files import check_output_file
from dlkit.predict import Predictor

# the picture written: the user's image at its own size, enlarged by a whole factor until its longer side
# reaches DISPLAY_MIN (a 28x28 digit becomes 224x224, readable) or reduced to DISPLAY_MAX (a 12-megapixel
# photo becomes a 1024-pixel-wide PNG, not a 30 MB one)
DISPLAY_MIN = 224
DISPLAY_MAX = 1024


def display_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of the picture drawn for an image of `width` x `height` pixels."""
    longer = max(width, height)
    if longer > DISPLAY_MAX:
        scale = DISPLAY_MAX / longer
        return max(1, round(width * scale)), max(1, round(height * scale))
    factor = max(1, math.ceil(DISPLAY_MIN / longer))
    return width * factor, height * factor


def heat_on_image(heat: Tensor, placement: Placement | None, size: tuple[int, int]) -> Tensor:
    """The model-input heat map (1, 1, h, w) laid over the user's whole image shown at `size` (H, W).

    The plain layout (`placement` None) resizes the whole image to the model's input, so the map is
    resized back over all of it. The MNIST layout took the digit's ink box, scaled and centred it: each
    pixel of the picture is looked up where it landed in the 28x28 frame, and what lies outside the
    frame (paper the model never saw) gets no heat."""
    if placement is None:
        return F.interpolate(heat, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    frame = F.interpolate(heat, size=(FRAME, FRAME), mode="bilinear", align_corners=False)
    grid = placement.frame_grid(size)
    return F.grid_sample(frame, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


def explain_image(run_dir: str | Path, source: str, out: str | Path | None = None) -> dict[str, Any]:
    """The heat map of the predicted class over the user's image (at its own size, see `display_size`) with
    a colour scale, saved as a PNG (default: beside the image, `<name>.gradcam.png`, or `<name>.attention.png`
    for a ViT); returns the label, its confidence, the method, where the picture went and the image's size."""
    if out is not None:
        check_output_file(out, "-o")  # before any work
    predictor = Predictor.from_run(run_dir)
    kind = "gradcam" if predictor.model.attention_grid is None else "attention"
    path = Path(out) if out is not None else Path(source).with_name(f"{Path(source).stem}.{kind}.png")
    check_output_file(path, "-o")
    spec = prep_from_dict(predictor.bundle["preprocessing"])
    if not isinstance(spec, ImagePrep):
        raise InputError(f"dlkit explain draws Grad-CAM over images; the model of {run_dir} reads "
                         f"{predictor.bundle['input_kind']} (its report shows what it attends to)")
    raw = spec.decode(source)  # as predict reads it
    method, cam = heat_maps(predictor.model, spec.normalise(spec.layout(raw)))
    best = int(cam.predicted[0])
    label, confidence = predictor.classes[best], float(cam.probabilities[0, best])
    # the user's own picture, in colour: a large JPEG decodes reduced, never below the display's size
    picture = read_image(source, 3, (DISPLAY_MAX, DISPLAY_MAX))
    width, height = display_size(picture.shape[-1], picture.shape[-2])
    enlarging = width >= picture.shape[-1]
    picture = F.interpolate(picture, size=(height, width), mode="nearest" if enlarging else "area")
    placement = spec.placement(raw)
    heat = heat_on_image(cam.heatmaps[None], placement, (height, width))
    shows = evidence(cam.heatmaps[0])
    title = f"{label} ({confidence:.1%})" + ("" if shows else f", {NO_EVIDENCE}")
    save_overlay(path, picture[0], heat[0, 0], title=title, colorbar=True)
    result = {"input": source, "label": label, "confidence": round(confidence, 6), "method": method,
              "heatmap": str(path), "size": [width, height]}
    if not shows:
        result["note"] = (f"the map is empty: no place in the model's last conv layer raised the score of {label} "
                          "(the class rests on what is absent there)")
    return result
