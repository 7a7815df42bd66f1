"""Secure aggregation (Bonawitz et al. 2017, honest-but-curious variant): the server learns only the sum.

Rounds (client u, server S; all clients selected for the round have ids 1..n):
  0 AdvertiseKeys   u -> S: two X25519 public keys, c_pk (to encrypt shares) and s_pk (mask agreement).
  1 ShareKeys       u draws a self-mask seed b_u and Shamir-shares it and its s-key seed (threshold t);
                    the share for v is AES-GCM encrypted under X25519(c_sk_u, c_pk_v); S only routes it.
  2 MaskedInput     u -> S: y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)  (mod 2^bits),
                    s_uv = X25519(s_sk_u, s_pk_v), identical at both ends, so the pair masks cancel in the sum.
  3 Unmasking       S names the survivors U3; each responding u reveals, for every other v, the share of b_v
                    if v survived, else the share of v's s-key seed -- never both for one v.
                    S rebuilds b_v of survivors and the s-keys of the dropped (any t shares suffice), removes
                    their masks, and holds sum_{u in U3} x_u.

"Every other v" is every client of the round in Bonawitz et al.; with SecAgg+ (Bell et al. 2020,
`peer_graph(n, k)`) it is the k peers of a random k-regular graph, so a client's work and bytes grow
with k instead of n. The price: the guarantees hold per neighbourhood (t of a client's k + 1 share
holders must answer; a client whose k peers all drop is exposed), so with high probability, not always.

What S ever holds: public keys, ciphertexts it cannot open, masked vectors (each uniformly random in the
ring to S, because of the self-mask and the pair masks with honest survivors), shares below the threshold,
and the final sum. The consistency-check round and signatures of the actively-secure variant are not built
(see docs/threat_model.md). Secrets are 16-byte values, the size PyCryptodome's Shamir shares.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fl_core.aggregate import RoundAbandoned
from fl_core.privacy.secagg.prg import add_masks, derive_key

Observer = Callable[[str, Any], None]
KeyAdvert = tuple[bytes, bytes]  # (c_pk, s_pk), raw 32-byte X25519 public keys


class SecAggError(RoundAbandoned):
    """The round cannot be completed securely (e.g. too many dropouts); no partial or wrong sum is returned."""


def _need(have: int, t: int, what: str) -> None:
    if have < t:
        raise SecAggError(f"secure aggregation: only {have} clients {what}; at least {t} are needed to recover the "
                          "sum, so this round is abandoned (raise the dropout tolerance or select more clients)")


def _s_key(seed: bytes, session: bytes) -> X25519PrivateKey:
    """The mask-agreement key is derived from a 16-byte seed, so the seed is what gets Shamir-shared."""
    return X25519PrivateKey.from_private_bytes(derive_key(seed, b"s-key", session, length=32))


def _nonce(sender: int, receiver: int) -> bytes:
    # u->v and v->u share one AES-GCM key, so the direction must be in the nonce
    return struct.pack(">IIi", sender, receiver, 0)


def _pub(raw: bytes) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(raw)


def peer_graph(n: int, k: int, session: bytes) -> dict[int, tuple[int, ...]]:
    """Who shares masks and keys with whom: everyone (k <= 0, Bonawitz et al. 2017), or a k-regular Harary
    graph on a ring shuffled per round (SecAgg+, Bell et al. 2020; k rounded up to even). Public to all."""
    ids = list(range(1, n + 1))
    half = (k + 1) // 2
    if k <= 0 or 2 * half >= n - 1:
        return {u: tuple(v for v in ids if v != u) for u in ids}
    ring = np.random.default_rng(int.from_bytes(session, "big")).permutation(ids).tolist()
    at = {u: i for i, u in enumerate(ring)}
    return {u: tuple(sorted(ring[(at[u] + d) % n] for d in range(-half, half + 1) if d)) for u in ids}


def holders(peers: Mapping[int, Sequence[int]], v: int) -> list[int]:
    """The clients holding shares of v's secrets, in share-index order (index = position + 1); v keeps one."""
    return sorted((*peers[v], v))


