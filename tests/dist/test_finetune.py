"""Fine-tuning a Hugging Face Llama on JSONL at tp=2 x pp=2 x dp=2, checked against transformers itself.

One launch of 8 ranks: the `finetune-llama` preset (weights and tokenizer from a tiny random HF Llama
that transformers saved, documents from a JSONL file, document masking on) takes one step under
every pipeline schedule (with and without sequence parallelism) and once without the mask, then
trains, checkpoints and computes logits on a probe. In this process transformers computes the same
batch's loss from the same HF folder: per document for the masked runs (each document alone, the
target across a boundary skipped), on whole windows for the unmasked one. Then trident-export's
folder loads with AutoModelForCausalLM and AutoTokenizer and gives the parallel model's logits, and
trident-generate from the checkpoint, with no model setting, writes the tokens generation from the
export gives.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launch.local import spawn
from orchestrator.cli.export import main as export_main
from orchestrator.config import CONF_DIR, register
from orchestrator.data.dataset import IGNORE, Batches, prepare
from orchestrator.data.tokenizer import load_tokenizer
from orchestrator.generate.decode import Generator, Sampling, build_model
from orchestrator.generate.worker import context_length
from orchestrator.generate.worker import prepare as prepare_generation
from orchestrator.runs import checkpoint
from orchestrator.train.trainer import Trainer
from orchestrator.validate import validate
from tests.conftest import compose_as_shipped, run_cmd
from tests.textdata import short_documents, write_jsonl

pytestmark = pytest.mark.dist

PROBE = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n"
TOL = 1e-5  # fp32 sums in another order (TP shards, pipeline stages, dp averaging)
# A choice's log-likelihood: an fp32 sum of 20-40 tokens' log-probabilities (-90 to -190 nats here), each from
# logits summed in another order (transformers' matmuls, tp shards). Seen: 2.7e-7 relative (2 ULPs of the
# sum, 1.2e-7 each); allowed: 8 ULPs.
LL_REL = 1e-6
# (name, overrides): every schedule takes one masked step; 1f1b (the preset's) is the run that trains.
CHECKS = [
    ("gpipe-no-sp", ["parallel.schedule=gpipe", "parallel.sequence_parallel=false"]),
    ("interleaved-1f1b", ["parallel.schedule=interleaved-1f1b"]),
    ("zero-bubble", ["parallel.schedule=zero-bubble"]),
    ("zbv", ["parallel.schedule=zbv"]),
    ("dualpipev", ["parallel.schedule=dualpipev"]),
    ("unmasked", ["data.mask_across_documents=false"]),
]


def finetune_cfg(hf_dir: Path, data: Path, tmp: Path, *overrides: str):
    return compose_as_shipped(
        "+experiment=finetune-llama", f"model.init_from={hf_dir}", f"data.path={data}",
        "parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.timeout_s=90",
        "train.seq_len=32", "train.global_batch=8", "train.micro_batch=1", "train.steps=3", "train.eval_every=0",
        "train.eval_sequences=8", "train.dtype=fp32", "optim.warmup_steps=1", "optim.lr=1e-3", "optim.min_lr_ratio=1.0",
        "checkpoint.every=0", "checkpoint.at_end=true", f"checkpoint.dir={tmp / 'checkpoints'}",
        f"data.cache_dir={tmp / 'cache'}", "logging.wandb.mode=disabled", "logging.console_every=100", *overrides,
    )


def _worker(env, device, cfgs: dict, run_dir: str, corpus, probe: torch.Tensor):
    first = {}
    for name, cfg_dict in cfgs.items():
        if name == "main":
            continue
        trainer = Trainer(OmegaConf.create(cfg_dict), env, device, f"{run_dir}/{name}", corpus)
        row = trainer.train_step()
        first[name] = {"loss": row["loss"], "grad_norm": row["grad_norm"]}
    cfg = OmegaConf.create(cfgs["main"])
    trainer = Trainer(cfg, env, device, f"{run_dir}/main", corpus)
    trainer.fit()
    seq = probe.shape[1]
    logits = trainer.pipeline.forward_only(probe, (1, seq // cfg.parallel.tp, cfg.model.dim), torch.float32)
    if logits is not None and trainer.mesh["tp"].get_local_rank() == 0 and trainer.mesh["dp"].get_local_rank() == 0:
        torch.save(logits.full_tensor(), Path(run_dir, "logits.pt"))
    elif logits is not None:
        logits.full_tensor()  # a collective over tp: every tp rank takes part
    if env.rank == 0:
        Path(run_dir, "first.json").write_text(json.dumps(first))


def per_document_loss(model, window: torch.Tensor, bos: int) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of a window's next-token targets, each document run alone (split at BOS), and
    how many targets that sums."""
    cuts = sorted({0, len(window), *(i for i in range(1, len(window)) if window[i] == bos)})
    total, count = 0.0, 0
    for a, b in zip(cuts, cuts[1:]):
        seg = window[a:b]
        if len(seg) > 1:
            total = total + F.cross_entropy(model(seg[None, :-1]).logits[0], seg[1:], reduction="sum")
            count += len(seg) - 1
    return total, count


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, hf_llama_dir):
    tmp = tmp_path_factory.mktemp("finetune")
    data = write_jsonl(tmp / "docs.jsonl", short_documents())
    cfgs = {"main": finetune_cfg(hf_llama_dir, data, tmp)}
    cfgs.update({name: finetune_cfg(hf_llama_dir, data, tmp, *extra) for name, extra in CHECKS})
    for cfg in cfgs.values():
        validate(cfg)
    main = cfgs["main"]
    corpus = prepare(main.data, main.model.init_from)
    tok = load_tokenizer(main.data.tokenizer, main.model.init_from)
    probe = torch.tensor([tok.encode_document(PROBE)[:16]])
    run_dir = tmp / "runs"
    for name in cfgs:
        (run_dir / name).mkdir(parents=True)
    plain = {name: OmegaConf.to_container(cfg, resolve=True) for name, cfg in cfgs.items()}
    spawn(_worker, 8, plain, str(run_dir), corpus, probe, timeout_s=600)
    ckpt = checkpoint.find_resume("auto", str(tmp / "checkpoints"))
    assert export_main([str(ckpt), str(tmp / "hf-out")]) == 0
    return {"tmp": tmp, "cfg": main, "corpus": corpus, "tok": tok, "probe": probe, "run_dir": run_dir,
            "first": json.loads((run_dir / "first.json").read_text()), "out": tmp / "hf-out"}


