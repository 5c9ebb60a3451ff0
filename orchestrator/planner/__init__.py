"""The planner: which layouts of a model fit a cluster, and how fast each would step.

  layouts.py   enumerate (tp, pp, dp, micro-batch, schedule), keep what
               trident-train's validation accepts, rank them
  memory.py    per-rank memory: model state measured from the real sharding
               code on the meta device, activations from a formula
  cost.py      the step-time model (compute, TP/PP/DP traffic, bubble)
  bubble.py    the pipeline bubble, replayed from each schedule's action lists
  render.py    table, JSON, Hydra -m lines
  dry_run.py   one layout built whole, rank by rank
  meter.py     activation memory measured on a real step (to check memory.py)

`trident-plan` (orchestrator/cli/plan.py) and `trident-train dry_run=true`
are thin shells over these; nothing here imports a CLI.
"""
