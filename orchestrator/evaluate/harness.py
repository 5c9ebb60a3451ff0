"""`trident-eval`: lm-evaluation-harness on trident's own model, at any tp, from a checkpoint of any layout.

lm-eval asks a language model three things (its `LM` interface): the log-likelihood of a continuation
given a context, the rolling log-likelihood of a whole text, and text generated until a stop string.
`TridentLM` answers them with trident's model split over tp ranks: batched forward passes for the
log-likelihoods, the generator and its KV cache (orchestrator/generate/decode.py) for generation. It encodes and
scores as lm-eval's own `hf` model does (the context and continuation encoded whole then split, an empty
context conditioned on the BOS token, windows of the model's length for rolling texts), so the two give the
same metrics on the same weights.

Rank 0 runs lm-eval; under tp > 1 every other rank of the group follows it: rank 0 broadcasts each batch
before computing it, and the others compute the same (their shards) until it says stop.

The model, its tokenizer and the checkpoint are settled as trident-generate settles them
(orchestrator/generate/worker.py `run_config`): a checkpoint brings its run's model and tokenizer.
"""

import difflib
import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor

from orchestrator.config import CONF_DIR
from orchestrator.data.tokenizer import load_tokenizer
from orchestrator.evaluate.beside import metrics_row
from orchestrator.generate.decode import Generator, Sampling, build_model, load_weights, resolve_dtype
from orchestrator.generate.worker import check_layout, check_weights, run_config, tokenizer_of
from orchestrator.runs.dashboard import WandbRun, effective_rows
from orchestrator.runs.dashboard import read_state as read_wandb_state
from orchestrator.runs.dashboard import run_names
from orchestrator.runs.eval_files import RESULTS, hold_live, read_results, read_state, write_state
from orchestrator.validate import ConfigError
from parallel.mesh import ParallelDims, build_mesh

SHIPPED_TASKS = Path(CONF_DIR) / "eval_tasks"  # the tasks the project ships (their README says what they are)


# ---- before any rank starts ----

def task_folders(tasks: Sequence[str]) -> list[str]:
    """The folders lm-eval looks for task YAML in: the shipped tasks, and each task given as a file or folder."""
    folders = [str(SHIPPED_TASKS)]
    for t in tasks:
        path = Path(t).expanduser()
        if path.is_dir():
            folders.append(str(path.resolve()))
        elif path.suffix in (".yaml", ".yml") and path.is_file():
            folders.append(str(path.resolve().parent))
    return list(dict.fromkeys(folders))


def task_names(tasks: Sequence[str]) -> list[str]:
    """eval.tasks as lm-eval task names: a YAML file is the task it defines, a folder every task in it."""
    names = []
    for t in tasks:
        path = Path(t).expanduser()
        if path.is_dir():
            names += sorted(name for name in map(_yaml_task, path.glob("*.yaml")) if name)
        elif path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise ConfigError(f"eval.tasks: {t} is not a file")
            name = _yaml_task(path)
            if name is None:
                raise ConfigError(f"eval.tasks: {t} defines no `task:` name")
            names.append(name)
        else:
            names.append(str(t))
    return names


