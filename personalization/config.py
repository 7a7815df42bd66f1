"""Settings of per-user personalization (the [personal] table of a run config)."""

from __future__ import annotations

from dataclasses import dataclass

from fedkey.fields import option as _f

MODES = ("adapter", "bias", "last", "full")


@dataclass
class PersonalConfig:
    """Per-user adapters on a frozen global model, trained on each user's own train split only."""

    SECTION = "personal"
    mode: str = _f("adapter", "adapter: low-rank residual adapter + output bias | bias: output bias only | "
                   "last: fine-tune the LSTM projection and output bias | full: fine-tune every weight "
                   "(last/full are for comparison: they make whole models, not adapter files)")
    rank: int = _f(8, "rank of the residual adapter f + (f A) B on the LSTM output")
    steps: int = _f(60, "Adam steps per user (the best validation check is kept)")
    batch_tokens: int = _f(256, "pieces per user per step (users with fewer train on all of theirs each step)")
    lr: float = _f(0.01, "Adam learning rate of the low-rank adapter")
    bias_lr: float = _f(0.7, "damping of the output bias's diagonal Newton steps (1: full steps)")
    prior_bias: float = _f(30.0, "pseudo-count of the output bias's prior: bias ~ log((typed + k) / (expected + k))")
    # with respelling on, pushing the other variant down hid it before it could be shown respelled: on runs/full21's
    # model GB users' regional-variant accuracy once "colo"/"favo" is typed went 79.7% -> 85.8% without the push,
    # next-word 29.7% -> 34.5%, as typed 93.9% -> 94.6%; top-1 gain and users hurt the same (docs/results/sweeps.md,
    # session 21)
    regional_penalty: float = _f(4.0, "spelling preference: where the user typed one variant of an American/British "
                                 "pair and never the other, the other's first piece goes down this many nats if "
                                 "suggestions are not respelled (regional_respell false; 0: the whole preference off)")
    regional_max_lift: float = _f(3.0, "spelling preference: the own variant's first piece goes up by at most this "
                                  "(it takes over the other variant's unigram mass)")
    regional_min_words: int = _f(2, "a user with this many regional words typed, all of one region, gets that "
                                 "region's variant of every pair (0: only pairs they typed)")
    regional_respell: bool = _f(True, "spelling preference: a suggested word whose other variant the user prefers "
                                "is shown in the user's own spelling (whole words: the bias cannot separate "
                                "variants that share their first piece)")
    # runs/s5_lr005's model, all 916 users, as typed: GB 85.8% without the locale, 93.2% with it (US 83.2% -> 86.1%),
    # the same mean top-1 gain and users hurt: a keyboard knows its locale on the device that personalizes
    regional_locale: bool = _f(True, "spelling preference: a user whose own words show none (or too little) gets "
                               "their keyboard locale's variant of every pair (the user's region stands for the locale; "
                               "false: the user's own words only)")
    prior_adapter: float = _f(4.0, "Gaussian prior on the adapter's B: this times its squared norm joins the summed loss")
    cache_order: int = _f(4, "phrase cache: the user's own n-grams of up to this many pieces mixed into the next-piece "
                          "distribution (the classic cache LM; 0: off)")
    cache_lam: float = _f(0.2, "phrase cache: most weight one context's continuations take from the model")
    cache_m0: float = _f(5.0, "phrase cache: a context seen n times gets weight cache_lam * n / (n + this)")
    # a heavy writer's cache holds ~6-8 bytes a piece once compressed: 8k pieces keep the file near 65 kB
    cache_max_pieces: int = _f(8192, "phrase cache: built from the user's latest messages holding at most this many "
                                     "pieces (keeps the file small; 0: all)")
    cache_learn: bool = _f(True, "phrase cache: it learns each message the user sends, as the on-device runtime's "
                           "learn() does; the gate and the report replay the validation and test messages in the "
                           "order they were sent (false: the cache of the train text only)")
    # protecting users comes first (Motley 2022): with 0, 5.3% of runs/full's users lost > 0.5 point;
    # on today's federated model (small rounds, 18.0% top-1) a 1-word lead left 33 of 608 users hurt (5.4%,
    # +0.29 mean gain), 2 words 23 (3.8%, +0.26), 3 words 16 (2.6%, +0.20) (runs/full15, runs/p15g2, runs/p15g3)
    cache_gate_top1: int = _f(2, "keep the phrase cache only if it gets at least this many more validation words "
                              "right at top-1 than the model without it, at no higher validation loss (-1: always keep)")
    # runs/full, the full preset's report: +0.41 -> +0.56 mean top-1 gain, users hurt 21 -> 25 of 608 (session 10)
    cache_small_slice_loss: bool = _f(True, "a user whose validation slice has fewer than gate_min_words one-piece "
                                      "words keeps the phrase cache if it lowers validation loss (false: the same "
                                      "top-1 rule as everyone, which so few words rarely pass)")
    # chosen by session 25's replay (docs/results/personal25/cache_rules.py; 2,000 or 1,000 pieces hurt 4 or 16 more
    # users on the whole test splits); session 26 measured: whole test splits +0.23 -> +0.28 per user with the same
    # 18 users hurt, the full preset's sample +0.27 -> +0.34 with 20 -> 25 hurt (4.1%); on the quick preset's weaker
    # model's whole test splits +0.33 -> +0.43, 29 -> 28 hurt, no heavy writer hurt (docs/results/sweeps.md, session 26)
    cache_keep_pieces: int = _f(3000, "keep the phrase cache, whatever its validation says, for a user whose train "
                                "split holds at least this many pieces (0: the validation gate for everyone)")
    cache_sentinel: float = _f(0.0, "the phrase cache changes a top suggestion only where the shared sentinel "
                               "gives the change at least this probability of being right (0: off, every change; "
                               "0.6: mean gain +0.53 instead of +0.56, 22 users hurt instead of 25; docs/results/sweeps.md session 12)")
    sentinel_min_changes: int = _f(200, "fit the sentinel only from at least this many decisive validation changes")
    val_frac: float = _f(0.1, "latest fraction of each user's train messages used as the local validation slice")
    min_val_tokens: int = _f(8, "users with fewer validation pieces keep the global model")
    gate_margin: float = _f(0.03, "keep the adapter only if it lowers validation loss by this fraction")
    gate_top1_gain: int = _f(2, "... and only if it gets at least this many more one-piece validation words right at "
                             "top-1 (a lower loss alone often comes with worse whole-word suggestions)")
    # runs/s5_lr005's model: 3 users kept a trained adapter on 2 more right of < 20 validation words; one of them
    # went from 9 of 15 test words right to none
    gate_min_words: int = _f(20, "... and only if the validation slice has at least this many one-piece words to judge "
                             "it by (smaller slices still get the spelling preference and phrase cache gates)")
    max_train_tokens: int = _f(2048, "train on at most the latest this many pieces of each user")
    # 512 cut the heaviest writers' slices below the latest 10%, and their gate then turned down caches that help
    # them: 2048 keeps more (session 25: whole test splits +0.21 -> +0.23 per user, the same users hurt)
    max_val_tokens: int = _f(2048, "validate on at most the latest this many pieces of each user")
    max_len: int = _f(64, "longer messages are cut to this many pieces")
    shortlist: int = _f(1024, "output pieces trained exactly per user (own pieces + the base's likeliest); "
                        "the rest is one tail term")
    eval_every: int = _f(5, "steps between validation checks (early stopping)")
    group_tokens: int = _f(16384, "padded pieces of users trained together in one batched computation")
    max_users: int = _f(0, "personalize only the first N users by id (0: all train users)")
    seed: int = _f(0, "seed for adapter initialization")
    threads: int = _f(0, "torch threads (0: all cores)")
