"""Distributed checkpoints with torch.distributed.checkpoint (DCP): atomic, layout-free, resumable.

A checkpoint is the folder `step-N`. Every rank writes its shards into
`step-N.tmp`; rank 0 then writes `trident.json` (step, data position, the
config and layout it was saved under) and, after a barrier, renames the
folder into place. A folder named `step-N` holding `trident.json` and DCP's `.metadata` is
therefore complete; anything else (a `.tmp` left by a crash, a folder
without its marker) is never picked, by `auto` or by an explicit path.

Loading unpickles nothing it does not know: DCP's `.metadata` is a pickle,
read here by an unpickler that admits only DCP's own metadata classes,
torch dtypes and sizes (`SafeReader`), and a non-tensor item is refused
(`SafePlanner`), where DCP's defaults would use `pickle.load` and
a `torch.load` that admits any pickle. A checkpoint from elsewhere cannot run
code when it is loaded.

What is saved is keyed by the whole model's parameter names, with each value
a DTensor of its global shape: model weights and AdamW state. A run at any
other TP x PP x DP layout asks DCP for its own shards of the same names, so
it resumes with no conversion step. The learning rate and the data position
are functions of the step, so the step restores them too; the training step
consumes no random numbers (no dropout; batches come from (seed, step)).
"""

import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

HOLD = ".eval-hold"  # in a checkpoint an evaluation waits for (orchestrator/evaluate/beside.py)
MARKER = "trident.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# The model settings that shape the saved weights: a model that differs in one cannot load them.
SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, explained in one line."""


class _MetadataUnpickler(pickle.Unpickler):
    """Only what DCP writes into `.metadata`: its metadata classes, torch dtypes, Size, layouts, paths."""

    def find_class(self, module: str, name: str):
        allowed = (
            (module == dcp_metadata.__name__ and isinstance(getattr(dcp_metadata, name, None), type))
            or (module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo")
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))
            or (module == "collections" and name == "OrderedDict")
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refused to unpickle {module}.{name} (not checkpoint metadata)")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """DCP's file reader, with `.metadata` unpickled by `_MetadataUnpickler` instead of `pickle.load`."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """trident saves tensors only; a non-tensor item (which DCP would unpickle with torch.load, any pickle admitted) is refused."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise CheckpointError(f"holds a non-tensor item {read_item.dest_index.fqn!r}: trident saves none, and "
                              "unpickling it could run code")


def is_complete(path: Path) -> bool:
    """Renamed into place with its marker and DCP's metadata: every rank's shards were written."""
    return (path / MARKER).is_file() and (path / ".metadata").is_file()


