"""Reading and writing weights, tokenizers and text: HF safetensors / GGUF / orbax checkpoints
(`checkpoint`, re-exported here), the tokenizer (`tokenizer`) and the TFDS/grain text pipeline (`data`)."""

from puzzle_jax.io.checkpoint import (ARCH_FILE, GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES, SAFETENSORS_FILE,
                                      SAFETENSORS_INDEX, LoadError, expected_shapes, load_checkpoint,
                                      load_pretrained, safetensors_files, save_checkpoint,
                                      read_arch, smollm2_gguf_path, unpermute_qk)

__all__ = ["ARCH_FILE", "GGUF_GLOBAL_NAMES", "GGUF_LAYER_NAMES", "SAFETENSORS_FILE", "SAFETENSORS_INDEX",
           "LoadError", "expected_shapes", "load_checkpoint", "load_pretrained", "safetensors_files",
           "read_arch", "save_checkpoint", "smollm2_gguf_path", "unpermute_qk"]
