"""The one owner of the config, the run directory and the stage order.

`PIPELINE` lists the search's stages as data, in order: what each reads from the config, which
stages' artifacts it reads, the directories it owns and the function that runs it. Everything else
in the package takes explicit arguments; the functions here turn a config into them.

Run directory (`config.workdir`, marked as ours by `.puzzle_jax.json`):
  parent/ tokenizer/   import        bld/      bld (ckpt/, library/, losses.{jsonl,png})
  scores/              score         costs/    costs
  mip/                 mip           child/    realize
  corpus/              distill-data  gkd/      gkd (ckpt/, child/, losses.{jsonl,png}, metrics.json)
  report/              evaluate      records/  one <stage>.json per stage   superseded/  moved-aside runs
A stage's record holds the config subtree it read, its inputs' fingerprints and the package version.
It is written as "running" before the stage starts and "done" after its artifact; a stage is skipped
only when its done record matches what the config asks for now, resumed when its running record
matches, and otherwise the run stops before doing anything and names the keys that changed.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import Any, Callable

import numpy as np

from puzzle_jax import artifacts
from puzzle_jax.artifacts import ArtifactError
from puzzle_jax.evals import TASKS as EVAL_TASK_CONFIGS

VERSION = "0.1.0"


class UserError(ValueError):
  """A mistake in the config or the run directory: printed as one line per problem, no traceback."""


# ----------------------------------------------------------------------------- the run directory
@dataclasses.dataclass(frozen=True)
class Paths:
  root: pathlib.Path

  @classmethod
  def from_config(cls, config) -> Paths:
    return cls(pathlib.Path(config.workdir))

  parent = property(lambda s: s.root / "parent")
  tokenizer = property(lambda s: s.root / "tokenizer")
  bld = property(lambda s: s.root / "bld")
  library = property(lambda s: s.root / "bld" / "library")
  scores = property(lambda s: s.root / "scores" / "scores.json")
  costs = property(lambda s: s.root / "costs" / "costs.json")
  solution = property(lambda s: s.root / "mip" / "solution.json")
  child = property(lambda s: s.root / "child")
  report = property(lambda s: s.root / "report" / "report.json")
  tfds = property(lambda s: s.root / "tfds")
  upcycled = property(lambda s: s.root / "upcycle" / "parent")
  upcycle_report = property(lambda s: s.root / "upcycle" / "report.json")
  records = property(lambda s: s.root / "records")
  corpus = property(lambda s: s.root / "corpus")
  gkd = property(lambda s: s.root / "gkd")
  gkd_child = property(lambda s: s.root / "gkd" / "child")

  def record(self, stage: str) -> pathlib.Path:
    return self.records / f"{stage}.json"


# ----------------------------------------------------------------------------- the stage table
@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  help: str
  reads: tuple[str, ...]  # config keys (dotted; a section means all of it) its result depends on
  inputs: tuple[str, ...]  # stages whose artifacts it reads
  dirs: tuple[str, ...]  # directories under the workdir it owns
  artifact: Callable[[Paths], pathlib.Path]  # exists once the stage is complete
  fn: Callable[[Any, Paths], None]
  ignore: tuple[str, ...] = ()  # keys under `reads` that do not change the result (locations, logging)

  def rebuild(self) -> str:
    return f"python -m puzzle_jax run --config ... --rerun_from={self.name}"


def _stage(name, help, reads, inputs, dirs, artifact, ignore=()):
  def register(fn):
    _TABLE[name] = Stage(name, help, tuple(reads), tuple(inputs), tuple(dirs), artifact, fn, tuple(ignore))
    return fn
  return register


_TABLE: dict[str, Stage] = {}
_DATA = ("data", "seed")
_DATA_IGNORE = ("data.data_dir",)  # where TFDS caches, not what it holds


# ----------------------------------------------------------------------------- settings from the config
def settings(cls, section) -> Any:
  """A frozen settings dataclass from a config section (fields by name; lists become tuples)."""
  kw = {f.name: section[f.name] for f in dataclasses.fields(cls) if f.name in section}
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})


def library_settings(section):
  from puzzle_jax.search import candidates as cands
  lib = settings(cands.LibraryConfig, {k: v for k, v in section.items() if k != "layer_overrides"})
  return dataclasses.replace(lib, layer_overrides={int(k): dict(v) for k, v in section.layer_overrides.items()})


def targets(section, engine: str = "transformers"):
  from puzzle_jax.search import select
  return select.Targets(section.target_decode_speedup, section.target_prefill_speedup, section.max_memory_gb,
                        section.max_params, section.keep_first_attn, engine)


def parent_source(config) -> pathlib.Path:
  from puzzle_jax import io
  return pathlib.Path(config.parent.path) if config.parent.path else io.smollm2_gguf_path()


def load_parent(paths: Paths):
  """The search's parent: the upcycled MoE when the upcycle stage made one, else the import."""
  from puzzle_jax import io
  return io.load_checkpoint(paths.upcycled if (paths.upcycled / "arch.json").exists() else paths.parent)


def load_tok(paths: Paths):
  from puzzle_jax.io import tokenizer
  return tokenizer.Tokenizer.from_dir(paths.tokenizer)


def _text(config, paths: Paths, split: str):
  from puzzle_jax.io import data
  data_dir = config.data.data_dir or str(paths.tfds)
  return data.text_source(config.data.name, split, data_dir, local_dir=config.data.local_dir)


def heldout_tokens(config, paths: Paths, tok, num_seqs: int, seq_len: int, split: str | None = None) -> np.ndarray:
  """A fixed [num_seqs, seq_len] token set from the held-out split (deterministic)."""
  from puzzle_jax.io import data
  return data.token_array(_text(config, paths, split or config.data.eval_split), tok.encode, seq_len, num_seqs,
                          bos_id=None, eos_id=data.doc_separator(tok), seed=config.seed,
                          text_key=config.data.text_key)


def train_batches(config, paths: Paths, tok, batch_size: int, seq_len: int):
  from puzzle_jax.io import data
  return data.TokenBatches(_text(config, paths, config.data.train_split), tok, batch_size, seq_len,
                           seed=config.seed, text_key=config.data.text_key)


