"""Shared helpers: compose the real config tree in-process, with tiny-model overrides."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from hydra import compose, initialize_config_dir

from orchestrator.config import register
from orchestrator.config import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent

# A model and batch small enough for many ranks on 2 cores.
TINY = [
    "parallel.tp=1",
    "parallel.pp=1",
    "parallel.timeout_s=60",
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.multiple_of=16",
    "train.seq_len=32",
    "train.global_batch=8",
    "train.micro_batch=2",
    "train.eval_sequences=8",
    "train.eval_every=5",
    "optim.warmup_steps=2",
    "logging.wandb.mode=disabled",
    "logging.console_every=100",
    "launcher.backend=gloo",  # CPU processes even where GPUs exist: the gpu tier (tests/gpu) names nccl
]


def compose_as_shipped(*overrides: str):
    """The config exactly as a user gets it, without the tiny-model overrides."""
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def make_cfg(*overrides: str, tmp: Path = None):
    register()
    extra = [f"checkpoint.dir={tmp / 'checkpoints'}", f"data.cache_dir={tmp / 'cache'}"] if tmp else []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[*TINY, *extra, *overrides])


def run_cmd(cmd: list, timeout: float = 300, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run a command from the project root as a user would, outside any rank environment (plus `env`)."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    return subprocess.run(cmd, cwd=ROOT, env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def crash_rank_env(rank: int) -> dict:
    """The environment in which global rank `rank` of a run raises once its process group is up."""
    return fault_env(TRIDENT_TEST_CRASH_RANK=rank)


def fault_env(**faults) -> dict:
    """The environment of a run with faults injected from outside the product (tests/faults/sitecustomize.py)."""
    return {"PYTHONPATH": str(ROOT / "tests" / "faults"), **{k: str(v) for k, v in faults.items()}}


def run_train(*overrides: str, timeout: float = 300, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "orchestrator.cli.train", *overrides], timeout=timeout, env=env)



# --- real text, built here (tests/textdata.py): no download -----------------------------------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def bpe_json(tmp_path_factory) -> Path:
    """A ~2k-token byte-level BPE trained on part of the stdlib, as a bare tokenizer.json."""
    from tests.textdata import bare_tokenizer

    return bare_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory, bpe_json) -> Path:
    """A tiny random Hugging Face Llama (transformers' save_pretrained) with that tokenizer beside it."""
    from tests.textdata import hf_llama

    return hf_llama(tmp_path_factory.mktemp("hf-llama"), bpe_json)


def _scope(nodeid: str) -> str:
    """The unit a worker takes whole: the SLURM tier (it shares the one local cluster its session fixture
    starts: two workers would start two on the same ports), else a file (a module fixture is built once)."""
    path = nodeid.split("::")[0]
    return "tests/slurm" if path.startswith("tests/slurm/") else path


def pytest_collection_modifyitems(config, items):
    # The SLURM tier first (the Makefile keeps this order, --no-loadscope-reorder): it is the longest unit,
    # mostly waiting, and the other worker's files fill that time; the short unit files fill the end.
    items.sort(key=lambda item: _scope(item.nodeid) != "tests/slurm")


try:  # `make test` runs two workers (pytest-xdist, a test dependency; see the Makefile)
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest alone runs the suite in one process
    pass
else:
    class _ScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    def pytest_xdist_make_scheduler(config, log):
        """`--dist loadscope` by _scope (xdist's loadgroup marks no longer reach the test ids on pytest 9)."""
        if config.getoption("dist") == "loadscope":
            return _ScopeScheduling(config, log)
        return None