def _yaml_task(path: Path) -> Optional[str]:
    for line in path.read_text().splitlines():
        if line.startswith("task:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    return None


def check_tasks(e, key: str = "eval.tasks") -> tuple[list[str], list[str]]:
    """(lm-eval task names, the folders they come from: None for lm-eval's own); a task lm-eval does not know
    is refused, naming the close matches it does know, and so is one whose data is not on this machine. lm-eval's
    own tasks (thousands of YAML files, seconds to index) are looked at only for a name the given folders do
    not hold. key: the setting the tasks came from."""
    if not e.tasks:
        raise ConfigError(f"{key} is empty: name lm-eval tasks, task YAML files or folders of them "
                          f"(shipped: {', '.join(sorted(shipped_tasks()))})")
    folders = task_folders(e.tasks)
    try:
        names = task_names(e.tasks)
    except ConfigError as err:
        raise ConfigError(str(err).replace("eval.tasks", key)) from None
    from lm_eval.tasks import TaskManager  # imported here: lm-eval (and its datasets) load only for evaluation

    manager = TaskManager(include_path=folders, include_defaults=False)
    if not set(names) <= set(manager.all_tasks):
        folders.append(None)  # lm-eval's own tasks too
        manager = TaskManager(include_path=folders[:-1], include_defaults=True)
        known = set(manager.all_tasks)
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
                raise ConfigError(f"{key}: lm-eval knows no task {name!r}"
                                  + (f" (close: {', '.join(close)})" if close else "")
                                  + f"; the shipped tasks: {', '.join(sorted(shipped_tasks()))}")
    for name in names:
        entry = manager.task_index.get(name)
        wanted = missing_data(entry.cfg or {}, entry.yaml_path) if entry is not None and entry.cfg else None
        if wanted:
            raise ConfigError(
                f"{key}: task {name!r} ({entry.yaml_path}) reads {wanted}, which is not on this machine, and "
                "nothing is downloaded at run time: fetch it where there is a network (datasets.load_dataset, then "
                "point HF_DATASETS_CACHE or HF_HOME at that cache here), or give a task YAML whose "
                "dataset_kwargs.data_files name local files (docs/generation-and-evaluation.md)")
    return names, folders


# Hugging Face datasets' builders that read local files named by dataset_kwargs.data_files.
FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")


def missing_data(task: dict, yaml_path) -> Optional[str]:
    """What a task's data is, where it is not on this machine (None where it is, or a function of the task's
    own loads it): a local data file (relative to the task's YAML or to here), or a Hugging Face dataset that is
    in neither the datasets cache nor the hub cache."""
    files = (task.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        listed = files.values() if isinstance(files, dict) else [files]
        flat = [f for item in listed for f in ([item] if isinstance(item, str) else item)]
        bases = [Path(yaml_path).parent, Path.cwd()] if yaml_path else [Path.cwd()]
        for f in flat:
            if not any(glob.glob(str(base / Path(f).expanduser())) for base in bases):
                return f"the data file {f!r}"
        return None
    if task.get("custom_dataset"):
        return None
    path = task.get("dataset_path")
    if not path or Path(path).expanduser().exists():
        return None
    if path in FILE_BUILDERS:
        return f"dataset_path {path!r} with no dataset_kwargs.data_files"
    from datasets import config as datasets_config  # (lm-eval's dependency: loaded with it)
    from huggingface_hub import constants  # (likewise)

    cached = [Path(datasets_config.HF_DATASETS_CACHE) / path.replace("/", "___"),
              Path(constants.HF_HUB_CACHE) / ("datasets--" + path.replace("/", "--"))]
    if any(c.exists() for c in cached):
        return None
    name = task.get("dataset_name")
    return f"the Hugging Face dataset {path!r}" + (f" ({name})" if name else "")


def shipped_tasks() -> list[str]:
    return task_names([str(SHIPPED_TASKS)])


def prepare(cfg: DictConfig, env=None, overrides: Sequence[str] = ()) -> tuple[DictConfig, Optional[str], list, list]:
    """(the config evaluation runs with, the checkpoint, the task names, their folders): every check first."""
    e = cfg.eval
    cfg = OmegaConf.merge(cfg, {"generate": {"checkpoint": e.checkpoint}})
    names, folders = check_tasks(e)
    try:
        cfg, checkpoint = run_config(cfg, overrides)
    except ConfigError as err:
        raise ConfigError(str(err).replace("generate.checkpoint", "eval.checkpoint")) from None
    if e.batch_size < 1:
        raise ConfigError(f"eval.batch_size={e.batch_size} must be at least 1")
    if e.limit is not None and e.limit <= 0:
        raise ConfigError(f"eval.limit={e.limit} must be positive (a count of documents per task) or null (all)")
    check_layout(cfg, env)
    check_weights(cfg, checkpoint)
    tokenizer_of(cfg)
    return cfg, checkpoint, names, folders


def check_beside(cfg: DictConfig, env=None) -> None:
    """train.eval_tasks' evaluations beside a training run (orchestrator/evaluate/beside.py), before any rank starts: the
    tasks (known, their data here), checkpoints for them to evaluate, and the `eval` settings they take."""
    t, e = cfg.train, cfg.eval
    if not t.eval_tasks:
        return
    if t.eval_tasks_every < 1:
        raise ConfigError(f"train.eval_tasks_every={t.eval_tasks_every} must be at least 1 (evaluate every N-th "
                          "checkpoint)")
    if not cfg.checkpoint.every and not cfg.checkpoint.at_end:
        raise ConfigError("train.eval_tasks evaluates checkpoints, and this run saves none: set checkpoint.every "
                          "(steps between them) or checkpoint.at_end=true")
    check_tasks(OmegaConf.create({"tasks": list(t.eval_tasks)}), "train.eval_tasks")
    if e.batch_size < 1:
        raise ConfigError(f"eval.batch_size={e.batch_size} must be at least 1")
    if e.limit is not None and e.limit <= 0:
        raise ConfigError(f"eval.limit={e.limit} must be positive (a count of documents per task) or null (all)")
    if e.tp < 1:
        raise ConfigError(f"eval.tp={e.tp} must be at least 1")
    layout = OmegaConf.merge(cfg, {"parallel": {"tp": e.tp, "pp": 1, "dp": 1, "cp": 1, "sequence_parallel": False,
                                                "layout": "manual"}})
    try:
        check_layout(layout, None)
    except ConfigError as err:
        raise ConfigError(str(err).replace("parallel.tp", "eval.tp")) from None
    if e.launcher is not None and not isinstance(e.launcher, (dict, DictConfig)):
        raise ConfigError(f"eval.launcher={e.launcher!r} must be a mapping of launcher=slurm's keys (e.g. "
                          "{time: '0:30:00', partition: debug}) for the evaluations' jobs")


def step_of(checkpoint: Optional[str]) -> Optional[int]:
    if checkpoint is None:
        return None
    marker = Path(checkpoint) / "trident.json"
    return json.loads(marker.read_text())["step"] if marker.is_file() else None


def output_path(cfg: DictConfig, checkpoint: Optional[str]) -> Path:
    """eval.output, else evals.jsonl in the checkpoint's run dir (<run>/checkpoints/step-N), else here."""
    if cfg.eval.output:
        return Path(cfg.eval.output).expanduser()
    if checkpoint is not None:
        return Path(checkpoint).resolve().parent.parent / "evals.jsonl"
    return Path("evals.jsonl")


# ---- in every rank ----

class TridentLM:
    """lm-eval's LM interface over trident's model (see the module doc). Built per rank; only rank 0's is given
    to lm-eval, the others `follow`."""

    def __init__(self, model, tp_mesh, device, dtype, tokenizer, max_length: int, batch_size: int, rank0: bool):
        from lm_eval.api.model import TemplateLM  # imported here: lm-eval loads only for evaluation

        self.model, self.tp_mesh, self.device, self.dtype = model, tp_mesh, device, dtype
        self.tokenizer, self.max_length, self.batch_size, self.rank0 = tokenizer, max_length, batch_size, rank0
        self.tp = tp_mesh.size() if tp_mesh is not None else 1
        self.generator: Optional[Generator] = None
        self.vocab = model.args.vocab_size
        # lm-eval's scoring helpers (encoding a pair, an empty context) come from its TemplateLM: a subclass
        # made here, so this module imports lm-eval only where evaluation runs.
        self.lm = type("TridentTemplateLM", (TemplateLM,), {
            "eot_token_id": property(lambda _: self.eot_token_id),
            "prefix_token_id": property(lambda _: self.prefix_token_id),
            "tok_encode": lambda _, string, add_special_tokens=None, **kw: self.tokenizer.encode(string),
            "loglikelihood": lambda lm, requests, **kw: self._timed(TemplateLM.loglikelihood, lm, requests),
            "_loglikelihood_tokens": lambda _, requests, **kw: self.loglikelihood_tokens(requests),
            "loglikelihood_rolling": lambda _, requests, **kw: self._timed(self.loglikelihood_rolling, requests),
            "generate_until": lambda _, requests, **kw: self._timed(self.generate_until, requests),
        })()
        self.model_s = 0.0  # seconds spent answering lm-eval's requests (encoding, the model, scoring)

    def _timed(self, fn, *args):
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.model_s += time.perf_counter() - started

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.eot_token_id

    # ---- what every rank computes ----

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(tokens.to(self.device))
        if isinstance(out, DTensor):
            out = out.full_tensor()
        return out[..., : self.vocab].float()

    def _generate(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        if self.generator is None:
            self.generator = Generator(self.model, self.tp_mesh, self.device, self.dtype, batch=self.batch_size,
                                       max_len=self.max_length, rank0=self.rank0)
        s = Sampling(max_new_tokens=max_new, stop_ids=tuple(self.tokenizer.eos_ids))
        return [o.tokens for o in self.generator.generate(prompts, list(range(len(prompts))), s)]

    def _lead(self, *command) -> None:
        """Rank 0: tell the other ranks of the tp group what to compute next."""
        if self.tp > 1:
            dist.broadcast_object_list([command], src=dist.get_global_rank(self.tp_mesh.get_group(), 0),
                                       group=self.tp_mesh.get_group())

    def follow(self) -> None:
        """Ranks other than 0: compute what rank 0 says, until it says stop."""
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.tp_mesh.get_group(), 0),
                                       group=self.tp_mesh.get_group())
            kind, *args = box[0]
            if kind == "stop":
                return
            if kind == "logits":
                self._logits(*args)
            elif kind == "generate":
                self._generate(*args)

    def stop(self) -> None:
        self._lead("stop")

    # ---- lm-eval's requests (rank 0) ----

    def loglikelihood_tokens(self, requests) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request of
        ((context, continuation), context ids, continuation ids), as lm-eval's hf model computes them."""
        out: list = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        for first in range(0, len(order), self.batch_size):
            batch = order[first: first + self.batch_size]
            rows, spans = [], []
            for i in batch:
                _, context, continuation = requests[i]
                whole = (context + continuation)[-(self.max_length + 1):][:-1]
                rows.append(whole)
                spans.append((len(whole) - len(continuation), continuation))
            width = max(len(r) for r in rows)
            tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)
            self._lead("logits", tokens)
            logits = self._logits(tokens)
            for row, i, (start, continuation) in zip(range(len(batch)), batch, spans):
                # Normalised over the vocabulary only where the continuation is scored.
                scores = F.log_softmax(logits[row, start: start + len(continuation)], dim=-1)
                target = torch.tensor(continuation, dtype=torch.long, device=scores.device)
                greedy = bool((scores.argmax(dim=-1) == target).all())
                out[i] = (float(scores.gather(1, target[:, None]).sum()), greedy)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # (lm-eval, as above)

        results = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tokenizer.encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scored = self.loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            results.append(sum(score for score, _ in scored))
        return results

    def generate_until(self, requests) -> list[str]:
        results: list = [None] * len(requests)
        for first in range(0, len(requests), self.batch_size):
            batch = requests[first: first + self.batch_size]
            by_budget: dict[int, list] = {}
            for offset, r in enumerate(batch):
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.get("max_gen_toks", 256))
                ids = self.tokenizer.encode(context)[-(self.max_length - max_new):]
                by_budget.setdefault(max_new, []).append((first + offset, ids, until))
            for max_new, items in by_budget.items():
                self._lead("generate", [ids for _, ids, _ in items], max_new)
                for (i, _, until), tokens in zip(items, self._generate([ids for _, ids, _ in items], max_new)):
                    text = self.tokenizer.decode([t for t in tokens if t not in self.tokenizer.eos_ids])
                    for stop in until:
                        text = text.split(stop)[0]
                    results[i] = text
        return results


