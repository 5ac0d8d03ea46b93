"""lm-evaluation-harness model `puzzle_jax`: any project checkpoint scored on the JAX path.

Request semantics follow lm-eval's own `HFLM` (models/huggingface.py) exactly, so numbers compare
with `--model hf` on the exported model: context/continuation split by `TemplateLM._encode_pair`,
empty contexts get `prefix_token_id` (BOS, else EOS), inputs left-truncated to `max_length + 1`
tokens, a continuation's log-likelihood is the sum of its tokens' log-softmax and `is_greedy` means
every continuation token is the argmax; rolling log-likelihoods use `get_rolling_token_windows`
with `context_len=1` and the same prefix token; `generate_until` left-pads, generates greedily
(or samples) and cuts the text at the first stop sequence.

Speed: requests are sorted by length and scored in fixed-size batches padded to power-of-two
lengths, so one jitted function compiles once per (length, continuation-length) bucket. Only the
continuation positions go through the LM head, so a batch never holds [B, L, vocab] logits.

Axis legend: B batch, L input tokens, C continuation tokens, D hidden, V vocab.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

try:
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.models import utils as model_utils
except ImportError as e:  # pragma: no cover - the message is the point
  raise ImportError("puzzle_jax.evals needs lm-evaluation-harness: pip install 'lm-eval>=0.4.8' "
                    "(or pip install -e '.[eval]')") from e

from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch
from puzzle_jax.io.tokenizer import Tokenizer, load_tokenizer

Params = dict[str, Any]
Request = tuple[Any, list[int], list[int]]  # (cache key, context ids, continuation ids)

# What lm-eval's CLI passes every model besides --model_args; JAX places arrays itself.
LM_EVAL_EXTRAS = {"max_batch_size", "device"}
MIN_LEN, MIN_CONT = 64, 32  # smallest buckets: most prompts and answers fit, so few compiles


def bucket(n: int, lo: int, hi: int) -> int:
  """Smallest power of two >= n (at least lo), capped at hi: the padded length to compile for."""
  return min(max(lo, 1 << max(n - 1, 0).bit_length()), hi)


@functools.partial(jax.jit, static_argnums=(0,))
def _score(arch: Arch, params: Params, tokens_BxL, start_B, targets_BxC, mask_BxC):
  """(sum of continuation log-probs, all continuation tokens greedy) per row.

  Row b's continuation is predicted at input positions start_b .. start_b + C - 1 (mask marks
  the real ones); right padding after it cannot reach those positions under the causal mask.
  """
  ctx = model.forward_ctx(arch, tokens_BxL)
  h_BxLxD, _ = model.run_blocks(arch, params, model.embed(params, tokens_BxL), ctx)
  C = targets_BxC.shape[1]
  pos_BxC = jnp.minimum(start_B[:, None] + jnp.arange(C)[None, :], tokens_BxL.shape[1] - 1)
  h_BxCxD = jnp.take_along_axis(h_BxLxD, pos_BxC[:, :, None], axis=1)
  logits_BxCxV = model.lm_head(arch, params, h_BxCxD)
  logp_BxCxV = jax.nn.log_softmax(logits_BxCxV, axis=-1)
  tok_BxC = jnp.take_along_axis(logp_BxCxV, targets_BxC[:, :, None], axis=-1)[:, :, 0]
  greedy_BxC = jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC
  return jnp.sum(jnp.where(mask_BxC, tok_BxC, 0.0), -1), jnp.all(greedy_BxC | ~mask_BxC, -1)


def pack(chunk: Sequence[Request], max_length: int, batch_size: int,
         min_length: int = MIN_LEN) -> dict[str, np.ndarray]:
  """HFLM's input layout for one batch: inp = (ctx + cont)[-(max_length + 1):][:-1], right-padded."""
  inps = [(c + k)[-(max_length + 1):][:-1] for _, c, k in chunk]
  conts = [k for _, _, k in chunk]
  if any(not c or not k for _, c, k in chunk):
    raise ValueError("every request needs a non-empty context and continuation")
  if any(len(k) > max_length for k in conts):
    raise ValueError(f"a continuation is longer than max_length={max_length}; raise max_length")
  L = bucket(max(map(len, inps)), min_length, max_length)
  C = bucket(max(map(len, conts)), MIN_CONT, L)
  out = {"tokens": np.zeros((batch_size, L), np.int32), "start": np.zeros((batch_size,), np.int32),
         "targets": np.zeros((batch_size, C), np.int32), "mask": np.zeros((batch_size, C), bool)}
  for b, (inp, cont) in enumerate(zip(inps, conts)):
    out["tokens"][b, :len(inp)] = inp
    out["start"][b] = len(inp) - len(cont)
    out["targets"][b, :len(cont)] = cont
    out["mask"][b, :len(cont)] = True
  return out


