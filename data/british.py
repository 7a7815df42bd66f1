"""American -> British spelling for chat text, from breame's pair list minus pairs that are wrong in chat."""

from __future__ import annotations

import re

from breame.data.spelling_constants import AMERICAN_ENGLISH_SPELLINGS

# Pairs breame lists that would make chat text wrong or odd; american -> british as breame has them.
EXCLUDED_PAIRS: dict[str, str] = {
    # "tons of homework": the informal quantity is "tons" in British chat too.
    "ton": "tonne", "tons": "tonnes",
    # Software sense ("a program", "programs") is spelled "program" in British English.
    "program": "programme", "programs": "programmes",
    # British "practice" is the noun; these forms are usually nouns (practised/practising stay: verbs only).
    "practice": "practise", "practices": "practises",
    # "connexion" is archaic.
    "connection": "connexion", "connections": "connexions",
    # "biased" is the usual British spelling too.
    "biased": "biassed", "biasing": "biassing",
    # The verb "to tire" ("I'm tired", "it tires me") is the same in both.
    "tire": "tyre", "tires": "tyres",
    # British uses "draft" for documents, e-mails and sports drafts; "draught" only for beer and air.
    "draft": "draught", "drafts": "draughts",
    # A computer "disk" is "disk" in British English too.
    "disk": "disc", "disks": "discs",
    # "install" is by far the usual British spelling.
    "install": "instal", "installs": "instals",
    # The British verb is "license", so these stay (the noun "licence" is still converted).
    "licensed": "licenced", "licensing": "licencing",
    # "gramme" is archaic in Britain; "gram" is also chat slang for Instagram.
    "gram": "gramme", "grams": "grammes", "kilogram": "kilogramme", "kilograms": "kilogrammes",
    "milligram": "milligramme", "milligrams": "milligrammes", "centigram": "centigramme", "centigrams": "centigrammes",
    # Different words, not spellings: a philtre is a potion, a groyne a sea wall, a bevvy a drink.
    "filter": "philtre", "filters": "philtres", "groin": "groyne", "groins": "groynes",
    "bevy": "bevvy", "bevies": "bevvies",
    # "Griffin" is mostly a surname in chat.
    "griffin": "gryphon", "griffins": "gryphons",
    # Errors in breame: wrong word or wrong inflection.
    "tranquility": "tranquilly", "pummel": "pummelled", "pummeled": "pummelling", "snowplow": "snowploughs",
}
# Kept on purpose: meter -> metre (in chat, mostly the unit), judgment -> judgement (usual outside law);
# check/cheque is not in breame's list (only checkbook/checkered, which are right).

REGIONAL_PAIRS: dict[str, str] = {
    us.lower(): gb.lower() for us, gb in AMERICAN_ENGLISH_SPELLINGS.items() if us.lower() not in EXCLUDED_PAIRS
}


def _trie_regex(words: list[str]) -> str:
    """One alternation with shared prefixes factored out, so `re` does not try 1.7k branches at every letter."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        end = "" in node
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # A word may also stop here; the greedy `?` tries the longer words first.
        return "(?:" + body + ")?" if end else body

    return emit(trie)


_LETTER = r"[^\W\d_]"
# URLs and e-mail addresses are consumed whole (and returned unchanged) before any word inside them can match.
_PATTERN = re.compile(
    r"(?P<skip>(?:https?://|(?<!" + _LETTER + r")www\.)\S+|(?<!\S)[^\s@]+@[^\s@]+\.[^\s@]+)"
    r"|(?<!" + _LETTER + r")(?P<word>" + _trie_regex(sorted(REGIONAL_PAIRS)) + r")(?!" + _LETTER + r")",
    re.IGNORECASE,
)


def _match_case(source: str, target: str) -> str:
    if source.isupper() and len(source) > 1:
        return target.upper()
    if source[0].isupper():
        return target[0].upper() + target[1:]
    return target


def _replace(m: re.Match) -> str:
    word = m.group("word")
    if word is None:
        return m.group(0)
    return _match_case(word, REGIONAL_PAIRS[word.lower()])


def to_british(text: str) -> str:
    """Convert American spellings in `text` to British, keeping case, URLs and e-mail addresses."""
    return _PATTERN.sub(_replace, text)