def eval_worker(env, device, cfg_dict: dict, checkpoint: Optional[str], names: list, folders: list) -> None:
    """One rank of the tp group: its shard of the model; rank 0 runs lm-eval and writes the results."""
    cfg = OmegaConf.create(cfg_dict)
    e, tp = cfg.eval, cfg.parallel.tp
    tp_mesh = build_mesh(ParallelDims(tp, 1, 1), device.type)["tp"]
    model = build_model(cfg.model, tp_mesh, device, cfg.train.seed)
    if checkpoint:
        load_weights(model, checkpoint, tp_mesh)
    dtype = resolve_dtype(e.dtype, device)
    if dtype != torch.float32:
        model.to(dtype)
        model.reset_buffers()
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.init_from, cfg.data.eos_token)
    lm = TridentLM(model, tp_mesh, device, dtype, tokenizer, cfg.model.max_seq_len, e.batch_size, env.rank == 0)
    if env.rank != 0:
        lm.follow()
        return
    try:
        rows = run_tasks(lm, cfg, names, folders, step_of(checkpoint))
    finally:
        lm.stop()
    write_results(output_path(cfg, checkpoint), rows)
    if e.wandb and checkpoint and rows:
        log_to_run(checkpoint, output_path(cfg, checkpoint), rows)


