"""trident-eval's throughput against lm-eval's own `hf` model on the same checkpoint, task and machine.

    .venv/bin/python bench/eval_throughput.py [--limit 200] [--tp 1,2] [--work DIR]

Trains a small model for a few steps (llama-debug's shape with a 2k-token BPE of the stdlib, so that
transformers can load its export), exports the checkpoint (trident-export), then evaluates the shipped tasks:

- `stdlib_next_line_mc` (multiple choice: 4 log-likelihood requests per document): requests per second;
- `stdlib_complete_line` (generation until the line ends): generated tokens per second;

with `trident-eval` at each tp (its own processes, gloo on the CPU) and with lm-eval's `hf` model on the export
(transformers), both at batch size 8, fp32. The rates count the seconds each model spent answering lm-eval's
requests (encoding, forward passes or decoding, scoring: trident-eval's `model_seconds`, the same methods of
`hf` timed here); `whole_evaluation_s` is all of lm-eval's evaluation, its task loading and fixed costs too (for
trident-eval, importing transformers, which lm-eval does to report its version). Prints one JSON object: each
side's rates, the ratios against `hf` (target: >= 1.0 at tp=1), and whether both scored alike.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.evaluate.harness import SHIPPED_TASKS  # noqa: E402
from tests.textdata import bare_tokenizer  # noqa: E402

MC, GEN = "stdlib_next_line_mc", "stdlib_complete_line"
BATCH = 8


def run(argv: list[str]) -> None:
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(argv[:4])} failed:\n{done.stderr[-3000:]}")


def generated_tokens(samples: dict, tokenizer) -> int:
    """Tokens the model generated for the generation task's documents (what it answered, before filters)."""
    return sum(len(tokenizer(d["resps"][0][0], add_special_tokens=False)["input_ids"]) for d in samples[GEN])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=200, help="documents per task")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--work", default=None, help="where the run, its export and the results go (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="trident-eval-bench-"))
    tokenizer_json = bare_tokenizer(work / "bpe")
    run_dir = work / "run"
    if not (run_dir / "checkpoints").is_dir():
        run([sys.executable, "-m", "orchestrator.cli.train", f"hydra.run.dir={run_dir}", "model=llama-debug", "model.vocab_size=2048",
             f"data.tokenizer={tokenizer_json}", "parallel.tp=1", "parallel.pp=1", "parallel.dp=1", "train.steps=20",
             "train.seq_len=128", "train.global_batch=8", "train.micro_batch=8", "train.eval_every=0",
             "logging.wandb.mode=disabled", f"data.cache_dir={work / 'cache'}"])
        run([sys.executable, "-m", "orchestrator.cli.export", str(run_dir / "checkpoints"), str(work / "hf")])

    out: dict = {"limit": args.limit, "batch_size": BATCH, "tasks": [MC, GEN]}
    ours = {}
    for tp in [int(t) for t in args.tp.split(",")]:
        results, samples = work / f"evals-tp{tp}.jsonl", work / f"samples-tp{tp}.jsonl"
        results.unlink(missing_ok=True)
        samples.unlink(missing_ok=True)
        seconds, whole = {}, {}
        for task in (MC, GEN):  # one task per evaluation: each one's seconds are its own
            run([sys.executable, "-m", "orchestrator.cli.evaluate", f"eval.checkpoint={run_dir / 'checkpoints'}",
                 f"eval.tasks=[{task}]", f"eval.limit={args.limit}", f"eval.batch_size={BATCH}", "eval.dtype=fp32",
                 f"parallel.tp={tp}", f"eval.output={results}", f"eval.samples={samples}"])
            rows = [json.loads(line) for line in results.read_text().splitlines()]
            seconds[task] = [r["model_seconds"] for r in rows if r["task"] == task][-1]
            whole[task] = [r["seconds"] for r in rows if r["task"] == task][-1]
        rows = [json.loads(line) for line in results.read_text().splitlines()]
        ours[tp] = {"seconds": seconds, "whole_s": whole, "metrics": {f"{r['task']}/{r['metric']}": r["value"] for r in rows}}

    from lm_eval import simple_evaluate  # noqa: E402 - after our runs: their processes need none of it
    from lm_eval.models.huggingface import HFLM  # noqa: E402
    from lm_eval.tasks import TaskManager  # noqa: E402

    hf = HFLM(pretrained=str(work / "hf"), dtype="float32", device="cpu", batch_size=BATCH)
    spent = [0.0]  # seconds in the model's answers to lm-eval's requests, as trident-eval counts its own

    def timed(fn):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started
        return call

    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(hf, name, timed(getattr(hf, name)))
    theirs = {"seconds": {}, "whole_s": {}, "metrics": {}}
    gen_samples = None
    for task in (MC, GEN):
        started, spent[0] = time.perf_counter(), 0.0
        result = simple_evaluate(model=hf, tasks=[task], limit=args.limit, bootstrap_iters=1000, log_samples=True,
                                 task_manager=TaskManager(include_path=[str(SHIPPED_TASKS)], include_defaults=False))
        theirs["whole_s"][task], theirs["seconds"][task] = time.perf_counter() - started, spent[0]
        theirs["metrics"].update({f"{task}/{k.split(',')[0]}": v for k, v in result["results"][task].items()
                                  if isinstance(v, float) and "_stderr" not in k})
        if task == GEN:
            gen_samples = result["samples"]
        if task == MC:
            requests = sum(len(d["resps"]) for d in result["samples"][MC])
    tokens = generated_tokens(gen_samples, hf.tokenizer)

    def rates(seconds: dict) -> dict:
        return {"loglikelihood_requests_per_s": requests / seconds[MC], "generated_tokens_per_s": tokens / seconds[GEN]}

    out["loglikelihood_requests"], out["generated_tokens"] = requests, tokens
    out["hf"] = {**rates(theirs["seconds"]), "seconds": theirs["seconds"],
                 "whole_evaluation_s": theirs["whole_s"]}
    base = out["hf"]
    for tp, got in ours.items():
        r = rates(got["seconds"])
        out[f"trident_tp{tp}"] = {**r, "seconds": got["seconds"], "whole_evaluation_s": got["whole_s"],
                                  "loglikelihood_ratio": r["loglikelihood_requests_per_s"] / base["loglikelihood_requests_per_s"],
                                  "generation_ratio": r["generated_tokens_per_s"] / base["generated_tokens_per_s"],
                                  "same_metrics": all(abs(got["metrics"].get(k, -1) - v) <= 1e-6
                                                      for k, v in theirs["metrics"].items())}
    first = out.get("trident_tp1")
    if first:
        out["target_tp1_ratio"] = 1.0
        out["meets_target"] = min(first["loglikelihood_ratio"], first["generation_ratio"]) >= 1.0
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