class SecAggClient:
    """One device's side of the protocol; its secrets never leave it except as encrypted shares."""

    def __init__(self, cid: int, peers: Mapping[int, Sequence[int]], threshold: int, session: bytes) -> None:
        self.cid, self.t, self.session = cid, threshold, session
        self.peers, self.holders = set(peers[cid]), holders(peers, cid)
        self._c_sk = X25519PrivateKey.generate()
        self._s_seed = os.urandom(16)
        self._s_sk = _s_key(self._s_seed, session)

    def advertise_keys(self) -> KeyAdvert:
        """Round 0: the two public keys."""
        return self._c_sk.public_key().public_bytes_raw(), self._s_sk.public_key().public_bytes_raw()

    def share_keys(self, adverts: Mapping[int, KeyAdvert]) -> dict[int, bytes]:
        """Round 1: Shamir shares of b_u and of the s-key seed, one AES-GCM ciphertext per peer."""
        self._adverts = {v: adverts[v] for v in self.peers if v in adverts}
        _need(len(self._adverts) + 1, self.t, "advertised keys")
        self._b_seed = os.urandom(16)
        b_shares = dict(Shamir.split(self.t, len(self.holders), self._b_seed))
        s_shares = dict(Shamir.split(self.t, len(self.holders), self._s_seed))
        index = {h: i + 1 for i, h in enumerate(self.holders)}
        self._own_b_share = b_shares[index[self.cid]]
        self._enc_keys: dict[int, AESGCM] = {}
        out = {}
        for v, (c_pk, _) in self._adverts.items():
            aead = AESGCM(derive_key(self._c_sk.exchange(_pub(c_pk)), b"share-enc", self.session))
            self._enc_keys[v] = aead
            plain = struct.pack(">II", self.cid, v) + s_shares[index[v]] + b_shares[index[v]]
            out[v] = aead.encrypt(_nonce(self.cid, v), plain, self.session)
        return out

    def masked_input(self, inbox: Mapping[int, bytes], x: np.ndarray) -> np.ndarray:
        """Round 2: the encoded update plus the self-mask and the pair masks with every peer that shared keys."""
        self._inbox = {v: ct for v, ct in inbox.items() if v in self._adverts}
        self._u2 = set(self._inbox) | {self.cid}
        _need(len(self._u2), self.t, "shared keys")
        plus = [derive_key(self._b_seed, b"self", self.session)]
        minus = []
        for v in self._u2 - {self.cid}:
            k = derive_key(self._s_sk.exchange(_pub(self._adverts[v][1])), b"pair", self.session)
            (plus if self.cid < v else minus).append(k)
        y = np.array(x, copy=True)
        add_masks(y, plus, minus)
        return y

    def unmask(self, survivors: Collection[int]) -> dict[int, bytes]:
        """Round 3: for each peer, the share of its self-mask seed if it survived, else of its s-key seed."""
        if getattr(self, "_unmasked", False):  # a second answer could hand out both shares of one client
            raise SecAggError("secure aggregation: the server asked to unmask twice in one round; refusing")
        self._unmasked = True
        alive = set(survivors)
        _need(len(alive), self.t, "sent masked inputs")
        if not (alive & self.peers) <= self._u2 or self.cid not in alive:
            raise SecAggError("secure aggregation: the server named survivors that did not take part; refusing to unmask")
        out = {self.cid: self._own_b_share}
        for v, ct in self._inbox.items():
            try:
                plain = self._enc_keys[v].decrypt(_nonce(v, self.cid), ct, self.session)
            except (InvalidTag, KeyError):
                raise SecAggError(f"secure aggregation: the share from client {v} does not authenticate") from None
            if struct.unpack(">II", plain[:8]) != (v, self.cid):
                raise SecAggError(f"secure aggregation: the share from client {v} is addressed to another pair")
            out[v] = plain[24:40] if v in alive else plain[8:24]
        return out


