"""The training program, one package per workflow. Each part imports only the parts above it in this list
(tests/unit/test_imports.py holds the order), so a reader can take them top down:

  config.py        where the Hydra config tree lives, and its resolvers
  data/            text in: tokenizers, corpora tokenized once, chat rendering, mixtures, batches
  build/           the model as a run builds it: parallelized, its levers, its optimizer, its FLOPs
  validate.py      every check of a config before anything starts (ConfigError names the setting)
  slurm_checks.py  a launcher=slurm config against the cluster SLURM reports
  runs/            what a run dir holds: checkpoints, metrics.jsonl, the W&B run, evaluation state
  generate/        text out: decoding on tensor-parallel ranks, trident-generate's worker
  evaluate/        trident-eval (lm-eval's tasks on our model), and the evaluations beside a training run
  planner/         which layouts fit a cluster and how fast each steps, predicted without running
  train/           the training loop and what it runs beside itself
  search/          runs started to find something out: sweeps, trials, searches, tuning, calibration, status
  cli/             the console scripts, thin shells over all of the above; nothing imports them

docs/layout.md walks through the same packages with the file each topic starts from.
"""
