"""`fedkey export` on a run folder: which model and which users' adapters it ships, and its one-line errors."""

from __future__ import annotations

import json

import torch

from fedkey.cli import main
from fedkey.commands.export import choose_adapters, default_model
from fedkey.stages import file_hash
from keyboard.adapter_file import save_adapter
from keyboard.bundle import INT8, MANIFEST, PROFILES
from keyboard.checkpoint import save_model
from tests.test_export_bundle import british_adapter


def make_run(tmp_path, model, tok):
    """A run folder with a central model and four users' adapters: two helped, one not, one for another model."""
    run = tmp_path / "run"
    save_model(run / "central", model, tok)
    base = file_hash(run / "central" / "model.pt")
    adir = run / "personal" / "adapters"
    for user, region, base_id in (("ann", "GB", base), ("bob", "US", base), ("cid", "US", base), ("dee", "GB", "0" * 64)):
        ad = british_adapter(model, tok, base_id, user=user)
        ad.meta = {"region": region}
        save_adapter(adir / f"{user}.npz", ad)
    gate = {"ann": {"use_adapter": True, "val_global": 4.0, "val_personal": 3.0},
            "bob": {"use_adapter": True, "val_global": 4.0, "val_personal": 3.9}, "cid": {"use_adapter": False},
            "dee": {"use_adapter": True}, "fay": {"use_adapter": False, "reason": "no validation slice"}}
    (run / "personal" / "gate.json").write_text(json.dumps(gate))
    return run


def test_export_ships_the_users_the_gate_chose(tmp_path, tiny_model, tiny_tok, capsys):
    run = make_run(tmp_path, tiny_model, tiny_tok)
    assert main(["export", "--run-dir", str(run), "--no-progress", "--json", str(tmp_path / "e.json")]) == 0
    out = run / "export"
    assert json.loads((out / PROFILES).read_text()) == {"ann": "GB", "bob": "US"}  # cid: gate said global; dee: other model
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["int8_bytes"] == (out / INT8).stat().st_size and res["int8_bytes"] < res["fp32_bytes"]
    assert "top1_agreement" not in res  # no prepared data in this run: parity is not invented
    assert "parity not measured" in capsys.readouterr().out
    assert main(["export", "--run-dir", str(run), "--no-progress", "--user", "bob", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / PROFILES).read_text()) == {"bob": "US"}
    # with one user per region, the one the adapter helped most (ann: loss 4.0 -> 3.0, bob: 4.0 -> 3.9)
    assert choose_adapters(run, file_hash(run / "central" / "model.pt"), None, per_region=1).keys() == {"ann", "bob"}
    ad = run / "personal" / "adapters"
    save_adapter(ad / "eve.npz", british_adapter(tiny_model, tiny_tok, file_hash(run / "central" / "model.pt"), user="eve"))
    gate = json.loads((run / "personal" / "gate.json").read_text())
    gate["eve"] = {"use_adapter": True, "val_global": 4.0, "val_personal": 2.0, "region": "GB"}
    (run / "personal" / "gate.json").write_text(json.dumps(gate))
    assert choose_adapters(run, file_hash(run / "central" / "model.pt"), None, per_region=1).keys() == {"eve", "bob"}
    assert json.loads((tmp_path / "b" / MANIFEST).read_text())["base_id"] == file_hash(run / "central" / "model.pt")


def test_export_errors_are_one_line(tmp_path, tiny_model, tiny_tok, capsys):
    run = make_run(tmp_path, tiny_model, tiny_tok)
    for argv, needle in ((["--user", "cid"], "gate kept the global model"), (["--user", "zed"], "no adapter for user"),
                         (["--user", "fay"], "kept the global model for user 'fay' (no validation slice)"),
                         (["--user", "dee"], "trained on base model 000000000000")):
        assert main(["export", "--run-dir", str(run), "--no-progress", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["export", "--run-dir", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "no model" in capsys.readouterr().err


def test_default_model_is_the_one_the_adapters_were_trained_on(tmp_path, tiny_model, tiny_tok):
    run = make_run(tmp_path, tiny_model, tiny_tok)
    assert default_model(run) == run / "central"
    with torch.no_grad():
        tiny_model.out_bias.add_(0.0)  # same weights, but saved as another model folder with other metadata
    save_model(run / "fl", tiny_model, tiny_tok, note="federated")
    fl_base = file_hash(run / "fl" / "model.pt")
    for path in (run / "personal" / "adapters").glob("*.npz"):
        path.unlink()
    save_adapter(run / "personal" / "adapters" / "ann.npz", british_adapter(tiny_model, tiny_tok, fl_base, user="ann"))
    assert default_model(run) == run / "fl"
    for path in (run / "personal" / "adapters").glob("*.npz"):
        path.unlink()
    assert default_model(run) == run / "fl"  # no adapters: the federated model, not the baseline
    (run / "fl" / "model.pt").unlink()
    assert default_model(run) == run / "central"


def test_shipped_lexicon_keeps_both_spellings_so_a_british_user_can_get_colour():
    from fedkey.commands.export import with_spelling_variants

    words = with_spelling_variants(["color", "favorite", "theatre", "the"])
    assert {"colour", "favourite", "theater"} <= set(words)  # the other half of each pair joins
    assert "the" in words and words == sorted(set(words))
