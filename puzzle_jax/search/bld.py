"""Blockwise local distillation (BLD): every candidate sub-block trained at once.

Decoupled BLD (Puzzle sec. 4): per batch the parent runs once and yields, for every layer, the
block input h, the attention delta a, the post-attention residual m = h + a and the FFN delta f.
Attention candidates learn h -> a, FFN candidates learn m -> f, with the normalized MSE
||y - y_hat||^2 / ||y||^2. Candidates of one variant (same spec, hence same shapes) across layers
are stacked on a leading candidate axis C and trained by one `jax.vmap`ped update; all groups
share one jitted step (teacher forward included) whose candidate and batch axes are sharded over a
`Mesh(("candidate", "data"))`. Teacher activations live only inside the step, batch by batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from puzzle_jax import training
from puzzle_jax.search import candidates as cands
from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, variant_key
from puzzle_jax.search.candidates import Candidate
from puzzle_jax.training import ArrayBatches, BatchIterator, make_mesh  # noqa: F401  (re-exported)

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BLDConfig:
  steps: int = 200
  batch_size: int = 8
  seq_len: int = 256
  lr: float = 1e-4
  warmup_steps: int = 20
  weight_decay: float = 0.0
  init: str = "parent"
  calib_batches: int = 4
  ridge: float = 1e-3
  checkpoint_every: int = 50
  eval_batches: int = 2


@dataclasses.dataclass(frozen=True)
class Group:
  """Candidates of one variant across layers; `layers` is padded to the candidate mesh size."""
  sub: str
  spec: Any
  members: tuple[Candidate, ...]
  layers: tuple[int, ...]

  @property
  def name(self) -> str:
    return variant_key(self.spec).replace("/", "__")


def make_groups(arch: Arch, library: Sequence[Candidate], pad_to: int = 1) -> list[Group]:
  by_key: dict[tuple[str, Any], list[Candidate]] = {}
  for c in library:
    if cands.is_trainable(arch, c):
      by_key.setdefault((c.sub, c.spec), []).append(c)
  groups = []
  for (sub, spec), members in by_key.items():
    layers = [c.layer for c in members]
    layers += [layers[-1]] * (-len(layers) % pad_to)  # padding rows: copies, results ignored
    groups.append(Group(sub, spec, tuple(members), tuple(layers)))
  return groups


# ----------------------------------------------------------------------------- teacher
def teacher_acts(arch: Arch, params: Params, tokens_BxL: jax.Array) -> dict[str, jax.Array]:
  """Per-layer activations of the parent, stacked to [layers, B, L, D]."""
  rec: dict[str, list] = {"h_in": [], "attn": [], "mid": [], "ffn": []}

  def hook(i, h, a, mid, f):
    for k, v in zip(rec, (h, a, mid, f)):
      rec[k].append(v)

  model.forward(arch, params, tokens_BxL, hook=hook)
  return {k: jnp.stack(v) for k, v in rec.items()}


def nmse(y_hat, y) -> jax.Array:
  y32 = y.astype(jnp.float32)
  return jnp.sum(jnp.square(y_hat.astype(jnp.float32) - y32)) / (jnp.sum(jnp.square(y32)) + 1e-12)


# ----------------------------------------------------------------------------- the step
def make_optimizer(cfg: BLDConfig) -> optax.GradientTransformation:
  return training.adamw_cosine(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.weight_decay)


def candidate_update(params, opt_state, x_BxLxD, y_BxLxD, *, arch, sub, spec, optimizer):
  """One AdamW step of one candidate (vmapped over the candidate axis by `group_update`)."""
  loss_fn = lambda p: nmse(cands.apply_candidate(arch, sub, spec, p, x_BxLxD), y_BxLxD)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def group_update(params_C, opt_C, x_CxBxLxD, y_CxBxLxD, *, arch, group, optimizer):
  fn = functools.partial(candidate_update, arch=arch, sub=group.sub, spec=group.spec, optimizer=optimizer)
  return jax.vmap(fn)(params_C, opt_C, x_CxBxLxD, y_CxBxLxD)


def group_io(acts: Mapping[str, jax.Array], group: Group, constrain=None):
  """Gather each candidate's own layer's (input, target) pair: [C, B, L, D] each."""
  idx = jnp.asarray(group.layers)
  x, y = (acts["h_in"], acts["attn"]) if group.sub == "attn" else (acts["mid"], acts["ffn"])
  x, y = x[idx], y[idx]
  if constrain is not None:
    x, y = constrain(x), constrain(y)
  return x, y


def train_step(state, parent_params, tokens_BxL, *, arch, groups, optimizer, constrain=None):
  """All groups, one batch: teacher forward once, then each group's vmapped update."""
  acts = teacher_acts(arch, parent_params, tokens_BxL)
  new = {"params": {}, "opt": {}}
  losses = {}
  for g in groups:
    x, y = group_io(acts, g, constrain)
    p, o, l = group_update(state["params"][g.name], state["opt"][g.name], x, y, arch=arch, group=g,
                           optimizer=optimizer)
    new["params"][g.name], new["opt"][g.name], losses[g.name] = p, o, l
  return {**new, "step": state["step"] + 1}, losses


