"""`trident-generate`'s work around the ranks: checks and prompts before launch, decoding and text out in them.

Before anything starts (in the launching process, or in every rank under
launcher=external) the config is settled and checked. With generate.checkpoint,
the model and the tokenizer are the ones its run trained with, read from the
checkpoint's marker (`run_config`; trident-export reads them the same way);
then the sampling settings, the tensor-parallel-only layout and the model's
split (trident-train's checks of the model, and only those: train.*, optim and
data.path are not generation's), where the weights come from, the tokenizer,
and each prompt's length against the context. Prompts are read and tokenized
there, once: tokenizing is data preparation, ranks never do it.

Each rank then builds its shard of the model (orchestrator/generate/decode.py),
decodes the prompts batch by batch, and rank 0 writes each prompt's text to
stdout, or one JSON line per prompt to generate.output.
"""

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, TextIO

from omegaconf import DictConfig, OmegaConf

from launch.env import from_environ
from launch.rank import pick_backend, run_rank
from launch.slurm import executor_params, follow
from orchestrator.data.tokenizer import INIT_FROM, TokenizerError, load_tokenizer
from orchestrator.generate.decode import Generator, Sampling, build_model, load_weights, resolve_dtype
from orchestrator.runs.checkpoint import SHAPE_KEYS, CheckpointError, open_run, read_marker, saved_tokenizer
from orchestrator.validate import ConfigError, validate_model
from parallel.mesh import ParallelDims, build_mesh
from parallel.tensor_parallel import padded_vocab

GEN_DTYPES = ("auto", "fp32", "bf16")


@dataclass
class Plan:
    """What the ranks need, decided before launch."""

    prompts: list[dict]  # {"prompt": text, "ids": token ids}
    checkpoint: Optional[str]  # a complete step-N folder, or None (model.init_from, or random weights)
    config: DictConfig  # what the ranks run: with a checkpoint, its run's model and tokenizer (run_config)
    warnings: list[str] = field(default_factory=list)


def restated(overrides: Sequence[str]) -> dict[str, str]:
    """What the command line sets, key to value: `model=llama3-8b` gives {"model": "llama3-8b"}, `model.dim=64`
    {"model.dim": "64"}; a deletion (~key) sets nothing."""
    pairs = (o.lstrip("+").split("=", 1) for o in overrides if not o.startswith("~"))
    return {p[0]: p[1] if len(p) > 1 else "" for p in pairs}