class SecAggServer:
    """The aggregator: routes messages, sums masked vectors, and removes masks from the shares it is given.

    `observer(kind, obj)` sees every object the server receives or computes (for audits and tests).
    """

    def __init__(self, peers: Mapping[int, Sequence[int]], threshold: int, dim: int, dtype: type, session: bytes,
                 observer: Observer | None = None, min_survivors: int = 0) -> None:
        self.peers, self.t, self.dim, self.dtype, self.session = peers, threshold, dim, dtype, session
        # with SecAgg+ the share threshold is per neighbourhood; the round still needs this many inputs in its sum
        self.min_survivors = max(threshold, min_survivors)
        self._observer = observer

    def _observe(self, kind: str, obj: Any) -> None:
        if self._observer is not None:  # a snapshot: the running sum is updated in place afterwards
            snap = tuple(o.copy() if isinstance(o, np.ndarray) else o for o in obj) if isinstance(obj, tuple) else obj
            self._observer(kind, obj.copy() if isinstance(obj, np.ndarray) else snap)

    def collect_keys(self, adverts: Mapping[int, KeyAdvert]) -> dict[int, KeyAdvert]:
        """Round 0: keep the public keys (U1) and broadcast them."""
        self._observe("adverts", adverts)
        _need(len(adverts), self.t, "advertised keys")
        self._adverts = dict(adverts)
        return self._adverts

    def route_shares(self, sent: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Round 1: forward each ciphertext to its recipient; U2 = the clients that sent shares."""
        self._observe("shares", sent)
        self._u2 = set(sent) & set(self._adverts)
        _need(len(self._u2), self.t, "shared keys")
        inbox: dict[int, dict[int, bytes]] = {v: {} for v in self._u2}
        for u in self._u2:
            for v, ct in sent[u].items():
                if v in inbox:
                    inbox[v][u] = ct
        return inbox

    def receive_masked(self, u: int, y: np.ndarray) -> None:
        """Round 2: add one masked vector to the running sum (mod 2^bits); the vector itself is not kept."""
        if not hasattr(self, "_total"):
            self._total = np.zeros(self.dim, dtype=self.dtype)
            self._u3: list[int] = []
        self._observe("masked_input", (u, y))
        if u not in self._u2 or u in self._u3 or y.shape != (self.dim,) or y.dtype != self.dtype:
            return  # not a participant or malformed: left out, and its masks are removed as for a dropout
        np.add(self._total, y, out=self._total)
        self._observe("running_sum", self._total)
        self._u3.append(u)

    def survivors(self) -> list[int]:
        """End of round 2: the clients whose masked inputs are in the sum (U3), announced for unmasking."""
        _need(len(getattr(self, "_u3", [])), self.min_survivors, "sent masked inputs")
        self._u3 = sorted(self._u3)
        return self._u3

    def unmask(self, responses: Mapping[int, Mapping[int, bytes]]) -> np.ndarray:
        """Round 3: rebuild self-mask seeds of survivors and s-keys of the dropped from t shares each; return the sum."""
        self._observe("unmask_shares", responses)
        responders = [u for u in self._u3 if u in responses]
        _need(len(responders), self.t, "answered the unmasking request")
        plus: list[bytes] = []
        minus: list[bytes] = []
        for v in sorted(self._u2):
            index = {h: i + 1 for i, h in enumerate(holders(self.peers, v))}
            shares = [(index[u], bytes(responses[u][v])) for u in responders if u in index and v in responses[u]]
            _need(len(shares), self.t, f"returned shares for client {v}")
            secret = Shamir.combine(shares[:self.t])
            self._observe("reconstructed_seed", (v, secret))
            if v in self._u3:
                minus.append(derive_key(secret, b"self", self.session))
                continue
            sk = _s_key(secret, self.session)  # v dropped: undo the pair masks its surviving peers added for it
            for u in self._u3:
                if u in index and u != v:
                    k = derive_key(sk.exchange(_pub(self._adverts[u][1])), b"pair", self.session)
                    (minus if u < v else plus).append(k)
        total = self._total
        add_masks(total, plus, minus)
        self._observe("sum", total)
        return total
