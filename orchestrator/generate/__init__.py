"""Text out. Decoding on one rank of a tensor-parallel group: the model, its KV cache, prefill and decode
steps (decode.py), the next token chosen from the logits (sampling.py), and trident-generate's work around
the ranks: checks and prompts before launch, the rank's loop, the results file (worker.py).

Imports data/, build/, validate.py and runs/ (checkpoints): evaluation and the serving planner build on it.
"""