def _same_folder(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def run_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> tuple[DictConfig, Optional[str]]:
    """The config generation runs with, and the checkpoint it loads (None without generate.checkpoint).

    A checkpoint's marker holds its run's resolved config. Its model settings, data.tokenizer and
    data.eos_token replace the config tree's (defaults and presets: a fine-tune preset's ${hf:...} shape
    need not resolve, its train.seq_len is not generation's). The command line (`overrides`) may restate
    the model: a shape (SHAPE_KEYS) from `model=NAME` or `model.KEY=V` that is not the checkpoint's is
    refused, naming the setting; another `model.KEY=V` (max_seq_len, rope_theta, ...) wins, as do
    `data.tokenizer=` and `data.eos_token=` (trident-export's --tokenizer). The weights are the
    checkpoint's: model.init_from becomes null (a folder other than the run's own is refused), and a
    tokenizer `init_from` names the run's folder.
    """
    g, m = cfg.generate, cfg.model
    if g.checkpoint is None:
        return cfg, None
    try:
        path, saved = open_run(str(g.checkpoint))
    except CheckpointError as e:
        raise ConfigError(f"generate.checkpoint={e}") from None
    given, model = restated(overrides), saved["model"]
    spec, run_init, eos_token = saved_tokenizer(saved)
    init_from = None if OmegaConf.is_missing(m, "init_from") else m.init_from
    if init_from is not None and not _same_folder(init_from, run_init):
        raise ConfigError(f"generate.checkpoint={g.checkpoint!r} and model.init_from={init_from!r} are both set: "
                          "give one source of weights" + (f" (the checkpoint's run started from {run_init!r})"
                                                          if run_init else ""))
    wrong = []  # (the setting on the command line, the shape key it contradicts)
    for key in SHAPE_KEYS:
        setting = (f"model.{key}={given[f'model.{key}']}" if f"model.{key}" in given
                   else f"model={given['model']}" if "model" in given else None)
        if setting and key in model and m[key] != model[key]:
            wrong.append((setting, key))
    if wrong:
        settings = ", ".join(dict.fromkeys(s for s, _ in wrong))
        theirs = ", ".join(f"{k}={model[k]!r}" for _, k in wrong)
        preset = ", ".join(f"{k}={m[k]!r}" for s, k in wrong if s.startswith("model="))  # what model=NAME says
        raise ConfigError(
            f"{settings}{f' ({preset})' if preset else ''} contradicts generate.checkpoint={str(path)!r}, whose model "
            f"({model.get('name')}) has {theirs}: the model's shape is the checkpoint's (drop {settings}, or give a "
            "checkpoint of that model)")
    keep = {k for k in m if f"model.{k}" in given} - set(SHAPE_KEYS) - {"init_from"}
    values = {**{k: v for k, v in model.items() if k in m and k not in keep}, "init_from": None}
    data = {key: value for key, value in (("tokenizer", spec), ("eos_token", eos_token)) if f"data.{key}" not in given}
    if data.get("tokenizer", cfg.data.tokenizer) == INIT_FROM and run_init:
        data["tokenizer"] = run_init  # the folder itself: model.init_from is null from here on
    return OmegaConf.merge(cfg, {"model": values, "data": data}), str(path)


def check_settings(cfg: DictConfig) -> None:
    """The generate group's own values (before anything is read from disk)."""
    g = cfg.generate
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generate.top_p={g.top_p} must be in (0, 1] (1: no nucleus filtering)")
    if g.temperature < 0:
        raise ConfigError(f"generate.temperature={g.temperature} must be >= 0 (0: greedy)")
    if g.top_k < 0:
        raise ConfigError(f"generate.top_k={g.top_k} must be >= 0 (0: every token)")
    for key in ("max_new_tokens", "batch_size"):
        if g[key] < 1:
            raise ConfigError(f"generate.{key}={g[key]} must be >= 1")
    if g.dtype not in GEN_DTYPES:
        raise ConfigError(f"generate.dtype={g.dtype!r} is not one of: {', '.join(GEN_DTYPES)}")
    m = cfg.model
    if g.max_total_tokens is not None and not 2 <= g.max_total_tokens <= m.max_seq_len:
        raise ConfigError(f"generate.max_total_tokens={g.max_total_tokens} must be between 2 and "
                          f"model.max_seq_len={m.max_seq_len} (the rotary table's length), or null for that")
    if g.prompt is not None and g.prompts_file is not None:
        raise ConfigError("generate.prompt and generate.prompts_file are both set: give one of them")
    if g.prompts_file is not None and not Path(g.prompts_file).expanduser().is_file():
        raise ConfigError(f"generate.prompts_file={g.prompts_file!r} is not a file")


def check_layout(cfg: DictConfig, env=None) -> list[str]:
    """Tensor parallelism only; then trident-train's own checks of the model and its split."""
    par = cfg.parallel
    if par.cp != 1:
        raise ConfigError(f"parallel.cp={par.cp}: trident-generate decodes at parallel.cp=1 (context parallelism "
                          "splits a training sequence; valid: parallel.cp=1)")
    if par.pp != 1 or par.dp != 1:
        raise ConfigError(
            f"parallel.pp={par.pp} parallel.dp={par.dp}: trident-generate splits a model by tensor parallelism "
            "only (valid: parallel.pp=1 parallel.dp=1, and parallel.tp=N; pipeline- and data-parallel "
            "generation are not implemented)")
    if par.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel=true: a decode step holds one token, which cannot be split "
                          "over tp (valid: false)")
    # Only what generation uses: train.*, optim, checkpoint.dir and data.path are trident-train's.
    return validate_model(cfg, env)


def context_length(cfg: DictConfig) -> int:
    """Tokens per sequence the KV cache holds: prompt + output."""
    return cfg.generate.max_total_tokens or cfg.model.max_seq_len


def saved_rows(marker: dict) -> int:
    """Rows of the embedding a checkpoint holds: its vocabulary, padded to a multiple of its tp if need be."""
    config = marker.get("config", {})
    vocab, tp = config["model"]["vocab_size"], config.get("parallel", {}).get("tp", 1)
    return padded_vocab(vocab, tp) if vocab % tp else vocab


def check_weights(cfg: DictConfig, checkpoint: Optional[str]) -> None:
    """The checkpoint's embedding (its vocabulary, padded for the tp it was saved at) splits over this tp."""
    if checkpoint is None:
        return
    m, tp, rows = cfg.model, cfg.parallel.tp, saved_rows(read_marker(Path(checkpoint)))
    ours = padded_vocab(m.vocab_size, tp) if m.vocab_size % tp else m.vocab_size
    if rows != ours:
        raise ConfigError(
            f"generate.checkpoint={checkpoint!r} holds a vocabulary padded to {rows} rows (its tp); parallel.tp={tp} "
            f"needs {ours}: choose a tp that divides model.vocab_size={m.vocab_size}, or the one it was trained at")


