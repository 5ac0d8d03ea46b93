"""What each serving engine can load from a nemotron-nas export, as data, and the checks built on it.

`export.engine = transformers | vllm | trtllm`. The MIP drops candidates an engine cannot load
(`loadable`), and export refuses an arch that still has one, naming the layers (`check_arch`), after
writing fused FFN runs in the Llama-Nemotron-Ultra-253B layout (one wide FFN + no-op placeholders).

The rules, read from the loaders themselves:
- vLLM `vllm/model_executor/models/nemotron_nas.py` (`DeciLMDecoderLayer.__init__`): attention is
  either `no_op` or a `DeciLMAttention` with `num_attention_heads // n_heads_in_group` KV heads; the FFN
  is either `no_op` or a `LlamaMLP`. `replace_with_linear` is never read, so a linear sub-block is
  built as full attention / a full MLP and its weights fail to load. `parallel_group` and
  `window_length` are never read (blocks run in sequence over full context). The FFN width is
  `_ffn_mult_to_intermediate_size(ffn_mult, hidden)` = int(2*ffn_mult*H/3) rounded up to a multiple of
  256 when the block has an `ffn_mult` attribute, `ffn.intermediate_size` only where it has none. Our
  shipped DeciLMConfig fills `ffn_mult` (None) into every block, so under it vLLM always takes the
  `ffn_mult` branch: the width must survive the rounding.
- TensorRT-LLM `tensorrt_llm/_torch/models/modeling_nemotron_nas.py` (`NemotronNASDecoderLayer`):
  reads `no_op` and `replace_with_linear` for both sub-blocks (`LinearAttention`, `LinearMLP`: one
  HxH map), builds `GatedMLP(intermediate_size=_ffn_mult_to_intermediate_size(ffn.ffn_mult, H))`
  unconditionally (same rounding), and ignores `parallel_group` and `window_length`.
- NVIDIA's DeciLM modeling code and llama.cpp's `DeciModel` use the same `ffn_mult` rule.
- transformers (this package's shipped `hf_export` remote code) reads `intermediate_size` first and
  implements parallel groups and windows: everything loads.
"""

from __future__ import annotations

import dataclasses

from puzzle_jax.core.arch import Arch, AttnSpec, FFNSpec, describe_attn, describe_ffn, parallel_runs
from puzzle_jax.core.hf_config import intermediate_size_to_ffn_mult


@dataclasses.dataclass(frozen=True)
class EngineRules:
  linear_attn: bool  # reads attention.replace_with_linear
  linear_ffn: bool  # reads ffn.replace_with_linear
  parallel_blocks: bool  # reads parallel_group
  window: bool  # reads attention.window_length
  width_from_ffn_mult: bool  # derives the FFN width from ffn_mult by NVIDIA's rounding


ENGINES = {
    "transformers": EngineRules(linear_attn=True, linear_ffn=True, parallel_blocks=True, window=True,
                                width_from_ffn_mult=False),
    "vllm": EngineRules(linear_attn=False, linear_ffn=False, parallel_blocks=False, window=False,
                        width_from_ffn_mult=True),
    "trtllm": EngineRules(linear_attn=True, linear_ffn=True, parallel_blocks=False, window=False,
                          width_from_ffn_mult=True),
}


class EngineError(ValueError):
  """An arch the chosen serving engine cannot load; the message names the layers and the fix."""


def rules(engine: str) -> EngineRules:
  if engine not in ENGINES:
    raise ValueError(f"export.engine={engine!r} unknown; use one of {sorted(ENGINES)}")
  return ENGINES[engine]


def spec_problem(spec: AttnSpec | FFNSpec, engine: str, hidden_size: int) -> str | None:
  """Why `engine` cannot load this sub-block variant, or None if it can."""
  r = rules(engine)
  if (isinstance(spec, AttnSpec) and spec.sinks) or spec.kind == "moe":
    return None  # gpt-oss-shaped: exported as gpt_oss_puzzle, whose loader reads per-layer windows and experts
  if isinstance(spec, AttnSpec):
    if spec.kind == "linear" and not r.linear_attn:
      return f"{engine} has no linear attention (replace_with_linear is not read)"
    if spec.window and not r.window:
      return f"{engine} ignores window_length (would attend over the full context)"
    return None
  if spec.kind == "linear" and not r.linear_ffn:
    return f"{engine} has no linear FFN (replace_with_linear is not read)"
  if (spec.kind == "swiglu" and r.width_from_ffn_mult
      and intermediate_size_to_ffn_mult(spec.intermediate_size, hidden_size) is None):
    return (f"{engine} derives the FFN width from ffn_mult (int(2*m*H/3) rounded up to 256): width "
            f"{spec.intermediate_size} is unreachable; use a multiple of 256")
  return None


def loadable(spec: AttnSpec | FFNSpec, engine: str, hidden_size: int) -> bool:
  return spec_problem(spec, engine, hidden_size) is None


def arch_problems(arch: Arch, engine: str) -> list[str]:
  """Every reason `engine` cannot load `arch`, one line per layer and sub-block."""
  out = []
  for i, b in enumerate(arch.blocks):
    for spec, desc in ((b.attn, describe_attn(b.attn)), (b.ffn, describe_ffn(b.ffn))):
      why = spec_problem(spec, engine, arch.hidden_size)
      if why:
        out.append(f"layer {i} ({desc}): {why}")
  if not rules(engine).parallel_blocks:
    for run in parallel_runs(arch.blocks):
      if len(run) > 1:
        out.append(f"layers {run}: {engine} has no parallel blocks (parallel_group is not read); "
                   "only runs of FFN-only blocks can be fused into one wide FFN")
  return out


def check_arch(arch: Arch, engine: str) -> None:
  """Raise EngineError listing every layer `engine` cannot load."""
  problems = arch_problems(arch, engine)
  if problems:
    raise EngineError(f"export.engine={engine!r} cannot load this child:\n  " + "\n  ".join(problems)
                      + "\nSearch with the same export.engine (the MIP then forbids these variants) or "
                      "export with --config.export.engine=transformers.")
