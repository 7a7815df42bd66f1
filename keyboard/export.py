"""Export a trained KeyboardLM as one stateful ONNX step, in fp32 and int8, for the on-device runtime.

The graph is (piece ids, h, c, A, B, user_bias) -> (log-probs, h', c'): one LSTM step for a batch of
rows (the beams of a search), with the per-user adapter as inputs so one shared model serves every user.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from torch import nn

from fedkey.errors import FedkeyError
from fedkey.io import atomic_write_bytes
from keyboard.model import KeyboardLM

if TYPE_CHECKING:
    from keyboard.search import StepBackend
    from keyboard.tokenizer import Tokenizer

OPSET = 17
INPUTS = ("ids", "h", "c", "A", "B", "user_bias")
WEIGHTS = ("emb_t", "w_gates", "w_proj")  # the step graph's matrices, as named in StepGraph
OUTPUTS = ("logp", "h_out", "c_out")


class StepGraph(nn.Module):
    """One projected-LSTM step, the adapter and the tied output layer, laid out for export.

    The embedding is stored once, transposed (embed_dim x vocab): the input lookup gathers its
    columns and the output layer multiplies by it, so the int8 model keeps a single quantized copy.
    The two gate products are one matmul over [x, h].
    """

    def __init__(self, model: KeyboardLM) -> None:
        super().__init__()
        lstm = model.lstm
        if not lstm.proj_size or lstm.num_layers != 1 or lstm.bidirectional:
            raise FedkeyError("export supports the one-layer projected LSTM of keyboard.model.KeyboardLM only")
        self.hidden = lstm.hidden_size
        with torch.no_grad():
            self.emb_t = nn.Parameter(model.embed.weight.t().contiguous().clone())
            self.w_gates = nn.Parameter(torch.cat([lstm.weight_ih_l0, lstm.weight_hh_l0], 1).t().contiguous().clone())
            self.b_gates = nn.Parameter((lstm.bias_ih_l0 + lstm.bias_hh_l0).clone())
            self.w_proj = nn.Parameter(lstm.weight_hr_l0.t().contiguous().clone())
            self.out_bias = nn.Parameter(model.out_bias.detach().clone())

    def forward(self, ids: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                A: torch.Tensor, B: torch.Tensor,  # noqa: N803 (names of the adapter math)
                user_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probabilities of the next piece and the new state; f' = f + (f @ A) @ B."""
        H = self.hidden
        x = self.emb_t.index_select(1, ids).t()
        gates = torch.cat([x, h], 1) @ self.w_gates + self.b_gates
        i, f, g, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
        c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h2 = (torch.sigmoid(o) * torch.tanh(c2)) @ self.w_proj
        feats = h2 + (h2 @ A) @ B
        logits = feats @ self.emb_t + self.out_bias + user_bias
        return torch.log_softmax(logits, -1), h2, c2


def _example_inputs(model: KeyboardLM, rank: int = 8) -> tuple[torch.Tensor, ...]:
    d, H, V = model.cfg.embed_dim, model.cfg.hidden, model.vocab_size
    return (torch.tensor([1, 2]), torch.zeros(2, d), torch.zeros(2, H), torch.zeros(d, rank), torch.zeros(rank, d),
            torch.zeros(V))


