"""gpt_oss_puzzle export: a heterogeneous child (pruned experts, a window, FP8 KV) exported by us,
loaded by transformers with trust_remote_code, matches JAX; MXFP4 repacking loads back; EP checks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puzzle_jax import io
from puzzle_jax.core import model
from puzzle_jax.core.arch import ArchError
from puzzle_jax.export import gpt_oss_puzzle
from puzzle_jax.moe import prune
from puzzle_jax.search import kv_fp8
from tests.gpt_oss_fixtures import hf_gpt_oss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def child(tmp_path_factory):
  d = tmp_path_factory.mktemp("parent")
  hf_gpt_oss().save_pretrained(d)
  arch, params = io.load_pretrained(d, dtype=jnp.float32)
  calib = np.random.RandomState(0).randint(0, 97, (2, 16))
  stats = prune.layer_stats(arch, params, [calib])
  arch, params = prune.prune_layer(arch, params, 1, stats[1]["contribution"], 4)
  arch, params = prune.prune_layer(arch, params, 2, stats[2]["contribution"], 2, top_k=1)
  arch = arch.replace_block(1, attn=arch.blocks[0].attn.__class__(**{**arch.blocks[1].attn.__dict__, "window": 8}))
  scales = kv_fp8.scales_from_amax(kv_fp8.kv_amax(arch, params, [calib]), 1.25)
  return kv_fp8.to_fp8(arch, params, scales, layers=[0])


def test_export_loads_in_transformers_and_matches_jax(child, tmp_path):
  import torch
  from transformers import AutoModelForCausalLM
  arch, params = child
  out = gpt_oss_puzzle.export(arch, params, tmp_path / "child", dtype="float32", ep_size=2)
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["model_type"] == "gpt_oss_puzzle" and cfg["architectures"] == ["GptOssPuzzleForCausalLM"]
  assert [b["num_local_experts"] for b in cfg["block_configs"]] == [8, 4, 2]
  assert [b["sliding_window"] for b in cfg["block_configs"]] == [4, 8, 4]
  assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["expert_parallel_size"] == 2
  hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                            attn_implementation="eager").eval()
  assert hf.config.get_gpt_oss_config_for_layer(1).num_local_experts == 4
  assert float(hf.model.layers[0].self_attn.k_scale.detach()) == pytest.approx(float(params["model"]["layers"][0]["self_attn"]["k_scale"]))
  tokens = np.random.RandomState(3).randint(0, 97, (2, 14))
  with torch.no_grad():
    ref = hf(torch.as_tensor(tokens)).logits.numpy()
  ours = np.asarray(prune.forward(arch, params, tokens))
  assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4
  back_arch, back = io.load_pretrained(out)
  assert back_arch == arch
  np.testing.assert_allclose(np.asarray(prune.forward(back_arch, back, tokens)), ours, rtol=1e-5, atol=1e-5)


def test_mxfp4_export_and_ep_check(child, tmp_path):
  arch, params = child
  out = gpt_oss_puzzle.export(arch, params, tmp_path / "q", mxfp4=True)
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["quantization_config"]["quant_method"] == "mxfp4"
  back_arch, back = io.load_pretrained(out, dtype=jnp.float32)
  w = back["model"]["layers"][1]["mlp"]["experts"]["gate_up_proj"]
  ref = params["model"]["layers"][1]["mlp"]["experts"]["gate_up_proj"]
  assert w.shape == ref.shape and 0 < float(jnp.max(jnp.abs(w - ref)) / jnp.max(jnp.abs(ref))) < 0.2
  with pytest.raises(ArchError, match="ep_size=4"):
    gpt_oss_puzzle.export(arch, params, tmp_path / "ep", ep_size=4)
