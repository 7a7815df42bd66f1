"""Padded training batches of messages with little padding: messages of similar length go together."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from keyboard.tokenizer import BOS, EOS, PAD


def frame(ids: list[int], max_len: int) -> list[int]:
    """A message as the model sees it: BOS, its pieces (cut to max_len), EOS."""
    return [BOS] + ids[: max_len - 1] + [EOS]


def pad_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (PAD where there is no target) for a list of framed messages."""
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), PAD, dtype=torch.long)
    y = torch.full((len(seqs), T), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s) - 1
        x[i, :n] = torch.tensor(s[:-1])
        y[i, :n] = torch.tensor(s[1:])
    return x, y


def bucketed_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, window: int = 64) -> list[np.ndarray]:
    """Shuffle, sort within windows of `window` batches by length, cut into batches, shuffle the batches."""
    perm = rng.permutation(len(lengths))
    span = batch_size * window
    batches = []
    for s in range(0, len(perm), span):
        chunk = perm[s:s + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def iterate_epoch(seqs: list[list[int]], batch_size: int, seed: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of one epoch, a pure function of (seed, epoch) so a resumed run sees the same order."""
    rng = np.random.default_rng([seed, epoch])
    lengths = np.array([len(s) for s in seqs])
    for idx in bucketed_order(lengths, batch_size, rng):
        yield pad_batch([seqs[i] for i in idx])