def export_fp32(model: KeyboardLM, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the fp32 step graph (dynamic batch and adapter rank), checked by the ONNX checker."""
    path = Path(path)
    graph = StepGraph(model).eval()
    rows = {0: "rows"}
    dynamic = {"ids": rows, "h": rows, "c": rows, "A": {1: "rank"}, "B": {0: "rank"},
               "logp": rows, "h_out": rows, "c_out": rows}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_file = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            # the TorchScript exporter is deprecated but handles this small static graph without onnxscript
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, _example_inputs(model), str(tmp_file), dynamo=False, opset_version=OPSET,
                              input_names=list(INPUTS), output_names=list(OUTPUTS), dynamic_axes=dynamic)
        proto = onnx.load(str(tmp_file))
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


@dataclass
class QuantSettings:
    """How model.int8.onnx is made with onnxruntime.quantization.

    mode "weights" (default): weights in 8 bits with a scale and zero point per output channel (per
    word for the tied embedding), float activations. quantize_static writes the QDQ graph; its
    activation quantize/dequantize pairs are then removed, so only weights are quantized and nothing
    depends on calibration data or on which rows share a run; onnxruntime folds the weight
    dequantization at load. `wide` tensors get 16 bits: the 670->96 projection (5% of the weights)
    feeds both the recurrence and every logit, and at 8 bits it alone costs ~0.5 point of agreement.
    `block_size` > 0: scales per block of that many inputs of each output channel (opset-21 blocked QDQ,
    the quantizer's BlockSize) instead of one per channel: 48 gives the gate matrix's embedding and
    recurrent halves their own scales, and cut the relative log-prob error on the full run's model by a
    sixth (top-1 disagreements 34 -> 25 of 2,012) for 1.7 points more file size.
    mode "dynamic": quantize_dynamic (int8 weights, uint8 activations quantized per run, per tensor);
    smaller compute, but its per-tensor activations cost top-1 agreement (measured ~96% vs >99%).
    """

    mode: str = "weights"
    per_channel: bool = True
    block_size: int = 48
    weight_type: str = "QUInt8"
    symmetric: bool = False
    wide: list[str] = field(default_factory=lambda: ["w_proj"])
    op_types: list[str] = field(default_factory=lambda: ["MatMul", "Gather"])

    def __post_init__(self) -> None:
        if self.mode not in ("weights", "dynamic"):
            raise FedkeyError(f"quantization mode {self.mode!r}: choose weights or dynamic")
        if self.weight_type not in ("QInt8", "QUInt8"):
            raise FedkeyError(f"weight type {self.weight_type!r}: choose QInt8 or QUInt8")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 0:
            raise FedkeyError(f"quantization block size {self.block_size!r}: a whole number (0: one scale per channel)")
        unknown = set(self.wide) - set(WEIGHTS)
        if unknown:
            raise FedkeyError(f"16-bit tensors {sorted(unknown)}: choose among {WEIGHTS}")


def strip_activation_qdq(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Remove QuantizeLinear->DequantizeLinear pairs on activations, keeping the weights' dequantization."""
    g = proto.graph
    inits = {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    drop, rename = set(), {}
    for q in g.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        dqs = consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            raise FedkeyError(f"unexpected quantized graph at {q.name}: a QuantizeLinear not followed by DequantizeLinear")
        drop.add(q.name or q.output[0])
        for d in dqs:
            drop.add(d.name or d.output[0])
            if d.output[0] in outputs:  # a graph output keeps its name: its producer writes it directly
                rename[q.input[0]] = d.output[0]
            else:
                rename[d.output[0]] = q.input[0]

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    keep = [n for n in g.node if (n.name or n.output[0]) not in drop]
    for n in keep:
        n.input[:] = [resolve(x) for x in n.input]
        n.output[:] = [resolve(x) for x in n.output]
    del g.node[:]
    g.node.extend(keep)
    used = {x for n in keep for x in n.input}
    live = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    return proto


def float_weight_count(proto: onnx.ModelProto) -> int:
    """Float parameters left in a graph's matrices (2-D initializers, not scales): zero for a fully quantized model."""
    scales = {n.input[1] for n in proto.graph.node if n.op_type == "DequantizeLinear"}  # 2-D when blocked
    return sum(int(np.prod(i.dims)) for i in proto.graph.initializer
               if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and i.name not in scales)


class _OneStep:
    """Calibration data for quantize_static: one step from the zero state (activation ranges are dropped)."""

    def __init__(self, fp32_path: Path) -> None:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
        dims = {i.name: i.shape for i in sess.get_inputs()}
        d, H, V = dims["h"][1], dims["c"][1], dims["user_bias"][0]
        self._feeds = iter([{"ids": np.array([1], np.int64), "h": np.zeros((1, d), np.float32),
                             "c": np.zeros((1, H), np.float32), "A": np.zeros((d, 1), np.float32),
                             "B": np.zeros((1, d), np.float32), "user_bias": np.zeros(V, np.float32)}])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, settings: QuantSettings | None = None) -> dict:
    """Quantize the fp32 step graph with onnxruntime's tools; returns the settings used (for the manifest)."""
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    settings = settings or QuantSettings()
    wtype = getattr(QuantType, settings.weight_type)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.int8.onnx"
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # it logs advice on pre-processing we do not need
        try:
            if settings.mode == "dynamic":
                quantize_dynamic(str(fp32_path), str(out), op_types_to_quantize=settings.op_types + ["Transpose"],
                                 per_channel=settings.per_channel, weight_type=wtype,
                                 extra_options={"MatMulConstBOnly": True})
            else:
                # per output channel: MatMul weights are (in, out), so axis 1; the adapter inputs are not constants
                wide_type = QuantType.QUInt16 if wtype == QuantType.QUInt8 else QuantType.QInt16
                overrides = {}
                for name in WEIGHTS:
                    o: dict = {"symmetric": settings.symmetric}
                    if settings.per_channel:
                        o["axis"] = 0 if settings.block_size else 1  # blocks run along the inputs (axis 0)
                    if name in settings.wide:
                        o["quant_type"] = wide_type
                    overrides[name] = [o]
                quantize_static(str(fp32_path), str(out), _OneStep(Path(fp32_path)), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=settings.op_types, per_channel=settings.per_channel,
                                weight_type=wtype, activation_type=QuantType.QUInt8,
                                extra_options={"MatMulConstBOnly": True, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                                               "TensorQuantOverrides": overrides, "BlockSize": settings.block_size})
        finally:
            logging.getLogger().setLevel(level)
        proto = onnx.load(str(out))
    if settings.mode == "weights":
        proto = strip_activation_qdq(proto)
    left = float_weight_count(proto)
    if left:
        raise FedkeyError(f"int8 export left {left:,} float weights unquantized; check the quantization settings")
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(int8_path, proto.SerializeToString())
    method = "quantize_static (QDQ, activation pairs removed)" if settings.mode == "weights" else "quantize_dynamic"
    hint = ("onnxruntime session config session.disable_quant_qdq=1 folds the weights' DequantizeLinear at load"
            if settings.mode == "weights" else "")
    return {"tool": f"onnxruntime.quantization.{method}", "onnxruntime": onnxruntime.__version__, **asdict(settings),
            "runtime_hint": hint}


def max_abs_diff(model: KeyboardLM, onnx_path: str | Path, rows: int = 5, steps: int = 4, seed: int = 0) -> float:
    """Largest |log-prob| difference between torch and an exported graph over a few random steps."""
    import onnxruntime as ort

    from keyboard.torch_backend import TorchBackend

    rng = np.random.default_rng(seed)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    tb = TorchBackend(model)
    d, V = model.cfg.embed_dim, model.vocab_size
    adapter = {"A": np.zeros((d, 1), np.float32), "B": np.zeros((1, d), np.float32), "user_bias": np.zeros(V, np.float32)}
    _, h, c = tb.initial(rows)
    h_o, c_o, worst = h, c, 0.0
    for _ in range(steps):
        ids = rng.integers(4, V, size=rows)
        ref, h, c = tb.step(ids, h, c)
        got, h_o, c_o = sess.run(None, {"ids": ids.astype(np.int64), "h": h_o, "c": c_o, **adapter})
        worst = max(worst, float(np.abs(ref - got).max()))
    return worst


def _opset(path: Path) -> int:
    """The default-domain opset a saved graph declares (quantization may raise it: 16-bit QDQ needs 21)."""
    return next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))


