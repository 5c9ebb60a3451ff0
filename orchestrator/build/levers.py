"""Memory and speed levers applied to a plain model part: bf16 compute, activation checkpointing, compile.

Each is a function applied from the outside, like the parallelisms: it
replaces a module's `forward` on the instance, so no module is wrapped or
renamed and every parameter keeps its name (checkpoints stay compatible
whatever the levers). They compose with TP (DTensor), FSDP2 and pipeline
stages, whose hooks sit on the modules' `__call__`, around the new forward.

train.dtype=bf16             parameters stay fp32 (the master weights the optimizer steps);
                             where FSDP2 shards them, its MixedPrecisionPolicy gathers them as
                             bf16 and reduces gradients in fp32 (parallel/data_parallel.py); elsewhere
                             the part's forward runs under bf16 autocast (matmuls and attention
                             in bf16, norms and the loss in fp32, gradients fp32).
activation_checkpointing     full: every transformer block keeps only its input and recomputes
                             the rest in backward. selective: the same for every second block
                             (even global layer index), halving the saving and the recompute:
                             layer-level selection, as torchtitan's selective AC with option "2",
                             not Korthikanti et al.'s op-level selective recomputation (which
                             keeps the linears' outputs and recomputes only attention's core).
                             Memory, per micro-batch in flight: a checkpointed block keeps one
                             (batch, seq/tp under SP, dim) tensor in the compute dtype instead
                             of its whole activations, plus one block's full activations while
                             it is recomputed; the recompute costs about one more forward of
                             those blocks (and, under TP/SP, their forward collectives again).
compile                      torch.compile of as much as is correct for the layout
                             (`compile_scope`): the whole part (the model, or the pipeline
                             stage), its loss included where the part computes it, without TP
                             and without a per-block data-parallel wrapper; each whole block
                             under TP (its collectives inside the graph), FSDP2 (whose per-block
                             hooks must stay outside a graph) and DDP (whose gradient hooks then
                             still fire block by block, so its all-reduce overlaps backward).
                             train.compile_backend: inductor, or aot_eager (graph capture and
                             AOTAutograd only). If the compiler does not work here (checked once
                             on a small function), a message says so and the run stays eager.
loss_chunks                  the output projection and cross-entropy over that many token
                             chunks, each recomputed in backward (models/llama.py
                             cross_entropy): the fp32 logits are never whole.
"""

import functools
import sys

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
AC_MODES = ("none", "full", "selective")


def dtype_bytes(name: str) -> int:
    """Bytes per element of train.dtype: what matmuls output and activations are saved in."""
    return DTYPES[name].itemsize


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def ac_layers(layer_ids: list[int], mode: str) -> list[int]:
    """The global layer indices whose blocks are recomputed in backward."""
    if mode == "full":
        return list(layer_ids)
    if mode == "selective":
        return [i for i in layer_ids if i % 2 == 0]
    return []


def apply_ac(model: nn.Module, mode: str) -> nn.Module:
    chosen = set(ac_layers([int(k) for k in model.layers.keys()], mode))
    for key, block in model.layers.items():
        if int(key) in chosen:
            block.forward = _checkpointed(block.forward)
    return model


