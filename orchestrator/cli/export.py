"""`trident-export CHECKPOINT OUT_DIR [--dtype float32|bfloat16] [--tokenizer PATH]`: a checkpoint as a Hugging Face Llama folder.

Reads a trident checkpoint saved at any layout (its marker holds the model
config), gathers the full weights in this one process, and writes
`config.json` + `model.safetensors` that `transformers.LlamaForCausalLM.
from_pretrained` loads as they are, and next to them the files of the run's
tokenizer (`data.tokenizer` in the checkpoint's config, or --tokenizer), so
that `AutoTokenizer.from_pretrained(OUT_DIR)` loads too. The reverse is
`model.init_from=OUT_DIR` in trident-train, at any layout.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from models.hf import export
from models.llama import ModelArgs, Transformer
from orchestrator.data.tokenizer import TokenizerError, copy_tokenizer, load_tokenizer
from orchestrator.runs.checkpoint import CheckpointError, SafePlanner, SafeReader, open_run, saved_tokenizer


def load_full_model(path: Path) -> tuple[dict, ModelArgs]:
    """The whole model's weights from a checkpoint, as plain tensors (one process, no process group)."""
    args = ModelArgs.from_config(open_run(str(path))[1]["model"])
    with torch.device("meta"):
        shapes = Transformer(args).state_dict()
    state = {"model": {k: torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items() if k != "rope"}}
    dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner(), no_dist=True)
    return state["model"], args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="trident-export", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a step-N checkpoint folder, or a checkpoint dir (its newest complete one)")
    ap.add_argument("out", help="the Hugging Face folder to write")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer files to copy next to the weights: a tokenizer.json or a folder "
                         "(default: the run's data.tokenizer; 'bytes' copies none)")
    ns = ap.parse_args(argv)
    try:
        path, config = open_run(ns.checkpoint)
        state, args = load_full_model(path)
    except CheckpointError as e:
        print(f"trident-export: checkpoint {e}", file=sys.stderr)
        return 2
    spec, init_from, eos_token = saved_tokenizer(config)
    spec = ns.tokenizer or spec
    try:
        load_tokenizer(spec, init_from, eos_token)  # before writing anything
    except TokenizerError as e:
        print(f"trident-export: {e} (pass --tokenizer PATH, or --tokenizer bytes for none)", file=sys.stderr)
        return 2
    export(state, args, ns.out, getattr(torch, ns.dtype))
    files = copy_tokenizer(spec, init_from, Path(ns.out), eos_token)
    print(f"trident-export: {path} -> {ns.out} ({', '.join(['config.json', 'model.safetensors', *files])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
