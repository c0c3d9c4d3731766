"""SentencePiece tokenizers: training (BPE / unigram / char), loading, hashing, chat specials.

Fixed ids: pad=0, unk=1, bos=2, eos=3; then the reserved specials below, in order, so every
jaxllm tokenizer agrees on what `<mask>` or `<|assistant|>` is called.
"""

from __future__ import annotations

import hashlib
import io
import os
from functools import cached_property
from typing import Iterable, Sequence

import sentencepiece as spm

from jaxllm.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<mask>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
DEFAULT_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "assets", "default_tokenizer.model")


def train_tokenizer(texts: Iterable[str], out_prefix: str, vocab_size: int = 1024,
                    model_type: str = "bpe", character_coverage: float = 1.0,
                    max_sentence_length: int = 16384) -> "Tokenizer":
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
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)) or ".", exist_ok=True)
    model = io.BytesIO()
    try:
        _train_sp(sentences, model, vocab_size, model_type, character_coverage, max_sentence_length)
    except RuntimeError as e:  # sentencepiece reports e.g. a vocab too small for the characters
        reason = str(e).split("] ")[-1].strip()
        raise DataError(f"tokenizer training failed: {reason}") from None
    path = out_prefix + ".model"
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)
    return Tokenizer(path)


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


class Tokenizer:
    def __init__(self, path: str = ""):
        path = path or DEFAULT_TOKENIZER
        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise DataError(f"tokenizer file not found: {self.path}; train one with "
                            f"`jaxllm tokenizer train` or set data.tokenizer=PATH.model")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(self.path)
        except Exception:  # sentencepiece raises OSError/RuntimeError with a long message
            raise DataError(f"tokenizer file {self.path} is not a SentencePiece model") from None
        self.specials = {tok: self.sp.piece_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [t for t, i in self.specials.items() if i == UNK_ID]
        if missing:
            raise DataError(f"tokenizer {self.path} lacks reserved tokens {missing}; train it with "
                            f"`jaxllm tokenizer train` so chat/mask tokens exist")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    @property
    def mask_id(self) -> int:
        return self.specials["<mask>"]

    @cached_property
    def sha256(self) -> str:
        with open(self.path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)]
        return self.sp.decode(ids)

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "vocab_size": self.vocab_size}
