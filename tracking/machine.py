"""Where a result was measured, for every report that carries figures (bench/ and analysis/)."""

import os
import platform

import torch


def machine() -> dict:
    """OS, CPU (its model name where the OS says it: one project's sessions may land on different chips), core
    count, torch and its thread count, and the GPU if one is seen."""
    return {"platform": platform.platform(), "processor": cpu_model() or platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), e.g. "Intel(R) Xeon(R) Processor"; None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None
