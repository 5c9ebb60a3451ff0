"""Entry points: thin shells (Hydra apps and argparse) over the library; nothing imports them."""
