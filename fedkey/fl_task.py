"""The keyboard model as a federated task: a user's messages become local batches; losses for one or many clients.

This is the text-specific glue fl_core is given. A client's round: a fresh random sample of
at most `max_messages` of its train messages, read from the shards when it is selected
(nothing per user is kept in RAM), bucketed by length per epoch (as the central trainer
does) and cut into batches of B messages in random order.

`reference_loss` runs the real KeyboardLM (nn.LSTM) on a padded batch. `loss` (one client)
and `lane_loss` (many at once) compute the same with the LSTM written over a lane
dimension (fl_core.lane_ops: input projections and weight gradients as whole-sequence
matmuls rather than per step) and without padding waste: each client's messages are packed one after another into rows of the
longest message's length (first-fit decreasing), the LSTM state is reset at each message's
BOS, and the output layer is computed only at real target positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from fl_core.client import ClientData
from fl_core.lane_ops import lane_lstm
from keyboard.batches import bucketed_order, frame, pad_batch
from keyboard.model import KeyboardLM
from keyboard.tokenizer import BOS, PAD

if TYPE_CHECKING:
    from data.shards import Shards
    from keyboard.tokenizer import Tokenizer

Batch = list[list[int]]  # framed messages (BOS ... EOS)


def pack_lanes(batches: Sequence[Batch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Pack each lane's messages into rows: x (L, T, R) inputs, targets (L, N) at real positions, their index, N."""
    T = max(len(s) - 1 for b in batches for s in b)
    lane_rows: list[list[list[list[int]]]] = []
    for b in batches:
        rows: list[list[list[int]]] = []
        room: list[int] = []
        for s in sorted(b, key=len, reverse=True):  # first-fit decreasing
            n = len(s) - 1
            for r, free in enumerate(room):
                if n <= free:
                    rows[r].append(s)
                    room[r] -= n
                    break
            else:
                rows.append([s])
                room.append(T - n)
        lane_rows.append(rows)
    L, R = len(batches), max(len(r) for r in lane_rows)
    x = np.full((L, T, R), PAD, dtype=np.int64)
    counts = [sum(len(s) - 1 for s in b) for b in batches]
    N = max(counts)
    tgt = np.full((L, N), PAD, dtype=np.int64)
    pos = np.zeros((L, N), dtype=np.int64)
    for lane, rows in enumerate(lane_rows):
        k = 0
        for r, msgs in enumerate(rows):
            t = 0
            for s in msgs:
                n = len(s) - 1
                x[lane, t:t + n, r] = s[:-1]
                tgt[lane, k:k + n] = s[1:]
                pos[lane, k:k + n] = np.arange(t, t + n) * R + r  # flat (time, row) index
                k += n
                t += n
    return torch.from_numpy(x), torch.from_numpy(tgt), torch.from_numpy(pos), N


class KeyboardTask:
    """ClientTask for KeyboardLM over prepared shards; clients are user ids of `split`."""

    def __init__(self, shards: Shards, tok: Tokenizer, model: KeyboardLM, batch_size: int, max_messages: int,
                 max_len: int, local_epochs: int = 1, split: str = "train") -> None:
        self.shards, self.tok, self.split = shards, tok, split
        self.template = model
        self.batch_size, self.max_messages, self.max_len, self.epochs = batch_size, max_messages, max_len, local_epochs

    def client_data(self, client: str, rng: np.random.Generator) -> ClientData:
        """A fresh sample of the user's messages, E shuffled passes, cut into batches."""
        texts = self.shards.user_texts(self.split, client)
        if len(texts) > self.max_messages:
            texts = [texts[i] for i in sorted(rng.choice(len(texts), self.max_messages, replace=False))]
        seqs = [frame(ids, self.max_len) for ids in self.tok.encode_batch(texts)] if texts else []
        return batches_of(seqs, self.batch_size, self.epochs, rng)

    def client_size(self, client: str) -> int:
        """How many messages the user holds (the server may know this; it never sees them)."""
        return self.shards.n_messages(self.split, client)

    def loss(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Mean next-piece cross-entropy of one batch (packed rows, no padding computed)."""
        return lane_lm_loss({n: p.unsqueeze(0) for n, p in params.items()}, [batch])[0]

    def reference_loss(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """The same loss through the real KeyboardLM (nn.LSTM on a padded batch): what `loss` must equal."""
        x, y = pad_batch(batch)
        logits, _ = torch.func.functional_call(self.template, params, (x,))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=PAD)

    def lane_loss(self, params: dict[str, torch.Tensor], batches: Sequence[Batch]) -> torch.Tensor:
        """Per-lane mean cross-entropy for L clients at once (packed rows, hand-batched LSTM)."""
        return lane_lm_loss(params, batches)


def batches_of(seqs: list[list[int]], batch_size: int, epochs: int, rng: np.random.Generator) -> ClientData:
    """E passes over framed messages in batches of batch_size, bucketed by length as the central trainer does."""
    batches: list[Batch] = []
    lengths = np.array([len(s) for s in seqs])
    for _ in range(epochs):  # one window over the client's whole sample: similar lengths share a batch
        batches += [[seqs[i] for i in idx] for idx in bucketed_order(lengths, batch_size, rng, window=len(seqs) + 1)]
    n_tok = sum(len(s) - 1 for s in seqs)
    return ClientData(batches, len(seqs), n_tok, n_tok * epochs)


def lane_lm_loss(params: dict[str, torch.Tensor], batches: Sequence[Batch]) -> torch.Tensor:
    """KeyboardLM's loss over stacked parameters {name: (L, *shape)}; returns (L,) per-lane mean losses."""
    E = params["embed.weight"]
    L, V, D = E.shape
    x, tgt, pos, N = pack_lanes(batches)
    _, T, R = x.shape
    emb = F.embedding(x + (torch.arange(L) * V).view(L, 1, 1), E.reshape(L * V, D))
    feats = lane_lstm(emb, x != BOS, params["lstm.weight_ih_l0"], params["lstm.weight_hh_l0"],
                      params["lstm.bias_ih_l0"], params["lstm.bias_hh_l0"], params["lstm.weight_hr_l0"])
    feats = feats.reshape(L, T * R, D).gather(1, pos.unsqueeze(-1).expand(L, N, D))
    if "adapter_A" in params:  # a residual adapter on the LSTM output, f + (f A) B (personalization.fedper)
        feats = feats + torch.bmm(torch.bmm(feats, params["adapter_A"]), params["adapter_B"])
    logits = torch.baddbmm(params["out_bias"].unsqueeze(1), feats, E.transpose(1, 2))
    nll = F.cross_entropy(logits.reshape(L * N, V), tgt.reshape(-1), ignore_index=PAD, reduction="none").view(L, N)
    return nll.sum(1) / (tgt != PAD).sum(1).clamp(min=1)
