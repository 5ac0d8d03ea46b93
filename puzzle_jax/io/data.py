"""Text data: a TFDS builder over local text, packed LM batches (grain), eval tasks.

Pipeline (no TensorFlow needed; TFDS writes and reads array_record):

  TFDS source (random access) → documents shuffled by `seed` (grain) → encoded and
  concatenated into one flat int32 token stream (bos before / eos after each
  document) → non-overlapping windows of `seq_len` tokens (the tail shorter than
  `seq_len` is dropped) → grain `MapDataset`, windows reshuffled every epoch → batches.

Why a pretokenized stream and not grain's iterator packing (`ConcatThenSplitIterDataset`):
  * window i is a pure function of (seed, i), so the iterator state is one integer
    (`{"next_index": n}`, JSON) and resume is exact without replaying or storing a
    packing buffer;
  * windows are shuffled globally, so a batch does not hold B consecutive chunks of
    the same article (iterator packing emits them back to back; breaking that up
    needs a shuffle buffer with a large state);
  * the corpora Puzzle needs for BLD distillation / scoring / calibration are small
    (WikiText-2 valid ≈ 0.25M tokens); for a large TFDS dataset `max_tokens` caps
    the pretokenization (documents are read in the shuffled order until the cap).
  The cost is tokenizing up front, once per process.

Documents of the local corpus are whole articles by default (`doc_unit="article"`):
WikiText has one paragraph or heading per line, and an article runs from its
top-level ` = Title = ` line to the next one. Articles keep paragraphs and section
headings in order, so a window is coherent text and bos/eos mark real document
boundaries (60 in WikiText-2 valid, against 2,461 with one document per line, where
the document shuffle would put unrelated paragraphs next to each other).
`doc_unit="line"` (config `local_text/wikitext2_lines`) gives one document per line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

REPO = pathlib.Path(__file__).resolve().parents[2]
WIKITEXT2_DIR = REPO / "data" / "wikitext2"
EVAL_DIR = REPO / "data" / "eval"
LOCAL_TEXT = "local_text"  # TFDS name of the builder below (from the class name)
_SPLIT_NAMES = {"valid": "validation"}  # file stem -> TFDS split name; others as is
_ARTICLE_TITLE = re.compile(r"^ ?= [^=].* = ?$")  # ` = Title = `, not ` = = Section = = `

# ----------------------------------------------------------------------------- TFDS


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """A folder of `{split}.txt` files (`valid.txt` becomes split `validation`)."""
  local_dir: str = str(WIKITEXT2_DIR)
  # "article": WikiText ` = Title = ` blocks (a file without titles is one document);
  # "line": one document per non-empty line.
  doc_unit: str = "article"


def split_documents(text: str, doc_unit: str) -> list[str]:
  """Non-empty stripped lines, grouped into articles (joined by newlines) or not."""
  if doc_unit not in ("article", "line"):
    raise ValueError(f"doc_unit must be 'article' or 'line', got {doc_unit!r}")
  raw = text.splitlines()
  lines = [l.strip() for l in raw if l.strip()]
  if doc_unit == "line":
    return lines
  docs: list[list[str]] = [[]]
  for i, line in enumerate(raw):
    if _is_title(raw, i):
      docs.append([])
    if line.strip():
      docs[-1].append(line.strip())
  return ["\n".join(d) for d in docs if d]


def _is_title(lines: list[str], i: int) -> bool:
  # A title stands between blank lines; math in the text (" = 1 <unk> ... = ") does not.
  blank = lambda j: j < 0 or j >= len(lines) or not lines[j].strip()
  return bool(_ARTICLE_TITLE.match(lines[i])) and blank(i - 1) and blank(i + 1)


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Plain-text corpus from local files; one example `{"text": str}` per document."""

  VERSION = tfds.core.Version("1.0.0")
  # TFDS finds this through `importlib_resources`, which etils[epath] wants but a bare
  # install may lack; the answer is this file (no checksums.tsv beside it: no downloads).
  code_path = pathlib.Path(__file__)
  BUILDER_CONFIGS = [
      LocalTextConfig(name="wikitext2", description="WikiText-2 (data/wikitext2), an article each"),
      LocalTextConfig(name="wikitext2_lines", doc_unit="line",
                      description="WikiText-2, a line each"),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        homepage="https://arxiv.org/abs/1609.07843",  # WikiText (Merity et al. 2016)
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # local files only
    paths = sorted(pathlib.Path(self.builder_config.local_dir).glob("*.txt"))
    if not paths:
      raise FileNotFoundError(f"no *.txt in {self.builder_config.local_dir}")
    return {_SPLIT_NAMES.get(p.stem, p.stem): self._generate_examples(p) for p in paths}

  def _generate_examples(self, path: pathlib.Path) -> Iterator[tuple[int, dict[str, str]]]:
    docs = split_documents(path.read_text(encoding="utf-8"), self.builder_config.doc_unit)
    for i, doc in enumerate(docs):
      yield i, {"text": doc}


def local_text_config(local_dir: str | os.PathLike, doc_unit: str = "article") -> LocalTextConfig:
  """A config for any folder; its name hashes the files, so edited files rebuild."""
  paths = sorted(pathlib.Path(local_dir).glob("*.txt"))
  digest = hashlib.sha256()
  for p in paths:
    digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
  stem = re.sub(r"[^A-Za-z0-9_]", "_", pathlib.Path(local_dir).resolve().name)
  return LocalTextConfig(name=f"{stem}_{doc_unit}_{digest.hexdigest()[:10]}",
                         local_dir=str(local_dir), doc_unit=doc_unit)


def build_local_text(data_dir: str | os.PathLike, local_dir: str | os.PathLike | None = None,
                     doc_unit: str = "article") -> LocalText:
  """Builds (once; later calls reuse the files) the local corpus into `data_dir`."""
  if local_dir is None:
    config: str | LocalTextConfig = "wikitext2" if doc_unit == "article" else "wikitext2_lines"
  else:
    config = local_text_config(local_dir, doc_unit)
  builder = LocalText(data_dir=os.fspath(data_dir), config=config, file_format="array_record")
  builder.download_and_prepare()  # a no-op when the version is already built
  return builder


def text_source(name: str, split: str, data_dir: str | os.PathLike,
                local_dir: str | os.PathLike | None = None,
                doc_unit: str = "article") -> Sequence[dict[str, Any]]:
  """Random-access examples: `local_text` builds the local corpus, others go through TFDS.

  `local_dir` / `doc_unit` apply to `local_text` only. Articles are found by WikiText's
  ` = Title = ` lines: a folder of other text wants `doc_unit="line"`.
  """
  if name == LOCAL_TEXT:
    return build_local_text(data_dir, local_dir, doc_unit).as_data_source(split=split)
  return tfds.data_source(name, split=split, data_dir=os.fspath(data_dir),
                          builder_kwargs={"file_format": "array_record"})


# -------------------------------------------------------------------------- packing


def _text(example: dict[str, Any], text_key: str) -> str:
  value = example[text_key]
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def token_stream(source: Sequence[Any], encode: Callable[[str], list[int]], *, seed: int,
                 bos_id: int | None, eos_id: int | None, text_key: str = "text",
                 max_tokens: int | None = None) -> np.ndarray:
  """All documents in a seeded grain shuffle, encoded and concatenated: int32[T]."""
  docs = grain.MapDataset.source(source).shuffle(seed=seed)
  pieces, total = [], 0
  for i in range(len(docs)):
    text = _text(docs[i], text_key)
    if not text:
      continue  # an empty document would only add a bos/eos pair
    ids = [bos_id] * (bos_id is not None) + list(encode(text)) + [eos_id] * (eos_id is not None)
    pieces.append(np.asarray(ids, np.int32))
    total += len(ids)
    if max_tokens is not None and total >= max_tokens:
      break
  stream = np.concatenate(pieces) if pieces else np.zeros([0], np.int32)
  return stream[:max_tokens]


def _windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
  n = len(stream) // seq_len
  if n == 0:
    raise ValueError(f"corpus has {len(stream)} tokens, fewer than seq_len={seq_len}")
  return stream[: n * seq_len].reshape(n, seq_len)


def packed_dataset(source: Sequence[Any], encode: Callable[[str], list[int]], seq_len: int, *,
                   seed: int, bos_id: int | None, eos_id: int | None, text_key: str = "text",
                   max_tokens: int | None = None, shuffle_windows: bool = True) -> grain.MapDataset:
  """Fixed-length int32[seq_len] windows of the packed stream, in a seeded order."""
  windows_NxL = _windows(token_stream(source, encode, seed=seed, bos_id=bos_id, eos_id=eos_id,
                                      text_key=text_key, max_tokens=max_tokens), seq_len)
  ds = grain.MapDataset.source(list(windows_NxL))
  # A seed distinct from the document shuffle's: equal lengths would give equal permutations.
  return ds.shuffle(seed=(seed + 1) % 2**32) if shuffle_windows else ds


def batch_iterator(dataset: grain.MapDataset, batch_size: int, *,
                   num_epochs: int | None = None) -> grain.DatasetIterator:
  """Iterator of `{"tokens": int32[B, L]}`; epochs reshuffle; partial batches dropped.

  Its `get_state()` / `set_state()` (or `iterator_state` / `restore_iterator`) resume
  exactly; the state is `{"next_index": n}`.
  """
  ds = dataset.repeat(num_epochs)  # after the shuffle: each epoch gets its own order
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=lambda xs: {"tokens": np.stack(xs)})
  # Indexing a numpy array is cheap: a small prefetch is plenty and keeps memory flat.
  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
  return iter(ds.to_iter_dataset(read))


def iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
  """The iterator's position as plain JSON types (to store next to a checkpoint)."""
  return json.loads(json.dumps(it.get_state(), default=int))


def restore_iterator(it: grain.DatasetIterator, state: dict[str, Any]) -> grain.DatasetIterator:
  """Moves a fresh iterator over the same dataset to `state`; returns it."""
  it.set_state(state)
  return it


def doc_separator(tok) -> int | None:
  """Plain-text documents are separated by <|endoftext|> where the vocab has it (SmolLM2 does)."""
  sep = tok.backend.token_to_id("<|endoftext|>")
  return sep if sep is not None else tok.eos_id


class TokenBatches:
  """int32[B, L] training batches of packed text with a JSON position (BLD's BatchIterator protocol)."""

  def __init__(self, source: Sequence[Any], tok, batch_size: int, seq_len: int, *, seed: int,
               text_key: str = "text"):
    ds = packed_dataset(source, tok.encode, seq_len, seed=seed, bos_id=None, eos_id=doc_separator(tok),
                        text_key=text_key)
    self._it = batch_iterator(ds, batch_size)

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    return np.asarray(next(self._it)["tokens"])

  def get_state(self) -> dict:
    return iterator_state(self._it)

  def set_state(self, state: dict) -> None:
    self._it = restore_iterator(self._it, state)


