"""Back-off trigram next-word model over whole words: the count-based baseline (Gboard compared to n-grams)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from functools import lru_cache

from keyboard.words import WORD_RE, normalize


class BackoffNgram:
    """Stupid-backoff trigram (Brants et al. 2007): trigram counts, else bigram, else unigram, scaled by 0.4."""

    def __init__(self, texts: Iterable[str], alpha: float = 0.4, keep: int = 32) -> None:
        self.alpha = alpha
        tri: dict[tuple[str, str], Counter] = defaultdict(Counter)
        bi: dict[str, Counter] = defaultdict(Counter)
        uni: Counter = Counter()
        for text in texts:
            words = ["<s>", "<s>"] + WORD_RE.findall(normalize(text))
            for a, b, c in zip(words, words[1:], words[2:]):
                tri[(a, b)][c] += 1
                bi[b][c] += 1
                uni[c] += 1
        # keep only the head of each continuation list: ranking needs nothing else
        self.tri = {k: v.most_common(keep) for k, v in tri.items()}
        self.bi = {k: v.most_common(keep) for k, v in bi.items()}
        self.tri_tot = {k: sum(v.values()) for k, v in tri.items()}
        self.bi_tot = {k: sum(v.values()) for k, v in bi.items()}
        self.uni = uni.most_common()
        self.uni_tot = sum(uni.values())
        self._uni_prefix = lru_cache(maxsize=100_000)(self._uni_with_prefix)

    def _uni_with_prefix(self, prefix: str, k: int) -> tuple[tuple[str, float], ...]:
        out = []
        for w, n in self.uni:
            if w.startswith(prefix):
                out.append((w, self.alpha**2 * n / self.uni_tot))
                if len(out) == k:
                    break
        return tuple(out)

    def suggest(self, prev: list[str], k: int = 3, prefix: str = "") -> list[str]:
        """Top-k next words after the previous words, optionally completing a typed prefix."""
        prev = ["<s>", "<s>"] + prev
        a, b = prev[-2], prev[-1]
        scores: dict[str, float] = {}
        for w, n in self.tri.get((a, b), ()):
            if w.startswith(prefix):
                scores.setdefault(w, n / self.tri_tot[(a, b)])
        for w, n in self.bi.get(b, ()):
            if w.startswith(prefix):
                scores.setdefault(w, self.alpha * n / self.bi_tot[b])
        for w, s in self._uni_prefix(prefix, k):
            scores.setdefault(w, s)
        return [w for w, _ in sorted(scores.items(), key=lambda kv: -kv[1])[:k]]
