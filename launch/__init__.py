"""Rank environments (local spawn, torchrun, srun) and starting the ranks."""
