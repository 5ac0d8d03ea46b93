"""gpt-oss-puzzle: MoE layer compute, MXFP4, expert pruning, FP8 KV calibration, upcycling."""
