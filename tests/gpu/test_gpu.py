"""trident on GPUs: one GPU against a CPU reference, the multi-GPU launcher=local layouts against one GPU,
the loop's host synchronisation, MFU's peak and the planner's CUDA peak.

Tolerances. fp32 on a GPU (torch leaves TF32 off for matmuls) and on a CPU differ only in how each kernel
orders its sums: every value carries at most K u relative error per reduction of K terms (u = 2^-24),
K = 256 at most here (the vocabulary), through 2 L + 2 reductions in a row (two per block, the head and
the loss): GPU_REL = (2 L + 2) K u = 9e-5 for the loss after a step. Over ten AdamW steps such
differences do not grow in this model (the CPU layouts stay within 1e-5 of each other over the same run).
"""

import json
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from launch.local import spawn
from orchestrator.build.flops import device_key, table_peak
from orchestrator.data.dataset import prepare
from orchestrator.planner.memory import GiB, layout_memory, probe_shards
from orchestrator.train.trainer import Trainer
from orchestrator.validate import validate
from tests.conftest import compose_as_shipped, make_cfg
from tests.dist.harness import Result, assert_same_run, run_layout
from tests.gpu.conftest import needs_gpus

pytestmark = pytest.mark.gpu

LAYERS, K = 2, 256
GPU_REL = (2 * LAYERS + 2) * K * 2.0 ** -24
NCCL = ("launcher.backend=nccl",)


def _run_with_init(env, device, cfg_dict, run_dir, corpus, init_path, save_init):
    """One rank: save the initial weights (save_init) or start from saved ones, then train."""
    trainer = Trainer(OmegaConf.create(cfg_dict), env, device, run_dir, corpus)
    named = {n: p for m in trainer.modules for n, p in m.named_parameters()}
    if save_init:
        torch.save({n: p.detach().cpu() for n, p in named.items()}, init_path)
    else:
        with torch.no_grad():
            for n, value in torch.load(init_path).items():
                named[n].copy_(value.to(named[n].device))
    trainer.fit()


def test_one_gpu_run_matches_a_cpu_run_from_the_same_initial_weights(tmp_path):
    """The GPU's random generator makes other initial weights than the CPU's: the CPU run starts from the
    GPU run's, and then the two loss curves agree within fp32 reduction error."""
    cfg = make_cfg("parallel.tp=1", "parallel.pp=1", "parallel.dp=1", "train.steps=10", "checkpoint.at_end=false",
                   *NCCL, tmp=tmp_path)
    validate(cfg)
    plain, corpus, init = OmegaConf.to_container(cfg, resolve=True), prepare(cfg.data), str(tmp_path / "init.pt")
    spawn(_run_with_init, 1, plain, str(tmp_path / "gpu"), corpus, init, True, backend="nccl", timeout_s=300)
    spawn(_run_with_init, 1, plain, str(tmp_path / "cpu"), corpus, init, False, backend="gloo", timeout_s=300)
    gpu, cpu = Result(tmp_path / "gpu"), Result(tmp_path / "cpu")
    assert sorted(gpu.losses()) == sorted(cpu.losses()) and len(cpu.losses()) == 10
    for s, loss in cpu.losses().items():
        assert abs(gpu.rows[s]["loss"] - loss) <= GPU_REL * loss, s
    assert gpu.rows[10]["mem_peak_gb"] < 1  # the GPU allocator's figure, not the CPU process's


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("one-gpu"), "one-gpu", 1, 1, *NCCL)


@needs_gpus(2)
@pytest.mark.parametrize("tp, pp, dp, extra", [
    (2, 1, 1, ()),
    (1, 1, 2, ("parallel.dp_shard=full",)),
    (1, 2, 1, ("parallel.schedule=1f1b", "model.n_layers=2")),
    (1, 1, 2, ("parallel.dp_shard=replicate",)),
])
def test_two_gpu_layouts_match_one_gpu(one_gpu, tmp_path, tp, pp, dp, extra):
    """Mesh on cuda, TP with loss parallel, FSDP2, pipeline buffers and DDP, all over NCCL."""
    got = run_layout(tmp_path, f"tp{tp}pp{pp}dp{dp}", tp, dp, *NCCL, *extra, pp=pp)
    assert_same_run(got, one_gpu, rel=GPU_REL)


