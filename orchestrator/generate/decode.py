"""Text generation on one rank of a tensor-parallel group: the model, its KV cache, prefill and decode.

The model is the training model: built on the meta device, split by the
same TP plan (`models/plans.py` through `parallel.tensor_parallel.apply_tp`,
without sequence parallelism, since a decode step holds one token),
materialized, and filled from a DCP checkpoint saved at any layout (each
rank reads its own shards of each global name), a Hugging Face folder, or
the seeded init. Per token and layer it costs Megatron's two all-reduces
(after attention, after the MLP), plus one for the vocabulary-parallel
embedding and one all-gather of the last position's logits per step.

A batch is left-padded, prefilled in one forward, then decoded one token per
step with the KV cache (`models/kv_cache.py`) until every prompt has met a
stop token or its budget. A decode step has static shapes, so it can be
compiled and replayed as a CUDA graph; both fall back to eager with a
message where they do not work.
"""

import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from models.hf import load_hf
from models.kv_cache import KVCache
from models.llama import ModelArgs, Transformer
from models.plans import TP_PLANS
from orchestrator.build.model import init_weights
from orchestrator.generate.sampling import prompt_generator, sample
from orchestrator.runs.checkpoint import CheckpointError, SafePlanner, SafeReader
from parallel.tensor_parallel import apply_tp, padded_vocab

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """generate.dtype: auto is bf16 on a GPU, fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def generation_args(model_cfg, tp: int) -> ModelArgs:
    args = ModelArgs.from_config(model_cfg)
    if tp > 1 and args.vocab_size % tp:
        args = replace(args, padded_vocab_size=padded_vocab(args.vocab_size, tp))
    return args


def build_model(model_cfg, tp_mesh: Optional[DeviceMesh], device: torch.device, seed: int) -> Transformer:
    """The model split over tp_mesh (None: whole), with model.init_from's weights or the seeded init."""
    tp = tp_mesh.size() if tp_mesh is not None else 1
    args = generation_args(model_cfg, tp)
    with torch.device("meta"):
        model = Transformer(args)
    if tp > 1:
        apply_tp(model, tp_mesh, TP_PLANS["llama"], sequence_parallel=False)
    source = load_hf(model_cfg.init_from, args) if model_cfg.get("init_from") else None
    model.to_empty(device=device)
    init_weights(model, seed, source)
    return model.eval()


def load_weights(model: Transformer, path: str, tp_mesh: Optional[DeviceMesh]) -> None:
    """The model weights of a trident checkpoint saved at any layout; each rank reads only its shards."""
    state = {"model": model.state_dict()}
    try:
        if tp_mesh is None or tp_mesh.size() == 1:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner(), no_dist=True)
        else:
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner(),
                     process_group=tp_mesh.get_group())
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"checkpoint {path} could not be read: {str(e).splitlines()[0][:300]}") from None
    model.load_state_dict(state["model"])


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple = ()

    @classmethod
    def from_config(cls, g, eos_ids=()) -> "Sampling":
        return cls(g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.seed, tuple(eos_ids) + tuple(g.stop_ids))


@dataclass
class Output:
    index: int  # the prompt's place in the list
    tokens: list[int]  # generated ids (a stop token included)
    finish: str  # eos | length (max_new_tokens) | context (max_total_tokens)
    ttft_s: float  # batch start to this prompt's first token
    decode_s: float  # first token to its last
    logits: list = field(default_factory=list, repr=False)  # each step's (vocab,) logits, when recorded