def read_prompts(g, stdin: Optional[TextIO] = None) -> list[str]:
    """generate.prompt, else generate.prompts_file (lines, or JSONL), else stdin (one per line)."""
    if g.prompt is not None:
        return [str(g.prompt)]
    if g.prompts_file is not None:
        path = Path(g.prompts_file).expanduser()
        lines = path.read_text().splitlines()
        if path.suffix != ".jsonl":
            return [line for line in lines if line.strip()]
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"generate.prompts_file={g.prompts_file!r} line {n} is not JSON: {e}") from None
            if isinstance(item, dict):
                item = item.get("prompt", item.get("text"))
            if not isinstance(item, str):
                raise ConfigError(f"generate.prompts_file={g.prompts_file!r} line {n}: expected a string or an "
                                  'object with a "prompt" (or "text") string')
            prompts.append(item)
        return prompts
    stdin = stdin or sys.stdin
    if stdin.isatty():
        print("trident-generate: reading prompts from stdin, one per line (end with Ctrl-D)", file=sys.stderr)
    return [line for line in stdin.read().splitlines() if line.strip()]


def encode_prompts(cfg: DictConfig, texts: list[str], tokenizer) -> tuple[list[dict], list[str]]:
    """Token ids of each prompt, checked against the context. Returns (prompts, warnings)."""
    g, context = cfg.generate, context_length(cfg)
    where = "generate.prompt" if g.prompt is not None else (
        f"generate.prompts_file={g.prompts_file!r}" if g.prompts_file is not None else "stdin")
    if not texts:
        raise ConfigError(f"{where}: no prompt (set generate.prompt, generate.prompts_file, or pipe prompts to stdin)")
    context_key = (f"generate.max_total_tokens={g.max_total_tokens}" if g.max_total_tokens
                   else f"model.max_seq_len={cfg.model.max_seq_len}")
    prompts, long = [], []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if not ids:
            raise ConfigError(f"{where}: prompt {i} is empty (no token to continue from)")
        if len(ids) >= context:
            raise ConfigError(
                f"{where}: prompt {i} is {len(ids)} tokens, longer than the context ({context_key}), which must "
                f"also hold at least one generated token (valid: prompts of at most {context - 1} tokens, or a "
                f"larger generate.max_total_tokens, up to model.max_seq_len={cfg.model.max_seq_len})")
        if max(ids) >= cfg.model.vocab_size:
            raise ConfigError(f"{where}: prompt {i} holds token id {max(ids)}, beyond model.vocab_size="
                              f"{cfg.model.vocab_size} (is data.tokenizer={cfg.data.tokenizer!r} this model's?)")
        if len(ids) + g.max_new_tokens > context:
            long.append(i)
        prompts.append({"prompt": text, "ids": ids})
    warnings = []
    if long:
        warnings.append(f"{len(long)} prompt(s) (first: {long[0]}) plus generate.max_new_tokens={g.max_new_tokens} "
                        f"exceed the context ({context_key}): their output stops at it (finish: context)")
    return prompts, warnings


def tokenizer_of(cfg: DictConfig):
    try:
        tok = load_tokenizer(cfg.data.tokenizer, cfg.model.init_from, cfg.data.eos_token)
    except TokenizerError as e:
        raise ConfigError(str(e)) from None
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r} has {tok.vocab_size} tokens, more than "
                          f"model.vocab_size={cfg.model.vocab_size} (a tokenizer may be smaller than the model, not larger)")
    return tok


def prepare(cfg: DictConfig, env=None, stdin: Optional[TextIO] = None, overrides: Sequence[str] = ()) -> Plan:
    """The config settled (`run_config`; overrides: the command line's), every check in the order a user's
    mistake is cheapest to find, then the prompts, tokenized."""
    cfg, checkpoint = run_config(cfg, overrides)
    check_settings(cfg)
    warnings = check_layout(cfg, env)
    if cfg.generate.prompt is None and cfg.generate.prompts_file is None and cfg.launcher.name != "local":
        raise ConfigError(f"launcher={cfg.launcher.name} reads no stdin: give generate.prompt or generate.prompts_file")
    check_weights(cfg, checkpoint)
    if checkpoint is None and cfg.model.init_from is None:
        warnings.append("neither generate.checkpoint nor model.init_from is set: random weights from train.seed, "
                        "the text will be noise")
    tokenizer = tokenizer_of(cfg)
    prompts, more = encode_prompts(cfg, read_prompts(cfg.generate, stdin), tokenizer)
    return Plan(prompts, checkpoint, cfg, warnings + more)


# ---- in every rank ----

