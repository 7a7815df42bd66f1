"""The Gboard-sized LSTM language model over word pieces (tied embeddings, projected LSTM)."""

from __future__ import annotations

import warnings
from dataclasses import asdict

import torch
from torch import nn

from fedkey.config import ModelConfig

State = tuple[torch.Tensor, torch.Tensor]

# PyTorch warns on every call that oneDNN lacks projected LSTMs; its own kernel is used, which is fine
warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")


class KeyboardLM(nn.Module):
    """Embedding -> LSTM with projection back to the embedding size -> tied output layer.

    nn.LSTM's `proj_size` gives Hard et al.'s LSTMP shape (670 units projected to 96) in
    PyTorch's fused kernel; the projection is what lets the output layer reuse the embedding.
    """

    def __init__(self, vocab_size: int, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ModelConfig()
        self.vocab_size = vocab_size
        d, h = self.cfg.embed_dim, self.cfg.hidden
        self.embed = nn.Embedding(vocab_size, d)
        self.lstm = nn.LSTM(d, h, proj_size=d, batch_first=True)
        self.out_bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.normal_(self.embed.weight, std=d**-0.5)

    def features(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """LSTM outputs (batch, time, embed_dim) and the new (h, c) state."""
        return self.lstm(self.embed(ids), state)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from LSTM outputs through the tied embedding."""
        return feats @ self.embed.weight.t() + self.out_bias

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """(batch, time) piece ids -> (batch, time, vocab) logits and the state after the last step."""
        feats, state = self.features(ids, state)
        return self.logits(feats), state

    @torch.no_grad()
    def init_output_bias(self, seqs: list[list[int]]) -> None:
        """Start the output bias at the log unigram distribution of these framed messages.

        Use public users' text: the model then starts from "predict common pieces" rather than
        uniform, which is worth a lot in short runs and reveals nothing about training users.
        """
        counts = torch.ones(self.vocab_size)
        for s in seqs:
            counts += torch.bincount(torch.tensor(s[1:]), minlength=self.vocab_size)[: self.vocab_size]
        self.out_bias.copy_(torch.log(counts / counts.sum()))

    def describe(self) -> dict:
        """Shape and size, for manifests and compatibility checks."""
        return {"vocab_size": self.vocab_size, **asdict(self.cfg),
                "params": sum(p.numel() for p in self.parameters())}
