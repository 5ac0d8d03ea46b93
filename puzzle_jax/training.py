"""What every trainer here shares (BLD, GKD): mesh, optimizer schedule, orbax checkpoints, the
step loop with one-step-late metrics, tqdm progress (tokens/s, ETA) and a JSONL loss log.

A trainer supplies a jitted `step(state, tokens) -> (state, metrics)`, a batch iterator with a JSON
state, and a `report(step, metrics) -> postfix` callback; `loop` does the rest, so resume, NaN
guards and progress behave the same in every stage.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh


class BatchIterator(Protocol):
  """What a trainer needs from the data pipeline: token batches plus a checkpointable position."""

  def __next__(self) -> np.ndarray: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


class ArrayBatches:
  """Batches cycling through a fixed [N, L] token array in a seeded order (tests, notebooks)."""

  def __init__(self, tokens_NxL: np.ndarray, batch_size: int, seed: int = 0):
    self.tokens, self.batch_size, self.seed, self.pos = np.asarray(tokens_NxL), batch_size, seed, 0

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    n = len(self.tokens)
    epoch, start = divmod(self.pos * self.batch_size, n)
    order = np.random.default_rng([self.seed, epoch]).permutation(n)
    idx = order[np.arange(start, start + self.batch_size) % n]
    self.pos += 1
    return self.tokens[idx]

  def get_state(self) -> dict:
    return {"pos": self.pos}

  def set_state(self, state: dict) -> None:
    self.pos = int(state["pos"])


# ----------------------------------------------------------------------------- mesh, optimizer
def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> Mesh:
  """Mesh from config pairs like (("candidate", -1), ("data", 1)); -1 = remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [s for _, s in axes]
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or len(devices) % known:
    raise ValueError(f"mesh {axes} does not fit {len(devices)} devices; use at most one -1 and "
                     "sizes whose product divides the device count")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    devices = devices[: int(np.prod(sizes))]
  return Mesh(np.asarray(devices).reshape(sizes), tuple(n for n, _ in axes))


def adamw_cosine(lr: float, steps: int, warmup_steps: int, weight_decay: float,
                 clip_norm: float = 0.0) -> optax.GradientTransformation:
  """AdamW, linear warmup then cosine decay to 10% of the peak; optional global-norm clipping."""
  warmup = max(1, min(warmup_steps, steps - 1))
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=0.1 * lr)
  opt = optax.adamw(sched, weight_decay=weight_decay)
  return optax.chain(optax.clip_by_global_norm(clip_norm), opt) if clip_norm > 0 else opt


# ----------------------------------------------------------------------------- checkpoints
def ckpt_manager(path: pathlib.Path, keep: int = 2):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(path.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(mngr, step: int, state, data_state: dict) -> None:
  """Train state and the data iterator's position together: resume is exact."""
  import orbax.checkpoint as ocp
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)))
  mngr.wait_until_finished()


def restore(mngr, abstract_state, what: str = "training"):
  """(step, state, data state) of the newest intact checkpoint, or None. A step that fails to
  restore (a crash or a full disk mid-write) is moved aside to `ckpt_corrupt/` (never deleted),
  said so, and the step before it is tried. `abstract_state` may carry shardings."""
  import orbax.checkpoint as ocp
  root, errors = pathlib.Path(mngr.directory), []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                       data=ocp.args.JsonRestore()))
      return step, out["state"], out["data"]
    except Exception as e:  # orbax/tensorstore raise many types for a truncated file
      errors.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
      aside = root.parent / "ckpt_corrupt" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
      aside.parent.mkdir(parents=True, exist_ok=True)
      (root / str(step)).rename(aside)
      mngr.reload()
      print(f"{what}: checkpoint step {step} is unreadable ({errors[-1]}); moved to {aside}, "
            "resuming from the one before", flush=True)
  print(f"{what}: no intact checkpoint left; training from step 0 (same result, more time)", flush=True)
  return None


# ----------------------------------------------------------------------------- loss log
class LossLog:
  """Scalar losses as JSONL (one line per step); truncated to the resumed step on open."""

  def __init__(self, path: pathlib.Path, resume_step: int, *, what: str, hint: str):
    self.path, self.what, self.hint = path, what, hint
    lines = path.read_text().splitlines() if path.exists() else []
    keep = [l for l in lines if _step_of(l) <= resume_step]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(l + "\n" for l in keep))

  def write(self, step: int, row: Mapping[str, float]) -> None:
    bad = [k for k, v in row.items() if not np.isfinite(v)]
    if bad:
      raise FloatingPointError(f"{self.what} loss is NaN/Inf at step {step} for {bad[:5]}...; the "
                               f"last checkpoint is intact: {self.hint}")
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, "loss": dict(row)}) + "\n")


def _step_of(line: str) -> float:
  """A log line's step; a line cut short by a kill counts as past any resume point (it is dropped)."""
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return float("inf")


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend (plots are PNGs; no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def read_log(path: pathlib.Path) -> list[dict[str, Any]]:
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


# ----------------------------------------------------------------------------- the loop
def loop(step_fn: Callable, state, batches: BatchIterator, *, start: int, steps: int,
         checkpoint_every: int, mngr, report: Callable[[int, Any], Mapping[str, str]],
         desc: str, progress: bool = True):
  """Run steps [start, steps): metrics read one step late, checkpoints every `checkpoint_every`.

  `report(step, host_metrics)` logs a finished step (1-based) and returns the tqdm postfix.
  """
  from tqdm.auto import tqdm
  bar = tqdm(total=steps, initial=start, desc=desc, unit="step", disable=not progress)
  pending, t0, tokens_seen = None, time.perf_counter(), 0

  def flush():
    step, metrics = pending
    post = dict(report(step + 1, jax.device_get(metrics)))
    bar.update(1)
    bar.set_postfix(tok_s=f"{tokens_seen / (time.perf_counter() - t0):,.0f}", **post)

  for step in range(start, steps):
    tokens = np.asarray(next(batches))
    state, metrics = step_fn(state, tokens)
    if pending is not None:  # read step n-1 while step n runs
      flush()
    pending, tokens_seen = (step, metrics), tokens_seen + tokens.size
    if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
      flush()
      pending = None
      save(mngr, step + 1, state, batches.get_state())
  bar.close()
  return state
