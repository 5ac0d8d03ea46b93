"""The Puzzle search proper: candidate libraries (`candidates`), blockwise local distillation (`bld`,
`library`), replace-1-block scoring (`scoring`), costs (`costs`), the mixed-integer program (`mip`,
`select`), the child (`realize`) and its evaluation against same-cost baselines (`evaluate`).
Each module takes explicit arguments; `puzzle_jax.stages` turns a config into them."""
