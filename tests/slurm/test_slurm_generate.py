"""trident-generate launcher=slurm against the real local SLURM cluster: a 2-task job generates what one
process does."""

import json
import re
import sys

import pytest
import torch

from orchestrator.generate.decode import Generator, Sampling, build_model
from tests.conftest import TINY, run_cmd
from tests.unit.test_generate import gen_cfg

pytestmark = pytest.mark.slurm

PROMPTS = ["def ", "while True:"]


def test_a_2_task_slurm_job_generates_at_tp2_what_one_process_generates(slurm_cluster, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    model = [o for o in TINY if o.startswith("model.")]
    res = run_cmd([sys.executable, "-m", "orchestrator.cli.generate", *model, "parallel.tp=2", "launcher=slurm",
                   "launcher.wait=true", f"launcher.folder={tmp_path / 'slurm'}", f"generate.prompts_file={prompts}",
                   f"generate.output={out}", "generate.max_new_tokens=12", "generate.max_total_tokens=32",
                   "generate.temperature=0.9", "generate.seed=5"], timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert re.search(r"submitted SLURM job \d+ \(1 node\(s\) x 2 task\(s\)\)", res.stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # The same random weights (train.seed) and sampling seed in one process, unsplit.
    cfg = gen_cfg(tmp_path)
    gen = Generator(build_model(cfg.model, None, torch.device("cpu"), cfg.train.seed), None, torch.device("cpu"),
                    torch.float32, batch=2, max_len=32)
    want = gen.generate([list(p.encode()) for p in PROMPTS], [0, 1], Sampling(12, temperature=0.9, seed=5))
    assert [r["tokens"] for r in rows] == [o.tokens for o in want]
