"""The training loop: one rank's Trainer, built from the config, and its steps (trainer.py); the loop's side
of faults: one agreement per step, non-finite steps, loss spikes, stragglers (faults.py); what the run's W&B
run shows beside its rows: the layout, the planner's prediction, the pipeline timeline (describe.py).

Imports everything it runs on (data/, build/, runs/, evaluate/ for the evaluations beside it, planner/ for
the prediction); only search/ and cli/ import it. `python -m orchestrator.train` is trident-train.
"""
