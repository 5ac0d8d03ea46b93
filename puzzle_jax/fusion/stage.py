"""Stage glue for FFN Fusion: config + run directory -> the algorithm modules' explicit arguments.

`python -m puzzle_jax fusion-deps --config configs/smollm2_135m.py` writes, under <workdir>/fusion/,
deps.json (the matrix, the window, the proposed runs) and deps.png (the heatmap).
"""

from __future__ import annotations

import pathlib

import numpy as np

from puzzle_jax.fusion import deps as D


def deps_settings(c) -> D.DepsSettings:
  return D.DepsSettings(start=c.start, stop=c.stop, batch_size=c.batch_size, threshold=c.threshold,
                        max_run=c.max_run)


def run_deps(config) -> pathlib.Path:
  from puzzle_jax import generate, workdir as W
  out = W.Paths.from_config(config).root / "fusion" / "deps.json"
  if W.finished("fusion-deps", out):
    return out
  arch, params = generate.resolve_checkpoint(config, config.fusion.checkpoint)
  s = deps_settings(config.fusion)
  tokens = W.heldout_tokens(config, W.load_tok(config), config.fusion.num_seqs, config.fusion.seq_len,
                            split=config.data.train_split)
  dep = D.dependency_matrix(arch, params, tokens, s)
  window = D.window_layers(arch, s)
  runs = D.propose_runs(dep, s.threshold, s.max_run, start=window[0])
  ffn_only = [arch.blocks[i].attn.kind == "noop" for i in window]
  fusable = D.propose_runs(dep, s.threshold, s.max_run, start=window[0], allowed=ffn_only)
  W.write_json(out, {"checkpoint": config.fusion.checkpoint, "window": window, "dep": np.where(
      np.isnan(dep), None, dep).tolist(), "threshold": s.threshold, "parallel_runs": runs,
      "fusable_ffn_runs": fusable})
  D.plot_heatmap(dep, window[0], out.with_name("deps.png"), runs,
                 title=f"block dependency, {config.fusion.checkpoint} (runs at <= {s.threshold})")
  print(f"fusion-deps: window {window[0]}..{window[-1]}, proposed parallel runs {runs}, "
        f"fusable FFN runs {fusable} -> {out}")
  return out