def load_model(checkpoint: str | pathlib.Path, dtype: str = "float32") -> tuple[Arch, Params]:
  """A project checkpoint (orbax dir with arch.json), an HF directory or a GGUF file."""
  from puzzle_jax import io
  path = pathlib.Path(checkpoint)
  if (path / io.ARCH_FILE).is_file():
    arch, params = io.load_checkpoint(path)
    return arch, jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint={path} does not exist; pass a project checkpoint "
                            f"(e.g. WORKDIR/child), an HF directory or a .gguf file")
  return io.load_pretrained(path, dtype=jnp.dtype(dtype))


def find_tokenizer(checkpoint: str | pathlib.Path) -> pathlib.Path:
  """The tokenizer that goes with a checkpoint: the GGUF / HF dir itself, or the run directory's
  `tokenizer/` beside a project checkpoint (WORKDIR/child -> WORKDIR/tokenizer)."""
  path = pathlib.Path(checkpoint)
  for cand in (path, path / "tokenizer", path.parent / "tokenizer", path.parent.parent / "tokenizer"):
    if cand.suffix == ".gguf" or (cand / "tokenizer.json").is_file():
      return cand
  raise FileNotFoundError(f"no tokenizer found for {path}: pass tokenizer=DIR_OR_GGUF in --model_args "
                          f"(the run directory's tokenizer/ or the parent's .gguf)")


