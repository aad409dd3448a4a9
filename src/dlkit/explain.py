"""`dlkit explain`: where a finished run's conv model looked (Grad-CAM) for an image a user gives."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from dlkit.data.inputs import read_image
from dlkit.data.preprocess import ImagePrep, prep_from_dict
from dlkit.errors import InputError
from dlkit.evaluate.gradcam import NO_EVIDENCE, evidence, gradcam, save_overlay
from dlkit.files import check_output_file
from dlkit.predict import Predictor

DISPLAY = 224  # smallest side of the picture written, in pixels


def explain_image(run_dir: str | Path, source: str, out: str | Path | None = None) -> dict[str, Any]:
    """Grad-CAM of the predicted class over the image, saved as a PNG (default: beside the image,
    `<name>.gradcam.png`); returns the label, its confidence and where the picture went."""
    path = Path(out) if out is not None else Path(source).with_name(f"{Path(source).stem}.gradcam.png")
    check_output_file(path, "-o")
    predictor = Predictor.from_run(run_dir)
    spec = prep_from_dict(predictor.bundle["preprocessing"])
    if not isinstance(spec, ImagePrep):
        raise InputError(f"dlkit explain draws Grad-CAM over images; the model of {run_dir} reads "
                         f"{predictor.bundle['input_kind']} (its report shows what it attends to)")
    shown = spec.layout(read_image(source, spec.channels, spec.size))  # what the model sees, before normalisation
    cam = gradcam(predictor.model, spec.normalise(shown))
    best = int(cam.predicted[0])
    label, confidence = predictor.classes[best], float(cam.probabilities[0, best])
    image, heat = shown, cam.heatmaps[None]
    scale = math.ceil(DISPLAY / max(image.shape[-2:]))
    if scale > 1:  # a 28x28 digit is enlarged so the picture can be read
        image = F.interpolate(image, scale_factor=scale, mode="nearest")
        heat = F.interpolate(heat, scale_factor=scale, mode="bilinear", align_corners=False)
    shows = evidence(cam.heatmaps[0])
    save_overlay(path, image[0], heat[0, 0], title=f"{label} ({confidence:.1%})" + ("" if shows else f", {NO_EVIDENCE}"))
    result = {"input": source, "label": label, "confidence": round(confidence, 6), "heatmap": str(path)}
    if not shows:
        result["note"] = (f"the map is empty: no place in the model's last conv layer raised the score of {label} "
                          "(the class rests on what is absent there)")
    return result
