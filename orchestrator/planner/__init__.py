"""The planner: which layouts of a model fit a cluster, and how fast each would step.

  layouts.py   enumerate (tp, pp, dp, micro-batch, schedule), keep what
               trident-train's validation accepts, rank them
  memory.py    per-rank memory: model state measured from the real sharding
               code on the meta device, activations from a formula
  cost.py      the step-time model (compute, every collective, bubble, the loop)
  comms.py     every collective a layout's step issues, per pp rank
  cluster.py   a cluster file's figures checked and looked up (alpha/beta,
               compute fits, speed-ups, overheads)
  calibrate.py `trident-plan --calibrate`: measure ranks, fit, write the file
               (calibrate_slurm.py: the same as one SLURM job)
  bubble.py    the pipeline bubble, replayed from each schedule's action lists
  render.py    table, JSON, Hydra -m lines
  dry_run.py   one layout built whole, rank by rank
  meter.py     activation memory measured on a real step (to check memory.py)

`trident-plan` (orchestrator/cli/plan.py) and `trident-train dry_run=true`
are thin shells over these; nothing here imports a CLI.
"""
