"""Secure aggregation: exact sums, dropout recovery, clear failure, and a server that never holds one client's update."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fl_core.privacy.secagg import FixedPoint, SecAggError, secure_sum, threshold_for
from fl_core.privacy.secagg.prg import add_masks, derive_key, keystream
from fl_core.privacy.secagg.protocol import SecAggClient, SecAggServer, peer_graph


def _updates(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.02, (n, d)).astype(np.float32)


def _real_updates(tok, n: int) -> np.ndarray:
    """Model deltas of n clients, each taking a few SGD steps of a tiny LSTM on its own phrase from one start."""
    from fedkey.config import ModelConfig
    from keyboard.batches import frame, pad_batch
    from keyboard.model import KeyboardLM
    from keyboard.train import lm_loss
    from tests.conftest import PHRASES

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend with other work on the machine
    model = KeyboardLM(tok.vocab_size, ModelConfig(embed_dim=16, hidden=32))
    start = [p.detach().clone() for p in model.parameters()]
    out = []
    for i in range(n):
        with torch.no_grad():
            for p, s in zip(model.parameters(), start):
                p.copy_(s)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        x, y = pad_batch([frame(tok.encode(PHRASES[i % len(PHRASES)]), 64)] * 4)
        for _ in range(3):
            loss, _ = lm_loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append(torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)]).numpy())
    torch.set_num_threads(threads)
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("bits", [32, 16])
def test_secure_sum_equals_plain_sum_to_the_fixed_point_step(bits):
    x = _updates(7, 3000)
    fp = FixedPoint(0.1, len(x), bits)
    rep = secure_sum([fp.encode(v)[0] for v in x])
    assert rep.survivors == list(range(7))
    err = np.abs(fp.decode(rep.total) - x.astype(np.float64).sum(0))
    assert err.max() <= len(x) * fp.step / 2 + 1e-12
    assert fp.step < (1e-8 if bits == 32 else 1e-4)


def test_sum_is_recovered_with_a_third_of_the_clients_dropped():
    n = 12
    x = _updates(n, 2000, seed=1)
    fp = FixedPoint(0.1, n)
    enc = [fp.encode(v)[0] for v in x]
    dropped = [1, 4, 7, 10]  # a third, after they sent their shares (their pair masks are in everyone's input)
    assert threshold_for(n) == n - len(dropped)
    rep = secure_sum(enc, drop_after_shares=dropped)
    alive = [i for i in range(n) if i not in dropped]
    assert rep.survivors == alive
    assert np.abs(fp.decode(rep.total) - x[alive].astype(np.float64).sum(0)).max() <= n * fp.step / 2 + 1e-12


def test_a_client_silent_at_unmasking_still_counts_when_enough_others_answer():
    x = _updates(9, 500, seed=2)
    fp = FixedPoint(0.1, 9)
    rep = secure_sum([fp.encode(v)[0] for v in x], drop_after_shares=[0, 3], drop_before_unmask=[5])
    assert rep.survivors == [1, 2, 4, 5, 6, 7, 8]  # client 5's input is in the sum though it left before unmasking
    assert np.abs(fp.decode(rep.total) - x[rep.survivors].astype(np.float64).sum(0)).max() <= 9 * fp.step


@pytest.mark.parametrize("stage", ["after_shares", "before_unmask"])
def test_too_many_dropouts_raise_a_clear_error_not_a_wrong_sum(stage):
    x = _updates(9, 200, seed=3)
    fp = FixedPoint(0.1, 9)
    enc = [fp.encode(v)[0] for v in x]
    kwargs = {"drop_after_shares": [0, 1, 2, 3]} if stage == "after_shares" else {"drop_before_unmask": [0, 1, 2, 3]}
    with pytest.raises(SecAggError, match=r"only 5 clients .* at least 6 are needed"):
        secure_sum(enc, **kwargs)


def test_server_never_holds_anything_that_equals_or_correlates_with_one_update(tiny_tok):
    x = _real_updates(tiny_tok, 6)
    n, d = x.shape
    fp = FixedPoint(float(np.abs(x).max()), n)
    enc = [fp.encode(v)[0] for v in x]
    held: list[tuple[str, object]] = []
    session = bytes(range(16))
    rep = secure_sum(enc, drop_after_shares=[4], observer=lambda kind, obj: held.append((kind, obj)), session=session)
    assert rep.survivors == [0, 1, 2, 3, 5]
    masked = {u: y for kind, (u, y) in ((k, o) for k, o in held if k == "masked_input")}
    seeds = dict(obj for kind, obj in held if kind == "reconstructed_seed")
    assert sorted(masked) == [1, 2, 3, 4, 6] and sorted(seeds) == [1, 2, 3, 4, 5, 6]
    # what the server receives and computes, plus the most it can derive per client: a survivor's masked
    # input with the self-mask removed (it rebuilt that seed); the pair masks with other survivors remain
    views = [obj for kind, obj in held if kind == "running_sum"] + list(masked.values())
    for u, y in masked.items():
        stripped = y.copy()
        add_masks(stripped, [], [derive_key(seeds[u], b"self", session)])
        views.append(stripped)
    final = [obj for kind, obj in held if kind == "sum"]
    assert len(final) == 1 and np.array_equal(final[0], rep.total)

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])

    limit = 6 / np.sqrt(d)  # 6 standard deviations of the correlation of independent vectors
    for a in views:
        for i in range(n):
            assert not np.array_equal(a, enc[i])
            assert abs(corr(fp.decode(a), x[i])) < limit
    # the check does see a dependence where there is one: an unmasked input, and the output sum
    assert all(corr(fp.decode(enc[i]), x[i]) > 0.99 for i in range(n))
    assert max(corr(fp.decode(rep.total), x[i]) for i in rep.survivors) > 10 * limit
    # everything else the server holds is a public key, a ciphertext it has no key for, or a 16-byte share
    for kind, obj in held:
        if kind in ("adverts", "shares", "unmask_shares"):
            for msgs in obj.values():
                assert all(isinstance(m, bytes) and len(m) <= 64 for m in (msgs.values() if isinstance(msgs, dict)
                                                                           else msgs))


def test_masks_are_the_aes_ctr_keystream_and_pair_masks_cancel():
    key = derive_key(b"shared secret", b"pair", bytes(16))
    d = 100_003  # not a multiple of the chunk: the streamed tail must continue the same keystream
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    expect = np.frombuffer(enc.update(bytes(4 * d)), dtype=np.uint32)
    assert np.array_equal(keystream(key, d, np.uint32), expect)
    acc = np.arange(d, dtype=np.uint32)
    add_masks(acc, [key, derive_key(b"other", b"self", bytes(16))], [key])
    add_masks(acc, [], [derive_key(b"other", b"self", bytes(16))])
    assert np.array_equal(acc, np.arange(d, dtype=np.uint32))


def test_a_client_never_answers_two_unmasking_requests():
    n, t, session = 4, 3, bytes(16)
    peers = peer_graph(n, 0, session)
    clients = {c: SecAggClient(c, peers, t, session) for c in range(1, n + 1)}
    server = SecAggServer(peers, t, 10, np.uint32, session)
    adverts = server.collect_keys({c: cl.advertise_keys() for c, cl in clients.items()})
    inbox = server.route_shares({c: cl.share_keys(adverts) for c, cl in clients.items()})
    for c in (1, 2, 3, 4):
        server.receive_masked(c, clients[c].masked_input(inbox[c], np.zeros(10, np.uint32)))
    clients[1].unmask([1, 2, 3, 4])
    with pytest.raises(SecAggError, match="twice"):
        clients[1].unmask([1, 2, 3])  # would reveal client 4's s-key share on top of its self-mask share


def test_secagg_plus_neighbourhoods_sum_exactly_and_share_only_with_peers():
    n, k = 14, 6  # 7 share holders per client, threshold 5: any two of them may drop
    x = _updates(n, 1000, seed=5)
    fp = FixedPoint(0.1, n)
    enc = [fp.encode(v)[0] for v in x]
    held: list = []
    rep = secure_sum(enc, drop_after_shares=[3], drop_before_unmask=[8], neighbors=k, session=bytes(16),
                     observer=lambda kind, obj: held.append((kind, obj)))
    alive = [i for i in range(n) if i != 3]
    assert rep.survivors == alive and rep.threshold == threshold_for(k + 1)
    assert np.abs(fp.decode(rep.total) - x[alive].astype(np.float64).sum(0)).max() <= n * fp.step / 2 + 1e-12
    peers = peer_graph(n, k, bytes(16))
    assert all(len(p) == k and all(u in peers[v] for v in p) for u, p in peers.items())  # k-regular, symmetric
    sent = next(obj for kind, obj in held if kind == "shares")
    assert all(set(cts) == set(peers[u]) for u, cts in sent.items())  # work and bytes grow with k, not n
    assert rep.client_up_bytes[0] < secure_sum(enc).client_up_bytes[0]


def test_secagg_plus_fails_cleanly_when_a_neighbourhood_loses_too_many():
    n, k = 12, 4
    fp = FixedPoint(0.1, n)
    enc = [fp.encode(v)[0] for v in _updates(n, 100, seed=6)]
    peers = peer_graph(n, k, bytes(16))
    victim_peers = [v - 1 for v in peers[1]][:3]  # 3 of client 1's 4 peers drop: 2 of its 5 holders remain
    with pytest.raises(SecAggError, match="at least 4 are needed"):
        secure_sum(enc, drop_after_shares=victim_peers, neighbors=k, session=bytes(16))
