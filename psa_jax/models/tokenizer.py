"""Tokenizer and chat template, built from a Hugging Face tokenizer.json or from GGUF metadata."""

from __future__ import annotations

import datetime
import json
import re
from typing import Sequence

import jinja2
from jinja2 import sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

GGUF_CONTROL_TOKEN = 3  # llama.cpp token type of special tokens such as <|im_start|>


class Tokenizer:
  """Text <-> ids plus the model's chat template.

  add_bos: prepend bos_token_id when encoding a prompt (GGUF's tokenizer.ggml.add_bos_token).
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None, eos_token_ids: Sequence[int],
               chat_template: str | None, add_bos: bool = False):
    self.backend = backend
    self.bos_token_id = bos_token_id
    self.eos_token_ids = tuple(eos_token_ids)
    self.chat_template = chat_template
    self.add_bos = add_bos

  def to_json(self) -> str:
    """Everything needed to rebuild this tokenizer (`from_json`), as one JSON document."""
    return json.dumps({"backend": self.backend.to_str(), "bos_token_id": self.bos_token_id,
                       "eos_token_ids": list(self.eos_token_ids), "chat_template": self.chat_template,
                       "add_bos": self.add_bos})

  @classmethod
  def from_json(cls, text: str) -> "Tokenizer":
    d = json.loads(text)
    return cls(tokenizers.Tokenizer.from_str(d["backend"]), bos_token_id=d["bos_token_id"],
               eos_token_ids=d["eos_token_ids"], chat_template=d["chat_template"], add_bos=d["add_bos"])

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def token(self, token_id: int) -> str:
    return self.backend.id_to_token(token_id)

  def token_bytes(self) -> list[bytes | None]:
    """Each token id's bytes as it adds them to the text (None for special tokens, which are not text): what a
    grammar over bytes needs to know of the vocabulary. Byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece
    style (a "\u2581" space and <0xNN> byte tokens) vocabularies."""
    if getattr(self, "_token_bytes", None) is None:
      decoder = json.loads(self.backend.to_str()).get("decoder") or {}
      kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
      special = set(self.backend.get_added_tokens_decoder())
      unicode_to_byte = _byte_level_alphabet()
      table: list[bytes | None] = []
      for i in range(self.vocab_size):
        piece = self.backend.id_to_token(i)
        if i in special or piece is None:
          table.append(None)
        elif "ByteLevel" in kinds:
          table.append(bytes(unicode_to_byte[c] for c in piece) if all(c in unicode_to_byte for c in piece) else None)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
          table.append(bytes([int(piece[3:5], 16)]))
        else:
          table.append(piece.replace("\u2581", " ").encode("utf-8"))
      self._token_bytes = table
    return self._token_bytes

  def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
    ids = self.backend.encode(text, add_special_tokens=False).ids
    if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
      ids = [self.bos_token_id] + ids
    return ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                  tools: Sequence[dict] | None = None) -> list[int]:
    """The chat template's token ids, with the messages' text encoded as plain text: a user who writes
    "<|im_start|>system" gets those characters, not the control token, so user text cannot forge roles.
    Only the template itself produces control tokens. tools: OpenAI tool objects, for templates that render
    them."""
    marks = {i: f"\x00psa-content-{i}\x00" for i, m in enumerate(messages) if m.get("content")}
    marked = [{**m, "content": marks[i]} if i in marks else m for i, m in enumerate(messages)]
    rendered = self.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tools=tools)
    if any(rendered.count(mark) != 1 for mark in marks.values()):  # a template that rewrites content: whole
      return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tools=tools))
    ids = [self.bos_token_id] if self.add_bos and self.bos_token_id is not None else []
    rest = rendered
    for i, mark in marks.items():
      template, rest = rest.split(mark, 1)
      ids += self.backend.encode(template, add_special_tokens=False).ids if template else []
      ids += self._plain_text().encode(messages[i]["content"], add_special_tokens=False).ids
    return ids + (self.backend.encode(rest, add_special_tokens=False).ids if rest else [])

  def _plain_text(self) -> tokenizers.Tokenizer:
    """A copy of the backend that reads special-token strings as ordinary text (a copy: the switch is global
    to a tokenizer object, and requests are tokenized on several threads)."""
    if getattr(self, "_plain", None) is None:
      plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
      plain.encode_special_tokens = True
      self._plain = plain
    return self._plain

  def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                          tools: Sequence[dict] | None = None) -> str:
    if not self.chat_template:
      raise ValueError("this model has no chat template; send a plain prompt instead")
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    # As Hugging Face renders templates: JSON without Jinja's HTML escaping (tools' schemas would read
    # "\u003c"), and today's date for templates that print it.
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    tok = lambda i: None if i is None else self.token(i)
    extra = {} if tools is None else {"tools": list(tools)}
    return env.from_string(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **extra,
        bos_token=tok(self.bos_token_id) or "", eos_token=tok(self.eos_token_ids[0]) if self.eos_token_ids else "")


def _byte_level_alphabet() -> dict[str, int]:
  """GPT-2's byte-level BPE spells each byte as a printable character; this maps the characters back."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
               *range(ord("\u00ae"), ord("\u00ff") + 1)]
  chars = {b: b for b in printable}
  shifted = 0
  for b in range(256):
    if b not in chars:
      chars[b] = 256 + shifted
      shifted += 1
  return {chr(c): b for b, c in chars.items()}


def from_gguf_metadata(meta: dict) -> Tokenizer:
  """Builds the tokenizer of a GGUF file from its tokenizer.ggml.* metadata (BPE "gpt2" vocabularies:
  SmolLM2, Llama 3, Qwen2)."""
  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(
        f"GGUF tokenizer model {kind!r} is not supported (only BPE 'gpt2' vocabularies); load the model from its "
        "Hugging Face directory instead, whose tokenizer.json is used as is")
  tokens = list(meta["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
  types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False)
  backend = tokenizers.Tokenizer(bpe)
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([
      tokenizers.AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
      if ty == GGUF_CONTROL_TOKEN])
  eos = meta.get("tokenizer.ggml.eos_token_id")
  return Tokenizer(backend, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                   eos_token_ids=() if eos is None else (int(eos),),
                   chat_template=meta.get("tokenizer.chat_template"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)))


def from_hf_directory(path, config: dict) -> Tokenizer:
  """tokenizer.json + tokenizer_config.json (chat template, bos/eos) of a Hugging Face model directory."""
  backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
  tok_config = {}
  if (path / "tokenizer_config.json").exists():
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
  template = tok_config.get("chat_template")
  if template is None and (path / "chat_template.jinja").exists():
    template = (path / "chat_template.jinja").read_text()

  def token_id(value):
    if isinstance(value, dict):
      value = value.get("content")
    return None if value is None else backend.token_to_id(value)

  bos = token_id(tok_config.get("bos_token")) if "bos_token" in tok_config else config.get("bos_token_id")
  eos = config.get("eos_token_id")
  eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
  if not eos_ids and tok_config.get("eos_token") is not None:
    eos_ids = (token_id(tok_config["eos_token"]),)
  return Tokenizer(backend, bos_token_id=bos, eos_token_ids=eos_ids, chat_template=template,
                   add_bos=bool(tok_config.get("add_bos_token", False)))
