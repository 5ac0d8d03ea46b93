"""Serving measurements of exported children in PyTorch (needs the `serving` extra:
`pip install -e ".[serving]"`).

    python -m puzzle_jax.serving measure --parent DIR [--child DIR] --out OUT.json [--quick] \
        [--random-weights] [--decode-batches 1,64] [--prefill-grid 16x1024,1x1024]
    python -m puzzle_jax.serving costs --arch-from DIR --keys k1,k2,... --batch B --prompt-len L \
        --gen-len G --out costs.json [--check-whole]

What it measures, on an exported directory (`puzzle_jax.export.nemotron_nas`, loaded with the
package's own DeciLM classes after checking the directory's modeling files are the package's:
`load.verify_export_code`):
  prefill   tokens/s of one prompt batch [B, L] (KV written, last-position logits), median of repeats.
  decode    tokens/s over `new_tokens` greedy steps after a prompt of `decode_context` tokens
            (`runner.StaticRunner`: static KV cache, CUDA graphs).
  requests  a workload of prompts in static, left-padded batches, each generating until EOS or the
            cap: requests/s and tokens per request. Skipped with --random-weights (config-only
            exports, `export.export_config`): random weights make stop behaviour meaningless.
  costs     per-sub-block prefill/decode times as PyTorch modules, in the `puzzle_jax.cost_table`
            format the MIP reads (`--config.costs.table=PATH`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import torch

from puzzle_jax import cost_table
from puzzle_jax.core import hf_config
from puzzle_jax.serving.costs import cost_table_torch, predicted_vs_measured
from puzzle_jax.serving.load import TORCH_DTYPES, device_default, load_tokenizer, verify_export_code, vocab_size_of
from puzzle_jax.serving.measure import (FULL, QUICK, RANDOM_WEIGHTS_NOTE, Sizes, compare, device_name, measure_model,
                                        measure_one, workload)


def _fmt_table(result: dict[str, Any]) -> str:
  roles = [r for r in ("parent", "child") if r in result]
  first = result[roles[0]]
  cols = ([f"pre {r['batch']}x{r['prompt_len']}" for r in first["prefill"]]
          + [f"dec b{r['batch']}" for r in first["decode"]] + ["req/s", "tok/req", "peak GB"])
  lines = [f"{'':<8}" + "".join(f"{c:>14}" for c in cols) + "   (tokens/s unless noted)"]
  nan = float("nan")
  for role in roles:
    m = result[role]
    vals = [r["tokens_per_s"] for r in m["prefill"]] + [r["tokens_per_s"] for r in m["decode"]]
    req = m["requests"] or {}  # None: skipped (random weights)
    vals += [req.get("requests_per_s", nan), req.get("mean_new_tokens", nan), (m["peak_memory_bytes"] or 0) / 2**30]
    lines.append(f"{role:<8}" + "".join(f"{v:>14.4g}" for v in vals))
  if "ratios" in result:
    r = result["ratios"]
    vals = list(r["prefill_speedup"].values()) + list(r["decode_speedup"].values())
    vals += [r.get("request_speedup", float("nan")), r.get("tokens_per_request_ratio", float("nan")),
             r.get("peak_memory_ratio", float("nan"))]
    lines.append(f"{'child/par':<8}" + "".join(f"{v:>14.4g}" for v in vals))
  if result["harness"].get("random_weights"):
    lines.append(f"req/s, tok/req: n/a ({RANDOM_WEIGHTS_NOTE})")
  return "\n".join(lines)


def _dtype_arg(name: str, device: torch.device) -> torch.dtype:
  if name == "auto":
    return torch.bfloat16 if device.type == "cuda" else torch.float32
  return TORCH_DTYPES[name]


def _sizes(base: Sizes, args: argparse.Namespace) -> Sizes:
  """`base` with the command line's decode batches / prefill grid, where given, in place of its own."""
  over = {k: v for k, v in (("decode_batches", args.decode_batches), ("prefill_grid", args.prefill_grid)) if v}
  return dataclasses.replace(base, **over)


def cmd_measure(args: argparse.Namespace) -> dict[str, Any]:
  dev = device_default()
  quick = args.quick or dev.type != "cuda"
  sizes = _sizes(QUICK if quick else FULL, args)
  dtype = _dtype_arg(args.dtype, dev)
  tokenizer = load_tokenizer(args.tokenizer or args.parent)
  vocab = vocab_size_of(args.parent)
  prompts = [] if args.random_weights else workload(tokenizer, vocab, args.requests or sizes.requests, sizes,
                                                     prompts_file=args.prompts)
  result: dict[str, Any] = {"harness": {"device": device_name(dev), "dtype": str(dtype), "mode": args.mode,
                                        "sizes": dataclasses.asdict(sizes), "torch": torch.__version__,
                                        "quick": quick, "tokenizer": tokenizer is not None,
                                        "random_weights": args.random_weights}}
  if args.random_weights:
    result["harness"]["note"] = RANDOM_WEIGHTS_NOTE
  t0 = time.perf_counter()
  for role, path in (("parent", args.parent), ("child", args.child)):
    if path:
      print(f"[serving] measuring {role}: {path}", file=sys.stderr, flush=True)
      result[role] = measure_one(path, prompts, tokenizer, sizes, dtype=dtype, mode=args.mode, device=dev,
                                 random_weights=args.random_weights)
  if args.child:
    result["ratios"] = compare(result["parent"], result["child"])
  result["harness"]["wall_s"] = time.perf_counter() - t0
  _write_json(result, args.out)
  print(_fmt_table(result))
  return result


