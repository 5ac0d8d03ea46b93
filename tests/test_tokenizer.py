"""puzzle_jax.io.tokenizer: ids, chat template and files identical to transformers' on SmolLM2."""

import json

import gguf
import jinja2
import pytest
import transformers

from puzzle_jax.io.tokenizer import Tokenizer, TokenizerError, load_tokenizer


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Capital of Italy?"},
     {"role": "assistant", "content": "Rome."},
     {"role": "user", "content": "And  of Spain?\n\t(2 words max) <|im_end|>"}],
]
ODD_TEXTS = ["", " ", "  leading spaces", "trailing \n\n", "digits 1234567 and 3.14159",
             "émoji 🤖 中文 ﬁ", "tabs\tand\r\nCRLF", "<|im_start|>user\nhi<|im_end|>",
             "<|endoftext|><|endoftext|>x", "can't won't I'll"]


@pytest.fixture(scope="session")
def ours(smollm2_gguf) -> Tokenizer:
  return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def ref(smollm2_gguf):
  return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def saved(ours, tmp_path_factory):
  return ours.save(tmp_path_factory.mktemp("tok"))


def test_special_tokens(ours, ref):
  assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
      ref.bos_token, ref.eos_token, ref.unk_token, ref.pad_token) == (
      "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")
  assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)
  assert ours.stop_ids == (2, 0)  # <|im_end|> first, then <|endoftext|>
  assert ours.vocab_size == len(ref) == 49152


def test_ids_match_transformers_on_wikitext(ours, ref, wikitext_lines):
  lines = wikitext_lines[:50]
  assert len(lines) == 50
  for line in lines:
    assert ours.encode(line) == ref(line)["input_ids"], line


def test_ids_match_transformers_on_odd_text(ours, ref):
  for text in ODD_TEXTS:
    assert ours.encode(text) == ref(text)["input_ids"], text


def test_special_tokens_stay_whole(ours):
  assert ours.encode("<|im_start|>user<|im_end|>") == [1, ours.encode("user")[0], 2]


def test_chat_template_matches_transformers(ours, ref):
  for chat in CHATS:
    for gen in (True, False):
      text = ours.apply_chat_template(chat, add_generation_prompt=gen)
      assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
      assert ours.encode(text) == ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen,
                                                          return_dict=False)
  assert ours.apply_chat_template(CHATS[0]).endswith("<|im_start|>assistant\n")


def test_chat_template_raise_exception(ours):
  tok = Tokenizer(ours.backend, chat_template="{{ raise_exception('roles must alternate') }}")
  with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
    tok.apply_chat_template(CHATS[0])
  with pytest.raises(TokenizerError, match="no chat_template"):
    Tokenizer(ours.backend).apply_chat_template(CHATS[0])


def test_encode_add_bos_and_decode(ours, wikitext_lines):
  ids = ours.encode(wikitext_lines[0], add_bos=True)
  assert ids[0] == ours.bos_id and ids[1:] == ours.encode(wikitext_lines[0])
  assert ours.decode(ids[1:]) == wikitext_lines[0]
  assert ours.decode(ids, skip_special_tokens=True) == wikitext_lines[0]
  for text in ODD_TEXTS:
    assert ours.decode(ours.encode(text)) == text


def test_saved_dir_loads_in_transformers(ours, saved, wikitext_lines):
  names = {p.name for p in saved.iterdir()}
  assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
  assert json.loads((saved / "tokenizer_config.json").read_text())["chat_template"] == ours.chat_template
  hf = transformers.AutoTokenizer.from_pretrained(saved)
  assert (hf.bos_token, hf.eos_token, hf.bos_token_id, hf.eos_token_id) == (
      ours.bos_token, ours.eos_token, ours.bos_id, ours.eos_id)
  for text in wikitext_lines[:10] + ODD_TEXTS:
    assert hf(text)["input_ids"] == ours.encode(text), text
  assert hf.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True) == \
      ours.apply_chat_template(CHATS[1])


def test_from_dir_roundtrip(ours, saved, tmp_path, wikitext_lines):
  again = load_tokenizer(saved)
  assert (again.bos_token, again.eos_token, again.unk_token, again.pad_token, again.chat_template) == (
      ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token, ours.chat_template)
  assert again.encode(wikitext_lines[1]) == ours.encode(wikitext_lines[1])
  # transformers 5 writes the template to chat_template.jinja; from_dir reads that too.
  transformers.AutoTokenizer.from_pretrained(saved).save_pretrained(tmp_path / "hf")
  from_hf = load_tokenizer(tmp_path / "hf")
  assert from_hf.chat_template == ours.chat_template
  assert (from_hf.bos_id, from_hf.eos_id, from_hf.stop_ids) == (ours.bos_id, ours.eos_id, ours.stop_ids)
  assert from_hf.encode(wikitext_lines[2]) == ours.encode(wikitext_lines[2])
  assert load_tokenizer(tmp_path / "hf" / "tokenizer.json").eos_id == ours.eos_id


def test_bad_inputs(tmp_path):
  with pytest.raises(TokenizerError, match="has no tokenizer.json"):
    load_tokenizer(tmp_path)
  with pytest.raises(TokenizerError, match="expected an HF directory"):
    load_tokenizer(tmp_path / "vocab.txt")
  # A sentencepiece ('llama') GGUF vocabulary is refused by name.
  w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
  w.add_tokenizer_model("llama")
  w.add_token_list(["<unk>", "a"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(TokenizerError, match=r"sp.gguf: tokenizer.ggml.model is 'llama'; only byte-level"):
    load_tokenizer(tmp_path / "sp.gguf")
