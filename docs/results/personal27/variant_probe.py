"""Would a user's informal-variant preference ("ok" not "okay", "im" not "i'm") move top-1? (issue 4, session 27)

    .venv/bin/python docs/results/personal27/variant_probe.py --run-dir runs/full21 [--json F]

The spelling preference generalized from American/British pairs to chat variants: where a user's train split
has one variant of a pair and never the other, the global model's top-1 next piece, if it is the other variant's
piece, is swapped for the user's own. Teacher-forced over every word start of every user's whole test split
(nothing of the word typed; top-1 among the pieces that start a word, as a keyboard shows words), pairs whose
variants are both one piece. Also counts what the global model's top-1 is at all: the few words it names at most
word starts are what any per-user change must overturn to move top-1.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from data.shards import Shards
from keyboard.checkpoint import load_model
from keyboard.words import WORD_RE, PieceTable, normalize

# chat variants of the same word or answer; the first is the common one in this corpus
PAIRS = [("you", "u"), ("your", "ur"), ("okay", "ok"), ("okay", "k"), ("alright", "ok"), ("yeah", "yea"),
         ("yeah", "ya"), ("yes", "yeah"), ("sure", "yeah"), ("haha", "lol"), ("haha", "hahaha"), ("hi", "hey"),
         ("hello", "hi"), ("because", "cuz"), ("though", "tho"), ("dont", "don't"), ("im", "i'm"),
         ("cant", "can't"), ("didnt", "didn't"), ("doesnt", "doesn't"), ("isnt", "isn't"), ("wasnt", "wasn't")]


def main() -> None:
    """Print (and optionally save) the swap's top-1 effect and the global model's top-1 vocabulary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok, _ = load_model(a.run_dir / "fl")
    shards = Shards.load(a.run_dir / "data")
    one = {w: ids[0] for w in {w for p in PAIRS for w in p} if len(ids := tok.encode(w)) == 1}
    pairs = [(x, y) for x, y in PAIRS if x in one and y in one]
    train_words: dict[str, Counter] = defaultdict(Counter)
    for u in shards.users("train"):
        for text in shards.user_texts("train", u):
            train_words[u].update(WORD_RE.findall(normalize(text)))
    swap: dict[str, dict[int, int]] = defaultdict(dict)  # user -> {other variant's piece: own variant's piece}
    for u, c in train_words.items():
        for x, y in pairs:
            if c[x] and not c[y]:
                swap[u][one[y]] = one[x]
            elif c[y] and not c[x]:
                swap[u][one[x]] = one[y]
    word_start = PieceTable.from_tokenizer(tok).start_space
    starts = set(word_start.tolist())
    not_word = torch.ones(tok.vocab_size, dtype=torch.bool)
    not_word[torch.from_numpy(word_start)] = False
    top_words: Counter = Counter()
    per_user, changed, fixed, broken = {}, 0, 0, 0
    bos = tok.sp.bos_id()
    for u in shards.users("test"):
        n = right = right_swapped = 0
        for text in shards.user_texts("test", u):
            s = tok.encode(text)
            if not s:
                continue
            with torch.no_grad():
                # the keyboard suggests words: top-1 is the likeliest piece that starts one
                top = model(torch.tensor([[bos] + s[:-1]]))[0][0].masked_fill(not_word, float("-inf")).argmax(-1).tolist()
            for p, t in zip(s, top):
                if p not in starts:
                    continue
                n += 1
                top_words[t] += 1
                t2 = swap[u].get(t, t)
                changed += t2 != t
                fixed += t2 == p != t
                broken += t == p != t2
                right += t == p
                right_swapped += t2 == p
        if n:
            per_user[u] = (n, right, right_swapped)
    gains = np.array([(r2 - r) / n * 100 for n, r, r2 in per_user.values()])
    total = sum(top_words.values())
    share = {k: sum(c for _, c in top_words.most_common(k)) / total for k in (1, 5, 10, 50)}
    out = {"pairs_one_piece": len(pairs), "users_with_a_preference": sum(bool(v) for v in swap.values()),
           "users": len(gains), "word_starts": total, "top1_changed": changed, "fixed": fixed,
           "broken": broken, "mean_top1_gain": float(gains.mean()), "users_hurt": int((gains < -0.5).sum()),
           "top1_share_of_most_named": share,
           "most_named": [(tok.sp.id_to_piece(t), c) for t, c in top_words.most_common(10)]}
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