# ----------------------------------------------------------------------------- the stages
@_stage("import", "parent (HF dir / GGUF / checkpoint) -> project checkpoint + tokenizer",
        reads=("parent",), inputs=(), dirs=("parent", "tokenizer"), artifact=lambda p: p.parent / "arch.json")
def _import(config, paths: Paths) -> None:
  import jax.numpy as jnp
  from puzzle_jax import io
  from puzzle_jax.core import model
  from puzzle_jax.io import tokenizer
  src = parent_source(config)
  arch, params = io.load_pretrained(src, dtype=jnp.dtype(config.parent.dtype))
  arch, params = model.truncate(arch, params, config.parent.max_layers)
  tokenizer.load_tokenizer(src).save(paths.tokenizer)
  io.save_checkpoint(paths.parent, arch, params, overwrite=True)
  print(f"parent from {src}\n{arch.table()}")


@_stage("upcycle", "optional: dense parent -> gpt-oss-shaped MoE parent (experts = FFN channel groups, BLD router)",
        reads=("upcycle",) + _DATA, inputs=("import",), dirs=("upcycle",), artifact=lambda p: p.upcycle_report,
        ignore=_DATA_IGNORE)
def _upcycle(config, paths: Paths) -> None:
  from puzzle_jax import io
  from puzzle_jax.core import model
  from puzzle_jax.moe import fit, prune, upcycle
  c = config.upcycle
  if not c.num_experts:
    artifacts.write_json(paths.upcycle_report, {"enabled": False})
    return
  arch, params = io.load_checkpoint(paths.parent)
  tok = load_tok(paths)
  s = upcycle.UpcycleSettings(c.num_experts, c.top_k, fit=fit.FitSettings(c.steps, c.lr, c.batch_tokens,
                                                                         seed=config.seed))
  calib = heldout_tokens(config, paths, tok, c.calib_seqs, c.seq_len, split=config.data.train_split)
  m_arch, m_params, report = upcycle.upcycle(arch, params, [calib[i:i + 2] for i in range(0, len(calib), 2)], s)
  held = heldout_tokens(config, paths, tok, 2, c.seq_len)
  kl = prune.kl(prune.forward(arch, params, held), prune.forward(m_arch, m_params, held))
  io.save_checkpoint(paths.upcycled, m_arch, m_params, overwrite=True)
  artifacts.write_json(paths.upcycle_report, {"enabled": True, "kl_to_dense": kl,
                                              "layers": {str(k): v for k, v in report.items()}})
  print(f"upcycle: {c.num_experts} experts, top-{c.top_k}; KL to the dense parent {kl:.4f}\n{m_arch.table()}")


@_stage("bld", "candidate library + blockwise local distillation of every candidate at once",
        reads=("library", "bld") + _DATA, inputs=("import", "upcycle"), dirs=("bld",),
        artifact=lambda p: p.library / "library.json", ignore=_DATA_IGNORE + ("bld.checkpoint_every",))
def _bld(config, paths: Paths) -> None:
  import jax
  from puzzle_jax.search import bld, candidates as cands, library as library_lib
  arch, params = load_parent(paths)
  tok = load_tok(paths)
  library = cands.build_library(arch, library_settings(config.library))
  cfg = settings(bld.BLDConfig, config.bld)
  split = lambda x: [x[i:i + cfg.batch_size] for i in range(0, len(x), cfg.batch_size)]
  calib = split(heldout_tokens(config, paths, tok, cfg.calib_batches * cfg.batch_size, cfg.seq_len,
                               split=config.data.train_split))
  held = split(heldout_tokens(config, paths, tok, cfg.eval_batches * cfg.batch_size, cfg.seq_len))
  mesh = bld.make_mesh(config.mesh)
  print(f"bld: {len(library)} candidates, {sum(cands.is_trainable(arch, c) for c in library)} trained, "
        f"mesh {dict(mesh.shape)}")
  groups, trained = bld.train(arch, params, library, cfg, train_batches(config, paths, tok, cfg.batch_size,
                                                                        cfg.seq_len),
                              calib, paths.bld, mesh=mesh, key=jax.random.PRNGKey(config.seed))
  losses = bld.evaluate(arch, params, groups, trained, held)
  library_lib.save_library(paths.library, arch, library, groups, trained, losses, cfg)
  bld.plot_losses(paths.bld / "losses.jsonl", paths.bld / "losses.png")
  bld.print_summary(library, losses)


@_stage("score", "replace-1-block KL / LM-loss / top-1 of every candidate on held-out text",
        reads=("score",) + _DATA, inputs=("import", "upcycle", "bld"), dirs=("scores",), artifact=lambda p: p.scores,
        ignore=_DATA_IGNORE + ("score.metric", "score.candidate_chunk", "score.batch_size"))
def _score(config, paths: Paths) -> None:
  from puzzle_jax.search import library as library_lib, scoring
  arch, params = load_parent(paths)
  library = library_lib.load_library(paths.library)
  cfg = settings(scoring.ScoreConfig, config.score)
  tokens = heldout_tokens(config, paths, load_tok(paths), cfg.num_seqs, cfg.seq_len)
  scores = scoring.Scorer(arch, params, cfg).score(library, tokens)
  scoring.save_scores(paths.scores, scores, {"tokens": int(tokens.size), "config": dataclasses.asdict(cfg)})
  scoring.plot_heatmap(scores, library, paths.scores.with_name("heatmap.png"), cfg.metric)


@_stage("costs", "per-variant prefill / decode time (measured, analytic or a given table), exact bytes",
        reads=("costs", "seed"), inputs=("bld",), dirs=("costs",), artifact=lambda p: p.costs)
def _costs(config, paths: Paths) -> None:
  from puzzle_jax.search import costs, library as library_lib
  c = config.costs
  library = library_lib.load_library(paths.library)
  keys = sorted(library.keys)
  scenario = costs.Scenario(batch=c.batch, prompt_len=c.prompt_len, gen_len=c.gen_len, dtype=c.dtype,
                            kv_dtype=c.kv_dtype, repeats=c.repeats)
  if c.table:
    table = costs.load_cost_table(c.table, library.arch, keys)  # from another harness (e.g. PyTorch/H100)
  elif c.backend == "analytic":
    table = costs.analytic_table(library.arch, keys, scenario, peak_flops=c.peak_tflops * 1e12,
                                 bandwidth=c.bandwidth_gbps * 1e9)
  else:
    table = costs.cost_table(library.arch, keys, scenario, seed=config.seed)
  costs.save_cost_table(table, paths.costs)
  print(f"costs ({table['backend']}, {table['device']}): " + ", ".join(
      f"{k} {v['decode_s'] * 1e6:.0f}us" for k, v in table["variants"].items()))