def apply_autocast(model: nn.Module, dtype: torch.dtype, device_type: str) -> nn.Module:
    """Run the part's forward under autocast: fp32 weights, low-precision matmuls."""
    forward = model.forward

    @functools.wraps(forward)
    def run(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    model.forward = run
    return model


# torch.compile backends (train.compile_backend): inductor generates and compiles kernels; aot_eager
# captures the same graphs and differentiates them with AOTAutograd, then runs them with eager kernels.
COMPILE_BACKENDS = ("inductor", "aot_eager")
_COMPILE_WORKS: dict[str, bool] = {}


def compile_works(backend: str = "inductor") -> bool:
    """Whether torch.compile can build forward and backward here (a small probe, once per process)."""
    if backend not in _COMPILE_WORKS:
        try:
            x = torch.ones(8, requires_grad=True)
            torch.compile(lambda t: (t * 2).sin().sum(), backend=backend)(x).backward()
            _COMPILE_WORKS[backend] = True
        except Exception as e:  # noqa: BLE001 - any compiler failure means: stay eager
            _COMPILE_WORKS[backend] = False
            why = (str(e).splitlines() or [""])[0][:200]
            print(f"trident: train.compile=true but torch.compile (backend {backend}) does not work here "
                  f"({type(e).__name__}: {why}); running eager", file=sys.stderr)
    return _COMPILE_WORKS[backend]


def compile_scope(tp: int, per_block_dp: bool) -> str:
    """What train.compile=true compiles at a layout.

    model   the whole part (model or pipeline stage): embedding, blocks, norm, output
            projection and, where the part computes it (pp=1), the loss. tp=1, no per-block
            data-parallel hooks (dp=1, ZeRO-1, or replicate without DDP).
    blocks  each transformer block whole. FSDP2 (dp_shard=full, dp>1) all-gathers and
            reduce-scatters per block in hooks around each block's __call__, and DDP reduces
            per bucket as gradients arrive: a graph across blocks would move or serialise
            them. Under TP each block's collectives are inside its graph (as torchtitan
            compiles TP models). The embedding, final norm, output projection and loss stay
            eager (under TP: the vocabulary-parallel embedding, output and loss).
    """
    return "blocks" if tp > 1 or per_block_dp else "model"


def _plain_input(compiled):
    """A compiled block whose input, if it is an unfinished collective's result, is settled first.

    Under TP the embedding's output comes from RowwiseParallel's asynchronous redistribute:
    a tensor subclass that waits for its collective on first use. Given to a compiled graph
    as its input, its gradient reached the collective's backward as a plain tensor and
    backward failed (torch 2.13: "'Tensor' object has no attribute '_local_tensor'") or, with
    the block checkpointed, was lost: the embedding's gradient came out without the blocks'
    share (such tensors are not supported at graph boundaries, pytorch/pytorch#118671). A clone waits
    for it outside the graph and keeps autograd's edge to the embedding: one copy of the
    first block's input per micro-batch.
    """

    @functools.wraps(compiled)
    def forward(x, *args, **kwargs):
        if type(x) is not torch.Tensor and not isinstance(x, DTensor):
            x = x.clone()
        return compiled(x, *args, **kwargs)

    return forward


def apply_compile(model: nn.Module, scope: str = "model", backend: str = "inductor") -> bool:
    """Compile `scope` of the part (compile_scope); False (and eager) where the compiler does not work."""
    if not compile_works(backend):
        return False
    if scope == "model":
        model.forward = torch.compile(model.forward, backend=backend)
    else:
        for block in model.layers.values():
            block.forward = _plain_input(torch.compile(block.forward, backend=backend))
    return True


def apply_levers(model: nn.Module, train_cfg, device: torch.device, fsdp_mixed_precision: bool,
                 scope: str = "model") -> nn.Module:
    """Compile of `scope`, activation checkpointing, autocast (outermost: compiled graphs are traced under
    it), the loss's token chunks.

    Checkpointing wraps each chosen block's forward as it is by then: a compiled block (scope "blocks") is
    checkpointed from outside, its recompute calling the compiled code again (torch 2.13 could not compile
    a checkpointed block under TP: AOTAutograd tried to save the device mesh for backward as a tensor).
    Under scope "model" the whole model's graph, traced at its first call, takes the checkpointed blocks in.
    """
    if train_cfg.compile:
        apply_compile(model, scope, train_cfg.compile_backend)
    apply_ac(model, train_cfg.activation_checkpointing)
    model.loss_chunks = train_cfg.loss_chunks
    if DTYPES[train_cfg.dtype] != torch.float32 and not fsdp_mixed_precision:
        apply_autocast(model, DTYPES[train_cfg.dtype], device.type)
    return model
