"""Tokenizers: one interface, two file formats, and the special ids every other module reads.

`Tokenizer(path)` opens the implementation the path calls for:
  * `SentencePieceTokenizer`: a SentencePiece `*.model` (or a directory holding `tokenizer.model`):
    jaxllm's own (the embedded default, `jaxllm tokenizer train`) or a foreign one such as Llama 2's;
  * `HFTokenizer`: a Hugging Face `tokenizers` file (`*.json`, or a directory holding
    `tokenizer.json`), with special tokens and chat template from the `tokenizer_config.json` beside
    it. Needs the optional extra: `pip install 'jaxllm[hf]'`.

Special ids come from the tokenizer, never from constants elsewhere in jaxllm:
  pad_id   fills unused slots. Tokenizers without a pad token (Llama, Mistral) fall back to eos_id
           (`pad_is_fallback`). The value never decides anything: segment_ids, loss_mask and
           prompt_mask mark what is real, so a pad equal to a real token is harmless.
  bos_id   put before each document / prompt; None when the tokenizer adds none (e.g. Qwen2).
  eos_id   ends each document; eos_ids: every id that ends generation (eos_id first, then e.g.
           Llama 3's <|eot_id|> from generation_config.json).
  unk_id, mask_id  None when absent (masked_lm needs a mask token).
`tok.chat` is the tokenizer's chat format (jaxllm.data.chat).

jaxllm's own tokenizers have fixed ids pad=0, unk=1, bos=2, eos=3, then the reserved specials below,
in order, so every jaxllm tokenizer agrees on what `<mask>` or `<|assistant|>` is called. The
constants name those ids for training a tokenizer and as the defaults of low-level APIs that take
ids as arguments (the sampler); code that has a tokenizer passes the tokenizer's ids.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from functools import cached_property
from typing import Iterable, Optional, Sequence

import sentencepiece as spm

from jaxllm.core import storage
from jaxllm.errors import DataError, require

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # jaxllm's own tokenizers only
SPECIAL_TOKENS = ("<mask>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
DEFAULT_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "assets", "default_tokenizer.model")
HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")  # read from beside tokenizer.json (and copied with it)


def train_tokenizer(texts: Iterable[str], out_prefix: str, vocab_size: int = 1024,
                    model_type: str = "bpe", character_coverage: float = 1.0,
                    max_sentence_length: int = 16384) -> "SentencePieceTokenizer":
    """Trains a SentencePiece model on `texts` and writes `{out_prefix}.model` (+ `.vocab`).

    Identity normalization and byte fallback make decode(encode(x)) == x for any UTF-8 text.
    """
    if model_type not in ("bpe", "unigram", "char", "word"):
        raise DataError(f"tokenizer model_type={model_type!r}: choose bpe, unigram, char or word")
    sentences = []
    for t in texts:
        sentences.extend(line for line in t.split("\n") if line.strip())
    if not sentences:
        raise DataError("tokenizer training got no text: check the input files/sources")
    model = io.BytesIO()
    try:
        _train_sp(sentences, model, vocab_size, model_type, character_coverage, max_sentence_length)
    except RuntimeError as e:  # sentencepiece reports e.g. a vocab too small for the characters
        reason = str(e).split("] ")[-1].strip()
        raise DataError(f"tokenizer training failed: {reason}") from None
    path = storage.join(out_prefix + ".model")
    storage.write_atomic(path, model.getvalue())
    return SentencePieceTokenizer(path)


def _train_sp(sentences, model, vocab_size, model_type, character_coverage, max_sentence_length):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        user_defined_symbols=list(SPECIAL_TOKENS) + ["\n", "\t"],
        byte_fallback=model_type != "char", normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        max_sentence_length=max_sentence_length, num_threads=2, minloglevel=2,
        hard_vocab_limit=model_type != "char",
    )


def _resolve(path: str) -> tuple[type, str]:
    """data.tokenizer value -> (implementation, file). A directory is searched for tokenizer.model,
    then tokenizer.json (the order `jaxllm convert hf-to-jaxllm` records them in)."""
    path = storage.join(path or DEFAULT_TOKENIZER)
    if storage.isdir(path):
        for name, impl in (("tokenizer.model", SentencePieceTokenizer), ("tokenizer.json", HFTokenizer)):
            if storage.exists(storage.join(path, name)):
                return impl, storage.join(path, name)
        raise DataError(f"tokenizer directory {path} has neither tokenizer.model (SentencePiece) nor "
                        f"tokenizer.json (Hugging Face tokenizers)")
    if not storage.exists(path):
        raise DataError(f"tokenizer file not found: {path}; train one with `jaxllm tokenizer train` or set "
                        f"data.tokenizer=PATH.model, PATH/tokenizer.json or a directory holding one")
    return (HFTokenizer if path.endswith(".json") else SentencePieceTokenizer), path


class Tokenizer:
    """The interface. `Tokenizer(path)` returns the implementation for `path` ("" = the default)."""

    path: str
    pad_id: int
    pad_is_fallback: bool = False
    bos_id: Optional[int]
    eos_id: int
    eos_ids: tuple[int, ...]
    unk_id: Optional[int] = None
    mask_id: Optional[int] = None
    specials: dict  # jaxllm's reserved tokens present in this vocabulary -> ids
    chat_template: Optional[str] = None  # a Hugging Face chat template, if the tokenizer has one

    def __new__(cls, path: str = ""):
        if cls is Tokenizer:
            cls = _resolve(path)[0]
        return super().__new__(cls)

    # -- per implementation --
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def files(self) -> list[str]:
        """The files that make up this tokenizer, the main one first (copied by `jaxllm convert`)."""
        return [self.path]

    # -- shared --
    def _set_special_ids(self, pad, bos, eos, extra_eos=(), unk=None, mask=None) -> None:
        if eos is None:
            raise DataError(f"tokenizer {self.path} defines no eos token; jaxllm ends documents and "
                            f"generation with it (set eos_token in its tokenizer_config.json)")
        self.bos_id, self.eos_id, self.unk_id, self.mask_id = bos, eos, unk, mask
        self.eos_ids = tuple(dict.fromkeys([eos, *extra_eos]))
        self.pad_is_fallback = pad is None
        self.pad_id = eos if pad is None else pad  # masks decide what is padding, not this value
        self._hidden = {self.pad_id, *self.eos_ids} | ({bos} if bos is not None else set())

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.encode_batch([text], bos, eos)[0]

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Special-token text (e.g. "<|user|>") in `texts` becomes that token. bos=True adds bos_id
        if the tokenizer has one; eos=True adds eos_id."""
        head = [self.bos_id] if bos and self.bos_id is not None else []
        tail = [self.eos_id] if eos else []
        return [head + ids + tail for ids in self._encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` without pad, bos and eos tokens (other special tokens are kept)."""
        return self._decode([int(i) for i in ids if int(i) not in self._hidden])

    @cached_property
    def sha256(self) -> str:
        """Of the main file: what defines the ids (a checkpoint's tokenizer must match it)."""
        return hashlib.sha256(self._bytes).hexdigest()

    @cached_property
    def _bytes(self) -> bytes:
        return storage.read_bytes(self.path)

    @cached_property
    def chat(self):
        """The chat format: the tokenizer's own chat template, else jaxllm's (chat.py)."""
        from jaxllm.data.chat import chat_format
        return chat_format(self)

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "kind": type(self).__name__, "pad_id": self.pad_id, "bos_id": self.bos_id,
                "eos_ids": list(self.eos_ids)}


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str = ""):
        _, self.path = _resolve(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self._bytes)  # from bytes: the file may be remote
        except Exception:  # sentencepiece raises OSError/RuntimeError with a long message
            raise DataError(f"tokenizer file {self.path} is not a SentencePiece model") from None
        self.specials = {t: i for t in SPECIAL_TOKENS if self.sp.id_to_piece(i := self.sp.piece_to_id(t)) == t}
        sp_id = lambda i: i if i >= 0 else None  # sentencepiece says -1 for "none"
        self._set_special_ids(pad=sp_id(self.sp.pad_id()), bos=sp_id(self.sp.bos_id()), eos=sp_id(self.sp.eos_id()),
                              unk=sp_id(self.sp.unk_id()), mask=self.specials.get("<mask>"))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def _read_json(path: str) -> dict:
    if not storage.exists(path):
        return {}
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


def _token_text(value) -> Optional[str]:
    """A tokenizer_config special-token entry: a string or a serialized AddedToken {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json. Special tokens and chat template come from tokenizer_config.json
    (else special_tokens_map.json) and chat_template.jinja beside it; extra stop ids from
    generation_config.json's eos_token_id. bos_id is the token the tokenizer's post-processor puts
    before a text (what transformers adds with add_special_tokens=True), if any."""

    def __init__(self, path: str = ""):
        _, self.path = _resolve(path)
        tokenizers = require("tokenizers")
        try:
            self.tk = tokenizers.Tokenizer.from_str(storage.read_text(self.path))
        except Exception as e:  # tokenizers raises a bare Exception with a serde message
            raise DataError(f"tokenizer file {self.path} is not a Hugging Face tokenizer.json "
                            f"({str(e).splitlines()[0]})") from None
        here = str(storage.path(self.path).parent)
        self.config = _read_json(storage.join(here, "tokenizer_config.json"))
        self.special_tokens = self._special_tokens(_read_json(storage.join(here, "special_tokens_map.json")))
        ids = {k: self._id(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")}
        extra = _read_json(storage.join(here, "generation_config.json")).get("eos_token_id") or []
        extra = [extra] if isinstance(extra, int) else list(extra)
        self._set_special_ids(pad=ids["pad_token"], bos=self._bos(ids["bos_token"]),
                              eos=ids["eos_token"] if ids["eos_token"] is not None else (extra or [None])[0],
                              extra_eos=extra, unk=ids["unk_token"], mask=ids["mask_token"])
        self.specials = {t: i for t in SPECIAL_TOKENS if (i := self.tk.token_to_id(t)) is not None}
        self.added_ids = set(self.tk.get_added_tokens_decoder())
        self.chat_template = self._chat_template(storage.join(here, "chat_template.jinja"))

    def _special_tokens(self, special_map: dict) -> dict:
        """Special-token name -> text, as the chat template sees them (bos_token, eos_token, ...)."""
        out = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
            text = _token_text(self.config.get(key, special_map.get(key)))
            if text:
                out[key] = text
        return out

    def _id(self, key: str) -> Optional[int]:
        text = self.special_tokens.get(key)
        if text is None:
            return None
        i = self.tk.token_to_id(text)
        if i is None:
            raise DataError(f"tokenizer {self.path}: {key} {text!r} (tokenizer_config.json) is not in its vocabulary")
        return i

    def _bos(self, configured: Optional[int]) -> Optional[int]:
        plain = self.tk.encode("a", add_special_tokens=False).ids
        full = self.tk.encode("a", add_special_tokens=True).ids
        added = full[:full.index(plain[0])] if plain and plain[0] in full else []
        if added:
            return added[0]
        return configured if self.config.get("add_bos_token") else None

    def _chat_template(self, jinja_file: str) -> Optional[str]:
        if storage.exists(jinja_file):  # newer transformers save the template as its own file
            return storage.read_text(jinja_file)
        t = self.config.get("chat_template")
        if isinstance(t, list):  # several named templates: the "default" one is the chat template
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        return t if isinstance(t, str) and t else None

    @cached_property
    def vocab_size(self) -> int:
        # largest id + 1: added tokens may leave holes, and the model's embedding must cover every id
        return max(self.tk.get_vocab(with_added_tokens=True).values()) + 1

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21): the same ids without character offsets, ~15% less CPU
        encode = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """-> (ids, character offset where each token starts): for locating text spans in tokens."""
        e = self.tk.encode(text, add_special_tokens=False)
        return e.ids, [start for start, _ in e.offsets]

    def _decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def files(self) -> list[str]:
        here = str(storage.path(self.path).parent)
        return [self.path] + [p for n in HF_CONFIG_FILES if storage.exists(p := storage.join(here, n))]
