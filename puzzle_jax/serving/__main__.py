from puzzle_jax.serving.cli import main

main()
