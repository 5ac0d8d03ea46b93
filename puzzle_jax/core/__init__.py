"""The model core: architecture as frozen data (`arch`), its HF config mapping (`hf_config`), the pure
forward (`model`) and the HF parameter names (`names`). Nothing here reads a config or a workdir."""
