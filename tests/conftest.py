"""Shared fixtures: a tiny real corpus, tokenizer and trained model (seconds to build)."""

from __future__ import annotations

import random

import pytest
import torch

from fedkey.config import CentralConfig, ModelConfig
from keyboard.batches import frame
from keyboard.model import KeyboardLM
from keyboard.tokenizer import Tokenizer, train_tokenizer
from keyboard.train import train_central

PHRASES = [
    "how are you doing today",
    "i like the color blue",
    "what is your favorite color",
    "see you tomorrow at the park",
    "thank you so much for the help",
    "i am going to the store",
    "do you want to play a game",
    "my favorite food is pizza",
    "the weather is nice today",
    "good morning how was your night",
]


def tiny_texts(n: int = 400, seed: int = 0) -> list[str]:
    """A small corpus of repeated chat phrases (deterministic)."""
    rng = random.Random(seed)
    return [rng.choice(PHRASES) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_tok() -> Tokenizer:
    """A tokenizer with a small vocabulary trained on the tiny corpus."""
    return train_tokenizer(tiny_texts(2000) + ["colour colours favourite"] * 5, vocab_size=400, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_tok, tmp_path_factory) -> KeyboardLM:
    """A tiny LSTM trained to near-memorise the tiny corpus."""
    torch.manual_seed(0)
    model = KeyboardLM(tiny_tok.vocab_size, ModelConfig(embed_dim=16, hidden=48))
    seqs = [frame(ids, 64) for ids in tiny_tok.encode_batch(tiny_texts(400))]
    cfg = CentralConfig(lr=1e-2, batch_size=8, max_tokens=60_000, warmup_tokens=0, seed=0)
    train_central(model, seqs, cfg, tmp_path_factory.mktemp("tiny"))
    return model.eval()
