"""Reliability under load, overload and kill -9, measured against a real `cnnserve serve`.

`python -m bench.reliability` starts the service as a subprocess on loopback and runs each
scenario in turn: `soak` (closed-loop mixed load for minutes: errors, latency over time, memory
growth), `overload` (far more than capacity on a small queue bound: fast refusals, bounded
latency, no collapse, deadlines honoured), `restart` (kill -9, start again: seconds to serving)
and `fuzz` (the case counts of tests/integration/test_fuzz.py). Load comes from one separate
client process (`load`) so the client never shares a GIL with the measuring. Everything lands in
one JSON file, and `report` turns that file, never hand-typed numbers, into docs/RELIABILITY.md.
"""
