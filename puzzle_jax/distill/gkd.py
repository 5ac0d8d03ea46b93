"""Global knowledge distillation (GKD): the realized child trained as a whole against the parent.

Puzzle's last stage (sec. 5): after BLD and the MIP, the assembled child learns from the parent's
logits on the fly. The loss is a weighted mix (each weight a setting, as the paper ablates them):
  * KL(teacher || student) on next-token distributions, optionally at a temperature T (scaled by
    T^2, Hinton et al.) and over the teacher's top-k tokens plus one bucket for the rest;
  * LM cross-entropy on the data;
  * a hidden-state term at aligned block outputs (block i of the child vs block i of the parent,
    the output a block gives its residual, h + attn + ffn): 1 - cosine or normalized MSE.
Student master weights stay float32; the forward runs in `compute_dtype` (bf16 on accelerators)
through a cast inside the loss, so gradients land on float32. One jitted step, state donated;
batch over the mesh's "data" axis, every param (student, its Adam moments, teacher) sharded
FSDP-style over the same axis on its largest divisible dimension, gathered by XLA where used.

Axis legend: B batch, L tokens, V vocab, D hidden, Y layers, K top-k.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from puzzle_jax import training
from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch

Params = dict[str, Any]
HIDDEN_LOSSES = ("cosine", "nmse")


@dataclasses.dataclass(frozen=True)
class GKDConfig:
  steps: int = 100
  batch_size: int = 8
  seq_len: int = 256
  lr: float = 1e-4
  warmup_steps: int = 10
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  kl_weight: float = 1.0
  lm_weight: float = 0.0
  hidden_weight: float = 0.0
  hidden_loss: str = "cosine"
  temperature: float = 1.0
  top_k: int = 0
  compute_dtype: str = "bfloat16"
  checkpoint_every: int = 50

  def __post_init__(self):
    if self.hidden_loss not in HIDDEN_LOSSES:
      raise ValueError(f"gkd.hidden_loss must be one of {HIDDEN_LOSSES}, got {self.hidden_loss!r}")
    if min(self.kl_weight, self.lm_weight, self.hidden_weight) < 0 or not (
        self.kl_weight or self.lm_weight or self.hidden_weight):
      raise ValueError("gkd loss weights must be >= 0 and not all 0 (set gkd.kl_weight=1.0)")
    if self.temperature <= 0:
      raise ValueError(f"gkd.temperature must be > 0, got {self.temperature}")


# ----------------------------------------------------------------------------- losses
def kl_per_token(teacher_BxLxV, student_BxLxV, temperature: float = 1.0, top_k: int = 0) -> jax.Array:
  """KL(teacher || student) per position [B, L], float32, scaled by T^2.

  With `top_k`, both distributions are coarsened to the teacher's k most likely tokens plus one
  "rest" bucket: a proper KL (zero iff they agree there, the full KL when k = V) that still
  charges the student for mass it puts elsewhere, from k + 1 numbers per teacher position.
  """
  t_logp = jax.nn.log_softmax(teacher_BxLxV.astype(jnp.float32) / temperature, axis=-1)
  s_logp = jax.nn.log_softmax(student_BxLxV.astype(jnp.float32) / temperature, axis=-1)
  if top_k:
    t_logp, idx_BxLxK = jax.lax.top_k(t_logp, top_k)
    s_logp = jnp.take_along_axis(s_logp, idx_BxLxK, axis=-1)
    t_logp, s_logp = _with_rest(t_logp), _with_rest(s_logp)
  return jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1) * temperature**2


def _with_rest(logp_BxLxK) -> jax.Array:
  """Append log(1 - sum p) as a (K+1)-th bucket (clamped: it can round to 0)."""
  rest = jnp.log(jnp.maximum(-jnp.expm1(jax.nn.logsumexp(logp_BxLxK, axis=-1)), 1e-30))
  return jnp.concatenate([logp_BxLxK, rest[..., None]], axis=-1)


def lm_per_token(logits_BxLxV, tokens_BxL) -> jax.Array:
  """Next-token cross-entropy [B, L-1]."""
  logp = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1)[..., 0]


def hidden_distance(student_YxBxLxD, teacher_YxBxLxD, kind: str) -> jax.Array:
  """Mean over layers of 1 - cosine (token-averaged) or of ||s - t||^2 / ||t||^2."""
  s, t = student_YxBxLxD.astype(jnp.float32), teacher_YxBxLxD.astype(jnp.float32)
  if kind == "cosine":
    cos = jnp.sum(s * t, -1) / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1) + 1e-6)
    return jnp.mean(1.0 - cos)
  sq = jnp.sum(jnp.square(s - t), axis=(1, 2, 3)) / (jnp.sum(jnp.square(t), axis=(1, 2, 3)) + 1e-12)
  return jnp.mean(sq)


def forward_hidden(arch: Arch, params: Params, tokens_BxL, dtype=None) -> tuple[jax.Array, jax.Array]:
  """(float32 logits, block outputs [Y, B, L, D]) in one forward."""
  outs = []
  logits = model.forward(arch, params, tokens_BxL, dtype=dtype,
                         hook=lambda i, h, a, mid, f: outs.append(mid + f))
  return logits, jnp.stack(outs)


def gkd_loss(student: Params, teacher_logits, teacher_hidden, tokens_BxL, *, arch: Arch,
             cfg: GKDConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted mix and its parts; terms with weight 0 are not computed."""
  dt = jnp.dtype(cfg.compute_dtype)
  p = jax.tree_util.tree_map(lambda x: x.astype(dt), student)  # master f32 -> compute dtype
  logits, hidden = forward_hidden(arch, p, tokens_BxL, dt)
  zero = jnp.zeros((), jnp.float32)
  parts = {
      "kl": jnp.mean(kl_per_token(teacher_logits, logits, cfg.temperature, cfg.top_k)) if cfg.kl_weight else zero,
      "lm": jnp.mean(lm_per_token(logits, tokens_BxL)) if cfg.lm_weight else zero,
      "hidden": hidden_distance(hidden, teacher_hidden, cfg.hidden_loss) if cfg.hidden_weight else zero,
  }
  loss = cfg.kl_weight * parts["kl"] + cfg.lm_weight * parts["lm"] + cfg.hidden_weight * parts["hidden"]
  return loss, {"loss": loss, **parts}