def eval_step(params_by_group, parent_params, tokens_BxL, *, arch, groups):
  acts = teacher_acts(arch, parent_params, tokens_BxL)
  out = {}
  for g in groups:
    x, y = group_io(acts, g)
    apply = lambda p, x_, y_: nmse(cands.apply_candidate(arch, g.sub, g.spec, p, x_), y_)
    out[g.name] = jax.vmap(apply)(params_by_group[g.name], x, y)
  return out


# ----------------------------------------------------------------------------- sharding
def state_shardings(state, mesh: Mesh):
  """Candidate axis (leading) of every param/opt leaf on "candidate"; scalars replicated."""
  def spec(x):
    return NamedSharding(mesh, P("candidate") if np.ndim(x) >= 1 else P())
  return jax.tree_util.tree_map(spec, state)


def compile_step(arch: Arch, groups, optimizer, mesh: Mesh, state):
  """The jitted, sharded, state-donating BLD step."""
  act_sharding = NamedSharding(mesh, P("candidate", "data"))
  constrain = lambda x: jax.lax.with_sharding_constraint(x, act_sharding)
  fn = functools.partial(train_step, arch=arch, groups=groups, optimizer=optimizer, constrain=constrain)
  s_sh = state_shardings(state, mesh)
  repl = NamedSharding(mesh, P())
  return jax.jit(fn, in_shardings=(s_sh, repl, NamedSharding(mesh, P("data"))),
                 out_shardings=(s_sh, repl), donate_argnums=(0,))


# ----------------------------------------------------------------------------- init
def calibrate(arch: Arch, parent_params: Params, batches: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
  """Per-layer calibration sums (X^T X, X^T Y, channel importance) over the given batches."""
  acts_fn = jax.jit(functools.partial(teacher_acts, arch))
  stats_fn = jax.jit(functools.partial(cands.calib_stats_layer, arch), static_argnums=(1,))
  totals: list[dict[str, np.ndarray]] = [{} for _ in arch.blocks]
  for tokens in batches:
    acts = acts_fn(parent_params, jnp.asarray(tokens))
    for i, layer in enumerate(parent_params["model"]["layers"]):
      s = stats_fn(layer, arch.blocks[i], acts["h_in"][i], acts["attn"][i], acts["mid"][i], acts["ffn"][i])
      for k, v in s.items():
        merge = np.maximum if k.endswith("_amax") else np.add  # ranges are maxima, the rest sums
        totals[i][k] = merge(totals[i].get(k, 0), np.asarray(v, np.float64))
  return totals


def init_groups(arch: Arch, parent_params: Params, groups: Sequence[Group], cfg: BLDConfig,
                stats: Sequence[Mapping[str, np.ndarray]] | None, key: jax.Array) -> dict[str, Params]:
  """Stacked initial params for every group ("parent" inits or "random" of the same shapes)."""
  out = {}
  layers = parent_params["model"]["layers"]
  for gi, g in enumerate(groups):
    rows = []
    for ci, layer in enumerate(g.layers):
      c = Candidate(layer, g.sub, g.spec)
      if cfg.init == "parent":
        rows.append(cands.init_from_parent(arch, c, layers[layer], stats[layer], cfg.ridge))
      elif cfg.init == "random":
        rows.append(cands.init_random(arch, c, jax.random.fold_in(key, gi * 10_000 + ci)))
      else:
        raise ValueError(f"bld.init must be 'parent' or 'random', got {cfg.init!r}")
    out[g.name] = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), cands.stack(rows))
  return out


def init_state(params_by_group: Mapping[str, Params], optimizer) -> dict[str, Any]:
  opt = {k: jax.vmap(optimizer.init)(p) for k, p in params_by_group.items()}
  return {"params": dict(params_by_group), "opt": opt, "step": jnp.zeros((), jnp.int32)}


