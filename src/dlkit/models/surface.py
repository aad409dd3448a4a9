"""The surface every dlkit model shares, so that training, Grad-CAM and fine-tuning stay generic.

`DlkitModel` states it as a Protocol; `ModelSurface` is the base class that gives every optional
part its default, so a model family declares what it has instead of being probed with hasattr:

- `features`: the trunk; `head`: the classifier on top of it; `forward(x) = head(features(x))`.
- `cam_layer`: the block whose output Grad-CAM reads (the last conv block), None without convs.
- `blocks`: parameter-holding groups, input side first and head last, for staged unfreezing.
- `input_dtype`: the dtype a model's input has; float32 unless it reads token ids (torch.long),
  so that tools like `summarize` can build a dummy batch without data.
- `pad_id`: the token id the model masks out (a tokenizer must pad with it), None if it masks none.
- `label_names`: a pretrained classifier's own class names, None when its head is new.
- `load_report`: one line saying what loading pretrained weights did, None when nothing was loaded.
- `bundle_args()`: builder arguments that rebuild the architecture offline (a hub model's config).
- `attention_grid`: an image transformer's patch grid (rows, columns), None for other models; a model
  that declares one gives `attention_maps(x)`: its logits and each block's attention probabilities
  (N, heads, T, T), the patch tokens last, so that attention rollout can explain it where Grad-CAM cannot.

What a family can do before a model is built (a Hugging Face checkpoint id for `model.weights`,
an ImageNet layout for `model.head`) is declared where it registers: `models.Family`.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class DlkitModel(Protocol):
    """What training, freezing, Grad-CAM, the bundle and the report may rely on in any dlkit model."""

    input_dtype: torch.dtype
    pad_id: int | None
    label_names: list[str] | None
    load_report: str | None
    attention_grid: tuple[int, int] | None

    @property
    def features(self) -> nn.Module: ...

    @property
    def head(self) -> nn.Module: ...

    @property
    def cam_layer(self) -> nn.Module | None: ...

    @property
    def blocks(self) -> list[nn.Module]: ...

    def bundle_args(self) -> dict[str, Any]: ...

    def attention_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class ModelSurface(nn.Module):
    """Defaults of the optional parts of `DlkitModel`: float inputs, no padding id, no pretrained
    label names or load report, nothing extra in the bundle, no attention maps."""

    input_dtype: torch.dtype = torch.float32
    pad_id: int | None = None
    label_names: list[str] | None = None
    load_report: str | None = None
    attention_grid: tuple[int, int] | None = None

    def bundle_args(self) -> dict[str, Any]:
        """Builder arguments beyond the recipe's that rebuild this architecture (none by default)."""
        return {}

    def attention_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and each block's attention probabilities; only models that declare `attention_grid` have them."""
        raise NotImplementedError(f"{type(self).__name__} declares no attention_grid: it has no attention maps")


class Classifier(ModelSurface):
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