def token_array(source: Sequence[Any], encode: Callable[[str], list[int]], seq_len: int,
                num_seqs: int | None, *, bos_id: int | None, eos_id: int | None,
                seed: int = 0, text_key: str = "text") -> np.ndarray:
  """A fixed int32[num_seqs, seq_len] set (calibration / scoring / perplexity).

  The first `num_seqs` windows of the stream, documents in the seeded order (so a
  random sample of whole documents); `num_seqs=None` takes every full window.
  """
  max_tokens = None if num_seqs is None else num_seqs * seq_len
  windows = _windows(token_stream(source, encode, seed=seed, bos_id=bos_id, eos_id=eos_id,
                                  text_key=text_key, max_tokens=max_tokens), seq_len)
  if num_seqs is not None and len(windows) < num_seqs:
    raise ValueError(f"corpus gives {len(windows)} windows of {seq_len}, asked for {num_seqs}")
  return windows


# ---------------------------------------------------------------------- eval tasks

EVAL_FILES = {
    "hellaswag": "hellaswag_val.jsonl",
    "arc_easy": "arc_easy_test.jsonl",
    "arc_challenge": "arc_challenge_test.jsonl",
    "piqa": "piqa_valid.jsonl",
    "boolq": "boolq_validation.jsonl",
    "lambada": "lambada_test.jsonl",
}


def _hellaswag_clean(text: str) -> str:
  # As lm-evaluation-harness: WikiHow contexts carry "[title]"/"[header]" markers.
  text = text.strip().replace(" [title]", ". ")
  return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(r: dict) -> dict:
  ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
  return {"context": _hellaswag_clean(r["activity_label"] + ": " + ctx),
          "choices": [_hellaswag_clean(e) for e in r["endings"]], "label": int(r["label"])}


def _arc(r: dict) -> dict:
  return {"context": f"Question: {r['question']}\nAnswer:", "choices": list(r["choices"]),
          "label": int(r["gold"])}


def _piqa(r: dict) -> dict:
  return {"context": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]],
          "label": int(r["label"])}


def _boolq(r: dict) -> dict:
  return {"context": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
          "choices": ["no", "yes"], "label": int(bool(r["answer"]))}


def _lambada(r: dict) -> dict:
  context, target = r["text"].rsplit(" ", 1)
  return {"context": context, "target": target}


_NORMALIZE = {"hellaswag": _hellaswag, "arc_easy": _arc, "arc_challenge": _arc,
              "piqa": _piqa, "boolq": _boolq, "lambada": _lambada}


def load_eval_task(name: str, eval_dir: str | os.PathLike = EVAL_DIR,
                   limit: int | None = None) -> list[dict]:
  """The first `limit` items of a task, normalized.

  Multiple choice (all but lambada): `{"context", "choices", "label"}`, the context
  in lm-evaluation-harness's prompt format; each choice is a continuation to score
  after a single space. LAMBADA: `{"context", "target"}`, the text without its last
  word and that word (greedy last-word accuracy / target perplexity).
  """
  if name not in EVAL_FILES:
    raise KeyError(f"unknown eval task {name!r}; known: {sorted(EVAL_FILES)}")
  items = []
  with open(pathlib.Path(eval_dir) / EVAL_FILES[name], encoding="utf-8") as f:
    for line in f:
      if limit is not None and len(items) >= limit:
        break
      if line.strip():
        items.append(_NORMALIZE[name](json.loads(line)))
  return items