def problem(config, paths: Paths):
  """The MIP's inputs (per-layer options, budgets) from the bld, score and costs artifacts."""
  from puzzle_jax.search import costs, library as library_lib, scoring, select
  library = library_lib.load_library(paths.library)
  table = costs.load_cost_table(paths.costs, library.arch, sorted(library.keys))
  return select.build_problem(library, scoring.load_scores(paths.scores), table, config.score.metric,
                              targets(config.mip, config.export.engine))


@_stage("mip", "mixed-integer program: one candidate per layer under the budgets; Pareto sweep",
        reads=("mip", "score.metric", "export.engine"), inputs=("bld", "score", "costs"), dirs=("mip",),
        artifact=lambda p: p.solution)
def _mip(config, paths: Paths) -> None:
  from puzzle_jax.search import select
  select.solve_and_plot(problem(config, paths), paths.solution, num_solutions=config.mip.num_solutions,
                        solver=config.mip.solver, pareto_speedups=config.mip.pareto_speedups,
                        metric=config.score.metric)


def load_solution(paths: Paths) -> list[tuple[str, str]]:
  doc = artifacts.read_json(paths.solution, required=("choices",))
  try:
    return [(str(a), str(f)) for a, f in doc["choices"]]
  except (TypeError, ValueError) as e:
    raise ArtifactError(paths.solution, f"'choices' is not a list of [attn, ffn] pairs ({e})") from e


@_stage("realize", "the MIP's choice -> child checkpoint with BLD-trained sub-blocks",
        reads=(), inputs=("import", "upcycle", "bld", "mip"), dirs=("child",), artifact=lambda p: p.child / "arch.json")
def _realize(config, paths: Paths) -> None:
  from puzzle_jax import io
  from puzzle_jax.search import library as library_lib, realize
  _, parent_params = load_parent(paths)
  arch, params = realize.realize(library_lib.load_library(paths.library), parent_params, load_solution(paths))
  io.save_checkpoint(paths.child, arch, params, overwrite=True)
  print(arch.table())


@_stage("distill-data", "teacher-generated corpus: the parent continues training-text / chat prompts",
        reads=("distill_data",) + _DATA, inputs=("import", "upcycle"), dirs=("corpus",),
        artifact=lambda p: p.corpus / "corpus.json", ignore=_DATA_IGNORE)
def _distill_data(config, paths: Paths) -> None:
  import jax.numpy as jnp
  from puzzle_jax.distill import corpus
  from puzzle_jax.io import data
  arch, params = load_parent(paths)
  tok = load_tok(paths)
  cfg = dataclasses.replace(settings(corpus.CorpusConfig, config.distill_data), seed=config.seed)
  # Prompts come from the training text (the same packed stream BLD and GKD read).
  stream = data.token_stream(_text(config, paths, config.data.train_split), tok.encode, seed=config.seed,
                             bos_id=None, eos_id=data.doc_separator(tok), text_key=config.data.text_key)
  params = _cast(params, jnp.dtype(cfg.dtype))
  doc = corpus.generate(arch, params, stream, cfg, paths.corpus, tok)
  print(f"distill-data: {doc['generated_tokens']:,} tokens in {doc['shards']} shards under {paths.corpus}")


def _cast(params, dtype):
  import jax
  return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)


def gkd_batches(config, paths: Paths, tok, batch_size: int, seq_len: int):
  """GKD's training batches: the training split, or the distill-data corpus (`gkd.data`)."""
  from puzzle_jax.distill import corpus
  from puzzle_jax.io import data
  if config.gkd.data == "wikitext":
    return train_batches(config, paths, tok, batch_size, seq_len)
  return data.TokenBatches(corpus.source(paths.corpus), tok, batch_size, seq_len, seed=config.seed,
                           text_key="tokens")


@_stage("gkd", "global knowledge distillation of the realized child against the parent (logits on the fly)",
        reads=("gkd", "eval") + _DATA, inputs=("import", "upcycle", "realize", "distill-data"), dirs=("gkd",),
        artifact=lambda p: p.gkd / "metrics.json",
        ignore=_DATA_IGNORE + ("gkd.checkpoint_every", "eval.batch_size"))
def _gkd(config, paths: Paths) -> None:
  import jax
  from puzzle_jax import io
  from puzzle_jax.distill import gkd
  from puzzle_jax.search.evaluate import Reference
  parent_arch, parent = load_parent(paths)
  child_arch, child = io.load_checkpoint(paths.child)
  tok = load_tok(paths)
  cfg = settings(gkd.GKDConfig, config.gkd)
  mesh = gkd.data_mesh(cfg.batch_size, config.gkd.data_parallel)
  print(f"gkd: {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens from {config.gkd.data}, "
        f"mesh {dict(mesh.shape)}")
  trained = jax.device_get(gkd.train(child_arch, child, parent_arch, parent, cfg,
                                     gkd_batches(config, paths, tok, cfg.batch_size, cfg.seq_len), paths.gkd,
                                     mesh=mesh))
  dtype = jax.tree_util.tree_leaves(child)[0].dtype  # the child's storage dtype (the parent's)
  io.save_checkpoint(paths.gkd_child, child_arch, _cast(trained, dtype), overwrite=True)
  held = heldout_tokens(config, paths, tok, config.eval.num_seqs, config.eval.seq_len)
  ref = Reference(parent_arch, parent, held, config.eval.batch_size)
  before, after = ref.evaluate(child_arch, child), ref.evaluate(child_arch, trained)
  gkd.plot_losses(paths.gkd / "losses.jsonl", paths.gkd / "losses.png")
  artifacts.write_json(paths.gkd / "metrics.json", {"before": before, "after": after,
                                                    "tokens": cfg.steps * cfg.batch_size * cfg.seq_len})
  print(gkd.summary(before, after))


