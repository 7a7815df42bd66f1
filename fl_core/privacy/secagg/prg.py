"""Masks: a 16-byte key expanded by AES-128-CTR into a ring vector, summed without Python loops over parameters.

AES-CTR is a cryptographic PRG (its keystream is indistinguishable from random under the
AES PRP assumption); OpenSSL runs it with AES-NI at GB/s. All masks of one client are
streamed together in cache-sized chunks: for each chunk every key's keystream is written
into one small buffer and added in place, so the mask vectors are never materialized in
full and main-memory traffic stays at one pass over the accumulator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_CHUNK_BYTES = 1 << 17  # 128 KiB: keystream buffer and accumulator slice both stay in L2
_ZEROS = bytes(_CHUNK_BYTES)
_NONCE = bytes(16)  # every key is fresh per round and per purpose, so a fixed counter start is safe


def derive_key(secret: bytes, purpose: bytes, session: bytes, length: int = 16) -> bytes:
    """HKDF-SHA256 of a shared secret or seed into a key bound to this round and purpose."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=session,
                info=b"fedkey-secagg/" + purpose).derive(secret)


def keystream(key: bytes, dim: int, dtype: type) -> np.ndarray:
    """The whole mask of one key as a ring vector (for tests and one-off use; add_masks is the fast path)."""
    out = np.zeros(dim, dtype=dtype)
    add_masks(out, [key], [])
    return out


def add_masks(acc: np.ndarray, plus: Sequence[bytes], minus: Sequence[bytes]) -> None:
    """acc += sum(PRG(k) for k in plus) - sum(PRG(k) for k in minus), modulo 2^bits, in place."""
    if not (plus or minus):
        return
    item = acc.dtype.itemsize
    encs = [(Cipher(algorithms.AES(k), modes.CTR(_NONCE)).encryptor(), np.add) for k in plus]
    encs += [(Cipher(algorithms.AES(k), modes.CTR(_NONCE)).encryptor(), np.subtract) for k in minus]
    chunk = _CHUNK_BYTES // item
    buf = bytearray(_CHUNK_BYTES + 15)  # update_into wants room for one block more than it writes
    zeros = memoryview(_ZEROS)
    for start in range(0, acc.size, chunk):
        part = acc[start:start + chunk]
        nbytes = part.size * item
        view = np.frombuffer(buf, dtype=acc.dtype, count=part.size)
        for enc, op in encs:
            enc.update_into(zeros[:nbytes], buf)
            op(part, view, out=part)
