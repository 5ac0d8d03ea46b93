"""Tokenizer: a `tokenizers.Tokenizer` plus the special tokens and chat template a model ships.

Built from a GGUF's `tokenizer.ggml.*` metadata (byte-level BPE, as transformers' GGUF loader builds
it, so ids match `AutoTokenizer.from_pretrained(dir, gguf_file=...)`) or from an HF directory's
tokenizer.json + tokenizer_config.json. `save` writes an HF directory that `AutoTokenizer` loads.

`encode` never adds special tokens on its own (the backend's post-processor is bypassed); pass
`add_bos=True` to prepend BOS, so callers always know exactly which ids they feed the model.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
from typing import Any, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

# Tokens that end a turn in common chat formats; generation stops on any present in the vocab.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")

GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # llama.cpp token types

# Split regexes for `tokenizer.ggml.pre` values, copied from transformers' GGUF tokenizer mapping.
# Values not listed (SmolLM2's 'smollm', 'gpt2', ...) get GPT-2's ByteLevel regex, as in transformers.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                   "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
                   "deepseek-r1-qwen": _QWEN2_SPLIT}


class TokenizerError(ValueError):
  """A tokenizer file that cannot be used; the message says why and what to do."""


@dataclasses.dataclass
class Tokenizer:
  backend: tokenizers.Tokenizer
  bos_token: str | None = None
  eos_token: str | None = None
  unk_token: str | None = None
  pad_token: str | None = None
  chat_template: str | None = None

  # --------------------------------------------------------------------------- ids
  def _id(self, token: str | None) -> int | None:
    return None if token is None else self.backend.token_to_id(token)

  @property
  def bos_id(self) -> int | None:
    return self._id(self.bos_token)

  @property
  def eos_id(self) -> int | None:
    return self._id(self.eos_token)

  @property
  def pad_id(self) -> int | None:
    return self._id(self.pad_token)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """EOS first (generate repeats stop_ids[0] after stopping), then other end-of-turn tokens."""
    ids = [self.eos_id] + [self._id(t) for t in END_OF_TURN_TOKENS]
    return tuple(dict.fromkeys(i for i in ids if i is not None))

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  # --------------------------------------------------------------------------- text
  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = self.backend.encode(text, add_special_tokens=False).ids
    if add_bos:
      if self.bos_id is None:
        raise TokenizerError("add_bos=True but this tokenizer has no BOS token")
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                          **kwargs) -> str:
    """Render the chat template exactly as transformers' `apply_chat_template(tokenize=False)`."""
    if not self.chat_template:
      raise TokenizerError("this tokenizer has no chat_template; format the prompt yourself")
    return _compile_template(self.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

  # --------------------------------------------------------------------------- files
  def save(self, out_dir: str | pathlib.Path) -> pathlib.Path:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json (AutoTokenizer loads it)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    self.backend.save(str(out_dir / "tokenizer.json"))
    special = {k: v for k, v in dict(bos_token=self.bos_token, eos_token=self.eos_token,
                                      unk_token=self.unk_token, pad_token=self.pad_token).items()
               if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if self.chat_template:
      config["chat_template"] = self.chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))
    return out_dir

  @classmethod
  def from_dir(cls, path: str | pathlib.Path) -> Tokenizer:
    """An HF directory's tokenizer.json + tokenizer_config.json (+ chat_template.jinja if present)."""
    path = pathlib.Path(path)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
      raise TokenizerError(f"{path} has no tokenizer.json; only fast (tokenizers) tokenizers are "
                           f"supported: save one with AutoTokenizer(...).save_pretrained(dir)")
    config = _read_json(path / "tokenizer_config.json")
    special = {**_read_json(path / "special_tokens_map.json"), **config}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
      template = {t["name"]: t["template"] for t in template}.get("default")
    if (path / "chat_template.jinja").is_file():
      template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    tokens = {k: _token_str(special.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return cls(tokenizers.Tokenizer.from_file(str(tok_file)), **tokens, chat_template=template)

  @classmethod
  def from_gguf(cls, path: str | pathlib.Path) -> Tokenizer:
    """Byte-level BPE from a GGUF's `tokenizer.ggml.*` metadata, as transformers builds it."""
    from puzzle_jax.io.checkpoint import open_gguf
    path = pathlib.Path(path)
    if not path.is_file():
      raise TokenizerError(f"{path} does not exist")
    reader = open_gguf(path)
    meta = lambda key, default=None: (reader.fields[key].contents()  # noqa: E731
                                      if key in reader.fields else default)
    kind = meta("tokenizer.ggml.model")
    if kind != "gpt2":
      raise TokenizerError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') "
                           f"GGUF tokenizers are supported, use the model's HF tokenizer.json instead")
    tokens = meta("tokenizer.ggml.tokens")
    backend = gguf_bpe(tokens, meta("tokenizer.ggml.merges") or [], meta("tokenizer.ggml.token_type"),
                       meta("tokenizer.ggml.pre"))
    name = lambda key: tokens[i] if (i := meta(f"tokenizer.ggml.{key}")) is not None else None  # noqa: E731
    return cls(backend, bos_token=name("bos_token_id"), eos_token=name("eos_token_id"),
               unk_token=name("unknown_token_id"), pad_token=name("padding_token_id"),
               chat_template=meta("tokenizer.chat_template"))


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
  """A GGUF file or an HF directory (or the tokenizer.json inside one)."""
  path = pathlib.Path(path)
  if path.is_dir():
    return Tokenizer.from_dir(path)
  if path.suffix == ".gguf":
    return Tokenizer.from_gguf(path)
  if path.name == "tokenizer.json":
    return Tokenizer.from_dir(path.parent)
  raise TokenizerError(f"{path}: expected an HF directory with tokenizer.json or a .gguf file")


# ----------------------------------------------------------------------------- GGUF BPE
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (the alphabet byte-level vocabularies are spelled in)."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def gguf_bpe(tokens: list[str], merges: list[str], token_types: list[int] | None,
             pre: str | None) -> tokenizers.Tokenizer:
  """The backend transformers builds for a byte-level GGUF vocabulary (GPT2Tokenizer + added tokens)."""
  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())
  # A token spelled outside the byte alphabet is stored raw; respell it as its UTF-8 bytes.
  vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
           for i, t in enumerate(tokens)}
  bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
  tok = tokenizers.Tokenizer(bpe)
  split = GGUF_PRE_SPLITS.get(pre)
  if split is None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  types = token_types or [1] * len(tokens)
  # Control tokens spelled outside the alphabet are llama.cpp mislabels; adding them would grow the vocab.
  control = [AddedToken(t, normalized=False, special=True)
             for t, ty in zip(tokens, types) if ty == GGUF_CONTROL and set(t) <= alphabet]
  tok.add_special_tokens(control)
  user = [AddedToken(t, normalized=False, special=False)
          for t, ty in zip(tokens, types) if ty == GGUF_USER_DEFINED and t in vocab]
  tok.add_tokens(user)
  return tok


# ----------------------------------------------------------------------------- helpers
def _read_json(path: pathlib.Path) -> dict[str, Any]:
  return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_str(tok: Any) -> str | None:
  """tokenizer_config spells a special token as a string or as an AddedToken dict."""
  return tok.get("content") if isinstance(tok, dict) else tok


_TEMPLATES: dict[str, Any] = {}


def _compile_template(source: str):
  """Compile with the environment transformers uses (sandboxed, trim/lstrip blocks, its globals)."""
  if source not in _TEMPLATES:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
      # transformers overrides jinja's tojson, which would HTML-escape the output.
      return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                        sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    _TEMPLATES[source] = env.from_string(source)
  return _TEMPLATES[source]
