"""Training and ONNX export of the cnnserve model family (needs the `export` extra: torch, onnx).

The serving side (`service/`) never imports this package: it only reads the model repository
that `export` writes.
"""

__version__ = "0.1.0"
