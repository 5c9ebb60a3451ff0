"""Runs started to find something out, and what they left. A Hydra sweep as one SLURM job array
(sweep.py); a trident-train run as a child process (trials.py); the asynchronous Optuna search over a
sweep's space (engine.py, space.py, report.py); the planner's best layouts run for real against its
prediction (tune.py); the cluster file measured on real ranks (calibrate.py, calibrate_slurm.py); where a
run's, a sweep's or a search's jobs stand, the library of trident-status (status.py).

The top of the library: it may import the training loop (its runs are training runs) and the planner
(what it checks); only cli/ imports it.
"""
