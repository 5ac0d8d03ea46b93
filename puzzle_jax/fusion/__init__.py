"""FFN Fusion and block parallelism: dependency analysis (`deps`), fusion-aware search (`search`),
tensor-parallel fused FFN (`tp`); the fused block itself lives in the model core
(`core.arch.fuse_ffn_run`, `core.model.fuse_ffn_params`)."""
