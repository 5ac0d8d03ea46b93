"""Teacher corpus: records = prompt + the teacher's own continuation, chat prompts in the template,
kill-and-resume gives the same shards, and the grain pipeline packs the shards."""

import dataclasses

import jax
import numpy as np
import pytest

from puzzle_jax.core import model
from puzzle_jax.core.arch import uniform_arch
from puzzle_jax.distill import corpus
from puzzle_jax.io import data


@pytest.fixture(scope="module")
def setup(smollm2_gguf, wikitext_lines):
  from puzzle_jax.io.tokenizer import load_tokenizer
  tok = load_tokenizer(smollm2_gguf)
  arch = uniform_arch(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64)
  params = model.init_params(jax.random.PRNGKey(0), arch)
  stream = np.asarray([t for l in wikitext_lines[:20] for t in tok.encode(l)], np.int32)
  return arch, params, tok, stream


CFG = corpus.CorpusConfig(num_tokens=70, batch_size=4, prompt_len=16, max_new_tokens=8, temperature=1.0,
                          top_p=0.9, chat_fraction=0.5, seed=3)


def test_records_are_prompts_plus_greedy_continuations(setup):
  arch, params, tok, stream = setup
  cfg = dataclasses.replace(CFG, temperature=0.0)
  rows = corpus.prompts(stream, 0, cfg, tok)
  records, generated = corpus.make_shard(arch, params, stream, 0, cfg, tok, tok.stop_ids)
  chat = [r for r in rows if tok.decode(r).startswith("<|im_start|>")]
  assert 0 < len(chat) < len(rows) and all(corpus.CHAT_INSTRUCTION.strip() in tok.decode(r) for r in chat)
  assert generated == sum(len(rec) - len(r) for rec, r in zip(records, rows))
  for r, rec in zip(rows, records):
    assert list(rec[:len(r)]) == r
  plain = [i for i, r in enumerate(rows) if r not in chat]
  for i in (rows.index(chat[0]), plain[0]):  # one of each (each length compiles once)
    alone = np.asarray(model.generate(arch, params, np.asarray([rows[i]], np.int32), max_new_tokens=8))[0]
    np.testing.assert_array_equal(records[i][len(rows[i]):], corpus.cut_at_stop(alone, tok.stop_ids))


class _Killed(Exception):
  pass


def test_resume_equals_uninterrupted_and_grain_reads_it(setup, tmp_path, monkeypatch):
  arch, params, tok, stream = setup
  ref = corpus.generate(arch, params, stream, CFG, tmp_path / "ref", tok, progress=False)
  assert ref["shards"] >= 3 and ref["generated_tokens"] >= CFG.num_tokens
  write = corpus.write_shard

  def dies_at_2(path, records):
    if path.name == corpus.shard_path(path.parent, 2).name:
      raise _Killed()
    write(path, records)

  monkeypatch.setattr(corpus, "write_shard", dies_at_2)
  with pytest.raises(_Killed):
    corpus.generate(arch, params, stream, CFG, tmp_path / "run", tok, progress=False)
  assert corpus.existing(tmp_path / "run")[0] == 2 and not (tmp_path / "run" / "corpus.json").exists()
  monkeypatch.setattr(corpus, "write_shard", write)
  got = corpus.generate(arch, params, stream, CFG, tmp_path / "run", tok, progress=False)
  assert got["shards"] == ref["shards"] and got["generated_tokens"] == ref["generated_tokens"]
  for i in range(ref["shards"]):
    a, b = (corpus.shard_path(tmp_path / d, i).read_bytes() for d in ("ref", "run"))
    assert a == b
  # The grain pipeline packs the shards like text: records in memory give the same stream.
  src = corpus.source(tmp_path / "run")
  mem = [{"tokens": r} for i in range(ref["shards"])
         for r in corpus.make_shard(arch, params, stream, i, CFG, tok, tok.stop_ids)[0]]
  assert len(src) == len(mem)
  kw = dict(seed=0, bos_id=None, eos_id=tok.eos_id, text_key="tokens")
  np.testing.assert_array_equal(data.token_stream(src, tok.encode, **kw), data.token_stream(mem, tok.encode, **kw))
  batch = next(data.batch_iterator(data.packed_dataset(src, tok.encode, 16, **kw), 2))["tokens"]
  assert batch.shape == (2, 16) and batch.dtype == np.int32


def test_chat_without_template_is_a_clear_error(setup):
  _, _, _, stream = setup
  with pytest.raises(ValueError, match="chat_fraction=0"):
    corpus.prompts(stream, 0, CFG, tok=None)
  with pytest.raises(FileNotFoundError, match="distill-data"):
    corpus.source("/nonexistent")
