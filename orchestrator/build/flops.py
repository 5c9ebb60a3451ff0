"""Model FLOPs per token, the one table of device peaks, and MFU: one definition for the trainer and the planner.

MFU (model FLOPs utilisation) = flops_per_token x tokens/s / (peak x ranks),
where tokens/s counts the whole run's tokens (all dp replicas) per second of
step time, flops_per_token counts the model's own arithmetic (6N + 12 L d s,
below; recomputation by activation checkpointing is not model FLOPs), and
peak is one device's dense peak *in the compute dtype* (train.dtype): a bf16
run is measured against the bf16 tensor-core peak, an fp32 run against the
fp32 one. Measuring a bf16 run against the fp32 peak reads ~15x high on an
H100 (989 vs 67 TFLOP/s).
"""

import os
from functools import lru_cache
from typing import Optional

import torch

from models.llama import ModelArgs

TFLOPS = 1e12

# Dense (no sparsity) peak TFLOP/s per device by train.dtype, from NVIDIA's data sheets. fp32 is the
# plain FP32 (CUDA-core) figure: torch runs fp32 matmuls without TF32 unless told to
# (torch.backends.cuda.matmul.allow_tf32). conf/cluster/*.yaml name a key of this table.
DEVICE_PEAKS = {
    "h100-sxm": {"bf16": 989.0, "fp32": 67.0},
    "h100-pcie": {"bf16": 756.0, "fp32": 51.0},
    "h100-nvl": {"bf16": 835.0, "fp32": 60.0},
    "h200": {"bf16": 989.0, "fp32": 67.0},  # the H100 SXM's chip, more memory
    "h200-nvl": {"bf16": 835.0, "fp32": 60.0},
    "gh200": {"bf16": 989.0, "fp32": 67.0},
    "a100": {"bf16": 312.0, "fp32": 19.5},  # SXM and PCIe, 40 and 80 GB alike
}
CPU_DEVICE = "cpu"  # a cluster of CPU processes: the peak is this machine's estimate (cluster_peak)
CLUSTER_DEVICES = (*DEVICE_PEAKS, CPU_DEVICE)  # what conf/cluster's `device` may name
# How torch.cuda.get_device_name spells them ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", ...):
# the first fragment found in the name wins, so the more specific come first.
CUDA_NAMES = (
    ("GH200", "gh200"),
    ("H200 NVL", "h200-nvl"),
    ("H200", "h200"),
    ("H100 NVL", "h100-nvl"),
    ("H100 PCIe", "h100-pcie"),
    ("H100", "h100-sxm"),
    ("A100", "a100"),
)


def flops_per_token(args: ModelArgs, n_params: int, seq_len: int) -> float:
    """6N for the matmuls of forward+backward, plus 12*L*dim*seq for attention scores.

    N counts every weight used in a matmul: all parameters but the token
    embedding (a lookup), unless it is tied to the output projection.
    """
    n_matmul = n_params - (0 if args.tie_embeddings else args.vocab_size * args.dim)
    return 6 * n_matmul + 12 * args.n_layers * args.dim * seq_len


def block_matmul_weights(args: ModelArgs) -> int:
    """One block's matmul weights: wq, wo (dim x dim), wk, wv (dim x kv heads), w1, w2, w3 (dim x ffn hidden)."""
    return 2 * args.dim * args.dim + 2 * args.dim * args.kv_heads * args.head_dim + 3 * args.dim * args.ffn_hidden


def block_flops_parts(args: ModelArgs, tp: int, tokens: int, seq: int) -> tuple[float, float]:
    """Model FLOPs of one block's tp shard, forward and backward, for `tokens` tokens: (the matmuls', 6 per weight
    and token; attention's, 12 x dim x seq per token), as flops_per_token counts them."""
    return tokens * 6 * block_matmul_weights(args) / tp, tokens * 12 * args.dim * seq / tp


def block_flops(args: ModelArgs, tp: int, tokens: int, seq: int) -> float:
    return sum(block_flops_parts(args, tp, tokens, seq))


def head_flops(args: ModelArgs, tp: int, tokens: int) -> float:
    """The output projection's tp shard, forward and backward (the embedding is a lookup)."""
    return tokens * 6 * args.dim * args.vocab_size / tp


def mfu(flops_per_token_: float, tokens_per_s: float, peak_per_rank: float, world_size: int) -> float:
    """The one MFU formula: achieved model FLOP/s over the peak of all ranks (0 when no peak is known)."""
    return flops_per_token_ * tokens_per_s / (peak_per_rank * world_size) if peak_per_rank else 0.0


def device_key(cuda_name: str) -> Optional[str]:
    """The DEVICE_PEAKS key of a CUDA device name, or None for a device not in the table."""
    return next((key for fragment, key in CUDA_NAMES if fragment in cuda_name), None)


def table_peak(key: str, dtype: str) -> float:
    """FLOP/s of a DEVICE_PEAKS device in train.dtype `dtype` (KeyError for unknown ones)."""
    return DEVICE_PEAKS[key][dtype] * TFLOPS


def peak_flops(device_type: str, dtype: str, local_world_size: int = 1,
               cuda_name: Optional[str] = None) -> tuple[float, str]:
    """(peak FLOP/s of one rank's device in the compute dtype, where the figure comes from).

    device_type "cuda" looks cuda_name up in DEVICE_PEAKS (0 when unknown: MFU is
    then not reported; logging.peak_tflops sets it); "cpu" is an estimate.
    """
    if device_type == "cuda":
        key = device_key(cuda_name or "")
        if key is None:
            return 0.0, f"{cuda_name}: no peak known; set logging.peak_tflops"
        return table_peak(key, dtype), f"{cuda_name} ({key}) data-sheet dense {dtype} peak"
    return _cpu_peak(local_world_size)


@lru_cache(maxsize=4)
def _cpu_peak(local_world_size: int) -> tuple[float, str]:
    """threads x clock x FMA width: fp32 FLOP/s. Used for bf16 too (few CPUs compute bf16 faster
    without AMX, and torch's CPU autocast mostly converts around fp32 kernels)."""
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


def cluster_peak(device: str, dtype: str, ranks_per_node: int) -> float:
    """FLOP/s of one rank of a conf/cluster: the table's figure, or for `device: cpu` this machine's estimate
    with `ranks_per_node` processes sharing its cores."""
    if device == CPU_DEVICE:
        return _cpu_peak(ranks_per_node)[0]
    return table_peak(device, dtype)


def run_peak(peak_tflops: Optional[float], device: torch.device, dtype: str, local_world_size: int) -> tuple[float, str]:
    """The trainer's peak: logging.peak_tflops if set, else the table (GPU) or the estimate (CPU)."""
    if peak_tflops:
        return peak_tflops * TFLOPS, "logging.peak_tflops"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return peak_flops(device.type, dtype, local_world_size, name)