def check_aligned(student_arch: Arch, teacher_arch: Arch, cfg: GKDConfig) -> None:
  if cfg.hidden_weight and student_arch.num_layers != teacher_arch.num_layers:
    raise ValueError(f"hidden-state loss aligns block i with block i, but the child has "
                     f"{student_arch.num_layers} blocks and the parent {teacher_arch.num_layers}; "
                     "set gkd.hidden_weight=0")
  if student_arch.vocab_size != teacher_arch.vocab_size:
    raise ValueError(f"child vocab {student_arch.vocab_size} != parent vocab {teacher_arch.vocab_size}")


# ----------------------------------------------------------------------------- the step
def make_optimizer(cfg: GKDConfig):
  return training.adamw_cosine(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.weight_decay, cfg.clip_norm)


def train_step(state, teacher: Params, tokens_BxL, *, student_arch: Arch, teacher_arch: Arch,
               cfg: GKDConfig, optimizer):
  """Teacher forward (no gradient), student loss + AdamW update on float32 master weights."""
  t_logits, t_hidden = forward_hidden(teacher_arch, teacher, tokens_BxL, jnp.dtype(cfg.compute_dtype))
  t_logits, t_hidden = jax.lax.stop_gradient((t_logits, t_hidden))
  loss_fn = functools.partial(gkd_loss, arch=student_arch, cfg=cfg)
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], t_logits, t_hidden,
                                                                   tokens_BxL)
  updates, opt = optimizer.update(grads, state["opt"], state["params"])
  params = jax.tree_util.tree_map(lambda p, u: p + u, state["params"], updates)
  return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics


def fsdp_sharding(tree, mesh: Mesh, axis: str = "data"):
  """Each leaf sharded over `axis` on its largest dimension that the axis size divides."""
  n = mesh.shape[axis]

  def one(x):
    shape = np.shape(x)
    dims = [d for d in np.argsort(shape)[::-1] if shape[d] % n == 0 and shape[d] >= n]
    spec = [None] * len(shape)
    if dims and n > 1:
      spec[dims[0]] = axis
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map(one, tree)


def data_mesh(batch_size: int, size: int = -1, devices=None) -> Mesh:
  """A ("data",) mesh; size -1 takes the most devices that divide the batch."""
  devices = list(devices if devices is not None else jax.devices())
  if size == -1:
    size = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0 and len(devices) % n == 0)
  return training.make_mesh((("data", size),), devices)


