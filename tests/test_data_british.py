"""American -> British conversion: the pair list and the edge cases of chat text."""


import pytest
from breame.data.spelling_constants import AMERICAN_ENGLISH_SPELLINGS

from data.british import EXCLUDED_PAIRS, REGIONAL_PAIRS, to_british


@pytest.mark.parametrize(
    "text, expected",
    [
        ("color", "colour"),
        ("Color", "Colour"),
        ("COLOR", "COLOUR"),
        ("my favorite color", "my favourite colour"),
        ("Favorite colors?", "Favourite colours?"),
        ("color! color, (color) \"color\" color's color.", "colour! colour, (colour) \"colour\" colour's colour."),
        ("the theater's center", "the theatre's centre"),
        ("I apologize", "I apologise"),
        ("", ""),
    ],
)
def test_converts_with_case_and_punctuation(text, expected):
    assert to_british(text) == expected


def test_word_boundaries_convert_only_listed_words():
    # Inside longer words nothing changes unless the longer word is itself in the list.
    assert to_british("colorado discolorx") == "colorado discolorx"
    for word in ("recolored", "colorful"):
        expected = REGIONAL_PAIRS.get(word, word)
        assert to_british(word) == expected
    assert "colorful" in REGIONAL_PAIRS and to_british("colorful") == "colourful"
    assert "recolored" not in REGIONAL_PAIRS and to_british("recolored") == "recolored"
    assert to_british("color2 2color") == "colour2 2colour"  # digits are not letters


@pytest.mark.parametrize(
    "text",
    [
        "see http://example.com/color/favorite",
        "see https://color.example.org/?q=favorite",
        "go to www.favorite-color.com now",
        "mail me at color.favorite@humor.com",
        "(favorite@color.net)",
    ],
)
def test_urls_and_emails_untouched(text):
    assert to_british(text) == text


def test_text_around_url_still_converted():
    assert to_british("my favorite: https://color.com/color color") == "my favourite: https://color.com/color colour"


def test_excluded_pairs_are_absent_and_not_converted():
    for us, gb in EXCLUDED_PAIRS.items():
        assert AMERICAN_ENGLISH_SPELLINGS.get(us) == gb, f"{us}: stale exclusion, breame no longer lists it"
        assert us not in REGIONAL_PAIRS
        assert to_british(us) == us
        assert to_british(us.capitalize()) == us.capitalize()
    for word in ("ton", "program", "programs", "practice", "connection", "biased", "filter", "tire"):
        assert word in EXCLUDED_PAIRS
    assert to_british("I practice my program, tons of them") == "I practice my program, tons of them"


def test_pairs_are_lowercase_breame_minus_exclusions():
    assert len(REGIONAL_PAIRS) == len(AMERICAN_ENGLISH_SPELLINGS) - len(EXCLUDED_PAIRS)
    assert all(k == k.lower() and v == v.lower() for k, v in REGIONAL_PAIRS.items())
    assert REGIONAL_PAIRS["favorite"] == "favourite"