def cmd_costs(args: argparse.Namespace) -> dict[str, Any]:
  verify_export_code(args.arch_from)
  arch = hf_config.arch_from_hf(json.loads((pathlib.Path(args.arch_from) / "config.json").read_text()))
  keys = [k for k in args.keys.split(",") if k] if args.keys else cost_table.arch_keys(arch)
  if args.check_whole:  # the parts of this arch must be in the table to predict it
    keys += [k for k in cost_table.arch_keys(arch) if k not in keys]
  dev = device_default()
  dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
  sc = cost_table.Scenario(batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len, dtype=dtype_name,
                      kv_dtype=dtype_name, repeats=args.repeats)
  table = cost_table_torch(arch.hidden_size, arch.num_heads, arch.head_dim, arch.vocab_size, keys, sc,
                           tie_embeddings=arch.tie_embeddings, rms_eps=arch.rms_eps, progress=True)
  if args.check_whole:
    whole = measure_model(args.arch_from, prefill_grid=[(args.batch, args.prompt_len)], decode_batches=[args.batch],
                          decode_context=args.prompt_len, new_tokens=args.gen_len, dtype=TORCH_DTYPES[dtype_name],
                          mode=args.mode)
    table["whole_model_check"] = predicted_vs_measured(table, arch, whole)
  cost_table.save_cost_table(table, args.out)
  print(f"{'variant':<24}{'prefill ms':>12}{'decode us':>12}{'weight MB':>11}{'kv MB':>9}")
  for k, v in [("fixed", table["fixed"]), *table["variants"].items()]:
    print(f"{k:<24}{v['prefill_s'] * 1e3:>12.4f}{v['decode_s'] * 1e6:>12.2f}{v['weight_bytes'] / 2**20:>11.2f}"
          f"{v.get('kv_bytes', 0) / 2**20:>9.2f}")
  for k, v in table.get("whole_model_check", {}).items():
    print(f"whole model {k}: predicted {v['predicted'] * 1e3:.4f} ms, measured {v['measured'] * 1e3:.4f} ms "
          f"(ratio {v['predicted_over_measured']:.3f})")
  return table


def _write_json(obj: Any, path: str | os.PathLike) -> None:
  """Atomic write (a crash never leaves half a result)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
  os.replace(tmp, path)


def _int_list(text: str) -> tuple[int, ...]:
  out = tuple(int(t) for t in text.split(",") if t.strip())
  if not out or min(out) < 1:
    raise argparse.ArgumentTypeError(f"need positive integers separated by commas, got {text!r}")
  return out


def _grid(text: str) -> tuple[tuple[int, int], ...]:
  pairs = []
  for item in filter(None, (t.strip() for t in text.split(","))):
    b, sep, length = item.partition("x")
    if not (sep and b.isdigit() and length.isdigit() and int(b) > 0 and int(length) > 0):
      raise argparse.ArgumentTypeError(f"need BATCHxPROMPT_LEN pairs separated by commas, got {text!r}")
    pairs.append((int(b), int(length)))
  if not pairs:
    raise argparse.ArgumentTypeError(f"need at least one BATCHxPROMPT_LEN pair, got {text!r}")
  return tuple(pairs)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m puzzle_jax.serving", description=__doc__.split("\n\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  m = sub.add_parser("measure", help="prefill/decode/request throughput of a parent (and child)")
  m.add_argument("--parent", required=True, help="exported HF directory of the parent")
  m.add_argument("--child", help="exported HF directory of the child (adds child/parent ratios)")
  m.add_argument("--out", required=True, help="result JSON")
  m.add_argument("--quick", action="store_true", help="tiny sizes (always on without CUDA)")
  m.add_argument("--mode", default="graphs", choices=("graphs", "compile", "eager"))
  m.add_argument("--dtype", default="auto", choices=("auto", *TORCH_DTYPES))
  m.add_argument("--tokenizer", help="directory of the tokenizer (default: the parent's, if it has one)")
  m.add_argument("--prompts", help="text file, one request prompt per line (default: built-in questions)")
  m.add_argument("--requests", type=int, default=0, help="prompts in the request workload (0 = default)")
  m.add_argument("--random-weights", action="store_true",
                 help="build both models from config.json with random weights (no safetensors needed); "
                      "skips the request workload and the greedy check")
  m.add_argument("--decode-batches", type=_int_list, default=None,
                 help="comma-separated decode batch sizes, e.g. 64 (default: the sizes' own)")
  m.add_argument("--prefill-grid", type=_grid, default=None,
                 help="comma-separated BATCHxPROMPT_LEN prefill shapes, e.g. 16x1024,1x1024 (default: the sizes' own)")
  c = sub.add_parser("costs", help="per-sub-block cost table (puzzle_jax.costs/v1) on this device")
  c.add_argument("--arch-from", required=True, help="exported HF directory whose dims (and arch) to use")
  c.add_argument("--keys", default="", help="comma-separated variant keys (default: the arch's own)")
  c.add_argument("--batch", type=int, default=8)
  c.add_argument("--prompt-len", type=int, default=256)
  c.add_argument("--gen-len", type=int, default=128)
  c.add_argument("--repeats", type=int, default=10)
  c.add_argument("--dtype", default="auto", choices=("auto", *TORCH_DTYPES))
  c.add_argument("--mode", default="graphs", choices=("graphs", "compile", "eager"),
                 help="runner mode of the --check-whole measurement")
  c.add_argument("--check-whole", action="store_true",
                 help="also time the whole --arch-from model and compare with the sum of parts")
  c.add_argument("--out", required=True, help="cost-table JSON (feed it with --config.costs.table=PATH)")
  return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # puzzle_jax.core imports JAX; it must not take the GPU
  args = parse_args(argv)
  return cmd_measure(args) if args.cmd == "measure" else cmd_costs(args)


if __name__ == "__main__":
  main()