class Generator:
    """Prefill and decode for `batch` sequences of up to `max_len` tokens on this rank's shard of the model."""

    def __init__(self, model: Transformer, tp_mesh: Optional[DeviceMesh], device: torch.device, dtype: torch.dtype,
                 batch: int, max_len: int, compile: bool = False, cuda_graphs: bool = False, rank0: bool = True):
        self.model, self.device, self.batch, self.max_len = model, device, batch, max_len
        self.args = model.args
        self.rank0 = rank0
        tp = tp_mesh.size() if tp_mesh is not None else 1
        if dtype != torch.float32:
            model.to(dtype)
            model.reset_buffers()  # the rotary table stays fp32
        self.cache = KVCache(self.args.n_layers, batch, max_len, self.args.kv_heads // tp, self.args.head_dim,
                             dtype, device)
        self.step_times: list[float] = []  # seconds of each decode step, for benchmarks
        self.compiled = self.graphed = False
        self._step = self._decode_eager
        self._static = self._decode_static  # the step CUDA graphs capture: compiled, where that works
        with torch.no_grad():
            if compile:
                self._setup_compile()
            if cuda_graphs:
                self._setup_cuda_graph()

    # ---- one forward ----

    def _logits(self, out) -> torch.Tensor:
        """The last position's logits, gathered over the vocabulary shards: (batch, vocab) fp32."""
        if isinstance(out, DTensor):
            out = out.full_tensor()
        return out[:, -1, : self.args.vocab_size].float()

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        return self._logits(self.model(tokens, cache=self.cache.at(self.cache.keys[:seq], seq), last_only=True))

    def _decode_eager(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """One token per row at buffer slot `slot`, attention over the slots filled so far."""
        return self._logits(self.model(tokens, cache=self.cache.at(self.cache.keys[slot: slot + 1], slot + 1),
                                       last_only=True))

    def _decode_static(self, tokens: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """The same step with static shapes: the slot a tensor, attention over the whole buffer under the mask."""
        return self._logits(self.model(tokens, cache=self.cache.at(slot), last_only=True))

    def _say(self, text: str) -> None:
        if self.rank0:
            print(f"trident-generate: {text}", file=sys.stderr, flush=True)

    def _setup_compile(self) -> None:
        compiled = torch.compile(self._decode_static, dynamic=False)
        tokens = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        slot = torch.zeros(1, dtype=torch.long, device=self.device)
        try:
            compiled(tokens, slot)  # compiles now; writes slot 0, which every prefill rewrites
        except Exception as e:  # noqa: BLE001 - any compiler failure means: stay eager
            why = (str(e).splitlines() or [""])[0][:200]
            self._say(f"generate.compile=true but the decode step does not compile here ({type(e).__name__}: "
                      f"{why}); decoding eager")
            return
        self.compiled = True
        self._static = compiled
        self._step = lambda tokens, slot: compiled(tokens, torch.tensor([slot], device=self.device))

    def _setup_cuda_graph(self) -> None:
        if self.device.type != "cuda":
            self._say(f"generate.cuda_graphs=true needs a CUDA device, this rank runs on {self.device.type}; "
                      "decoding without CUDA graphs")
            return
        step = self._static
        tokens = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        slot = torch.zeros(1, dtype=torch.long, device=self.device)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up (and compilation) outside the graph
                    step(tokens, slot)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step(tokens, slot)
        except Exception as e:  # noqa: BLE001 - capture fails for reasons of driver, NCCL or op support
            why = (str(e).splitlines() or [""])[0][:200]
            self._say(f"generate.cuda_graphs=true but the decode step cannot be captured here "
                      f"({type(e).__name__}: {why}); decoding without CUDA graphs")
            return
        self.graphed = True

        def replay(new_tokens: torch.Tensor, at: int) -> torch.Tensor:
            tokens.copy_(new_tokens)
            slot.fill_(at)
            graph.replay()
            return out.clone()

        self._step = replay

    # ---- a batch ----

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], indices: list[int], s: Sampling,
                 record_logits: bool = False) -> list[Output]:
        """Each prompt's generated tokens; prompts beyond `batch` are an error of the caller."""
        n = len(prompts)
        assert 0 < n <= self.batch, (n, self.batch)
        rows = [list(p) for p in prompts] + [[0]] * (self.batch - n)  # filler rows keep the shapes static
        longest = max(len(p) for p in rows)
        assert longest < self.max_len, (longest, self.max_len)
        budget = min(s.max_new_tokens, self.max_len - longest)
        pad = [longest - len(p) for p in rows]
        tokens = torch.tensor([[0] * k + p for k, p in zip(pad, rows)], dtype=torch.long, device=self.device)
        gens = None
        if s.temperature > 0:
            gens = [prompt_generator(s.seed, i, self.device) for i in indices]
            gens += [prompt_generator(s.seed, -1 - r, self.device) for r in range(self.batch - n)]
        stop = set(s.stop_ids)
        outs = [Output(i, [], "length", 0.0, 0.0) for i in indices]
        done = [False] * n
        self.cache.reset(pad)
        start = time.perf_counter()
        logits = self.prefill(tokens)
        first = last = start
        for step in range(budget):
            if record_logits:
                for r in range(n):
                    if not done[r]:
                        outs[r].logits.append(logits[r].cpu())
            chosen = sample(logits, s.temperature, s.top_k, s.top_p, gens)
            ids = chosen.tolist()  # the host needs them to stop: this syncs
            now = time.perf_counter()
            if step == 0:
                first = now
            else:
                self.step_times.append(now - last)
            last = now
            for r in range(n):
                if done[r]:
                    continue
                o = outs[r]
                o.tokens.append(ids[r])
                o.decode_s = now - first
                if ids[r] in stop:
                    done[r], o.finish = True, "eos"
                elif len(o.tokens) == s.max_new_tokens:
                    done[r], o.finish = True, "length"
                elif step == budget - 1:
                    done[r], o.finish = True, "context"
            if all(done):
                break
            logits = self._step(chosen[:, None], longest + step)
        for o in outs:
            o.ttft_s = first - start
        return outs
