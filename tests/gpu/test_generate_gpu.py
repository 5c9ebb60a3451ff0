"""trident-generate on a GPU: a compiled decode step replayed as a CUDA graph gives the eager step's tokens."""

import pytest
import torch

from orchestrator.generate.decode import Generator, Sampling, build_model
from tests.unit.test_generate import gen_cfg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [list(b"def fib(n):"), list(b"import")]


def test_compiled_decode_replayed_as_a_cuda_graph_gives_the_eager_tokens(tmp_path):
    device = torch.device("cuda")
    cfg = gen_cfg(tmp_path)
    eager = Generator(build_model(cfg.model, None, device, 0), None, device, torch.float32, batch=2, max_len=64)
    fast = Generator(build_model(cfg.model, None, device, 0), None, device, torch.float32, batch=2, max_len=64,
                     compile=True, cuda_graphs=True)
    assert fast.compiled and fast.graphed
    for s in (Sampling(32), Sampling(32, temperature=0.7, top_p=0.9, seed=1)):
        want = [o.tokens for o in eager.generate(PROMPTS, [0, 1], s)]
        assert [o.tokens for o in fast.generate(PROMPTS, [0, 1], s)] == want