# ----------------------------------------------------------------------------- training loop
def train(arch: Arch, parent_params: Params, library: Sequence[Candidate], cfg: BLDConfig,
          batches: BatchIterator, calib: Sequence[np.ndarray], workdir: pathlib.Path, *,
          mesh: Mesh, key: jax.Array, progress: bool = True) -> tuple[list[Group], dict[str, Params]]:
  """Run (or resume) BLD; returns the groups and their trained stacked params (padding included)."""
  groups = make_groups(arch, library, pad_to=mesh.shape["candidate"])
  optimizer = make_optimizer(cfg)
  rand_cfg = dataclasses.replace(cfg, init="random")
  abstract = jax.eval_shape(lambda: init_state(init_groups(arch, parent_params, groups, rand_cfg, None, key),
                                               optimizer))
  mngr = training.ckpt_manager(workdir / "ckpt")
  restored = training.restore(mngr, abstract, what="bld") if mngr.all_steps() else None
  if restored is not None:
    start, state, data_state = restored
    batches.set_state(data_state)
  else:
    stats = calibrate(arch, parent_params, calib) if cfg.init == "parent" else None
    start, state = 0, init_state(init_groups(arch, parent_params, groups, cfg, stats, key), optimizer)
  state = jax.device_put(state, state_shardings(state, mesh))
  parent_params = jax.device_put(parent_params, NamedSharding(mesh, P()))
  step_fn = compile_step(arch, groups, optimizer, mesh, state)
  log = training.LossLog(workdir / "losses.jsonl", start, what="BLD",
                         hint="lower bld.lr or check the parent's activations")

  def report(step: int, losses) -> dict[str, str]:
    row = {c.id: float(losses[g.name][i]) for g in groups for i, c in enumerate(g.members)}
    log.write(step, row)
    vals = list(row.values()) or [0.0]
    return {"loss": f"{min(vals):.3g}..{max(vals):.3g}"}

  state = training.loop(lambda s, t: step_fn(s, parent_params, t), state, batches, start=start,
                        steps=cfg.steps, checkpoint_every=cfg.checkpoint_every, mngr=mngr,
                        report=report, desc="BLD", progress=progress)
  mngr.close()
  return groups, state["params"]


def evaluate(arch: Arch, parent_params: Params, groups: Sequence[Group], params_by_group,
             eval_batches: Sequence[np.ndarray]) -> dict[str, float]:
  """Held-out BLD loss of every trained candidate (mean NMSE over the eval batches)."""
  fn = jax.jit(functools.partial(eval_step, arch=arch, groups=groups))
  # Trained params may be sharded over the BLD mesh; evaluation runs on the default device.
  params_by_group = jax.device_get(params_by_group)
  sums: dict[str, float] = {}
  for tokens in eval_batches:
    out = jax.device_get(fn(params_by_group, parent_params, jnp.asarray(tokens)))
    for g in groups:
      for i, c in enumerate(g.members):
        sums[c.id] = sums.get(c.id, 0.0) + float(out[g.name][i]) / len(eval_batches)
  return sums


def plot_losses(log_path: pathlib.Path, png: pathlib.Path) -> None:
  """Per-candidate BLD loss curves, coloured by variant."""
  plt = training.pyplot()
  rows = training.read_log(log_path)
  if not rows:
    return
  steps = [r["step"] for r in rows]
  keys = sorted({k.split("/", 1)[1] for k in rows[0]["loss"]})
  colors = dict(zip(keys, plt.cm.tab10(np.linspace(0, 1, max(len(keys), 1)))))
  fig, ax = plt.subplots(figsize=(8, 5))
  for cid in rows[0]["loss"]:
    key = cid.split("/", 1)[1]
    ax.plot(steps, [r["loss"][cid] for r in rows], color=colors[key], alpha=0.5, lw=0.8)
  for key, col in colors.items():
    ax.plot([], [], color=col, label=key)
  ax.set(xlabel="step", ylabel="normalized MSE", yscale="log", title="BLD loss per candidate")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)


def print_summary(library: Sequence[Candidate], losses: Mapping[str, float]) -> None:
  by_key: dict[str, list[float]] = {}
  for c in library:
    if c.id in losses:
      by_key.setdefault(c.key, []).append(losses[c.id])
  print(f"{'variant':<22} {'layers':>6} {'mean held-out NMSE':>19} {'min':>8} {'max':>8}")
  for k, v in sorted(by_key.items()):
    print(f"{k:<22} {len(v):>6} {np.mean(v):>19.4f} {min(v):>8.4f} {max(v):>8.4f}")
