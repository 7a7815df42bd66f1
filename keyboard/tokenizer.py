"""SentencePiece word-piece tokenizer: trained on public users' text only, saved with every model."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from fedkey.errors import FedkeyError

UNK, BOS, EOS, PAD = 0, 1, 2, 3
SPACE = "\u2581"  # SentencePiece's visible space, the word-start marker


class Tokenizer:
    """A thin wrapper over a SentencePiece model that also knows its own content hash."""

    def __init__(self, model_proto: bytes, source: str = "<memory>") -> None:
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception:
            raise FedkeyError(f"{source}: not a SentencePiece model; re-run `fedkey prepare` to rebuild it") from None
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        self.vocab_size = self.sp.get_piece_size()

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a tokenizer file, with a one-line error if it is missing or not a tokenizer."""
        path = Path(path)
        if not path.is_file():
            raise FedkeyError(f"{path}: tokenizer not found; run `fedkey prepare` first")
        return cls(path.read_bytes(), str(path))

    def save(self, path: str | Path) -> None:
        """Write the serialized model (atomically)."""
        from fedkey.io import atomic_write_bytes

        atomic_write_bytes(path, self.proto)

    def encode(self, text: str) -> list[int]:
        """Piece ids of one text (no BOS/EOS)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: "Sequence[str]") -> list[list[int]]:
        """Piece ids of many texts, using SentencePiece's own threads."""
        return self.sp.encode(list(texts), num_threads=2)

    def pieces(self) -> list[str]:
        """Every piece string, by id."""
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    def is_byte(self, i: int) -> bool:
        """Whether piece i is a byte-fallback piece."""
        return self.sp.is_byte(i)

    def decode(self, ids: list[int]) -> str:
        """Text of piece ids."""
        return self.sp.decode(ids)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, seed: int = 0) -> Tokenizer:
    """Train a unigram SentencePiece model with byte fallback and case folding."""
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type="unigram",
            byte_fallback=True,
            # case folding: the keyboard capitalises for display; the model predicts words, not casing
            normalization_rule_name="nmt_nfkc_cf",
            unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=PAD,
            hard_vocab_limit=False,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise FedkeyError(f"tokenizer training failed with vocab_size={vocab_size}: {str(e).splitlines()[0][-160:]}; "
                          "use vocab_size >= 300 (byte fallback takes 256 pieces) and enough public users' text") from None
    return Tokenizer(buf.getvalue())
