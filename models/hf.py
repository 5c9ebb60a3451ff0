"""Hugging Face Llama checkpoints: our weights out, and theirs in.

A Hugging Face Llama folder is `config.json` plus `model.safetensors`
(written and read here directly: the format is an 8-byte header length, a
JSON header of names, dtypes, shapes and byte offsets, then the raw data).
Two things differ from Meta's layout that our model uses: the parameter
names, and the rotary layout of the q/k projections (Meta rotates adjacent
pairs of each head's dimensions, HF's `rotate_half` the first half against
the second), so wq and wk rows are permuted on the way out and back.
"""

import json
import struct
from pathlib import Path

import torch

from models.llama import ModelArgs

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

# ours (per layer, after "layers.{i}.") -> HF (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, index, rest = name.split(".", 2)
    return f"model.layers.{index}.{_LAYER_NAMES[rest]}"


def _to_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head reordered from interleaved pairs (0,1),(2,3).. to halves (0,2,..),(1,3,..)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _from_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        **({"rope_scaling": {"rope_type": "llama3", **args.rope_scaling}} if args.rope_scaling else {}),
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _rope(config: dict) -> dict:
    # transformers 5 writes `rope_parameters`; earlier versions `rope_theta` and `rope_scaling`.
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def rope_type(config: dict) -> str:
    rope = _rope(config)
    return rope.get("rope_type", rope.get("type")) or "default"


LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_scaling(config: dict):
    """Our ModelArgs.rope_scaling from a HF config: the llama3 parameters, or None for plain RoPE."""
    if rope_type(config) != "llama3":
        return None
    rope = _rope(config)
    return {k: rope[k] for k in LLAMA3_SCALING_KEYS}


def hf_value(config: dict, key: str):
    """One field of a HF Llama config.json, with transformers' defaults where a field may be absent."""
    defaults = {
        "num_key_value_heads": config.get("num_attention_heads"),
        "rope_theta": _rope(config).get("rope_theta", 10000.0),
        "tie_word_embeddings": False,
        "max_position_embeddings": 2048,
    }
    if key == "rope_scaling":
        return rope_scaling(config)
    if key in config and config[key] is not None:
        return config[key]
    if key in defaults:
        return defaults[key]
    raise KeyError(f"config.json has no {key!r}")


def args_from_hf(config: dict) -> dict:
    """The ModelArgs fields a HF Llama config fixes (the SwiGLU hidden size is checked separately)."""
    return {
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": hf_value(config, "num_key_value_heads"),
        "vocab_size": config["vocab_size"],
        "norm_eps": config["rms_norm_eps"],
        "rope_theta": hf_value(config, "rope_theta"),
        "rope_scaling": rope_scaling(config),
        "tie_embeddings": hf_value(config, "tie_word_embeddings"),
        "ffn_hidden": config["intermediate_size"],
    }


def read_config(folder) -> dict:
    return json.loads((Path(folder).expanduser() / "config.json").read_text())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = bytearray(data[base + start : base + end])
        out[name] = torch.frombuffer(buf, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"]) if buf else torch.empty(
            info["shape"], dtype=_DTYPES[info["dtype"]])
    return out


def export(state: dict[str, torch.Tensor], args: ModelArgs, out_dir: str, dtype: torch.dtype = torch.float32) -> None:
    """Write our (full, unsharded) state dict as a HF Llama folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in state.items():
        t = t[: args.vocab_size] if name in ("tok_embeddings.weight", "output.weight") else t
        if name.endswith("attention.wq.weight"):
            t = _to_hf_rope(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = _to_hf_rope(t, args.kv_heads)
        if args.tie_embeddings and name == "output.weight":
            continue
        tensors[hf_name(name)] = t.to(dtype)
    write_safetensors(out / "model.safetensors", tensors)
    (out / "config.json").write_text(json.dumps(hf_config(args, dtype), indent=1))


def load_hf(hf_dir: str, args: ModelArgs) -> dict[str, torch.Tensor]:
    """A HF Llama folder as our full state dict (float32, Meta's rotary layout)."""
    tensors = read_safetensors(Path(hf_dir) / "model.safetensors")
    ours = {}
    names = ["tok_embeddings.weight", "norm.weight"] + ([] if args.tie_embeddings else ["output.weight"])
    names += [f"layers.{i}.{rest}" for i in range(args.n_layers) for rest in _LAYER_NAMES]
    for name in names:
        t = tensors[hf_name(name)].float()
        if name.endswith("attention.wq.weight"):
            t = _from_hf_rope(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = _from_hf_rope(t, args.kv_heads)
        ours[name] = t
    return ours
