"""Serving performance: cnnserve beside raw ONNX Runtime, Triton and a naive server.

`python -m bench.serving` (or `make bench`) measures, in one run on one machine: raw ONNX
Runtime in-process at its best batch size (`raw`, the limit), our service through its native
API (`Classify`) and through the Open Inference Protocol with the stock `tritonclient`, Triton
Inference Server with dynamic batching started by PyTriton (`triton`, `triton_app`), and a
naive grpc.aio server calling `session.run` per request (`naive_server`). Closed-loop load comes
from a separate process (`load`); each point's figures (`measure`) and the start-up and memory
footprint (`footprint`) land in one JSON file, from which `goals` judges the targets and
`report` (with `tables`) and `plot` write docs/BENCHMARKS.md and its picture, never from
hand-typed numbers. `--device cuda` measures the same on ONNX Runtime's CUDA provider
(`device`), its figures in a section of their own after the CPU ones.
`compare` measures one change before and after it; `changes` lists those measurements, kept in
bench/results/changes/, in the report.
"""
