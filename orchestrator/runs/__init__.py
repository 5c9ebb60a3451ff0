"""What a run leaves in its run dir, written and read back: checkpoints (checkpoint.py: atomic DCP folders,
loaded at any layout), metrics.jsonl and the console line (metrics.py), the run's W&B run through every
resume and rollback (dashboard.py), W&B's offline files read back (wandb_files.py), and the state and
results of its evaluations (eval_files.py).

Imports nothing else of orchestrator/: generation, evaluation, training and trident-status read and write
run dirs through it.
"""
