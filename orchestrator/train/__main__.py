"""`python -m orchestrator.train ...`: trident-train, where the console script is not installed (a GPU box
that carries the project's folders, ../shared/gpu/README.md)."""

from orchestrator.cli.train import main

main()