@pytest.fixture(scope="module")
def reference(finetuned, hf_llama_dir):
    """transformers on the HF folder: step 1's batch, masked (per document) and unmasked, and the gradient norm."""
    import transformers

    cfg, corpus, tok = finetuned["cfg"], finetuned["corpus"], finetuned["tok"]
    t = cfg.train
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_llama_dir), dtype=torch.float32)
    (x, y), = Batches(corpus.train, t.seq_len, t.global_batch, t.global_batch, t.seed, 0, 1).step(1)
    (mx, my, doc_ids), = Batches(corpus.train, t.seq_len, t.global_batch, t.global_batch, t.seed, 0, 1,
                                 mask_documents=True).step(1)
    windows = torch.cat([x, y[:, -1:]], dim=1)
    # Boundaries found from the tokens (each document starts with BOS) are the data's own.
    assert torch.equal(my == IGNORE, y == tok.bos_id) and (my == IGNORE).sum() >= 4
    # The step's loss is the mean over every target of the global batch that is not across a boundary.
    sums, counts = zip(*(per_document_loss(model, w, tok.bos_id) for w in windows))
    masked = torch.stack(sums).sum() / sum(counts)
    masked.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
    with torch.no_grad():
        logits = model(x).logits
        unmasked = torch.stack([F.cross_entropy(logits[i], y[i]) for i in range(len(x))]).mean()
    return {"masked": masked.item(), "unmasked": unmasked.item(), "grad_norm": grad_norm}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_first_masked_loss_at_tp2_pp2_dp2_equals_transformers_per_document_under_every_schedule(finetuned, reference):
    rows = [json.loads(line) for line in (finetuned["run_dir"] / "main" / "metrics.jsonl").read_text().splitlines()]
    step1 = next(r for r in rows if r.get("step") == 1 and "loss" in r)
    runs = {"1f1b": step1, **{n: r for n, r in finetuned["first"].items() if n != "unmasked"}}
    assert len(runs) == 6
    for name, row in runs.items():
        assert _rel(row["loss"], reference["masked"]) < TOL, (name, row["loss"], reference["masked"])
        assert _rel(row["grad_norm"], reference["grad_norm"]) < TOL, (name, row["grad_norm"], reference["grad_norm"])


def test_the_mask_changes_the_loss_by_what_separate_documents_do(finetuned, reference):
    unmasked = finetuned["first"]["unmasked"]["loss"]
    assert _rel(unmasked, reference["unmasked"]) < TOL
    # The two references differ by far more than the tolerance, so each match above means something.
    assert _rel(reference["masked"], reference["unmasked"]) > 100 * TOL


def test_the_export_loads_in_transformers_with_its_tokenizer_and_gives_the_parallel_models_logits(finetuned, hf_llama_dir):
    import transformers

    out, tok = finetuned["out"], finetuned["tok"]
    assert (out / "tokenizer.json").read_bytes() == (hf_llama_dir / "tokenizer.json").read_bytes()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok(PROBE, add_special_tokens=False).input_ids == tok.encode_document(PROBE)[1:-1]
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_id, tok.eos_id)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        theirs = model(finetuned["probe"]).logits
    ours = torch.load(finetuned["run_dir"] / "logits.pt")
    assert theirs.shape == ours.shape == (1, 16, tok.vocab_size)
    assert (theirs - ours).abs().max().item() < 1e-4 * ours.abs().max().item()
    # Three steps at lr 1e-3 moved the weights away from the imported ones.
    before = transformers.AutoModelForCausalLM.from_pretrained(str(hf_llama_dir), dtype=torch.float32)
    with torch.no_grad():
        assert (before(finetuned["probe"]).logits - ours).abs().max().item() > 1e-2