@_stage("evaluate", "perplexity, KL, top-1 over the sweep, and lm-eval task retention at the target: "
        "parent vs MIP child (before and after GKD) vs same-cost baselines",
        reads=("eval", "mip", "score.metric", "export.engine", "lm_eval") + _DATA,
        inputs=("import", "upcycle", "bld", "score", "costs", "mip", "gkd"), dirs=("report",),
        artifact=lambda p: p.report,
        ignore=_DATA_IGNORE + ("eval.batch_size", "lm_eval.batch_size", "lm_eval.eval_dir"))
def _evaluate(config, paths: Paths) -> None:
  from puzzle_jax.search import evaluate, library as library_lib
  parent_arch, parent_params = load_parent(paths)
  library = library_lib.load_library(paths.library)
  tokens = heldout_tokens(config, paths, load_tok(paths), config.eval.num_seqs, config.eval.seq_len)
  report = evaluate.evaluate_search(parent_arch, parent_params, library, problem(config, paths), tokens,
                                    config.eval.batch_size, config.mip.target_decode_speedup,
                                    config.mip.pareto_speedups)
  if config.lm_eval.tasks:
    models = {"parent": (parent_arch, parent_params),
              **evaluate.realized_at(library, parent_params, report["at_target"]), **_trained_children(paths)}
    report["tasks"] = _task_retention(config.lm_eval, models, load_tok(paths), paths.report.parent)
  report["fingerprints"] = {s: _read_record(paths, s).get("fingerprint") for s in _upstream("evaluate")}
  artifacts.write_json(paths.report, report)
  evaluate.plot_sweep(report, paths.report.with_name("pareto_kl.png"))
  evaluate.print_report(report)


def _trained_children(paths: Paths) -> dict[str, tuple[Any, Any]]:
  """The GKD-trained child (the `gkd` stage runs before `evaluate`, so it is there)."""
  from puzzle_jax import io
  return {"gkd": io.load_checkpoint(paths.gkd_child)} if (paths.gkd_child / "arch.json").exists() else {}


def _task_retention(section, models: dict, tok, out_dir: pathlib.Path) -> dict[str, Any]:
  """lm-eval scores of every model on the offline tasks, retention vs the parent, a PNG beside."""
  from puzzle_jax.evals import retention
  table = retention.retention_table(models, tok, section.tasks, section.limit or None,
                                    batch_size=section.batch_size, max_length=section.max_length,
                                    eval_dir=section.eval_dir or None)
  retention.plot_retention(table, out_dir / "retention.png")
  print(retention.format_table(table))
  return table


PIPELINE: tuple[Stage, ...] = tuple(_TABLE.values())  # the order of the decorators above


# ----------------------------------------------------------------------------- records
def _upstream(name: str) -> list[str]:
  """Every stage `name` depends on, transitively, in pipeline order."""
  need, stack = set(), list(_TABLE[name].inputs)
  while stack:
    s = stack.pop()
    if s not in need:
      need.add(s)
      stack.extend(_TABLE[s].inputs)
  return [s.name for s in PIPELINE if s.name in need]