@register_model("puzzle_jax")
class PuzzleLM(TemplateLM):
  """lm-eval's view of an (arch, params) pair.

  From the shell: `--model_args checkpoint=PATH[,tokenizer=PATH,max_length=2048,dtype=float32,
  min_length=64,prefix_token_id=N,add_bos_token=False]` (batch size: lm-eval's `--batch_size`).
  From Python: `PuzzleLM(arch=..., params=..., tokenizer=Tokenizer)`.
  """

  def __init__(self, checkpoint: str | None = None, tokenizer: str | Tokenizer | None = None, *,
               arch: Arch | None = None, params: Params | None = None, batch_size: int | str = 16,
               max_length: int | None = None, max_gen_toks: int = 256, dtype: str = "float32",
               prefix_token_id: int | None = None, add_bos_token: bool | None = None,
               min_length: int = MIN_LEN, seed: int = 0, **unused):
    super().__init__()
    unknown = set(unused) - LM_EVAL_EXTRAS
    if unknown:
      raise TypeError(f"puzzle_jax model: unknown argument(s) {sorted(unknown)}; see PuzzleLM's docstring")
    if (checkpoint is None) == (arch is None):
      raise ValueError("give either checkpoint=PATH or arch= and params= (not both)")
    if arch is None:
      arch, params = load_model(checkpoint, dtype)
    if not isinstance(tokenizer, Tokenizer):
      if tokenizer is None and checkpoint is None:
        raise ValueError("PuzzleLM(arch=..., params=...) needs tokenizer=Tokenizer")
      tokenizer = load_tokenizer(tokenizer or find_tokenizer(checkpoint))
    self.arch, self.params, self.tok = arch, params, tokenizer
    # lm-eval passes batch_size as given on the command line ("auto", "auto:4", "16").
    self.batch = int(batch_size) if str(batch_size).isdigit() else 16
    self._max_length = int(max_length or arch.max_position)
    self._max_gen_toks = int(max_gen_toks)
    self.min_length = int(min_length)  # smallest padded length: larger = fewer compiles, more padding
    self._prefix = prefix_token_id
    self.add_bos_token = add_bos_token
    self._key = jax.random.PRNGKey(seed)

  # ------------------------------------------------------------------------- tokens (as HFLM)
  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    if self._prefix is not None:
      return int(self._prefix)
    return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """As HFLM: the tokenizer's own special tokens unless told otherwise or the text starts with BOS."""
    special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
    if add_special_tokens is None and self.tok.bos_token and string.startswith(self.tok.bos_token):
      special = False
    return self.tok.backend.encode(string, add_special_tokens=True if special is None else special).ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    tokens = [tokens] if isinstance(tokens, int) else tokens
    return self.tok.decode(tokens, skip_special_tokens=skip_special_tokens)

  # ------------------------------------------------------------------------- scoring
  def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                            **kwargs) -> list[tuple[float, bool]]:
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    chunks = [order[i:i + self.batch] for i in range(0, len(order), self.batch)]
    for idx in tqdm(chunks, desc="puzzle_jax loglikelihood", disable=disable_tqdm):
      chunk = [requests[i] for i in idx]
      b = pack(chunk, self.max_length, self.batch, self.min_length)
      ll, greedy = _score(self.arch, self.params, b["tokens"], b["start"], b["targets"], b["mask"])
      for j, i in enumerate(idx):
        out[i] = (float(ll[j]), bool(greedy[j]))
        if requests[i][0] is not None:
          self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Sum over HFLM's disjoint rolling windows (context_len=1) of the text's log-likelihood."""
    windows, owner = [], []
    for r, (string,) in enumerate(req.args for req in requests):
      for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((None, ctx, cont))
        owner.append(r)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for r, (ll, _) in zip(owner, scores):
      totals[r] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # ------------------------------------------------------------------------- generation
  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled) continuations cut at the first stop sequence, grouped by gen kwargs."""
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
    out: list[str | None] = [None] * len(requests)
    for idx in groups.values():
      idx = sorted(idx, key=lambda i: -len(self.tok_encode(requests[i].args[0])))
      kwargs = requests[idx[0]].args[1]
      chunks = [idx[i:i + self.batch] for i in range(0, len(idx), self.batch)]
      for chunk in tqdm(chunks, desc="puzzle_jax generate_until", disable=disable_tqdm):
        texts = self._generate([requests[i].args[0] for i in chunk], kwargs)
        for i, text in zip(chunk, texts):
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out

  def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
    kwargs = model_utils.normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    until = model_utils.handle_stop_sequences(kwargs.pop("until", None),
                                              eos=self.tok_decode(self.eot_token_id, False))
    new = int(kwargs.pop("max_gen_toks"))
    if new >= self.max_length:
      raise ValueError(f"max_gen_toks={new} must be below max_length={self.max_length}")
    enc = [self.tok_encode(c)[-(self.max_length - new):] for c in contexts]
    L = bucket(max(map(len, enc)), self.min_length, self.max_length - new)
    tokens = np.zeros((self.batch, L), np.int32)
    mask = np.zeros((self.batch, L), bool)
    for b, ids in enumerate(enc):  # left padding, as HFLM's tok_batch_encode
      tokens[b, L - len(ids):], mask[b, L - len(ids):] = ids, True
    self._key, key = jax.random.split(self._key)
    sampled = kwargs.get("do_sample") and kwargs.get("temperature", 0.0) > 0
    ids = model.generate(self.arch, self.params, tokens, mask, max_new_tokens=new, key=key,
                         temperature=float(kwargs.get("temperature", 0.0)) if sampled else 0.0,
                         top_p=float(kwargs.get("top_p", 1.0)) if sampled else 1.0,
                         stop_tokens=(self.eot_token_id,))
    return [model_utils.postprocess_generated_text(self.tok_decode(list(map(int, row))), until, None)
            for row in np.asarray(ids)[:len(contexts)]]

  def get_model_info(self) -> dict:
    return {"model_num_parameters": self.arch.num_params(), "model_layers": self.arch.num_layers}