def test_generating_from_the_checkpoint_with_no_model_setting_gives_the_tokens_of_its_export(finetuned, tmp_path):
    """trident-generate generate.checkpoint=RUN/checkpoints, and nothing of the model or the tokenizer: shape,
    tokenizer and EOS come from the checkpoint. Generation from the export (in this process, under the preset as a
    user runs it, whose train.seq_len=2048 is beyond this model's 256 positions: not generation's) agrees."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def add(a, b):", "class Point:\n    x")))
    out = tmp_path / "out.jsonl"
    run = finetuned["tmp"] / "checkpoints"
    res = run_cmd([sys.executable, "-m", "orchestrator.cli.generate", f"generate.checkpoint={run}",
                   f"generate.prompts_file={prompts}", f"generate.output={out}", "generate.max_new_tokens=12"],
                  timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    line = ["+experiment=finetune-llama", f"model.init_from={finetuned['out']}", f"generate.prompts_file={prompts}",
            "generate.max_new_tokens=12"]
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        plan = prepare_generation(compose(config_name="generate", overrides=line), overrides=line)
    cfg, cpu = plan.config, torch.device("cpu")
    assert cfg.train.seq_len == 2048 and cfg.model.max_seq_len == 256
    gen = Generator(build_model(cfg.model, None, cpu, cfg.train.seed), None, cpu, torch.float32,
                    batch=len(plan.prompts), max_len=context_length(cfg))
    tok = load_tokenizer(cfg.data.tokenizer, cfg.model.init_from, cfg.data.eos_token)
    with torch.no_grad():
        outs = gen.generate([p["ids"] for p in plan.prompts], [0, 1], Sampling.from_config(cfg.generate, tok.eos_ids))
    assert [r["tokens"] for r in rows] == [o.tokens for o in outs]
    assert [r["text"] for r in rows] == [tok.decode(o.tokens) for o in outs]


EVAL_TASKS = ["stdlib_next_line_mc", "stdlib_complete_line"]


def test_trident_eval_at_tp1_and_tp2_answers_as_lm_evals_hf_model_does_on_the_export(finetuned, tmp_path):
    """trident-eval on the tp=2 x pp=2 x dp=2 checkpoint, at tp=1 and tp=2, on the shipped multiple-choice and
    generation tasks, against lm-eval's own hf model (transformers) on the checkpoint's export."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from orchestrator.evaluate.harness import SHIPPED_TASKS

    run = finetuned["tmp"] / "checkpoints"
    ours = {}
    for tp in (1, 2):
        res = run_cmd([sys.executable, "-m", "orchestrator.cli.evaluate", f"eval.checkpoint={run}",
                       f"eval.tasks=[{','.join(EVAL_TASKS)}]", "eval.limit=8", "eval.batch_size=4",
                       f"parallel.tp={tp}", f"eval.output={tmp_path}/evals-{tp}.jsonl",
                       f"eval.samples={tmp_path}/samples-{tp}.jsonl"], timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / f"evals-{tp}.jsonl").read_text().splitlines()]
        samples = [json.loads(line) for line in (tmp_path / f"samples-{tp}.jsonl").read_text().splitlines()]
        ours[tp] = ({(r["task"], r["metric"]): r["value"] for r in rows},
                    {(s["task"], s["doc_id"]): s["resps"] for s in samples})
        assert {r["step"] for r in rows} == {3} and {r["samples"] for r in rows} == {8}
    hf = simple_evaluate(model="hf", model_args=f"pretrained={finetuned['out']},dtype=float32", tasks=EVAL_TASKS,
                         task_manager=TaskManager(include_path=[str(SHIPPED_TASKS)], include_defaults=False),
                         limit=8, device="cpu", batch_size=4, log_samples=True, bootstrap_iters=1000)
    theirs = ({(task, key.split(",")[0]): value for task, m in hf["results"].items() for key, value in m.items()
               if isinstance(value, float) and "_stderr" not in key},
              {(task, d["doc_id"]): d["resps"] for task, docs in hf["samples"].items() for d in docs})
    assert set(ours[1][0]) == set(ours[2][0]) == set(theirs[0]) and len(ours[1][1]) == 16
    for key, value in theirs[0].items():
        assert ours[1][0][key] == pytest.approx(value, abs=1e-6) and ours[2][0][key] == pytest.approx(value, abs=1e-6)
    for key, resps in theirs[1].items():
        for tp in (1, 2):
            got = ours[tp][1][key]
            if key[0] == "stdlib_complete_line":  # the generated text
                assert got == resps, (tp, key)
            else:  # each choice's (log-likelihood, greedy)
                assert [g[0][1] for g in got] == [r[0][1] for r in resps]
                assert [g[0][0] for g in got] == pytest.approx([r[0][0] for r in resps], rel=LL_REL), (tp, key)