def build_bundle(model_dir: str | Path, out_dir: str | Path, adapters: dict[str, tuple[Path | None, str]] | None = None,
                 settings: QuantSettings | None = None, lexicon: dict | None = None,
                 respellings: dict[str, dict[str, str]] | None = None, caches: dict[str, Path] | None = None,
                 sentinel: Path | None = None, pairs: dict[str, str] | None = None) -> dict:
    """Write a bundle (fp32 and int8 graphs, tokenizer, lexicon, shipped users' files, manifest); returns the manifest.

    `adapters` maps each shipped user -> (adapter .npz or None for none, region); `caches` maps shipped users
    to their phrase cache .npz, checked on the device by `sentinel` (personalize's sentinel.npz, shipped with
    any cache); each file is refused unless made for this model.
    `lexicon` is {"words": [...], "source": str, "min_count": int}: the words the runtime suggests
    (None: no list shipped, suggestions are whatever the pieces spell). `respellings` maps a shipped
    user to their whole-word spelling preference {other variant: own} (personalize's gate.json), stored
    against the American -> British `pairs` (keyboard.respell_file: a locale user takes bytes, not 54 kB).
    The manifest is written last, so a half-written bundle fails its hash check instead of loading.
    """
    import fedkey
    from fedkey.io import write_json
    from fedkey.stages import file_hash
    from keyboard.adapter_file import load_adapter
    from keyboard.bundle import (ADAPTERS, CACHES, FORMAT, FP32, INT8, LEXICON, MANIFEST, PROFILES, RESPELL,
                                 SENTINEL, TOKENIZER, adapter_name, cache_name, sha256_bytes)
    from keyboard.phrase_cache import load_cache
    from keyboard.respell_file import pack
    from keyboard.sentinel import load_sentinel
    from keyboard.words import Lexicon
    from keyboard.checkpoint import MODEL_FILE, load_model

    model_dir, out = Path(model_dir), Path(out_dir)
    model, tok, ckpt = load_model(model_dir)
    base_id = file_hash(model_dir / MODEL_FILE)
    d, V = model.cfg.embed_dim, model.vocab_size
    adapters, caches = adapters or {}, caches or {}
    for user, (path, _) in adapters.items():  # refuse before writing anything
        if path is not None:
            load_adapter(path, expect_base_id=base_id, vocab_size=V, embed_dim=d)
    for user, path in caches.items():
        if user not in adapters:
            raise FedkeyError(f"{path}: phrase cache of {user!r}, who is not a shipped user")
        load_cache(path, expect_base_id=base_id)
    sentinel = sentinel if caches else None
    if sentinel is not None:
        load_sentinel(sentinel, expect_base_id=base_id)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"fedkey.base_id": base_id, "fedkey.tokenizer_sha256": tok.sha256, "fedkey.vocab_size": V}
    export_fp32(model, out / FP32, meta)
    quant = quantize_int8(out / FP32, out / INT8, settings)
    tok.save(out / TOKENIZER)
    names = [FP32, INT8, TOKENIZER]
    lex_info = None
    if lexicon is not None:
        lex = Lexicon(lexicon["words"])
        atomic_write_bytes(out / LEXICON, lex.to_text().encode("utf-8"))
        names.append(LEXICON)
        lex_info = {"words": len(lex), "source": lexicon["source"], "min_count": lexicon["min_count"]}
    elif (out / LEXICON).exists():
        (out / LEXICON).unlink()
    for folder in (ADAPTERS, CACHES):  # users' files of an earlier export with other users
        for old in (out / folder).glob("*.npz") if (out / folder).is_dir() else ():
            old.unlink()
    for user, (path, _) in sorted(adapters.items()):
        if path is not None:
            atomic_write_bytes(out / adapter_name(user), Path(path).read_bytes())
            names.append(adapter_name(user))
    for user, path in sorted(caches.items()):
        atomic_write_bytes(out / cache_name(user), Path(path).read_bytes())
        names.append(cache_name(user))
    if sentinel is not None:
        atomic_write_bytes(out / SENTINEL, Path(sentinel).read_bytes())
        names.append(SENTINEL)
    if adapters:
        write_json(out / PROFILES, {u: r for u, (_, r) in sorted(adapters.items())})
        names.append(PROFILES)
    elif (out / PROFILES).exists():
        (out / PROFILES).unlink()
    shipped = {u: m for u, m in (respellings or {}).items() if m and u in adapters}  # pack() sorts users and words
    if shipped:
        write_json(out / RESPELL, pack(shipped, pairs or {}))
        names.append(RESPELL)
    elif (out / RESPELL).exists():
        (out / RESPELL).unlink()
    files = {}
    for name in names:
        data = (out / name).read_bytes()
        files[name] = {"sha256": sha256_bytes(data), "bytes": len(data)}
    manifest = {
        "format": FORMAT, "fedkey": fedkey.__version__,
        "base_id": base_id, "source_checkpoint": str(model_dir.resolve() / MODEL_FILE),
        "tokenizer_sha256": tok.sha256, "vocab_size": V, "embed_dim": d, "hidden": model.cfg.hidden,
        "params": model.describe()["params"], "opset": {name: _opset(out / name) for name in (FP32, INT8)},
        "graph": {"inputs": list(INPUTS), "outputs": list(OUTPUTS), "dynamic": ["rows", "rank"],
                  "adapter": "f' = f + (f @ A) @ B; logits = f' @ E^T + out_bias + user_bias (zeros: global model)",
                  "phrase_cache": "caches/<user>.npz: the user's (context, next piece) counts; p <- (1 - l) p + "
                                  "l * count / total after each matched context, shortest first, "
                                  "l = lam * total / (total + m0) (keyboard.phrase_cache); where that changes the "
                                  "top piece, caches/sentinel.npz (if shipped) keeps the model's distribution unless "
                                  "sigmoid(((x - mu) / sd) @ w + b) >= threshold, x: the LSTM output h and the "
                                  "features of keyboard.sentinel.features"},
        "quantization": quant,
        "lexicon": lex_info,
        "export_check": {"fp32_max_abs_logp_diff": max_abs_diff(model, out / FP32),
                         "int8_max_abs_logp_diff": max_abs_diff(model, out / INT8)},
        "files": files,
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def measure_parity(model: KeyboardLM, tok: Tokenizer, backend: StepBackend, messages: list, positions: int = 2000,
                   seed: int = 0, ksr_messages: int = 100, progress: Callable[[int, int], None] | None = None) -> dict:
    """Top-1 agreement and accuracy of an exported backend against the torch model on the same positions.

    Both go through keyboard.evaluate on one seeded sample; the exported graph is stepped one message
    at a time and searched one query at a time, as on a device (its int8 activations are quantized per run).
    """
    from fedkey.config import EvalConfig
    from keyboard.evaluate import evaluate

    cfg = EvalConfig(seed=seed, max_positions=positions, ksr_messages=ksr_messages)
    ref_rec: dict = {}
    got_rec: dict = {}
    ref = evaluate(model, tok, messages, cfg, record=ref_rec)
    got = evaluate(backend, tok, messages, EvalConfig(**{**asdict(cfg), "batch": 1}), record=got_rec,
                   progress=progress)
    nxt = [k for k in ref_rec if k[1] > 0 and k[2] == 0]
    mid = [k for k in ref_rec if k[2] > 0]

    def agree(keys: list) -> float | None:
        same = [(ref_rec[k][:1] == got_rec[k][:1]) for k in keys]
        return sum(same) / len(same) if same else None

    return {"positions": len(nxt), "midword_queries": len(mid), "seed": seed,
            "top1_agreement": agree(nxt), "midword_top1_agreement": agree(mid),
            "top3_set_agreement": (sum(set(ref_rec[k]) == set(got_rec[k]) for k in nxt) / len(nxt)) if nxt else None,
            "torch_top1": ref["pooled"]["top1"], "exported_top1": got["pooled"]["top1"],
            "top1_loss_points": 100 * (ref["pooled"]["top1"] - got["pooled"]["top1"]),
            "torch_top3": ref["pooled"]["top3"], "exported_top3": got["pooled"]["top3"],
            "torch_ksr": ref["pooled"]["ksr"], "exported_ksr": got["pooled"]["ksr"]}
