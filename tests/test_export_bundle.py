"""Exporting the tiny model: the ONNX step graph, its int8 version, the adapter inputs, the bundle."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fedkey.errors import FedkeyError
from fedkey.stages import file_hash
from keyboard.adapter_file import AdapterArrays, save_adapter
from keyboard.bundle import FP32, INT8, MANIFEST, PROFILES, TOKENIZER, adapter_name, sha256_bytes
from keyboard.checkpoint import save_model
from keyboard.evaluate import Message
from keyboard.export import QuantSettings, build_bundle, float_weight_count, measure_parity
from keyboard.onnx_backend import OnnxBackend, make_session
from keyboard.torch_backend import TorchBackend
from tests.conftest import tiny_texts

BRITISH_USER = "gb_fan"


def british_adapter(model, tok, base_id: str, user: str = BRITISH_USER, scale: float = 16.0) -> AdapterArrays:
    """A hand-made adapter whose user bias prefers the British "colour" (one piece) over "color"."""
    d, V = model.cfg.embed_dim, model.vocab_size
    rng = np.random.default_rng(0)
    bias = np.zeros(V, np.float32)
    bias[tok.encode("colour")[0]] = scale
    return AdapterArrays(A=rng.normal(0, 0.1, (d, 4)).astype(np.float32), B=rng.normal(0, 0.1, (4, d)).astype(np.float32),
                         user_bias=bias, base_id=base_id, user=user, meta={"region": "GB"})


def make_bundle(tmp_path, model, tok, with_adapter: bool = True, **kw):
    """Save the tiny model as a model folder and export it (with one GB user's adapter)."""
    model_dir = tmp_path / "model"
    save_model(model_dir, model, tok)
    adapters = {}
    if with_adapter:
        path = tmp_path / "personal" / f"{BRITISH_USER}.npz"
        save_adapter(path, british_adapter(model, tok, file_hash(model_dir / "model.pt")))
        adapters = {BRITISH_USER: (path, "GB")}
    out = tmp_path / "bundle"
    man = build_bundle(model_dir, out, adapters, **kw)
    return out, man


@pytest.fixture(scope="module")
def bundle(tiny_model, tiny_tok, tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("export"), tiny_model, tiny_tok)


def test_bundle_round_trip(bundle, tiny_model, tiny_tok):
    out, man = bundle
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk["files"] == man["files"]
    for name in (FP32, INT8, TOKENIZER, PROFILES, adapter_name(BRITISH_USER)):
        assert sha256_bytes((out / name).read_bytes()) == man["files"][name]["sha256"], name
    assert json.loads((out / PROFILES).read_text()) == {BRITISH_USER: "GB"}
    assert man["base_id"] == file_hash(out.parent / "model" / "model.pt")
    assert man["tokenizer_sha256"] == tiny_tok.sha256
    assert (man["vocab_size"], man["embed_dim"], man["hidden"]) == (tiny_tok.vocab_size, 16, 48)
    assert man["opset"] == {FP32: 17, INT8: 21} and man["quantization"]["per_channel"] is True and man["quantization"]["wide"] == ["w_proj"]
    for name in (FP32, INT8):
        onnx.checker.check_model(onnx.load(str(out / name)), full_check=True)
    int8 = onnx.load(str(out / INT8))
    assert float_weight_count(int8) == 0  # every matrix is int8; only biases and scales stay float
    assert not any(n.op_type == "QuantizeLinear" for n in int8.graph.node)  # activations stay float
    # one 8-bit copy of the tied embedding serves the lookup and the output layer; the projection has 16 bits
    kinds = {i.name: (list(i.dims), i.data_type) for i in int8.graph.initializer}
    tied = [k for k, (dims, _) in kinds.items() if dims == [16, tiny_tok.vocab_size]]
    assert len(tied) == 1 and kinds[tied[0]][1] == onnx.TensorProto.UINT8
    assert [t for _, (dims, t) in kinds.items() if dims == [48, 16]] == [onnx.TensorProto.UINT16]
    # per block of 48 inputs of each output channel (one block here: the tiny model's matrices have < 48 rows)
    zero_points = {i.name: list(i.dims) for i in int8.graph.initializer if i.name.endswith("zero_point") and len(i.dims) == 2}
    assert sorted(zero_points.values()) == [[1, 16], [1, 4 * 48], [1, tiny_tok.vocab_size]]
    assert man["quantization"]["block_size"] == 48
    assert man["files"][INT8]["bytes"] < 0.5 * man["files"][FP32]["bytes"]
    assert man["export_check"]["fp32_max_abs_logp_diff"] < 1e-4


def _feeds(n: int, d: int, H: int, V: int, rank: int, rng) -> dict:
    return {"ids": rng.integers(4, V, n).astype(np.int64), "h": rng.normal(0, 0.3, (n, d)).astype(np.float32),
            "c": rng.normal(0, 0.3, (n, H)).astype(np.float32), "A": rng.normal(0, 0.2, (d, rank)).astype(np.float32),
            "B": rng.normal(0, 0.2, (rank, d)).astype(np.float32), "user_bias": rng.normal(0, 1, V).astype(np.float32)}


def test_graph_is_the_adapter_math_for_any_rows_and_rank(bundle, tiny_model):
    out, _ = bundle
    sess = ort.InferenceSession(str(out / FP32), providers=["CPUExecutionProvider"])
    tb = TorchBackend(tiny_model)
    rng = np.random.default_rng(1)
    for n, rank in ((1, 1), (5, 8), (3, 2)):
        f = _feeds(n, 16, 48, tiny_model.vocab_size, rank, rng)
        logp, h2, c2 = sess.run(None, f)
        _, want_h, want_c = tb.step(f["ids"], f["h"], f["c"])
        with torch.no_grad():  # f' = f + (f @ A) @ B; logits = f' @ E^T + out_bias + user_bias
            feats = torch.from_numpy(want_h)
            feats = feats + (feats @ torch.from_numpy(f["A"])) @ torch.from_numpy(f["B"])
            want = torch.log_softmax(tiny_model.logits(feats) + torch.from_numpy(f["user_bias"]), -1).numpy()
        assert logp.shape == (n, tiny_model.vocab_size)
        np.testing.assert_allclose(logp, want, atol=1e-4)
        np.testing.assert_allclose(h2, want_h, atol=1e-5)
        np.testing.assert_allclose(c2, want_c, atol=1e-5)


def test_int8_keeps_parity_with_torch(bundle, tiny_model, tiny_tok):
    out, _ = bundle
    msgs = [Message(f"u{i % 7}", "US", t) for i, t in enumerate(tiny_texts(300, seed=3))]
    res = measure_parity(tiny_model, tiny_tok, OnnxBackend(make_session(str(out / INT8))), msgs, positions=400,
                         ksr_messages=10)
    assert res["positions"] >= 300
    # the tiny corpus has genuine ties (messages start with "the" or "thank" equally often), which any
    # rounding may flip; the targets on a real model (>= 99%) are checked by `fedkey export`
    assert res["top1_agreement"] >= 0.98 and res["midword_top1_agreement"] >= 0.95
    assert abs(res["top1_loss_points"]) <= 0.5


def test_dynamic_quantization_also_exports(tmp_path, tiny_model, tiny_tok):
    out, man = make_bundle(tmp_path, tiny_model, tiny_tok, with_adapter=False, settings=QuantSettings(mode="dynamic"))
    assert man["quantization"]["mode"] == "dynamic" and not (out / PROFILES).exists()
    ops = {n.op_type for n in onnx.load(str(out / INT8)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    with pytest.raises(FedkeyError, match="quantization mode"):
        QuantSettings(mode="fp8")


def test_adapter_for_another_model_is_refused(tmp_path, tiny_model, tiny_tok):
    model_dir = tmp_path / "model"
    save_model(model_dir, tiny_model, tiny_tok)
    path = tmp_path / "other.npz"
    save_adapter(path, british_adapter(tiny_model, tiny_tok, base_id="f" * 64, user="other"))
    with pytest.raises(FedkeyError, match="trained on base model ffffffffffff"):
        build_bundle(model_dir, tmp_path / "bundle", {"other": (path, "US")})
    assert not (tmp_path / "bundle" / MANIFEST).exists()  # refused before anything was written
