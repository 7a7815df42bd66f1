"""Why secure aggregation: one plain client update names the word pieces its user typed (docs/threat_model.md)."""

from __future__ import annotations

import numpy as np
import torch

from fedkey.config import ModelConfig
from keyboard.batches import frame, pad_batch
from keyboard.model import KeyboardLM
from keyboard.train import lm_loss


def test_the_output_bias_delta_of_one_update_is_a_bag_of_the_typed_pieces(tiny_tok):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = KeyboardLM(tiny_tok.vocab_size, ModelConfig(embed_dim=16, hidden=32))
    start = model.out_bias.detach().clone()
    text = "see you tomorrow at the park"
    typed = set(tiny_tok.encode(text))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = pad_batch([frame(tiny_tok.encode(text), 64)] * 2)
    loss, _ = lm_loss(model, x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    torch.set_num_threads(threads)
    delta = (model.out_bias.detach() - start).numpy()
    targets = typed | {2}  # the typed pieces and end-of-message
    top = set(np.argsort(-delta)[: len(targets)].tolist())  # the pieces whose logit the update raised most
    assert top == targets  # exactly what was typed: the server reads it off one update
