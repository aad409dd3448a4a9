"""Explanations over HTTP, always in PyTorch (they need gradients or many forward passes): Grad-CAM (attention
rollout for a ViT) as the PNG `dlkit explain` draws, or each token's importance by occlusion for text models."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn.functional as F

from dlkit.data.inputs import read_image
from dlkit.data.preprocess import ImagePrep
from dlkit.data.text import TextPrep
from dlkit.evaluate.attention import heat_maps
from dlkit.evaluate.explain_text import mask_id, occlusion_importance, token_names
from dlkit.evaluate.gradcam import NO_EVIDENCE, evidence, save_overlay
from dlkit.explain import DISPLAY_MAX, display_size, heat_on_image
from dlkit.predict import Predictor
from dlkit.serve.inputs import image_suffix, mapped_errors, scratch


def gradcam_png(predictor: Predictor, spec: ImagePrep, label: str, data: bytes) -> tuple[bytes, dict[str, Any]]:
    """The Grad-CAM overlay PNG of an uploaded image, drawn as `dlkit explain` draws it (the picture at
    its own size, the colour scale, the class as title), and what it shows. The upload and the PNG
    live in a temporary folder removed before returning."""
    with scratch() as folder:
        path = (Path(folder) / "in").with_suffix(image_suffix(data, label))
        path.write_bytes(data)
        with mapped_errors(path, label):
            raw = spec.decode(str(path))  # as predict reads it
            _, cam = heat_maps(predictor.model, spec.normalise(spec.layout(raw)))
            best = int(cam.predicted[0])
            name, confidence = predictor.classes[best], float(cam.probabilities[0, best])
            picture = read_image(str(path), 3, (DISPLAY_MAX, DISPLAY_MAX))
            width, height = display_size(picture.shape[-1], picture.shape[-2])
            enlarging = width >= picture.shape[-1]
            picture = F.interpolate(picture, size=(height, width), mode="nearest" if enlarging else "area")
            heat = heat_on_image(cam.heatmaps[None], spec.placement(raw), (height, width))
            shows = evidence(cam.heatmaps[0])
            title = f"{name} ({confidence:.1%})" + ("" if shows else f", {NO_EVIDENCE}")
            out = save_overlay(Path(folder) / "gradcam.png", picture[0], heat[0, 0], title=title, colorbar=True)
            png = out.read_bytes()
    return png, {"label": name, "confidence": round(confidence, 6), "evidence": shows}


def token_importance(predictor: Predictor, spec: TextPrep, label: str, text: str) -> dict[str, Any]:
    """Each token's importance for the predicted class (its probability minus that with the token
    occluded), in reading order, with the label and confidence."""
    with mapped_errors(None, label):
        ids = spec.apply([text])
    tokenizer = spec.tokenizer
    scores = occlusion_importance(predictor.model, ids, predictor.bundle["task"], tokenizer.pad_id,
                                  mask_id(tokenizer))[0]
    names = token_names(tokenizer, scores.ids)
    return {"label": predictor.classes[scores.label], "confidence": round(scores.confidence, 6),
            "tokens": [{"token": t, "importance": round(s, 6)} for t, s in zip(names, scores.scores)]}
