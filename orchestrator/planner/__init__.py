"""The planner: which layouts of a model fit a cluster, and how fast each would step.

  layouts.py   enumerate (tp, pp, dp, micro-batch, schedule), keep what
               trident-train's validation accepts, rank them
  memory.py    per-rank memory: model state measured from the real sharding
               code on the meta device, activations from a formula
  cost.py      the step-time model (compute, every collective, bubble, the loop)
  comms.py     every collective a layout's step issues, per pp rank
  cluster.py   a cluster file's figures checked and looked up (alpha/beta,
               compute fits, speed-ups, overheads)
  bubble.py    the pipeline bubble, replayed from each schedule's action lists
  render.py    table, JSON, Hydra -m lines
  dry_run.py   one layout built whole, rank by rank
  meter.py     activation memory measured on a real step (to check memory.py)
  auto.py      parallel=auto: the best layout for the ranks a run gets; the
               prediction a run's dashboard shows
  serve.py     `trident-plan serve`: tensor-parallel degrees for generation
  timeline.py  a schedule's timeline as a picture

`trident-plan` (orchestrator/cli/plan.py) and `trident-train dry_run=true`
are thin shells over these; nothing here imports a CLI. Nothing here runs a
training step either: what measures real runs for the planner (the cluster
file's calibration, layout tuning) is in orchestrator/search/, which may
import the training loop. Imports build/, validate.py and generate/ (the
serving plan checks its layouts with trident-generate's own checks).
"""
