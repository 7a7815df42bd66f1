"""The on-device suggestion engine: an exported bundle, onnxruntime and the shared Predictor; no torch.

`load_bundle(dir, user)` gives an `OnDevicePredictor` with the Predictor's interface (`suggest`)
plus profile switching between the global model and the users shipped in the bundle (adapter, phrase
cache, spelling), and `learn(message)`: a sent message joins the profile's phrase cache.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from fedkey.errors import FedkeyError
from keyboard.adapter_file import load_adapter
from keyboard.bundle import (FP32, INT8, LEXICON, RESPELL, SENTINEL, TOKENIZER, Bundle, adapter_name, cache_name,
                             open_bundle)
from keyboard.onnx_backend import OnnxBackend, StepCache, make_session
from keyboard.phrase_cache import PhraseCache, PhraseCacheBackend, load_cache
from keyboard.sentinel import Sentinel, load_sentinel
from keyboard.predictor import Predictor, Suggestion
from keyboard.respell_file import unpack
from keyboard.search import LEX_MARGIN, search_words
from keyboard.tokenizer import BOS, EOS, Tokenizer
from keyboard.words import RESPELL_SPARE, WORD_RE, Lexicon, PieceTable, respell_scored, split_typed

MAX_K = 16
# the model conditions on the recent text only; the window starts on a block boundary so it moves
# rarely and the Predictor's per-piece state cache keeps working across keystrokes
WINDOW_CHARS = 256


def recent_text(text: str, window: int = WINDOW_CHARS) -> str:
    """The last `window`..2*`window` characters, cut at a stable block boundary and then at a space."""
    if len(text) <= 2 * window:
        return text
    start = (len(text) - window) // window * window
    space = text.find(" ", start, start + window)
    return text[space + 1 if space >= 0 else start:]


class WordCachePredictor(Predictor):
    """The Predictor plus what a keyboard engine adds: while one word is typed, earlier searches are reused.

    The search drops a prefix only when it cannot beat the k-th best complete word T, so every word
    scoring at least T was found: those words are certain. A typed character only narrows the prefix,
    so if at least k certain words still match it, they are exactly what a new search would return
    (up to the search's own beam cap); otherwise it searches again. Calling again with the same text
    (a redraw) and backspacing within the word also reuse the searches made for that word.
    The context's piece ids are kept while only the partial word changes. With a lexicon, the words of
    each finished context are learned, so a word the user typed can be suggested even if the list lacks it.
    """

    def __init__(self, *args, reuse_words: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reuse_words = reuse_words
        self.searches = self.reused = 0
        self._context: tuple[str, bool] | None = None
        self._ids: list[int] = []
        self._certain: dict[str, tuple[int, list[tuple[str, float]]]] = {}  # partial -> (k, words >= T, best first)

    def _reusable(self, partial: str, k: int) -> list[tuple[str, float]] | None:
        for n in range(len(partial), -1, -1):  # the most specific earlier search for this word
            prior = self._certain.get(partial[:n])
            if prior is not None and prior[0] >= k:
                words = [ws for ws in prior[1] if ws[0].startswith(partial)]
                return words[:k] if len(words) >= k else None
        return None

    def suggest(self, text: str, k: int = 3) -> list[Suggestion]:
        """Top-k whole words for the text typed so far (which may end mid-word)."""
        context, partial, space = split_typed(text)
        if (context, space) != self._context:
            self._context, self._certain = (context, space), {}
            self._ids = self.encode(context) if context.strip() else []
            if self.lexicon is not None:
                self.lexicon.learn(WORD_RE.findall(context))
        found = self._reusable(partial, k) if self.reuse_words else None
        if found is None:
            logp, h, c = self._state_for(self._ids)
            completed: list[dict[str, float]] = []
            found = search_words(self.backend, self.table, logp, h, c, [partial], [space], k=k,
                                 beam=max(self.beam, k), max_pieces=self.max_pieces, completed=completed,
                                 lexicon=self.lexicon)[0]
            if len(found) >= k:
                cut = found[k - 1][1]
                if self.lexicon is not None:  # with a lexicon the search also drops what is LEX_MARGIN below the best
                    cut = max(cut, found[0][1] - LEX_MARGIN)
                self._certain[partial] = (k, sorted(((w, v) for w, v in completed[0].items() if v >= cut),
                                                    key=lambda kv: -kv[1]))
            self.searches += 1
        else:
            self.reused += 1
        return [Suggestion(w, math.exp(s)) for w, s in found]


class OnDevicePredictor:
    """Completes the word being typed or predicts the next one, from an exported bundle."""

    def __init__(self, bundle: Bundle, backend: OnnxBackend, tok: Tokenizer, model_name: str, model_bytes: int,
                 beam: int = 6, max_pieces: int = 6, cache: bool = True, lexicon: Lexicon | None = None) -> None:
        self.bundle, self.backend, self.tokenizer, self.lexicon = bundle, backend, tok, lexicon
        self.model_name, self.model_bytes = model_name, model_bytes
        self.table = PieceTable.from_tokenizer(tok)
        if lexicon is not None:  # the pieces that start a word, computed at load rather than on the first keystroke
            lexicon.warm(self.table)
        self.beam, self.max_pieces, self.cache = beam, max_pieces, cache
        self.last_latency_ms = 0.0
        self.load_ms = 0.0
        self._profile: str | None = None
        self._respell: dict[str, str] = {}  # the profile's whole-word spelling preference: other variant -> own
        self._phrases: PhraseCache | None = None  # the profile's phrase cache (None: the profile has none)
        self._phrases_of: dict[str, PhraseCache] = {}  # loaded caches, with what each learned, across profile switches
        self._sentinel: Sentinel | None = None  # the check on the caches' changes, loaded with the first cache
        self._reset()

    def _reset(self) -> None:
        # cached log-probabilities depend on the adapter, so a profile switch starts fresh caches;
        # the words learned while typing belong to the profile too
        self.steps = StepCache(self.backend, capacity=128 if self.cache else 0)
        self._new_predictor(self.lexicon.fresh() if self.lexicon is not None else None)

    def _new_predictor(self, lexicon: Lexicon | None) -> None:
        steps = self.steps if self._phrases is None else PhraseCacheBackend(self.steps, self._phrases, self._sentinel)
        self.predictor = WordCachePredictor(steps, self.table, self.tokenizer.encode, beam=self.beam,
                                            max_pieces=self.max_pieces, reuse_words=self.cache, lexicon=lexicon)

    @property
    def profile(self) -> str | None:
        """The user whose adapter is applied (None: the global model)."""
        return self._profile

    def profiles(self) -> list[tuple[str, str]]:
        """(user_id, region) of every adapter shipped in the bundle."""
        return sorted(self.bundle.profiles.items())

    def set_profile(self, user_id: str | None) -> None:
        """Apply a shipped user's adapter, or the global model for None."""
        if user_id is None:
            self.backend.clear_adapter()
        else:
            if user_id not in self.bundle.profiles:
                shipped = ", ".join(sorted(self.bundle.profiles)) or "none"
                raise FedkeyError(f"user {user_id!r}: no adapter in {self.bundle.dir} (shipped: {shipped}); "
                                  "export with `fedkey export --user ID`")
            name, files = adapter_name(user_id), self.bundle.manifest["files"]
            if name in files:
                self.bundle.read(name)  # verified against the manifest before use
                ad = load_adapter(self.bundle.dir / name, expect_base_id=self.bundle.manifest["base_id"],
                                  vocab_size=self.backend.vocab_size, embed_dim=self.backend.embed_dim)
                self.backend.set_adapter(ad.A, ad.B, ad.user_bias)
            else:  # a user shipped for their phrase cache alone
                self.backend.clear_adapter()
        cname = cache_name(user_id) if user_id is not None else None
        if cname is not None and cname in self.bundle.manifest["files"] and user_id not in self._phrases_of:
            self._phrases_of[user_id] = load_cache(self.bundle.dir / cname, self.bundle.manifest["base_id"],
                                                   self.bundle.read(cname))
        self._phrases = self._phrases_of.get(user_id) if user_id is not None else None
        if self._phrases is not None and self._sentinel is None and SENTINEL in self.bundle.manifest["files"]:
            self._sentinel = load_sentinel(self.bundle.dir / SENTINEL, self.bundle.manifest["base_id"],
                                           self.bundle.read(SENTINEL))
        self._respell = self._respelling(user_id) if user_id is not None else {}
        self._profile = user_id
        self._reset()

    def _respelling(self, user_id: str) -> dict[str, str]:
        if RESPELL not in self.bundle.manifest["files"]:
            return {}
        try:
            doc = json.loads(self.bundle.read(RESPELL).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FedkeyError(f"{self.bundle.dir / RESPELL}: not valid JSON; re-run `fedkey export`") from None
        return unpack(doc, user_id, str(self.bundle.dir / RESPELL))

    def learn(self, message: str) -> bool:
        """Add a sent message to the profile's phrase cache (what a user sends is likely again); returns
        whether it was learned: the global model and a profile without a phrase cache learn nothing."""
        if self._phrases is None or not isinstance(message, str) or not message.strip():
            return False
        self._phrases.learn([BOS, *self.tokenizer.encode(message), EOS])
        lexicon = self.predictor.lexicon
        if lexicon is not None:  # a word the user sent is theirs to be offered, listed or not
            lexicon.learn(WORD_RE.findall(message))
        self._new_predictor(lexicon)  # its kept states hold distributions mixed before
        return True

    @property
    def steps_run(self) -> int:
        """Context pieces fed to the model so far (the Predictor's counter, for state-reuse checks)."""
        return self.predictor.steps_run

    def suggest(self, text: str, k: int = 3) -> list[Suggestion]:
        """Top-k whole words for the text typed so far (which may end mid-word)."""
        t0 = time.perf_counter()
        if not isinstance(text, str):
            raise FedkeyError(f"suggest() takes the typed text as str, not {type(text).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise FedkeyError(f"suggest(k={k!r}): k must be an integer from 1 to {MAX_K}")
        text = recent_text(text)
        # lone surrogates (from broken clipboard text) cannot be encoded; they become U+FFFD
        text = text.encode("utf-8", "replace").decode("utf-8") if not text.isascii() else text
        out = self.predictor.suggest(text, k)
        if self._respell:  # the user's own spelling of a suggested word, shown once in its place
            partial = split_typed(text)[1]
            pairs = respell_scored([(s.word, s.prob) for s in out], self._respell, partial)
            if len(pairs) < len(out) and k < MAX_K:  # two variants merged: a few words more fill the freed slot
                wider = self.predictor.suggest(text, min(k + RESPELL_SPARE, MAX_K))
                pairs = respell_scored([(s.word, s.prob) for s in wider], self._respell, partial)
            out = [Suggestion(w, p) for w, p in pairs[:k]]
        self.last_latency_ms = (time.perf_counter() - t0) * 1e3
        return out


def load_bundle(bundle_dir: str | Path, user: str | None = None, int8: bool = True, threads: int = 1,
                cache: bool = True) -> OnDevicePredictor:
    """Open an exported bundle (verifying every file it reads) as a predictor for `user` (None: global).

    `threads`: onnxruntime intra-op threads (1: lowest latency for one row). `cache`: reuse work across
    keystrokes (steps and the current word's completed words); False gives the plain Predictor's results.
    """
    t0 = time.perf_counter()
    bundle = open_bundle(bundle_dir)
    name = INT8 if int8 else FP32
    model = bundle.read(name)
    tok = Tokenizer(bundle.read(TOKENIZER), str(bundle.dir / TOKENIZER))
    if tok.sha256 != bundle.manifest.get("tokenizer_sha256"):
        raise FedkeyError(f"{bundle.dir / TOKENIZER}: a tokenizer from another model (the manifest names "
                          f"{str(bundle.manifest.get('tokenizer_sha256'))[:12]}); re-run `fedkey export`")
    backend = OnnxBackend(make_session(model, threads, str(bundle.dir / name)))
    man = bundle.manifest
    if (backend.vocab_size, backend.embed_dim, backend.hidden) != (man["vocab_size"], man["embed_dim"], man["hidden"]) \
            or tok.vocab_size != man["vocab_size"]:
        raise FedkeyError(f"{bundle.dir / name}: shapes do not match {bundle.dir / 'manifest.json'}; re-run `fedkey export`")
    lexicon = None
    if LEXICON in man["files"]:  # bundles exported without public text ship none: suggestions are unfiltered
        try:
            lexicon = Lexicon.from_text(bundle.read(LEXICON).decode("utf-8"))
        except UnicodeDecodeError:
            raise FedkeyError(f"{bundle.dir / LEXICON}: not UTF-8 text; re-run `fedkey export`") from None
    pred = OnDevicePredictor(bundle, backend, tok, name, len(model), cache=cache, lexicon=lexicon)
    if user is not None:
        pred.set_profile(user)
    pred.load_ms = (time.perf_counter() - t0) * 1e3
    return pred