@needs_gpus(4)
def test_tp2_dp2_on_four_gpus_matches_one_gpu_and_saves_asynchronously(one_gpu, tmp_path):
    got = run_layout(tmp_path, "tp2dp2", 2, 2, *NCCL, "checkpoint.async_save=true", "checkpoint.at_end=true")
    assert_same_run(got, one_gpu, rel=GPU_REL)
    assert list((tmp_path / "checkpoints").glob("step-10/.metadata"))  # DCP staged from GPU memory, written


@needs_gpus(8)
def test_tp2_pp2_dp2_on_eight_gpus_matches_one_gpu(one_gpu, tmp_path):
    assert_same_run(run_layout(tmp_path, "3d", 2, 2, *NCCL, "parallel.schedule=1f1b", pp=2), one_gpu, rel=GPU_REL)


def _sync_and_peak_worker(env, device, cfg_dict, run_dir, corpus):
    cfg = OmegaConf.create(cfg_dict)
    trainer = Trainer(cfg, env, device, run_dir, corpus)
    for _ in range(3):  # warm-up: allocator, pinned buffers, optimizer state
        trainer.train_step()
    syncs = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(3):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.train_step()
            syncs.append(sum("synchronizing" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.reset_peak_memory_stats(device)
    trainer.train_step()
    name = torch.cuda.get_device_name(device)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    Path(run_dir, "out.json").write_text(json.dumps({
        "syncs": syncs, "peak": trainer.peak, "device": name, "implementation": trainer.optim_implementation,
        "max_allocated": torch.cuda.max_memory_allocated(device)}))


def test_a_step_waits_for_the_gpu_once_and_mfu_takes_the_bf16_peak(tmp_path):
    cfg = make_cfg("parallel.tp=1", "parallel.pp=1", "parallel.dp=1", "train.dtype=bf16", *NCCL, tmp=tmp_path)
    spawn(_sync_and_peak_worker, 1, OmegaConf.to_container(cfg, resolve=True), str(tmp_path / "run"),
          prepare(cfg.data), backend="nccl", timeout_s=300)
    out = json.loads((tmp_path / "run" / "out.json").read_text())
    assert out["syncs"] == [1, 1, 1]  # the metrics' one copy to the host
    assert out["implementation"] == "fused"
    key = device_key(out["device"])
    if key is not None:
        assert out["peak"] == table_peak(key, "bf16")


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 40 * GiB,
                    reason="needs a GPU with 40 GiB")
def test_planner_cuda_peak_is_within_5_percent_above_the_allocators(tmp_path):
    """llama3-1b's shape with 4 layers, seq 2048, micro-batch 4, bf16, foreach AdamW: the step's peak."""
    cfg = compose_as_shipped("model=llama3-1b", "model.n_layers=4", "train.seq_len=2048", "train.global_batch=4",
                             "train.micro_batch=4", "train.dtype=bf16", "parallel.tp=1", "parallel.pp=1",
                             "parallel.dp=1", "optim.implementation=foreach", "logging.wandb.mode=disabled",
                             f"checkpoint.dir={tmp_path / 'ckpt'}", f"data.cache_dir={tmp_path / 'cache'}", *NCCL)
    validate(cfg)
    predicted = layout_memory(cfg, probe_shards(cfg), device="cuda")[0].total
    spawn(_sync_and_peak_worker, 1, OmegaConf.to_container(cfg, resolve=True), str(tmp_path / "run"),
          prepare(cfg.data), backend="nccl", timeout_s=300)
    measured = json.loads((tmp_path / "run" / "out.json").read_text())["max_allocated"]
    assert measured <= predicted <= 1.05 * measured, (predicted / GiB, measured / GiB)
