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
