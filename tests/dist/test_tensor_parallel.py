"""Tensor parallelism on real gloo processes: exact against one process, minimal communication."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.distributed.tensor.debug import CommDebugMode

from launch.local import spawn
from orchestrator.build.model import build_model
from parallel.mesh import ParallelDims, build_mesh
from parallel.tensor_parallel import loss_context
from tests.conftest import make_cfg
from tests.dist.harness import assert_same_run, run_layout

pytestmark = pytest.mark.dist


# Sequence parallelism on and off at each degree, with and without dp (not every product: launches cost ~10-20 s);
# the largest also steps AdamW with torch's fused kernel over its DTensors (FSDP2 x TP on a 2-D mesh), against
# the reference's foreach: the same update up to rounding. tp=2 x dp=2 with SP runs compiled and checkpointed in
# tests/dist/test_levers.py (test_tp2_dp2_compiled_checkpointed_blocks_match_single_eager_process).
@pytest.mark.parametrize("tp, dp, sp, implementation", [(2, 1, "true", "auto"), (2, 2, "false", "auto"),
                                                        (4, 1, "false", "auto"), (4, 2, "true", "fused")])
def test_tp_loss_curve_grads_and_init_match_single_process(single, tmp_path, tp, dp, sp, implementation):
    got = run_layout(tmp_path, f"tp{tp}dp{dp}sp{sp}", tp, dp, f"parallel.sequence_parallel={sp}",
                     f"optim.implementation={implementation}")
    assert_same_run(got, single)


def test_vocab_padding_for_tp_leaves_the_loss_unchanged(tmp_path):
    """258 tokens over tp=4: the embedding and output get 260 rows; the 2 extra never change a number."""
    ref = run_layout(tmp_path, "v258-single", 1, 1, "model.vocab_size=258", steps=5)
    got = run_layout(tmp_path, "v258-tp4", 4, 1, "model.vocab_size=258", steps=5)
    assert_same_run(got, ref)


def _count_layer_comms(env, device, cfg_dict, out):
    cfg = OmegaConf.create(cfg_dict)
    mesh = build_mesh(ParallelDims(tp=2, pp=1, dp=1), device.type)
    counts = {}
    for sp in (False, True):
        cfg.parallel.sequence_parallel = sp
        model = build_model(cfg.model, cfg.parallel, mesh, device, seed=0).parts[0]
        tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_len))
        mode = CommDebugMode()
        with mode, loss_context(2):
            F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        counts[f"sp={sp}"] = {
            layer: {
                phase: {str(op).split(".")[-1]: n for op, n in mode.comm_module_counts[f"Transformer.layers.{layer}"][phase].items()}
                for phase in ("forward", "backward")
            }
            for layer in ("0", "1")
        }
    if env.rank == 0:
        Path(out).write_text(json.dumps(counts))


def test_collectives_per_layer_are_megatrons_minimum(tmp_path):
    cfg = make_cfg("parallel.tp=2", "parallel.dp=1", tmp=tmp_path)
    out = tmp_path / "counts.json"
    spawn(_count_layer_comms, 2, OmegaConf.to_container(cfg, resolve=True), str(out), timeout_s=60)
    counts = json.loads(out.read_text())
    for layer in ("0", "1"):
        # Without SP: one all-reduce after attention and one after the MLP, each way.
        assert counts["sp=False"][layer] == {"forward": {"all_reduce": 2}, "backward": {"all_reduce": 2}}
        # With SP: each all-reduce becomes an all-gather + reduce-scatter pair of the same volume.
        pair = {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}
        assert counts["sp=True"][layer] == {"forward": pair, "backward": pair}
