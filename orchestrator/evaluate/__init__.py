"""Evaluation on benchmarks. trident-eval: lm-evaluation-harness's tasks on trident's model at any tp, from a
checkpoint of any layout (harness.py); and the evaluations beside a training run (train.eval_tasks): a
queue that starts trident-eval on checkpoints, here or as SLURM jobs, and takes their results into the
run's rows (beside.py).

Imports generate/ (the model and its decoding), runs/ and validate.py; the training loop holds a
beside.EvalQueue.
"""
