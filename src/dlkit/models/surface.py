"""The surface every dlkit model shares, so that training, Grad-CAM and fine-tuning stay generic.

- `features`: the trunk; `head`: the classifier on top of it; `forward(x) = head(features(x))`.
- `cam_layer`: the block whose output Grad-CAM reads (the last conv block), None without convs.
- `blocks`: parameter-holding groups, input side first and head last, for staged unfreezing.
- `input_dtype`: the dtype a model's input has; float32 unless it reads token ids (torch.long),
  so that tools like `summarize` can build a dummy batch without data.
"""
from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """A trunk (`features`) followed by a classifier (`head`)."""

    def __init__(
        self,
        features: nn.Module,
        head: nn.Module,
        cam_layer: str | None = None,
        input_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        # a submodule path, not the module: a second reference would duplicate weights in state_dict
        self.cam_path = cam_layer
        self.input_dtype = input_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch."""
        return self.head(self.features(x))

    @property
    def cam_layer(self) -> nn.Module | None:
        """The block whose output Grad-CAM reads, or None for models without conv layers."""
        return None if self.cam_path is None else self.get_submodule(self.cam_path)

    @property
    def blocks(self) -> list[nn.Module]:
        """Groups that hold parameters, input side first, head last."""
        trunk = list(self.features.children()) if isinstance(self.features, nn.Sequential) else [self.features]
        return [block for block in [*trunk, self.head] if any(True for _ in block.parameters())]
