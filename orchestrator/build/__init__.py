"""The model as a run builds it: this rank's parallelized parts with their initial weights (model.py), the
memory and speed levers applied to them (levers.py: dtype, activation checkpointing, compile), their
optimizer (optim.py), and the FLOPs and device peaks that MFU and the planner count with (flops.py).

Imports only models/ and parallel/ (and, within, levers.py): validate.py, the planner, generation and the
training loop all build on it.
"""
