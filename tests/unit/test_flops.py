"""MFU's ingredients without a GPU: the device-peak table by name and dtype, the one formula, the optimizer's choice."""

from pathlib import Path

import pytest
import torch
import yaml
from torch._subclasses.fake_tensor import FakeTensorMode

from models.llama import ModelArgs
from orchestrator.build.flops import (
    CLUSTER_DEVICES,
    device_key,
    flops_per_token,
    mfu,
    peak_flops,
    run_peak,
    table_peak,
)
from orchestrator.build.optim import resolve_implementation
from tests.conftest import ROOT


@pytest.mark.parametrize("name, key, bf16, fp32", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm", 989e12, 67e12),
    ("NVIDIA H100 PCIe", "h100-pcie", 756e12, 51e12),
    ("NVIDIA H100 NVL", "h100-nvl", 835e12, 60e12),
    ("NVIDIA H200", "h200", 989e12, 67e12),
    ("NVIDIA GH200 480GB", "gh200", 989e12, 67e12),
    ("NVIDIA A100-SXM4-80GB", "a100", 312e12, 19.5e12),
    ("NVIDIA A100 80GB PCIe", "a100", 312e12, 19.5e12),
])
def test_the_peak_is_the_compute_dtypes_for_each_cuda_device_name(name, key, bf16, fp32):
    assert device_key(name) == key
    assert peak_flops("cuda", "bf16", 1, name)[0] == bf16
    assert peak_flops("cuda", "fp32", 1, name)[0] == fp32
    assert "bf16" in peak_flops("cuda", "bf16", 1, name)[1]


def test_an_unknown_gpu_has_no_peak_and_says_which_setting_gives_one():
    peak, note = peak_flops("cuda", "bf16", 1, "Tesla T4")
    assert peak == 0.0 and "logging.peak_tflops" in note
    assert mfu(1e9, 1e3, peak, 1) == 0.0


def test_cpu_peak_is_the_same_estimate_for_both_dtypes_and_the_override_wins():
    assert peak_flops("cpu", "bf16", 2)[0] == peak_flops("cpu", "fp32", 2)[0] > 0
    assert run_peak(123.0, torch.device("cpu"), "bf16", 1) == (123e12, "logging.peak_tflops")


def test_mfu_is_model_flops_times_tokens_per_s_over_peak_times_ranks():
    # The H100 run: llama3-1b (1.236B parameters, tied), seq 2048, 34,016 tokens/s in bf16.
    args = ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                     ffn_dim_multiplier=1.5, tie_embeddings=True)
    fpt = flops_per_token(args, 1_235_814_400, 2048)
    assert fpt == 6 * 1_235_814_400 + 12 * 16 * 2048 * 2048  # 8.22 GFLOP per token
    assert mfu(fpt, 34016, table_peak("h100-sxm", "bf16"), 1) == pytest.approx(0.2827, abs=1e-4)
    # Against the fp32 peak the same run reads 15x high: the bug this table fixes.
    assert mfu(fpt, 34016, table_peak("h100-sxm", "fp32"), 1) / mfu(fpt, 34016, table_peak("h100-sxm", "bf16"), 1) \
        == pytest.approx(989 / 67)
    assert mfu(fpt, 8 * 34016, table_peak("h100-sxm", "bf16"), 8) == mfu(fpt, 34016, table_peak("h100-sxm", "bf16"), 1)


def test_every_cluster_preset_names_a_device_of_the_one_table():
    for path in (ROOT / "conf" / "cluster").glob("*.yaml"):
        cluster = yaml.safe_load(Path(path).read_text())
        assert cluster["device"] in CLUSTER_DEVICES, path.name
        assert "peak_tflops" not in cluster  # the peaks live in one place


def test_auto_optimizer_is_fused_for_cuda_parameters_and_foreach_elsewhere():
    with FakeTensorMode():
        on_gpu = [torch.empty(4, 4, device="cuda"), torch.empty(4, device="cuda")]
    on_cpu = [torch.zeros(4, 4), torch.zeros(4)]
    assert resolve_implementation("auto", on_gpu) == "fused"
    assert resolve_implementation("auto", on_cpu) == "foreach"
    assert resolve_implementation("auto", on_gpu[:1] + on_cpu[:1]) == "foreach"  # one kernel needs one device
    assert resolve_implementation("fused", on_cpu) == "fused"  # asked for: torch has a CPU kernel too
