"""A trained keyboard model on disk: weights, shape, and the tokenizer it was trained with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedkey.config import ModelConfig
from fedkey.errors import FedkeyError
from fedkey.io import load_torch, save_torch
from keyboard.model import KeyboardLM
from keyboard.tokenizer import Tokenizer

MODEL_FILE, TOKENIZER_FILE = "model.pt", "tokenizer.model"


def save_model(out_dir: str | Path, model: KeyboardLM, tok: Tokenizer, **extra: Any) -> Path:
    """Write model.pt (weights + shape + tokenizer hash) and tokenizer.model into out_dir."""
    out_dir = Path(out_dir)
    tok.save(out_dir / TOKENIZER_FILE)
    save_torch(out_dir / MODEL_FILE, {"state_dict": model.state_dict(), "model": model.describe(),
                                      "tokenizer_sha256": tok.sha256, **extra})
    return out_dir / MODEL_FILE


def load_model(model_dir: str | Path) -> tuple[KeyboardLM, Tokenizer, dict]:
    """Load a model directory; refuse one whose tokenizer is not the one it was trained with."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        model_dir = model_dir.parent
    ckpt = load_torch(model_dir / MODEL_FILE)
    tok = Tokenizer.load(model_dir / TOKENIZER_FILE)
    if ckpt.get("tokenizer_sha256") != tok.sha256:
        raise FedkeyError(f"{model_dir / TOKENIZER_FILE}: tokenizer does not belong to {model_dir / MODEL_FILE}; "
                          "copy the tokenizer.model the model was trained with")
    desc = ckpt["model"]
    model = KeyboardLM(desc["vocab_size"], ModelConfig(embed_dim=desc["embed_dim"], hidden=desc["hidden"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), tok, ckpt