def log_to_run(checkpoint: str, output: Path, rows: list[dict]) -> None:
    """The results of a run's checkpoint into the run's W&B run too, where its results went to the run dir and
    it has one: a live run logs them itself (it watches evals.jsonl; its live lock says it runs), else they are
    one more attempt of the W&B run, a row after its last step (in metrics.jsonl too), and an entry in
    evals.json, so that a later resume of the run shows them again after W&B's rewind."""
    run_dir = output.resolve().parent  # the run dir the results went to: the checkpoint's, checked next
    config_path = run_dir / "config.yaml"
    if output.resolve() != (Path(checkpoint).resolve().parent.parent / RESULTS) or not read_wandb_state(str(run_dir)).get("id") \
            or not config_path.is_file():
        return
    config = OmegaConf.load(config_path)
    if config.logging.wandb.mode == "disabled":
        return
    live = hold_live(run_dir)
    if live is None:
        print(f"trident-eval: the run in {run_dir} is live: it logs these results into its W&B run itself",
              file=sys.stderr, flush=True)
        return
    try:
        logged = effective_rows(run_dir / "metrics.jsonl")
        at = logged[-1]["step"] + 1 if logged else 1
        name, group = run_names(config)
        run = WandbRun(str(run_dir), config.logging.wandb, OmegaConf.to_container(config), name, group, first_step=at)
        row = {"step": at, **metrics_row(rows[0]["step"], rows)}
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        run.log(row)
        run.finish()
        state = read_state(run_dir)
        state[rows[0]["step"]] = {"state": "done", "where": "trident-eval", "ended": time.time(), "logged_at": at,
                                  "offset": len(read_results(run_dir)) - len(rows)}
        write_state(run_dir, state)
        print(f"trident-eval: results in W&B run {run.id} (eval/step {rows[0]['step']}, at step {at})", flush=True)
    finally:
        os.close(live)


