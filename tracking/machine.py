"""Where a result was measured, for every report that carries figures (bench/ and analysis/)."""

import os
import platform

import torch


def machine() -> dict:
    """OS, CPU, core count, torch and its thread count, and the GPU if one is seen."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
