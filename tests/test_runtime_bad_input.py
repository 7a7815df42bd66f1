"""Broken bundles and odd typing: a one-line FedkeyError naming the file, or sensible suggestions; never a crash."""

from __future__ import annotations

import json
import shutil

import pytest

from fedkey.errors import FedkeyError
from keyboard.adapter_file import save_adapter
from keyboard.bundle import FP32, INT8, MANIFEST, PROFILES, TOKENIZER, adapter_name, sha256_bytes
from keyboard.runtime import MAX_K, load_bundle
from keyboard.tokenizer import train_tokenizer
from keyboard.words import WORD_RE
from tests.test_export_bundle import BRITISH_USER, british_adapter, make_bundle


@pytest.fixture(scope="module")
def pristine(tiny_model, tiny_tok, tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bad"), tiny_model, tiny_tok)[0]


@pytest.fixture
def bundle(pristine, tmp_path):
    """A private copy each test may break."""
    return shutil.copytree(pristine, tmp_path / "bundle")


@pytest.fixture(scope="module")
def engine(pristine):
    return load_bundle(pristine)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def rehash(bundle, name: str) -> None:
    """Make the manifest agree with a replaced file, as a careless copy tool might."""
    man = json.loads((bundle / MANIFEST).read_text())
    data = (bundle / name).read_bytes()
    man["files"][name] = {"sha256": sha256_bytes(data), "bytes": len(data)}
    (bundle / MANIFEST).write_text(json.dumps(man))


def test_corrupted_model_is_refused(bundle):
    data = bytearray((bundle / INT8).read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64
    (bundle / INT8).write_bytes(bytes(data))
    with pytest.raises(FedkeyError) as err:
        load_bundle(bundle)
    assert "model.int8.onnx" in one_line(err) and "does not match the manifest" in str(err.value)
    load_bundle(bundle, int8=False)  # the fp32 model is intact and still loads
    (bundle / INT8).write_bytes(b"not an onnx model at all")
    rehash(bundle, INT8)  # the hash check passes; onnxruntime must refuse it
    with pytest.raises(FedkeyError, match="not a loadable ONNX model") as err:
        load_bundle(bundle)
    one_line(err)


def test_tokenizer_from_another_model_is_refused(bundle):
    other = train_tokenizer(["completely different words here"] * 300 + ["zebra yak"] * 50, vocab_size=300, seed=1)
    other.save(bundle / TOKENIZER)
    with pytest.raises(FedkeyError, match="tokenizer.model") as err:
        load_bundle(bundle)
    one_line(err)
    rehash(bundle, TOKENIZER)
    with pytest.raises(FedkeyError, match="a tokenizer from another model") as err:
        load_bundle(bundle)
    one_line(err)


@pytest.mark.parametrize("name", [INT8, TOKENIZER, MANIFEST, PROFILES])
def test_missing_file_is_named(bundle, name):
    (bundle / name).unlink()
    with pytest.raises(FedkeyError, match=name.replace(".", r"\.")) as err:
        load_bundle(bundle)
    assert "fedkey export" in one_line(err)


def test_missing_bundle_and_bad_manifest(bundle, tmp_path):
    with pytest.raises(FedkeyError, match="no such bundle folder"):
        load_bundle(tmp_path / "nowhere")
    (bundle / MANIFEST).write_text("{ not json")
    with pytest.raises(FedkeyError, match="manifest.json: unreadable") as err:
        load_bundle(bundle)
    one_line(err)
    (bundle / MANIFEST).write_text(json.dumps({"format": "something/else", "files": {}}))
    with pytest.raises(FedkeyError, match="not a fedkey-bundle/1 manifest"):
        load_bundle(bundle)


def test_adapter_for_another_model_is_refused_on_device(bundle, tiny_model, tiny_tok):
    save_adapter(bundle / adapter_name(BRITISH_USER), british_adapter(tiny_model, tiny_tok, base_id="e" * 64))
    rehash(bundle, adapter_name(BRITISH_USER))
    p = load_bundle(bundle)  # the global model is fine
    with pytest.raises(FedkeyError, match="trained on base model eeeeeeeeeeee") as err:
        p.set_profile(BRITISH_USER)
    one_line(err)
    assert p.profile is None and p.suggest("how are ")[0].word == "you"
    with pytest.raises(FedkeyError, match="trained on base model"):
        load_bundle(bundle, user=BRITISH_USER)


@pytest.mark.parametrize("text", [
    "", " ", "\n\t", "how are ", "naïve café ", "Straße und Grüße ", "😀", "hello 😀", "hello 😀 ", "i like 😀😀😀 the ",
    "日本語のテキスト", "how are\ud800 yo", "\x00\x01 hi", "what's ", "it's a don't-", "1234 ", "!!!???", "you" * 40,
])
def test_odd_text_gives_words(engine, text):
    sugg = engine.suggest(text)
    assert len(sugg) <= 3
    assert all(WORD_RE.fullmatch(s.word) and 0 < s.prob <= 1 for s in sugg), sugg
    assert [s.prob for s in sugg] == sorted((s.prob for s in sugg), reverse=True)


def test_huge_input_is_windowed(engine):
    huge = "how are you doing today " * 40_000 + "how are "
    before = engine.steps_run
    assert engine.suggest(huge)[0].word == "you"
    assert engine.steps_run - before < 300  # only the recent text is run, not a megabyte of pieces
    assert engine.suggest(huge + "yo")[0].word == "you"


@pytest.mark.parametrize("bad", [None, b"how are ", 42, ["how"]])
def test_text_must_be_a_string(engine, bad):
    with pytest.raises(FedkeyError, match="takes the typed text as str") as err:
        engine.suggest(bad)
    one_line(err)


@pytest.mark.parametrize("k", [0, -1, MAX_K + 1, 2.5, "3", True])
def test_k_must_be_a_sensible_integer(engine, k):
    with pytest.raises(FedkeyError, match="k must be an integer"):
        engine.suggest("how are ", k)


def test_k_up_to_the_limit(engine):
    assert len(engine.suggest("how are ", 1)) == 1
    many = engine.suggest("how are ", MAX_K)
    assert 3 <= len(many) <= MAX_K and len({s.word for s in many}) == len(many)


def test_unloadable_onnx_with_missing_fp32(bundle):
    (bundle / FP32).unlink()
    load_bundle(bundle)  # the int8 model does not need the fp32 file
    with pytest.raises(FedkeyError, match="model.onnx: missing"):
        load_bundle(bundle, int8=False)
