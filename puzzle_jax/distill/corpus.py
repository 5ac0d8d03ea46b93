"""Teacher-generated distillation text: the parent continues prompts drawn from the training text.

WikiText-2 has ~2M tokens; GKD wants more, and text the parent itself would write is what its
logits are most informative on. Shard i is one `model.generate` call (prefill + the whole decode
loop in one jit) over `batch_size` prompts, and a pure function of (seed, i): prompts are windows
of the training token stream at seeded offsets, a `chat_fraction` of them wrapped as a user turn
in the tokenizer's chat template ("Continue the text: ..."), sampled at `temperature`/`top_p`.
A record is the prompt's tokens followed by the continuation up to (not including) the first stop
token, stored as little-endian int32 bytes in `shard-NNNNN.array_record`; a shard is written under
a temporary name and renamed, so an interrupted run resumes at the first missing shard with the
same result as an uninterrupted one. `corpus.json` (written last) records what was made.

`source(dir)` reads the shards as `{"tokens": int32[n]}` examples, which `io.data.packed_dataset`
packs like any text source (it uses pretokenized examples as they are).

Axis legend: B prompts, P prompt slots (left-padded), T new tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Sequence

import jax
import numpy as np

from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch

Params = dict[str, Any]
FORMAT = "puzzle_jax.corpus/v1"
CHAT_INSTRUCTION = "Continue the text:\n\n"
PAD_MULTIPLE = 32  # prompt slots rounded up to this: chat prompts of any length compile a few times


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  num_tokens: int = 100_000
  batch_size: int = 64
  prompt_len: int = 32
  max_new_tokens: int = 128
  temperature: float = 1.0
  top_p: float = 0.95
  chat_fraction: float = 0.5
  dtype: str = "float32"
  seed: int = 0

  def __post_init__(self):
    if not 0.0 <= self.chat_fraction <= 1.0:
      raise ValueError(f"distill_data.chat_fraction must be in [0, 1], got {self.chat_fraction}")
    if self.num_tokens <= 0 or self.batch_size <= 0 or self.max_new_tokens <= 0 or self.prompt_len <= 0:
      raise ValueError("distill_data.num_tokens, batch_size, prompt_len and max_new_tokens must be > 0")


def shard_path(out_dir: pathlib.Path, i: int) -> pathlib.Path:
  return out_dir / f"shard-{i:05d}.array_record"


# ----------------------------------------------------------------------------- prompts
def prompts(stream: np.ndarray, i: int, cfg: CorpusConfig, tok=None) -> list[list[int]]:
  """Shard i's prompts: seeded windows of the token stream, some as chat turns."""
  if len(stream) <= cfg.prompt_len:
    raise ValueError(f"prompt text has {len(stream)} tokens; need more than prompt_len={cfg.prompt_len}")
  rng = np.random.default_rng([cfg.seed, i])
  starts = rng.integers(0, len(stream) - cfg.prompt_len, cfg.batch_size)
  chat = rng.random(cfg.batch_size) < cfg.chat_fraction
  if chat.any() and (tok is None or not tok.chat_template):
    raise ValueError("chat prompts need a tokenizer with a chat template; set distill_data.chat_fraction=0")
  out = []
  for s, c in zip(starts, chat):
    ids = [int(t) for t in stream[s:s + cfg.prompt_len]]
    if c:
      text = tok.apply_chat_template([{"role": "user", "content": CHAT_INSTRUCTION + tok.decode(ids)}])
      ids = tok.encode(text)
    out.append(ids)
  return out


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """[B, P] tokens and mask, left-padded to a multiple of PAD_MULTIPLE."""
  width = -(-max(len(r) for r in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
  tokens = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for b, r in enumerate(rows):
    tokens[b, width - len(r):], mask[b, width - len(r):] = r, True
  return tokens, mask


def cut_at_stop(new_T: np.ndarray, stop_ids: Sequence[int]) -> np.ndarray:
  hit = np.flatnonzero(np.isin(new_T, list(stop_ids))) if stop_ids else []
  return new_T[: hit[0]] if len(hit) else new_T


# ----------------------------------------------------------------------------- generation
def make_shard(arch: Arch, params: Params, stream: np.ndarray, i: int, cfg: CorpusConfig, tok=None,
               stop_ids: Sequence[int] = ()) -> tuple[list[np.ndarray], int]:
  """Shard i's records and how many tokens the teacher generated for it."""
  rows = prompts(stream, i, cfg, tok)
  tokens_BxP, mask_BxP = left_pad(rows)
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), i)
  new_BxT = np.asarray(model.generate(arch, params, tokens_BxP, mask_BxP, max_new_tokens=cfg.max_new_tokens,
                                      temperature=cfg.temperature, top_p=cfg.top_p,
                                      stop_tokens=tuple(stop_ids), key=key, dtype=jax.numpy.dtype(cfg.dtype)))
  records, generated = [], 0
  for r, new_T in zip(rows, new_BxT):
    cont = cut_at_stop(new_T, stop_ids)
    generated += len(cont)
    records.append(np.concatenate([np.asarray(r, np.int32), cont.astype(np.int32)]))
  return records, generated


