"""Export to serving formats: `nemotron_nas` (DeciLM `block_configs`, the layout vLLM, TensorRT-LLM and
transformers' remote code load; its public API is re-exported here) and the shipped PyTorch modeling
code in `hf_export/`."""

from puzzle_jax.export.nemotron_nas import (CONFIG_FILE, ExportError, check_exportable,
                                            check_engine_config, check_nemotron_nas_config, export, export_config,
                                            for_engine)

__all__ = ["CONFIG_FILE", "ExportError", "check_exportable", "check_engine_config", "check_nemotron_nas_config",
           "export", "export_config", "for_engine"]
