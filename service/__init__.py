"""The cnnserve gRPC service: ONNX Runtime behind our API and the Open Inference Protocol.

Never imports torch or the `export` package: it reads the model repository and nothing else.
"""

__version__ = "0.1.0"