def compile_step(student_arch: Arch, teacher_arch: Arch, cfg: GKDConfig, optimizer, mesh: Mesh,
                 state, teacher: Params):
  """The jitted, sharded, state-donating GKD step `(state, teacher, tokens) -> (state, metrics)`."""
  fn = functools.partial(train_step, student_arch=student_arch, teacher_arch=teacher_arch, cfg=cfg,
                         optimizer=optimizer)
  s_sh, t_sh = fsdp_sharding(state, mesh), fsdp_sharding(teacher, mesh)
  return jax.jit(fn, in_shardings=(s_sh, t_sh, NamedSharding(mesh, P("data"))),
                 out_shardings=(s_sh, NamedSharding(mesh, P())), donate_argnums=(0,))


def init_state(params: Params, optimizer) -> dict[str, Any]:
  params = jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32), params)  # a copy: the step donates it
  return {"params": params, "opt": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


# ----------------------------------------------------------------------------- training
def train(student_arch: Arch, student: Params, teacher_arch: Arch, teacher: Params, cfg: GKDConfig,
          batches: training.BatchIterator, workdir: pathlib.Path, *, mesh: Mesh,
          progress: bool = True) -> Params:
  """Run (or resume from `workdir/ckpt`) GKD; returns the student's float32 params."""
  check_aligned(student_arch, teacher_arch, cfg)
  if cfg.batch_size % mesh.shape["data"]:
    raise ValueError(f"gkd.batch_size={cfg.batch_size} must be a multiple of the mesh's data axis "
                     f"({mesh.shape['data']} devices)")
  optimizer = make_optimizer(cfg)
  abstract = jax.eval_shape(lambda: init_state(student, optimizer))
  shardings = fsdp_sharding(abstract, mesh)
  mngr = training.ckpt_manager(workdir / "ckpt")
  target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, shardings)
  restored = training.restore(mngr, target, what="gkd") if mngr.all_steps() else None
  if restored is not None:
    start, state, data_state = restored
    batches.set_state(data_state)
  else:
    # Placed first: a checkpoint's arrays arrive committed to one device, the mesh may span more.
    student = jax.device_put(student, fsdp_sharding(student, mesh))
    start, state = 0, jax.device_put(init_state(student, optimizer), shardings)
  dt = jnp.dtype(cfg.compute_dtype)
  teacher = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dt), teacher)  # cast once, not per step
  teacher = jax.device_put(teacher, fsdp_sharding(teacher, mesh))
  step_fn = compile_step(student_arch, teacher_arch, cfg, optimizer, mesh, state, teacher)
  log = training.LossLog(workdir / "losses.jsonl", start, what="GKD",
                         hint="lower gkd.lr or gkd.clip_norm")

  def report(step: int, m) -> dict[str, str]:
    row = {k: float(v) for k, v in m.items()}
    log.write(step, row)
    return {"loss": f"{row['loss']:.4g}", "kl": f"{row['kl']:.4g}"}

  state = training.loop(lambda s, t: step_fn(s, teacher, t), state, batches, start=start, steps=cfg.steps,
                        checkpoint_every=cfg.checkpoint_every, mngr=mngr, report=report, desc="GKD",
                        progress=progress)
  mngr.close()
  return state["params"]


def plot_losses(log_path: pathlib.Path, png: pathlib.Path) -> None:
  """Loss curves: the total and each non-zero term, log scale."""
  plt = training.pyplot()
  rows = training.read_log(log_path)
  if not rows:
    return
  steps = [r["step"] for r in rows]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for k in rows[0]["loss"]:
    ys = [r["loss"][k] for r in rows]
    if any(ys):
      ax.plot(steps, ys, label=k, lw=1.5 if k == "loss" else 1.0)
  ax.set(xlabel="step", ylabel="loss", yscale="log", title="GKD: child vs parent")
  ax.legend()
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)


def summary(before: Mapping[str, float], after: Mapping[str, float]) -> str:
  keys = ("kl", "ppl", "top1")
  lines = [f"{'':<8}" + "".join(f"{k:>12}" for k in keys)]
  for name, m in (("pre-GKD", before), ("GKD", after)):
    lines.append(f"{name:<8}" + "".join(f"{m[k]:>12.4g}" for k in keys))
  return "\n".join(lines)