def complete_checkpoints(directory: str) -> list[Path]:
    """Complete checkpoints in a folder, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def read_marker(path: Path) -> dict:
    return json.loads((Path(path) / MARKER).read_text())


def open_run(spec: str) -> tuple[Path, dict]:
    """A checkpoint (a step-N folder, or a dir whose newest complete step is taken) and the resolved config of
    the run that saved it, whose model and tokenizer trident-export and trident-generate take as they are."""
    if not Path(spec).exists():
        raise CheckpointError(f"{spec!r} does not exist (valid: a step-N checkpoint folder, or a checkpoint dir "
                              "whose newest complete step is taken)")
    found = [Path(spec)] if is_complete(Path(spec)) else complete_checkpoints(spec)
    if not found:
        raise CheckpointError(f"{spec!r} holds no complete checkpoint (a step-N folder with {MARKER}, or a dir "
                              "of them)")
    config = read_marker(found[-1]).get("config", {})
    if not config.get("model"):
        raise CheckpointError(f"{str(found[-1])!r} holds no model config in its {MARKER} (not saved by trident-train)")
    return found[-1], config


def saved_tokenizer(config: dict) -> tuple[str, Optional[str], Optional[str]]:
    """The tokenizer of a saved run, as `load_tokenizer` takes it: (data.tokenizer, model.init_from, data.eos_token)."""
    data, model = config.get("data", {}), config.get("model", {})
    return data.get("tokenizer", "bytes"), model.get("init_from"), data.get("eos_token")


def _state(modules: list, optimizers: list) -> dict:
    """This rank's model and optimizer state, keyed by the whole model's parameter names.

    Only the optimizer's per-parameter state is kept; its hyperparameters come
    from the config (and the learning rate from the step).
    """
    model, optim = {}, {}
    for module, opt in zip(modules, optimizers):
        model.update(get_model_state_dict(module))
        optim.update(get_optimizer_state_dict(module, opt)["state"])
    return {"model": model, "optim": optim}


class Saver:
    """Writes checkpoints, synchronously or in the background (`async_save`).

    An async save stages the state and returns; DCP writes it on a thread,
    over a process group of its own so its collectives never interleave with
    training's. The folder is renamed into place once every rank has
    finished: at the next save, or at `wait()` (called at the end of training).
    """

    def __init__(self, directory: str, keep: int = 0, async_save: bool = False,
                 on_complete: Optional[Callable[[int, str], None]] = None):
        """on_complete(step, path): called on rank 0 once a checkpoint is complete (renamed into place)."""
        self.directory, self.keep, self.async_save, self.on_complete = directory, keep, async_save, on_complete
        self.group = dist.new_group(backend="gloo") if async_save else None
        self.pending = None

    def save(self, modules: list, optimizers: list, step: int, meta: dict) -> str:
        self.wait()
        final = Path(self.directory) / f"step-{step}"
        tmp = final.with_name(final.name + ".tmp")
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        state = _state(modules, optimizers)
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group)
            self.pending = (getattr(future, "upload_completion", future), tmp, final, {"step": step, **meta})
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._finalize(tmp, final, {"step": step, **meta})
        return str(final)

    def wait(self) -> None:
        """Finish the save in flight, if any: wait for every rank's writes, then rename it into place."""
        if self.pending is None:
            return
        future, tmp, final, marker = self.pending
        self.pending = None
        future.result()
        self._finalize(tmp, final, marker)

    def _finalize(self, tmp: Path, final: Path, marker: dict) -> None:
        dist.barrier()
        if dist.get_rank() == 0:
            (tmp / MARKER).write_text(json.dumps(marker, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            prune(self.directory, self.keep)
            if self.on_complete is not None:
                self.on_complete(marker["step"], str(final))
        dist.barrier()


def hold(path: str) -> None:
    """Keep a checkpoint from checkpoint.keep's pruning (an evaluation waits for it) until `release`."""
    (Path(path) / HOLD).touch()


def release(path: str, keep: int) -> None:
    (Path(path) / HOLD).unlink(missing_ok=True)
    prune(str(Path(path).parent), keep)


def prune(directory: str, keep: int) -> None:
    """checkpoint.keep: remove the complete checkpoints older than the newest `keep`, but those held."""
    if keep > 0:
        for old in complete_checkpoints(directory)[: -keep]:
            if not (old / HOLD).exists():
                shutil.rmtree(old, ignore_errors=True)


def find_resume(resume: str, directory: str) -> Optional[Path]:
    """The checkpoint to start from: auto = newest complete in `directory` (None if there is none)."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(directory)
        return found[-1] if found else None
    path = Path(resume)
    if is_complete(path):
        return path
    found = complete_checkpoints(str(path))
    if not found:
        raise CheckpointError(
            f"checkpoint.resume={resume!r} holds no complete checkpoint (a step-N folder with {MARKER})"
        )
    return found[-1]


def check_compatible(path: Path, model_cfg) -> dict:
    """The marker of `path`, after checking the model it holds has this run's shapes."""
    meta = read_marker(path)
    saved = meta.get("config", {}).get("model", {})
    diffs = [f"{k}={saved.get(k)!r} there, {model_cfg[k]!r} here" for k in SHAPE_KEYS if saved.get(k) != model_cfg[k]]
    if diffs:
        raise CheckpointError(f"checkpoint {path} holds a different model ({saved.get('name')}): " + "; ".join(diffs))
    return meta


def load(modules: list, optimizers: list, path: Path) -> int:
    """Fill this rank's parts from a checkpoint saved at any layout; return its step."""
    state = _state(modules, optimizers)
    try:
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner())
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"checkpoint {path} could not be read: {str(e).splitlines()[0][:300]}") from None
    for module, opt in zip(modules, optimizers):
        # Each part takes back its own names from the merged state.
        osd = get_optimizer_state_dict(module, opt)
        osd["state"] = {k: state["optim"][k] for k in osd["state"]}
        names = {name for name, _ in module.named_parameters()}
        set_model_state_dict(module, {k: v for k, v in state["model"].items() if k in names})
        set_optimizer_state_dict(module, opt, osd)
    return read_marker(path)["step"]
