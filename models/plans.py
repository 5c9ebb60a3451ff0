"""How each model is split, as data; `parallel/` turns these into DTensor styles.

Tensor-parallel roles (Megatron-LM's scheme, with torchtitan's sequence parallelism):
  vocab_embedding  embedding rows (the vocabulary) split across tp ranks
  colwise          output features split: no communication in forward
  rowwise          input features split: partial sums reduced (all-reduce, or
                   reduce-scatter along the sequence with sequence parallelism)
  gather_input     the sub-block's input made one replicated tensor before its
                   column-parallel linears: one all-gather (SP) or none, and
                   one gradient reduction in backward rather than one per linear
  norm             sequence-parallel norm (each rank normalises its slice of
                   the sequence); replicated computation without SP
  vocab_output     output projection split over the vocabulary; the loss is
                   computed on the shards (loss parallel), never gathering logits

Keys are module paths; "layers.*." applies a key to every transformer block.
"""

LLAMA_TP_PLAN = {
    "tok_embeddings": "vocab_embedding",
    "layers.*.attention_norm": "norm",
    "layers.*.attention": "gather_input",
    "layers.*.attention.wq": "colwise",
    "layers.*.attention.wk": "colwise",
    "layers.*.attention.wv": "colwise",
    "layers.*.attention.wo": "rowwise",
    "layers.*.ffn_norm": "norm",
    "layers.*.feed_forward": "gather_input",
    "layers.*.feed_forward.w1": "colwise",
    "layers.*.feed_forward.w3": "colwise",
    "layers.*.feed_forward.w2": "rowwise",
    "norm": "norm",
    "output": "vocab_output",
}

TP_PLANS = {"llama": LLAMA_TP_PLAN}


def pipeline_cuts(n_layers: int, n_stages: int) -> list[int]:
    """Default pipeline cut points: the first layer of every stage after the first.

    Balanced by layer count (sizes differ by at most one, the extra layers go
    to the middle stages, since the first stage also holds the embedding and
    the last the norm, output projection and loss).
    """
    base, extra = divmod(n_layers, n_stages)
    # Hand the `extra` layers out from the middle outwards.
    order = sorted(range(n_stages), key=lambda i: (abs(i - (n_stages - 1) / 2), i))
    sizes = [base + (1 if i in order[:extra] else 0) for i in range(n_stages)]
    cuts, start = [], 0
    for size in sizes[:-1]:
        start += size
        cuts.append(start)
    return cuts


def stage_layers(n_layers: int, cuts: list[int]) -> list[range]:
    """The layer indices of each stage, from its cut points."""
    bounds = [0, *cuts, n_layers]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]