def run_tasks(lm: TridentLM, cfg: DictConfig, names: list, folders: list, step: Optional[int]) -> list[dict]:
    """lm-eval's evaluation of the tasks: one row per task and metric."""
    from lm_eval import simple_evaluate  # (lm-eval, as above)
    from lm_eval.tasks import TaskManager  # (likewise)

    e = cfg.eval
    started, lm.model_s = time.perf_counter(), 0.0
    # lm-eval's own seeds (few-shot examples, sampling): the same choices as its hf model makes.
    result = simple_evaluate(model=lm.lm, tasks=list(names), num_fewshot=e.num_fewshot, limit=e.limit,
                             task_manager=TaskManager(include_path=[f for f in folders if f],
                                                      include_defaults=None in folders),
                             log_samples=bool(e.samples), bootstrap_iters=1000)
    seconds = time.perf_counter() - started
    if e.samples:
        write_samples(Path(e.samples).expanduser(), result["samples"], step)
    rows = []
    for task, metrics in result["results"].items():
        samples = result.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": value,
                         "stderr": stderr if isinstance(stderr, (int, float)) else None, "step": step,
                         "samples": samples, "seconds": seconds, "model_seconds": lm.model_s})
    return rows


def write_samples(path: Path, samples: dict, step: Optional[int]) -> None:
    """Every document's answers (eval.samples): task, doc_id, step, and what the model answered to each of its
    requests (log-likelihoods and whether greedy, or generated text) before and after lm-eval's filters."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for task, docs in samples.items():
            for doc in docs:
                f.write(json.dumps({"task": task, "doc_id": doc["doc_id"], "step": step, "resps": doc["resps"],
                                    "filtered_resps": doc["filtered_resps"]}, default=str) + "\n")


def write_results(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    for row in rows:
        stderr = f" ± {row['stderr']:.4f}" if row["stderr"] is not None else ""
        print(f"trident-eval: {row['task']} {row['metric']} {row['value']:.4f}{stderr} "
              f"(step {row['step']}, {row['samples']} samples)", flush=True)
    print(f"trident-eval: results in {path}", file=sys.stderr, flush=True)