def write_shard(path: pathlib.Path, records: Sequence[np.ndarray]) -> None:
  """Write under a temporary name, then rename: a shard on disk is always complete."""
  from array_record.python.array_record_module import ArrayRecordWriter
  tmp = path.with_name(path.name + ".tmp")
  writer = ArrayRecordWriter(str(tmp), "group_size:1")
  for r in records:
    writer.write(np.asarray(r, "<i4").tobytes())
  writer.close()
  os.replace(tmp, path)


def existing(out_dir: pathlib.Path) -> tuple[int, int]:
  """(complete shards 0..n-1 on disk, their generated-token count from the shard log)."""
  log = _read_log(out_dir)
  n = 0
  while shard_path(out_dir, n).exists() and n in log:
    n += 1
  return n, sum(log[j] for j in range(n))


def _read_log(out_dir: pathlib.Path) -> dict[int, int]:
  p = out_dir / "shards.jsonl"
  rows = [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []
  return {r["shard"]: r["generated"] for r in rows}


def generate(arch: Arch, params: Params, stream: np.ndarray, cfg: CorpusConfig, out_dir: pathlib.Path,
             tok=None, progress: bool = True) -> dict[str, Any]:
  """Write shards until `num_tokens` generated tokens; resumes at the first missing shard."""
  import time
  from tqdm.auto import tqdm
  out_dir.mkdir(parents=True, exist_ok=True)
  stop_ids = tok.stop_ids if tok is not None else ()
  i, total = existing(out_dir)
  bar = tqdm(total=cfg.num_tokens, initial=min(total, cfg.num_tokens), desc="distill-data", unit="tok",
             unit_scale=True, disable=not progress)
  t0, made = time.perf_counter(), 0
  while total < cfg.num_tokens:
    records, generated = make_shard(arch, params, stream, i, cfg, tok, stop_ids)
    write_shard(shard_path(out_dir, i), records)
    with (out_dir / "shards.jsonl").open("a") as f:  # after the rename: a logged shard exists
      f.write(json.dumps({"shard": i, "generated": generated, "records": len(records)}) + "\n")
    i, total, made = i + 1, total + generated, made + generated
    bar.update(min(generated, cfg.num_tokens - bar.n))
  bar.close()
  elapsed = time.perf_counter() - t0
  doc = {"format": FORMAT, "config": dataclasses.asdict(cfg), "shards": i, "generated_tokens": total,
         "tokens_per_s_this_call": made / elapsed if made else None}
  (out_dir / "corpus.json.tmp").write_text(json.dumps(doc, indent=1))
  os.replace(out_dir / "corpus.json.tmp", out_dir / "corpus.json")
  return doc


# ----------------------------------------------------------------------------- reading
class _Records:
  """Random-access `{"tokens": int32[n]}` over the shards (grain's ArrayRecordDataSource)."""

  def __init__(self, paths: Sequence[pathlib.Path]):
    import grain
    self._src = grain.sources.ArrayRecordDataSource([str(p) for p in paths])

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {"tokens": np.frombuffer(self._src[i], "<i4").astype(np.int32)}


def source(out_dir: str | os.PathLike) -> _Records:
  """The corpus as a random-access source for `io.data.packed_dataset(..., text_key="tokens")`."""
  out_dir = pathlib.Path(out_dir)
  n, _ = existing(out_dir)
  if n == 0:
    raise FileNotFoundError(f"no corpus shards in {out_dir}; run `python -m puzzle_jax distill-data "
                            "--config ...` first")
  return _Records([shard_path(out_dir, j) for j in range(n)])
