"""Data: TFDS builder over local text, packing, exact resume, eval task loaders.

A byte-level encoder stands in for the tokenizer, so these tests need no model files.
"""

import json
import pathlib

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from puzzle_jax.io import data

BOS, EOS = 256, 257


def encode(text: str) -> list[int]:
  return list(text.encode("utf-8"))


def nonempty_lines(path: pathlib.Path) -> list[str]:
  return [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def as_str(x) -> str:
  return x.decode() if isinstance(x, bytes) else x


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def valid_src(tfds_dir):
  return data.text_source(data.LOCAL_TEXT, "validation", tfds_dir)


def test_builder_builds_once(tmp_path, monkeypatch):
  builder = data.build_local_text(tmp_path, doc_unit="line")
  assert set(builder.info.splits) == {"validation", "test"}
  for split, name in [("validation", "valid"), ("test", "test")]:
    lines = nonempty_lines(data.WIKITEXT2_DIR / f"{name}.txt")
    src = builder.as_data_source(split=split)
    assert len(src) == len(lines)
    assert sorted(as_str(src[i]["text"]) for i in range(len(src))) == sorted(lines)

  def fail(*args, **kwargs):
    raise AssertionError("rebuilt")
  monkeypatch.setattr(data.LocalText, "_download_and_prepare", fail)
  again = data.build_local_text(tmp_path, doc_unit="line")  # reuses the files
  test_lines = nonempty_lines(data.WIKITEXT2_DIR / "test.txt")
  assert len(again.as_data_source(split="test")) == len(test_lines)


def test_articles_partition_the_lines(valid_src):
  path = data.WIKITEXT2_DIR / "valid.txt"
  raw = path.read_text(encoding="utf-8").splitlines()
  titles = [i for i, l in enumerate(raw) if l.startswith(" = ") and not l.startswith(" = = ")
            and not raw[i - 1].strip() and not raw[i + 1].strip()]
  assert len(valid_src) == len(titles) == 60
  docs = [as_str(valid_src[i]["text"]) for i in range(len(valid_src))]
  assert all(d.startswith("= ") for d in docs)
  assert sorted(l for d in docs for l in d.split("\n")) == sorted(nonempty_lines(path))


def test_custom_folder_config(tmp_path):
  corpus, out = tmp_path / "corpus", tmp_path / "tfds"
  corpus.mkdir()
  (corpus / "train.txt").write_text(" \n = A = \n \n a b \n = = S = = \n c\n \n = B = \n \n d\n")
  (corpus / "valid.txt").write_text("g h\n")
  lines = data.text_source(data.LOCAL_TEXT, "train", out, corpus, doc_unit="line")
  assert sorted(as_str(x["text"]) for x in lines) == [
      "= = S = =", "= A =", "= B =", "a b", "c", "d"]
  articles = data.text_source(data.LOCAL_TEXT, "train", out, corpus)
  assert sorted(as_str(x["text"]) for x in articles) == ["= A =\na b\n= = S = =\nc", "= B =\nd"]
  assert len(data.text_source(data.LOCAL_TEXT, "validation", out, corpus)) == 1
  name = data.local_text_config(corpus).name
  (corpus / "valid.txt").write_text("g h\ni\n")  # edited files get a new config (a rebuild)
  assert data.local_text_config(corpus).name != name
  assert len(data.text_source(data.LOCAL_TEXT, "validation", out, corpus, doc_unit="line")) == 2


def reference_stream(src, seed: int) -> np.ndarray:
  """Direct reimplementation: documents in grain's seeded order, bos + bytes + eos."""
  docs = grain.MapDataset.source(src).shuffle(seed=seed)
  return np.array([t for d in docs for t in [BOS, *encode(as_str(d["text"])), EOS]], np.int32)


def test_packing_matches_stream(valid_src):
  seq_len = 96
  stream = reference_stream(valid_src, seed=3)
  ordered = data.packed_dataset(valid_src, encode, seq_len, seed=3, bos_id=BOS, eos_id=EOS,
                                shuffle_windows=False)
  windows = np.stack([ordered[i] for i in range(len(ordered))])
  assert windows.shape == (len(stream) // seq_len, seq_len) and windows.dtype == np.int32
  np.testing.assert_array_equal(windows.reshape(-1), stream[: windows.size])

  ds = data.packed_dataset(valid_src, encode, seq_len, seed=3, bos_id=BOS, eos_id=EOS)
  shuffled = np.stack([ds[i] for i in range(len(ds))])
  starts = {w.tobytes(): i for i, w in enumerate(windows)}
  order = [starts[w.tobytes()] for w in shuffled]  # every window is a window of the stream
  assert sorted(order) == list(range(len(windows))) and order != sorted(order)


def test_packing_without_bos_eos():
  src = [{"text": "abc"}, {"text": ""}, {"text": "defgh"}]
  ds = data.packed_dataset(src, encode, 3, seed=0, bos_id=None, eos_id=None, shuffle_windows=False)
  assert len(ds) == 2
  # The empty document is skipped; 8 bytes make 2 windows and the tail is dropped.
  assert [bytes(ds[i].tolist()) for i in range(len(ds))] in ([b"abc", b"def"], [b"def", b"gha"])


def take(it, n: int) -> list[np.ndarray]:
  return [next(it)["tokens"] for _ in range(n)]


def test_seeded_batches(valid_src):
  make = lambda seed: data.batch_iterator(
      data.packed_dataset(valid_src, encode, 64, seed=seed, bos_id=BOS, eos_id=EOS), 4)
  a, b, c = take(make(0), 5), take(make(0), 5), take(make(1), 5)
  assert a[0].shape == (4, 64) and a[0].dtype == np.int32
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_epochs_reshuffle():
  src = [{"text": f"doc {i:04d}"} for i in range(10)]  # 8 + 2 tokens: 10 windows of 10
  ds = data.packed_dataset(src, encode, 10, seed=0, bos_id=BOS, eos_id=EOS)
  batches = take(data.batch_iterator(ds, 5, num_epochs=2), 4)
  first, second = np.concatenate(batches[:2]), np.concatenate(batches[2:])
  assert sorted(map(bytes, first)) == sorted(map(bytes, second))  # same windows
  assert not np.array_equal(first, second)  # in another order


@pytest.mark.parametrize("n", [3, 9])  # 9 crosses an epoch boundary (7 batches an epoch)
def test_resume_is_exact(n):
  src = [{"text": f"document number {i} " * (i % 4 + 1)} for i in range(40)]
  make = lambda: data.packed_dataset(src, encode, 32, seed=5, bos_id=BOS, eos_id=EOS)
  assert len(make()) // 8 == 7
  it = data.batch_iterator(make(), 8)
  take(it, n)
  state = json.loads(json.dumps(data.iterator_state(it)))  # stored as JSON beside a checkpoint
  expected = take(it, 4)
  resumed = data.restore_iterator(data.batch_iterator(make(), 8), state)
  for x, y in zip(expected, take(resumed, 4)):
    np.testing.assert_array_equal(x, y)


def test_mock_data_through_text_source(tmp_path):
  # tfds.testing.mock_data works without TensorFlow for data sources: the offline
  # stand-in for "any TFDS dataset" named in a config.
  with tfds.testing.mock_data(num_examples=7):
    src = data.text_source("local_text/wikitext2_lines", "validation", tmp_path)
    assert len(src) == 7
    ds = data.packed_dataset(src, encode, 8, seed=0, bos_id=BOS, eos_id=EOS)
    assert next(data.batch_iterator(ds, 2))["tokens"].shape == (2, 8)
  assert not (tmp_path / "local_text").exists()  # nothing was built


def test_tfds_data_source_by_name(tmp_path):
  # The generic path (any registered TFDS name) builds and reads our builder by name.
  src = data.text_source("local_text/wikitext2_lines", "test", tmp_path)
  assert len(src) == len(nonempty_lines(data.WIKITEXT2_DIR / "test.txt"))
  assert (tmp_path / "local_text" / "wikitext2_lines" / "1.0.0").is_dir()


def test_token_array(valid_src):
  a = data.token_array(valid_src, encode, 128, 16, bos_id=BOS, eos_id=EOS, seed=0)
  b = data.token_array(valid_src, encode, 128, 16, bos_id=BOS, eos_id=EOS, seed=0)
  c = data.token_array(valid_src, encode, 128, 16, bos_id=BOS, eos_id=EOS, seed=1)
  assert a.shape == (16, 128) and a.dtype == np.int32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  np.testing.assert_array_equal(a.reshape(-1), reference_stream(valid_src, 0)[: a.size])
  full = data.token_array(valid_src, encode, 128, None, bos_id=BOS, eos_id=EOS)
  assert len(full) == len(reference_stream(valid_src, 0)) // 128
  with pytest.raises(ValueError):
    data.token_array([{"text": "tiny"}], encode, 128, 1, bos_id=BOS, eos_id=EOS)


@pytest.mark.parametrize("name", sorted(data.EVAL_FILES))
def test_eval_tasks(name):
  items = data.load_eval_task(name, data.EVAL_DIR)
  assert len(items) == 200  # the shipped fixed subset
  assert len(data.load_eval_task(name, data.EVAL_DIR, limit=5)) == 5
  for item in items:
    assert isinstance(item["context"], str) and item["context"]
    if name == "lambada":
      assert item["target"] and " " not in item["target"]
      continue
    choices, label = item["choices"], item["label"]
    assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
    assert 0 <= label < len(choices)
