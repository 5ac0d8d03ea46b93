"""Alias of `python -m puzzle_jax.serving` (the PyTorch serving harness), kept for old commands."""

from puzzle_jax.serving.cli import main

if __name__ == "__main__":
  main()
