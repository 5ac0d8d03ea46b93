"""Speed scripts (run on the GPU via benchmarks/gpu_suite.sh; numbers in BENCHMARKS.md)."""

import json
import os


def write_out(name: str, result: dict) -> None:
  """Write `result` to $OUT/<name> when $OUT is set (the device tool brings $OUT back)."""
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], name), "w") as f:
      json.dump(result, f, indent=1)