def generate_worker(env, device, cfg_dict: dict, prompts: list[dict], checkpoint: Optional[str]) -> None:
    """One rank of the tp group: build and load its shard, decode every batch; rank 0 writes the text."""
    cfg = OmegaConf.create(cfg_dict)
    g, tp = cfg.generate, cfg.parallel.tp
    started = time.perf_counter()
    tp_mesh = build_mesh(ParallelDims(tp, 1, 1), device.type)["tp"]
    model = build_model(cfg.model, tp_mesh, device, cfg.train.seed)
    if checkpoint:
        load_weights(model, checkpoint, tp_mesh)
    dtype = resolve_dtype(g.dtype, device)
    rank0 = env.rank == 0
    gen = Generator(model, tp_mesh, device, dtype, batch=min(g.batch_size, len(prompts)),
                    max_len=context_length(cfg), compile=g.compile, cuda_graphs=g.cuda_graphs, rank0=rank0)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.init_from, cfg.data.eos_token)  # decoding only
    sampling = Sampling.from_config(g, tokenizer.eos_ids)
    writer = Writer(g, tokenizer) if rank0 else None
    ready = time.perf_counter()
    for first in range(0, len(prompts), gen.batch):
        batch = prompts[first: first + gen.batch]
        outs = gen.generate([p["ids"] for p in batch], list(range(first, first + len(batch))), sampling)
        if writer:
            for p, o in zip(batch, outs):
                writer.write(p["prompt"], o)
    if writer:
        writer.close(tp=tp, dtype=str(dtype).removeprefix("torch."), device=device.type, load_s=ready - started,
                     compiled=gen.compiled, graphed=gen.graphed, step_times=gen.step_times)


class Writer:
    """Rank 0's output: each prompt's text on stdout, or one JSON line per prompt in generate.output."""

    def __init__(self, g, tokenizer):
        self.g, self.tokenizer = g, tokenizer
        self.file = None
        if g.output is not None:
            Path(g.output).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.file = open(Path(g.output).expanduser(), "w")
        self.count = self.tokens = 0
        self.ttft = []

    def write(self, prompt: str, o) -> None:
        text = self.tokenizer.decode(o.tokens)
        if self.file is not None:
            row = {"prompt": prompt, "tokens": o.tokens, "text": text, "ttft_s": o.ttft_s, "decode_s": o.decode_s,
                   "finish": o.finish}
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        else:
            if self.count:
                print("\n" + "-" * 40)
            print((prompt if self.g.echo else "") + text, flush=True)
        self.count += 1
        self.tokens += len(o.tokens)
        self.ttft.append(o.ttft_s)

    def close(self, tp: int, dtype: str, device: str, load_s: float, compiled: bool, graphed: bool,
              step_times: list[float]) -> None:
        if self.file is not None:
            self.file.close()
        steps = sorted(step_times)
        per_token = f"{1e3 * statistics.median(steps):.1f} ms per decode step (p50)" if steps else "no decode step"
        print(f"trident-generate: {self.count} prompt(s), {self.tokens} tokens; tp={tp} {dtype} on {device}, "
              f"ready in {load_s:.1f} s; time to first token {1e3 * statistics.median(self.ttft):.1f} ms (p50), "
              f"{per_token}; compiled: {'yes' if compiled else 'no'}, CUDA graphs: {'yes' if graphed else 'no'}"
              + (f"; wrote {self.g.output}" if self.file is not None else ""), file=sys.stderr, flush=True)


# ---- launcher=slurm ----

class GenerateTask:
    """What submitit pickles for launcher=slurm: every task of the job is one rank of the tp group."""

    def __init__(self, cfg_dict: dict, prompts: list[dict], checkpoint: Optional[str], backend: str, timeout_s: float):
        self.cfg_dict, self.prompts, self.checkpoint = cfg_dict, prompts, checkpoint
        self.backend, self.timeout_s = backend, timeout_s

    def __call__(self) -> int:
        env = from_environ()
        backend = pick_backend(self.backend, env.local_world_size)
        run_rank(generate_worker, env, backend, self.timeout_s, self.cfg_dict, self.prompts, self.checkpoint,
                 exit_process=False)
        return env.rank


def submit(cfg: DictConfig, plain: dict, plan: Plan):
    """One SLURM job whose tasks are the tp ranks; rank 0's log holds the text (or generate.output does)."""
    params = {**executor_params(cfg), "name": f"trident-generate-{cfg.model.name}"}
    import submitit  # here: a machine that never submits (a GPU box without it) must still generate

    executor = submitit.AutoExecutor(folder=cfg.launcher.folder, cluster="slurm")
    executor.update_parameters(**params)
    job = executor.submit(GenerateTask(plain, plan.prompts, plan.checkpoint, cfg.launcher.backend,
                                       cfg.parallel.timeout_s))
    print(f"trident-generate: submitted SLURM job {job.job_id} ({cfg.launcher.nodes} node(s) x "
          f"{params['tasks_per_node']} task(s))", flush=True)
    print(f"  rank 0 log  {job.paths.stdout}", flush=True)
    print(f"  errors      {job.paths.stderr}", flush=True)
    if cfg.generate.output is not None:
        print(f"  output      {cfg.generate.output}", flush=True)
    if cfg.launcher.wait:
        follow(job)
    return job
