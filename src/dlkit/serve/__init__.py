"""Serving finished runs over HTTP: ONNX export (`export`), the ONNX Runtime backend (`onnx_backend`)
and the app (`app`).

Nothing heavy is imported here: `import dlkit.serve` costs nothing until a submodule is used.
"""
from __future__ import annotations

from typing import Any


def create_app(*args: Any, **kwargs: Any) -> Any:
    """The FastAPI app over runs; see `dlkit.serve.app.create_app` (imported lazily: `import dlkit.serve` stays light)."""
    from dlkit.serve.app import create_app as create

    return create(*args, **kwargs)