def _section(config, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node.to_dict() if hasattr(node, "to_dict") else node


def _read_config(stage: Stage, config) -> dict[str, Any]:
  read = artifacts.flatten({k: artifacts.canonical(_section(config, k)) for k in stage.reads})
  return {k: v for k, v in sorted(read.items()) if not any(k == i or k.startswith(i + ".") for i in stage.ignore)}


def expected_records(config) -> dict[str, dict[str, Any]]:
  """What each stage's record must say for its artifact to serve this config."""
  out: dict[str, dict[str, Any]] = {}
  for stage in PIPELINE:
    rec = {"stage": stage.name, "config": _read_config(stage, config),
           "inputs": {s: out[s]["fingerprint"] for s in stage.inputs}}
    out[stage.name] = {**rec, "fingerprint": artifacts.fingerprint(rec)}
  return out


def _read_record(paths: Paths, name: str) -> dict[str, Any]:
  path = paths.record(name)
  if not path.exists():
    return {}
  try:
    return artifacts.read_json(path, required=("stage", "config", "inputs", "fingerprint", "status"))
  except ArtifactError:
    return {"status": "corrupt", "config": {}, "inputs": {}}


def _write_record(paths: Paths, expected: dict[str, Any], status: str, **extra) -> None:
  artifacts.write_json(paths.record(expected["stage"]), {**expected, "status": status, "version": VERSION,
                                                         "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra})


@dataclasses.dataclass(frozen=True)
class Status:
  stage: str
  state: str  # "done" | "resume" | "todo" | "stale"
  why: tuple[str, ...] = ()  # changed keys / inputs, when stale


def status(config) -> list[Status]:
  """Each stage's standing against the config: done, resumable, to do, or stale (and why)."""
  paths, expected, out = Paths.from_config(config), expected_records(config), []
  for stage in PIPELINE:
    rec, exp = _read_record(paths, stage.name), expected[stage.name]
    present = [d for d in stage.dirs if (paths.root / d).exists()]
    if not rec:
      out.append(Status(stage.name, "stale", (f"{', '.join(present)}/ exist(s) without a record of what made "
                                              "them",)) if present else Status(stage.name, "todo"))
      continue
    if rec["status"] == "corrupt":
      out.append(Status(stage.name, "stale", (f"its record {paths.record(stage.name)} is corrupt",)))
      continue
    why = tuple(artifacts.diff(rec["config"], exp["config"])) + tuple(
        f"input `{s}` changed" for s in stage.inputs if rec["inputs"].get(s) != exp["inputs"][s])
    if why:
      out.append(Status(stage.name, "stale", why))
    elif rec["status"] == "done" and stage.artifact(paths).exists():
      out.append(Status(stage.name, "done"))
    else:
      out.append(Status(stage.name, "resume"))
  return out


# ----------------------------------------------------------------------------- running
def _claim_workdir(paths: Paths) -> None:
  try:
    artifacts.claim(paths.root, "run directory")
  except FileExistsError as e:
    raise UserError(f"workdir: {e}") from None


def _move_aside(paths: Paths, names: list[str]) -> pathlib.Path | None:
  """Move the named stages' directories and records to superseded/<time>/ (never deleted)."""
  dest = paths.root / "superseded" / time.strftime("%Y%m%d-%H%M%S")
  moved = []
  for name in names:
    stage = _TABLE[name]
    for p in [paths.root / d for d in stage.dirs] + [paths.record(name)]:
      if p.exists():
        target = dest / p.relative_to(paths.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        p.rename(target)
        moved.append(p.name)
  return dest if moved else None


def _stale_message(stale: Status, later: list[str], workdir: pathlib.Path) -> str:
  why = "\n".join(f"    {w}" for w in stale.why)
  return (f"stage `{stale.stage}` in {workdir} was made with other settings than this run asks for:\n{why}\n"
          f"  its artifact (and those of {', '.join(later) or 'no later stage'}) would not match the config.\n"
          f"  Either recompute from it: add --rerun_from={stale.stage} (earlier results are moved to "
          f"{workdir}/superseded/, not deleted),\n  or use a new workdir: --config.workdir=NEW_DIR")


def check(config, until: str | None = None, rerun_from: str | None = None) -> list[Status]:
  """The stages to run for `until` (default: the whole pipeline); raises UserError when a stage
  that would be reused is stale and `rerun_from` does not cover it."""
  names = [s.name for s in PIPELINE]
  if until is not None and until not in names:
    raise UserError(f"unknown stage {until!r}; choose one of {', '.join(names)}")
  if rerun_from is not None and rerun_from not in names:
    raise UserError(f"--rerun_from={rerun_from!r} is not a stage; choose one of {', '.join(names)}")
  last = names.index(until) if until else len(names) - 1
  redo = set(names[names.index(rerun_from):]) if rerun_from else set()
  todo = status(config)[:last + 1]
  for i, st in enumerate(todo):
    if st.state == "stale" and st.stage not in redo:
      raise UserError(_stale_message(st, names[i + 1:last + 1], Paths.from_config(config).root))
  return [Status(s.stage, "todo") if s.stage in redo else s for s in todo]


def run(config, until: str | None = None, rerun_from: str | None = None) -> Paths:
  """Run the pipeline through `until`, skipping stages whose records match, resuming interrupted ones."""
  paths = Paths.from_config(config)
  validate_or_raise(config)
  plan_ = check(config, until, rerun_from)
  _claim_workdir(paths)
  if rerun_from:  # the stage and everything after it: their artifacts no longer match
    names = [t.name for t in PIPELINE]
    moved = _move_aside(paths, names[names.index(rerun_from):])
    if moved:
      print(f"rerun from {rerun_from}: earlier results moved to {moved}")
  expected = expected_records(config)
  for st in plan_:
    stage = _TABLE[st.stage]
    if st.state == "done":
      print(f"{stage.name}: {stage.artifact(paths)} exists, skipping (record {expected[stage.name]['fingerprint']})")
      continue
    _run_stage(stage, config, paths, expected[stage.name], resumed=st.state == "resume")
  return paths


def _run_stage(stage: Stage, config, paths: Paths, expected: dict[str, Any], resumed: bool) -> None:
  t0 = time.perf_counter()
  print(f"==> {stage.name}" + (" (resuming)" if resumed else ""), flush=True)
  _write_record(paths, expected, "running")
  try:
    stage.fn(config, paths)
  except ArtifactError as e:
    raise UserError(_corrupt_message(e, paths)) from e
  seconds = time.perf_counter() - t0
  _write_record(paths, expected, "done", seconds=round(seconds, 2))
  print(f"<== {stage.name} ({seconds:.1f}s)", flush=True)


def _corrupt_message(e: ArtifactError, paths: Paths) -> str:
  """Name the file, the stage that wrote it and the command that rebuilds it."""
  if e.path is None:
    return e.problem
  path = e.path.absolute()
  for stage in PIPELINE:
    if any(path.is_relative_to((paths.root / d).absolute()) for d in stage.dirs):
      return (f"{path}: {e.problem}.\n  It was written by the `{stage.name}` stage; rebuild it (and what "
              f"follows) with: {stage.rebuild()}")
  return f"{path}: {e.problem}"


# ----------------------------------------------------------------------------- tools outside the pipeline
def resolve_checkpoint(config, which: str):
  """(arch, params) for "parent", "child" or a checkpoint / HF / GGUF path. Workdir checkpoints must be
  current (their stage's record matches the config)."""
  from puzzle_jax import io
  paths = Paths.from_config(config)
  if which in ("parent", "child"):
    stage = "import" if which == "parent" else "realize"
    st = {s.stage: s for s in check(config, until=stage)}
    missing = [s for s, v in st.items() if v.state != "done"]
    if missing:
      if which == "parent":
        run(config, until="import")
      else:
        raise UserError(f"{which}: stage(s) {', '.join(missing)} not finished in {paths.root}; run "
                        "`python -m puzzle_jax run --config ...` first")
    return load_parent(paths) if which == "parent" else io.load_checkpoint(paths.child)
  p = pathlib.Path(which)
  return io.load_checkpoint(p) if (p / "arch.json").exists() else io.load_pretrained(p)


def tokenizer_for(config):
  paths = Paths.from_config(config)
  if not (paths.tokenizer / "tokenizer.json").exists():
    run(config, until="import")
  return load_tok(paths)


def generate(config) -> str:
  from puzzle_jax import generate as gen
  g = config.generate
  arch, params = resolve_checkpoint(config, g.checkpoint)
  text = gen.complete(arch, params, tokenizer_for(config), g.prompt, chat=g.chat, max_new_tokens=g.max_new_tokens,
                      temperature=g.temperature, top_p=g.top_p, seed=config.seed)
  print(f"[{g.checkpoint}] {g.prompt}\n-> {text}")
  return text


def export(config) -> pathlib.Path:
  """The parent, the child or a checkpoint -> HF directory (refuses a directory it did not create)."""
  import warnings
  from puzzle_jax.core import hf_config, hf_gpt_oss
  from puzzle_jax.export import engines, gpt_oss_puzzle, nemotron_nas
  which = config.export.checkpoint
  arch, params = resolve_checkpoint(config, which)
  out = pathlib.Path(config.export.out_dir or Paths.from_config(config).root / "export" / pathlib.Path(which).name)
  if hf_gpt_oss.is_gpt_oss_like(arch):  # MoE / attention sinks: vLLM's gpt_oss_puzzle layout
    try:
      path = gpt_oss_puzzle.export(arch, params, out, tokenizer=tokenizer_for(config), dtype=config.export.dtype,
                                   mxfp4=config.export.mxfp4, ep_size=config.library.ep_size)
    except FileExistsError as e:
      raise UserError(f"export: {e}") from None
    print(f"export (gpt_oss_puzzle): {which} -> {path}")
    return path
  engine = config.export.engine
  if engine == "transformers":
    for issue in nemotron_nas.check_nemotron_nas_config(hf_config.arch_to_hf(arch)):
      warnings.warn(f"vLLM/TensorRT-LLM compatibility (set export.engine to check strictly): {issue}")
  try:
    path = nemotron_nas.export(arch, params, out, tokenizer=tokenizer_for(config), dtype=config.export.dtype,
                               engine=engine)
  except (FileExistsError, engines.EngineError) as e:
    raise UserError(f"export: {e}") from None
  # for_engine checked the arch; this checks the written file against the loader rules.
  problems = nemotron_nas.check_engine_config(artifacts.read_json(path / nemotron_nas.CONFIG_FILE), engine)
  if problems:
    raise UserError(f"export: {path / nemotron_nas.CONFIG_FILE} fails {engine}'s loader rules: {problems}")
  print(f"export: {which} -> {path}")
  return path


def fusion_deps(config) -> pathlib.Path:
  """`fusion-deps`: pairwise block dependency on calibration text, heatmap and proposed runs, for the
  parent, the child or a checkpoint (`fusion` section) -> <workdir>/fusion/deps.{json,png}."""
  from puzzle_jax.fusion import deps
  validate_or_raise(config)
  f = config.fusion
  paths = Paths.from_config(config)
  arch, params = resolve_checkpoint(config, f.checkpoint)
  s = settings(deps.DepsSettings, f)
  tokens = heldout_tokens(config, paths, tokenizer_for(config), f.num_seqs, f.seq_len, split=config.data.train_split)
  dep = deps.dependency_matrix(arch, params, tokens, s)
  window = deps.window_layers(arch, s)
  runs = deps.propose_runs(dep, s.threshold, s.max_run, start=window[0])
  fusable = deps.propose_runs(dep, s.threshold, s.max_run, start=window[0],
                              allowed=[arch.blocks[i].attn.kind == "noop" for i in window])
  out = paths.root / "fusion" / "deps.json"
  artifacts.write_json(out, {"checkpoint": f.checkpoint, "window": window, "threshold": s.threshold,
                             "dep": [[None if np.isnan(v) else float(v) for v in row] for row in dep],
                             "parallel_runs": runs, "fusable_ffn_runs": fusable})
  deps.plot_heatmap(dep, window[0], out.with_name("deps.png"), runs,
                    title=f"block dependency, {f.checkpoint} (runs at <= {s.threshold})")
  print(f"fusion-deps: window {window[0]}..{window[-1]}, proposed parallel runs {runs}, "
        f"fusable FFN runs {fusable} -> {out}")
  return out


def run_all(config, rerun_from: str | None = None) -> Paths:
  """`run`: the whole search, then a sample from the parent and the child."""
  paths = run(config, rerun_from=rerun_from)
  from puzzle_jax import generate as gen
  for which in ("parent", "child"):
    arch, params = resolve_checkpoint(config, which)
    text = gen.complete(arch, params, load_tok(paths), config.generate.prompt,
                        max_new_tokens=config.generate.max_new_tokens)
    print(f"[{which}] {config.generate.prompt}\n  -> {text}")
  return paths


def plan(config) -> list[dict[str, Any]]:
  """`plan`: each stage's standing and, for what would run, an estimate of its time and peak memory."""
  from puzzle_jax import estimate, io
  from puzzle_jax.search import bld, candidates as cands
  validate_or_raise(config)
  source = io.read_arch(parent_source(config))
  arch = source
  if config.parent.max_layers and config.parent.max_layers < source.num_layers:
    arch = dataclasses.replace(source, blocks=source.blocks[:config.parent.max_layers])
  library = cands.build_library(arch, library_settings(config.library))
  work = estimate.Work(
      source_params=source.num_params(), candidates=len(library),
      trained=sum(cands.is_trainable(arch, c) for c in library), groups=len(bld.make_groups(arch, library)),
      bld=config.bld.to_dict(), score=config.score.to_dict(), eval=config.eval.to_dict(),
      costs_backend="table" if config.costs.table else config.costs.backend,
      variants=len({c.key for c in library}), sweep=len(set(config.mip.pareto_speedups)),
      gkd=config.gkd.to_dict(), distill_data=config.distill_data.to_dict(),
      lm_eval_requests=_lm_eval_requests(config.lm_eval),
      upcycle=config.upcycle.to_dict())
  probe = estimate.probe(arch, config.score.batch_size, config.score.seq_len)
  rows = estimate.plan_rows(status(config), estimate.stage_seconds(arch, probe, work),
                            estimate.stage_peak_bytes(arch, work))
  print(estimate.format_plan(rows, Paths.from_config(config).root))
  return rows


def _lm_eval_requests(section) -> int:
  from puzzle_jax.evals.retention import REQUESTS_PER_DOC, task_name
  docs = section.limit or 200  # data/eval holds 200 documents per task
  return sum(REQUESTS_PER_DOC[task_name(t)] * docs for t in section.tasks)


# The CLI's commands: the pipeline stages (each runs what it needs before it), then the tools.
COMMANDS: dict[str, tuple[str, Callable]] = {
    **{s.name: (s.help, lambda c, n=s.name, **kw: run(c, until=n, **kw)) for s in PIPELINE},
    "run": ("the whole search (" + " -> ".join(s.name for s in PIPELINE) + ") and a sample from parent and child",
            lambda c, **kw: run_all(c, **kw)),
    "plan": ("what is done, what would run, and its estimated time and memory here", lambda c, **kw: plan(c)),
    "generate": ("prompt -> text with the parent, the child or any checkpoint", lambda c, **kw: generate(c)),
    "export": ("parent / child / checkpoint -> HF nemotron-nas directory", lambda c, **kw: export(c)),
    "fusion-deps": ("block dependency matrix, heatmap and proposed parallel / fused runs",
                    lambda c, **kw: fusion_deps(c)),
}


# ----------------------------------------------------------------------------- validation
_FLOATS = ("float32", "bfloat16", "float16")
_ENUMS = {
    "score.metric": ("kl", "lm_loss_delta", "one_minus_top1"),
    "costs.backend": ("measure", "analytic"),
    "bld.init": ("parent", "random"),
    "parent.dtype": _FLOATS, "costs.dtype": _FLOATS, "export.dtype": _FLOATS,
    "export.engine": ("transformers", "vllm", "trtllm"),
    "costs.kv_dtype": _FLOATS + ("fp8", "float8_e4m3fn", "int8"),
    "gkd.hidden_loss": ("cosine", "nmse"), "gkd.data": ("wikitext", "corpus"), "gkd.compute_dtype": _FLOATS,
    "distill_data.dtype": _FLOATS,
}
_POSITIVE_INTS = ("bld.steps", "bld.batch_size", "bld.seq_len", "bld.checkpoint_every", "bld.calib_batches",
                  "bld.eval_batches", "score.num_seqs", "score.seq_len", "score.batch_size",
                  "score.candidate_chunk", "costs.batch", "costs.prompt_len", "costs.gen_len", "costs.repeats",
                  "eval.num_seqs", "eval.seq_len", "eval.batch_size", "generate.max_new_tokens",
                  "library.ffn_multiple", "mip.num_solutions", "fusion.num_seqs", "fusion.seq_len",
                  "fusion.batch_size", "fusion.max_run", "gkd.steps", "gkd.batch_size", "gkd.seq_len",
                  "gkd.checkpoint_every", "distill_data.num_tokens", "distill_data.batch_size",
                  "distill_data.prompt_len", "distill_data.max_new_tokens", "library.ep_size", "upcycle.top_k",
                  "upcycle.steps", "upcycle.batch_tokens", "upcycle.calib_seqs", "upcycle.seq_len",
                  "lm_eval.batch_size", "lm_eval.max_length")
_NON_NEGATIVE = ("bld.warmup_steps", "bld.weight_decay", "bld.ridge", "parent.max_layers", "mip.max_params",
                 "mip.target_decode_speedup", "mip.target_prefill_speedup", "mip.max_memory_gb",
                 "generate.temperature", "fusion.start", "fusion.stop", "fusion.threshold",
                 "gkd.warmup_steps", "gkd.weight_decay", "gkd.clip_norm", "gkd.kl_weight", "gkd.lm_weight",
                 "gkd.hidden_weight", "gkd.top_k", "distill_data.temperature", "upcycle.num_experts")
_POSITIVE = ("bld.lr", "costs.peak_tflops", "costs.bandwidth_gbps", "gkd.lr", "gkd.temperature", "upcycle.lr")
_MESH_AXES = ("candidate", "data")
_EVAL_TASKS = tuple(t.removeprefix("pj_") for t in EVAL_TASK_CONFIGS)


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _checkpoint_problem(key: str, which: str) -> list[str]:
  if which in ("parent", "child") or pathlib.Path(which).exists():
    return []
  return [f"{key}={which!r}: not 'parent', 'child' or an existing checkpoint / HF / GGUF path"]


def validate(config) -> list[str]:
  """Every problem with the config that can be seen before any stage runs, one line each."""
  errors = []
  for key, allowed in _ENUMS.items():
    if _section(config, key) not in allowed:
      errors.append(f"{key}={_section(config, key)!r}: must be " + " or ".join(map(repr, allowed)))
  for key in _POSITIVE_INTS:
    v = _section(config, key)
    if not _is_int(v) or v <= 0:
      errors.append(f"{key}={v!r}: must be a positive integer")
  for key, ok, what in [(k, lambda v: v >= 0, "non-negative") for k in _NON_NEGATIVE] + \
                       [(k, lambda v: v > 0, "positive") for k in _POSITIVE]:
    v = _section(config, key)
    if not _is_num(v) or not ok(v):
      errors.append(f"{key}={v!r}: must be a {what} number")
  errors += _list_problems(config) + _path_problems(config) + _mesh_problems(config.mesh)
  if _is_int(config.bld.warmup_steps) and _is_int(config.bld.steps) and config.bld.warmup_steps > config.bld.steps:
    errors.append(f"bld.warmup_steps={config.bld.warmup_steps}: more than bld.steps={config.bld.steps}")
  d = config.distributed
  if d.enabled and bool(d.coordinator_address) != (d.num_processes > 0):
    errors.append("distributed: give coordinator_address and num_processes together (or neither: the "
                  "cluster environment supplies both)")
  if not _is_int(config.lm_eval.limit) or config.lm_eval.limit < 0:
    errors.append(f"lm_eval.limit={config.lm_eval.limit!r}: must be a non-negative integer (0 = every document)")
  u = config.upcycle
  if _is_int(u.num_experts) and _is_int(u.top_k) and u.num_experts and not u.top_k < u.num_experts:
    errors.append(f"upcycle.top_k={u.top_k}: must be below upcycle.num_experts={u.num_experts} (sparse routing)")
  if _is_int(u.num_experts) and _is_int(config.library.ep_size) and u.num_experts % max(config.library.ep_size, 1):
    errors.append(f"library.ep_size={config.library.ep_size}: does not divide upcycle.num_experts={u.num_experts}")
  if not 0 < config.generate.top_p <= 1:
    errors.append(f"generate.top_p={config.generate.top_p!r}: must be in (0, 1]")
  errors += _distill_problems(config)
  if not errors and config.mip.solver not in _solvers():
    errors.append(f"mip.solver={config.mip.solver!r}: not an installed CVXPY MILP solver; installed: "
                  f"{', '.join(_solvers())}")
  return errors


def _distill_problems(config) -> list[str]:
  g, d, errors = config.gkd, config.distill_data, []
  if _is_num(g.kl_weight) and _is_num(g.lm_weight) and _is_num(g.hidden_weight) and not (
      g.kl_weight or g.lm_weight or g.hidden_weight):
    errors.append("gkd: kl_weight, lm_weight and hidden_weight are all 0; set gkd.kl_weight=1.0")
  if not (_is_int(g.data_parallel) and (g.data_parallel == -1 or g.data_parallel > 0)):
    errors.append(f"gkd.data_parallel={g.data_parallel!r}: a positive device count or -1 (all that divide the batch)")
  elif g.data_parallel > 0 and _is_int(g.batch_size) and g.batch_size % g.data_parallel:
    errors.append(f"gkd.batch_size={g.batch_size}: not a multiple of gkd.data_parallel={g.data_parallel}")
  if not (_is_num(d.top_p) and 0 < d.top_p <= 1):
    errors.append(f"distill_data.top_p={d.top_p!r}: must be in (0, 1]")
  if not (_is_num(d.chat_fraction) and 0 <= d.chat_fraction <= 1):
    errors.append(f"distill_data.chat_fraction={d.chat_fraction!r}: must be in [0, 1]")
  return errors


def _list_problems(config) -> list[str]:
  errors = []
  for key, ok, what in (("library.ffn_fractions", lambda v: _is_num(v) and 0 < v <= 1, "in (0, 1]"),
                        ("library.kv_heads", lambda v: _is_int(v) and v > 0, "positive integers"),
                        ("library.windows", lambda v: _is_int(v) and v > 0, "positive integers"),
                        ("library.expert_fractions", lambda v: _is_num(v) and 0 < v <= 1, "in (0, 1]"),
                        ("library.moe_top_ks", lambda v: _is_int(v) and v > 0, "positive integers"),
                        ("mip.pareto_speedups", lambda v: _is_num(v) and v > 0, "positive numbers"),
                        ("lm_eval.tasks", lambda v: v in _EVAL_TASKS, "among " + ", ".join(_EVAL_TASKS))):
    bad = [v for v in _section(config, key) if not ok(v)]
    if bad:
      errors.append(f"{key}: {bad} are not {what}")
  return errors


def _path_problems(config) -> list[str]:
  errors = []
  if config.parent.path and not pathlib.Path(config.parent.path).exists():
    errors.append(f"parent.path={config.parent.path!r}: does not exist (an HF directory, a .gguf or a "
                  "checkpoint; '' = the embedded SmolLM2)")
  if config.costs.table and not pathlib.Path(config.costs.table).is_file():
    errors.append(f"costs.table={config.costs.table!r}: no such file ('' = measure here)")
  if config.data.name == "local_text":
    local = pathlib.Path(config.data.local_dir)
    if not local.is_dir() or not any(local.glob("*.txt")):
      errors.append(f"data.local_dir={config.data.local_dir!r}: no *.txt files there (run from the repo root, "
                    "or give the absolute path of data/wikitext2)")
  if config.lm_eval.eval_dir and not pathlib.Path(config.lm_eval.eval_dir).is_dir():
    errors.append(f"lm_eval.eval_dir={config.lm_eval.eval_dir!r}: not a directory ('' = the repository's data/eval)")
  errors += _checkpoint_problem("generate.checkpoint", config.generate.checkpoint)
  errors += _checkpoint_problem("export.checkpoint", config.export.checkpoint)
  errors += _checkpoint_problem("fusion.checkpoint", config.fusion.checkpoint)
  if config.export.out_dir and config.parent.path:
    out, src = pathlib.Path(config.export.out_dir).resolve(), pathlib.Path(config.parent.path).resolve()
    if out == src or src.is_relative_to(out) or out.is_relative_to(src):
      errors.append(f"export.out_dir={config.export.out_dir!r}: is (or holds, or lies inside) the parent "
                    f"{config.parent.path!r}; pick a directory of its own")
  return errors


def _mesh_problems(mesh) -> list[str]:
  try:
    axes = [(str(name), int(size)) for name, size in mesh]
  except (TypeError, ValueError):
    return [f"mesh={mesh!r}: must be ((axis, size), ...) with axes {_MESH_AXES}"]
  errors = [f"mesh: unknown axis {name!r} (axes: {', '.join(_MESH_AXES)})" for name, _ in axes
            if name not in _MESH_AXES]
  errors += [f"mesh: axis {name!r} has size {size}; use a positive size or -1 (the remaining devices)"
             for name, size in axes if size == 0 or size < -1]
  if sum(size == -1 for _, size in axes) > 1:
    errors.append("mesh: at most one axis may take the remaining devices (-1)")
  return errors


def _solvers() -> list[str]:
  import cvxpy
  return cvxpy.installed_solvers()


def validate_or_raise(config) -> None:
  errors = validate(config)
  if errors:
    raise UserError("config: " + "\nconfig: ".join(errors))


def distributed_kwargs(section) -> dict[str, Any]:
  """`jax.distributed.initialize` arguments: the ones set in the config; the rest from the cluster env."""
  kw = {"coordinator_address": section.coordinator_address or None,
        "num_processes": section.num_processes or None,
        "process_id": section.process_id if section.process_id >= 0 else None}
  return {k: v for k, v in kw.items() if v is not None}


def maybe_init_distributed(config) -> None:
  """Multi-host: the same command on every host; jax connects them before any stage touches a device."""
  if config.distributed.enabled and not _DIST["done"]:
    import jax
    jax.distributed.initialize(**distributed_kwargs(config.distributed))
    _DIST["done"] = True


_DIST = {"done": False}


def main_command(name: str, config, rerun_from: str | None = None) -> int:
  """Run one CLI command; user mistakes become one line per problem on stderr and exit code 2."""
  if name not in COMMANDS:
    print(f"error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
    return 2
  try:
    maybe_init_distributed(config)
    COMMANDS[name][1](config, **({"rerun_from": rerun_from} if rerun_from else {}))
  except (UserError, ArtifactError) as e:
    msg = _corrupt_message(e, Paths.from_config(config)) if isinstance(e, ArtifactError) else str(e)
    print("\n".join(f"error: {line}" if line.startswith("config:") else line
                    for line in f"error: {msg}".replace("error: config:", "config:", 1).splitlines()),
          file=sys.stderr)
    return 2
  return 0
