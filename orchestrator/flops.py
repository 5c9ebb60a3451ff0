"""Model FLOPs per token and the device peak they are measured against (MFU)."""

import os
from functools import lru_cache

import torch

from models.llama import ModelArgs

# Dense peak FLOP/s per GPU from the vendors' data sheets (no sparsity).
GPU_PEAKS = {
    "H200": {torch.bfloat16: 989e12, torch.float32: 67e12},
    "H100": {torch.bfloat16: 989e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float32: 19.5e12},
}


def flops_per_token(args: ModelArgs, n_params: int, seq_len: int) -> float:
    """6N for the matmuls of forward+backward, plus 12*L*dim*seq for attention scores.

    N counts every weight used in a matmul: all parameters but the token
    embedding (a lookup), unless it is tied to the output projection.
    """
    n_matmul = n_params - (0 if args.tie_embeddings else args.vocab_size * args.dim)
    return 6 * n_matmul + 12 * args.n_layers * args.dim * seq_len


def peak_flops(device: torch.device, local_world_size: int, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """(peak FLOP/s of one rank's device, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAKS.items():
            if key in name:
                return peaks[dtype], f"{name} data-sheet {dtype} peak"
        return 0.0, f"{name}: no peak known; set logging.peak_tflops"
    return _cpu_peak(local_world_size)


@lru_cache(maxsize=4)
def _cpu_peak(local_world_size: int) -> tuple[float, str]:
    ghz, per_cycle = 2.0, 8
    try:
        info = open("/proc/cpuinfo").read()
        mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
        ghz = mhz[0] / 1000 if mhz else ghz
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "").split()
        per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= set(flags) else 8
    except OSError:
        pass
    # Ranks on one machine share its cores: a rank gets its threads or its share, whichever is less.
    cores = min(torch.get_num_threads(), (os.cpu_count() or 1) / local_world_size)
    note = f"CPU estimate: {cores:g} core(s) per rank x {ghz:.2f} GHz x {per_cycle} fp32 FLOP/cycle"
    return cores * ghz * 1e9 * per_cycle, note

