"""Serving a finished run: ONNX export (`export`), the ONNX Runtime backend (`onnx_backend`) and the app.

Nothing heavy is imported here: `import dlkit.serve` costs nothing until a submodule is used.
"""
