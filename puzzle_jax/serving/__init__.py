"""The PyTorch side: serving an exported child and measuring it (install extra `serving`: torch,
transformers). The JAX core never imports this package.

* `load`: an exported directory -> the package's own DeciLM module (its shipped code verified).
* `runner`: `StaticRunner`, a static-cache decode loop with CUDA graphs; `hf_generate`, HF's own.
* `measure`: prefill / decode / request-workload throughput and the greedy check.
* `costs`: per-sub-block cost tables in the `puzzle_jax.cost_table` format, timed in PyTorch.
* `cli`: `python -m puzzle_jax.serving measure|costs ...`.
"""
