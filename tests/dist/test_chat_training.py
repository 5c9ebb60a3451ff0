"""Chat fine-tuning for real: +experiment=sft-llama on conversations, tp=2 x pp=2 x dp=2 against one process.

The one process takes each step as one micro-batch of 8 conversations' windows. The parallel run takes 8
micro-batches of 1 over its ranks. Their windows hold different numbers of learned (assistant) tokens, so the
two agree only if the loss is the mean over every learned token of the global batch, not a mean of
micro-batch means.
"""

import json
import random
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer

from orchestrator.data.dataset import IGNORE, Batches, prepare
from tests.conftest import make_cfg, run_train
from tests.textdata import hf_llama

pytestmark = pytest.mark.dist

TOL = 1e-5  # fp32 sums in another order (TP shards, pipeline stages, dp): the layout-independence tolerance
TEMPLATE = (Path(__file__).resolve().parent.parent / "data" / "llama3-chat-template.jinja").read_text()
EOT = "<|eot_id|>"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, bpe_json) -> Path:
    """A tiny random HF Llama whose tokenizer has Llama 3's chat tokens and template."""
    tok = Tokenizer.from_file(str(bpe_json))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|start_header_id|>", "<|end_header_id|>", EOT)])
    tok_dir = tmp_path_factory.mktemp("chat-tok")
    tok.save(str(tok_dir / "tokenizer.json"))
    folder = hf_llama(tmp_path_factory.mktemp("chat-llama"), tok_dir / "tokenizer.json")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(chat_template=TEMPLATE, eos_token=EOT)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def conversations(path: Path, n: int = 80) -> Path:
    rng = random.Random(0)
    words = "list dict tuple sorted return value index key items loop range print open file read".split()
    with path.open("w") as f:
        for i in range(n):
            turns = [{"role": "system", "content": "Answer briefly."}] if i % 3 == 0 else []
            for _ in range(rng.randint(1, 3)):
                turns.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 8))) + "?"})
                turns.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 20)))})
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


def test_sft_at_tp2_pp2_dp2_equals_one_process_with_the_loss_on_assistant_tokens_only(chat_model, tmp_path):
    chats = conversations(tmp_path / "chats.jsonl")
    common = ["+experiment=sft-llama", f"model.init_from={chat_model}", f"data.path={chats}",
              f"data.cache_dir={tmp_path / 'cache'}", "train.seq_len=64", "train.global_batch=8", "train.steps=3",
              "train.eval_every=3", "train.eval_sequences=8", "train.dtype=fp32", "optim.warmup_steps=1",
              "optim.lr=1e-3", "optim.min_lr_ratio=1.0", "logging.wandb.mode=disabled", "logging.every=1",
              "parallel.timeout_s=60", "launcher.backend=gloo", "checkpoint.every=0", "checkpoint.at_end=false"]
    # The windows of step 1 hold different numbers of learned tokens (else any mean would agree).
    cfg = make_cfg(*common[:4], "train.seq_len=64", tmp=tmp_path)
    corpus = prepare(cfg.data, str(chat_model), progress=False)
    assert corpus.train.mask is not None
    (_, targets, _), = Batches(corpus.train, 64, 8, 8, cfg.train.seed, 0, 1, True).step(1)
    counted = (targets != IGNORE).sum(dim=1).tolist()
    assert len(set(counted)) > 1 and 0 < sum(counted) < 8 * 64, counted
    one = run_train(f"hydra.run.dir={tmp_path / 'one'}", *common, "parallel.tp=1", "parallel.pp=1", "parallel.dp=1",
                    "train.micro_batch=8")
    assert one.returncode == 0, one.stderr[-3000:]
    grid = run_train(f"hydra.run.dir={tmp_path / 'grid'}", *common, "parallel.tp=2", "parallel.pp=2",
                     "parallel.dp=2", "train.micro_batch=1", timeout=600)
    assert grid.returncode == 0, grid.stderr[-3000:]
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "grid")}
    ref = {r["step"]: r for r in rows["one"]}
    for r in rows["grid"]:
        for key in ("loss", "eval_loss"):
            if key in r:
                assert r[key] == pytest.approx(ref[r["step"]][key], rel=TOL, abs=0), (r["step"], key)
    assert sorted(r["step"] for r in rows["grid"] if "loss" in r) == [1, 2, 3]
