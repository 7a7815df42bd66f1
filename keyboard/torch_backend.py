"""Runs the torch model one step at a time for the Predictor and the whole-word search."""

from __future__ import annotations

import numpy as np
import torch

from keyboard.tokenizer import BOS


def lstm_cell(lstm: torch.nn.LSTM, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of a one-layer (projected) nn.LSTM written out: faster than nn.LSTM for a single step."""
    gates = torch.addmm(lstm.bias_ih_l0 + lstm.bias_hh_l0, x, lstm.weight_ih_l0.t())
    gates = gates.addmm_(h, lstm.weight_hh_l0.t())
    i, f, g, o = gates.chunk(4, dim=1)
    c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h2 = torch.sigmoid(o) * torch.tanh(c2)
    if lstm.proj_size:
        h2 = h2 @ lstm.weight_hr_l0.t()
    return h2, c2


class TorchBackend:
    """StepBackend over any module with `features(ids, state)` and `logits(feats)` (base or personalized)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        base = getattr(model, "base", model)
        self.lstm, self.embed = base.lstm, base.embed
        # a personalized model transforms LSTM outputs before the output layer
        self.post = getattr(model, "adapt", lambda f: f)

    @torch.inference_mode()
    def step(self, ids: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feed one piece per row; return log-probabilities of the next piece and the new state."""
        x = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        h, c = torch.from_numpy(np.ascontiguousarray(h)), torch.from_numpy(np.ascontiguousarray(c))
        h2, c2 = lstm_cell(self.lstm, self.embed(x), h, c)
        logp = torch.log_softmax(self.model.logits(self.post(h2)), dim=-1)
        return logp.numpy(), h2.numpy(), c2.numpy()

    def initial(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """State after the begin-of-message piece, for n rows."""
        h = np.zeros((n, self.lstm.proj_size or self.lstm.hidden_size), dtype=np.float32)
        c = np.zeros((n, self.lstm.hidden_size), dtype=np.float32)
        return self.step(np.full(n, BOS, dtype=np.int64), h, c)
