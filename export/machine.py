"""A one-line description of the machine a figure was measured on: times mean nothing without."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, or the platform's processor string."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe(device: str = "cpu") -> str:
    """E.g. 'Intel Xeon ... (2 CPUs, torch 2 threads)' or the GPU's name for a CUDA device."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA)"
    return f"{cpu_model()} ({os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads)"
