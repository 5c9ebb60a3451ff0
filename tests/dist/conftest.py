import pytest

import launch.local
from tests.dist.harness import DEEP, run_layout


@pytest.fixture(autouse=True)
def cpu_processes(monkeypatch):
    """The dist tier is gloo on CPU processes on every machine: its tolerances are derived for CPU kernels,
    and a GPU box must not turn it into a GPU run (tests/gpu is that tier). Spawned ranks and CLI
    subprocesses see no GPU; `launcher.backend=auto` here means gloo."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(launch.local, "pick_backend", lambda choice, n: "gloo" if choice == "auto" else choice)


@pytest.fixture(scope="session")
def single(tmp_path_factory):
    """The reference every layout is compared with: one process, same model, same global batch."""
    return run_layout(tmp_path_factory.mktemp("single"), "single")


@pytest.fixture(scope="session")
def single_deep(tmp_path_factory):
    """The reference of the deeper pipelines (8 layers, 16 micro-batches of one sequence)."""
    return run_layout(tmp_path_factory.mktemp("deep"), "single-deep", 1, 1, *DEEP)
