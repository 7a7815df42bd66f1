"""Fast checks of the Flower glue that needs no running federation: credentials, partitions, messages, settings."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedkey.cli import main
from fedkey.config import ModelConfig
from fedkey.errors import FedkeyError
from fl_core.compress import Codec, seeded_generator
from fl_core.config import FleetConfig, FLConfig
from fl_core.flower.app_dir import RUN_CONFIG, write_app
from fl_core.flower.certs import make_credentials
from fl_core.flower.job import Job
from fl_core.flower.partition import node_users
from fl_core.flower.wire import TrainIns, UserReport, content_to_reports, reports_to_content
from fl_core.params import ParamSpec
from keyboard.model import KeyboardLM

USERS = [f"u{i:02d}" for i in range(10)]


def test_credentials_chain_and_node_keys(tmp_path):
    c = make_credentials(tmp_path, nodes=2, hosts=["10.1.2.3", "superlink.lan"])
    ca = x509.load_pem_x509_certificate(c.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(c.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(n.value) for n in san}
    assert {"127.0.0.1", "localhost", "10.1.2.3", "superlink.lan"} <= names
    for i in range(2):
        key = load_ssh_private_key(c.node_keys[i].read_bytes(), password=None)
        pub = load_ssh_public_key(c.node_public(i).read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"  # a NIST curve
        assert key.public_key().public_numbers() == pub.public_numbers()
        assert c.node_keys[i].stat().st_mode & 0o077 == 0  # private keys are readable by their owner only
    assert load_ssh_private_key(c.node_keys[0].read_bytes(), None).public_key().public_numbers() != \
        load_ssh_private_key(c.node_keys[1].read_bytes(), None).public_key().public_numbers()


def test_partitions_cover_every_user_once_and_names_are_checked():
    parts = [node_users({"partition-id": i, "num-partitions": 3}, USERS) for i in range(3)]
    assert sorted(u for p in parts for u in p) == USERS
    assert node_users({"users": "u03, u07"}, USERS) == ["u03", "u07"]
    with pytest.raises(FedkeyError, match="u99"):
        node_users({"users": "u03,u99"}, USERS)
    with pytest.raises(FedkeyError, match="partition-id=3"):
        node_users({"partition-id": 3, "num-partitions": 3}, USERS)
    with pytest.raises(FedkeyError, match="--node-config"):
        node_users({}, USERS)


@pytest.mark.parametrize("kind", ["none", "int8", "topk"])
def test_updates_cross_the_message_layer_bit_for_bit(kind):
    torch.manual_seed(0)
    spec = ParamSpec.of(KeyboardLM(50, ModelConfig(embed_dim=8, hidden=12)))
    codec = Codec(kind, spec, topk_frac=0.05)
    delta = torch.randn(spec.n_shared) * 1e-2
    enc, _ = codec.encode(delta, seeded_generator(1, 2, 3), None)
    reps = [UserReport("u01", 1, 7, 70, 140, 2.5, False, enc), UserReport("u02", 2, 3, 30, 30, 3.0, True, None)]
    back = content_to_reports(reports_to_content(reps))
    assert [(r.user, r.idx, r.n_tokens, r.work_tokens, r.sat_out) for r in back] == \
        [("u01", 1, 70, 140, False), ("u02", 2, 30, 30, True)]
    assert back[0].update.kind == enc.kind and back[0].update.nbytes == enc.nbytes and back[1].update is None
    for name, t in enc.parts.items():
        assert back[0].update.parts[name].dtype == t.dtype and torch.equal(back[0].update.parts[name], t)

    ins = TrainIns(4, 0.5, ["u01", "u02"], [1, 2], torch.randn(spec.n_shared), torch.randn(3))
    got = TrainIns.from_content(ins.to_content())
    assert (got.round, got.client_lr, got.users, got.idx) == (4, 0.5, ["u01", "u02"], [1, 2])
    assert torch.equal(got.global_shared, ins.global_shared) and torch.equal(got.init_local, ins.init_local)


def test_job_survives_the_run_config_and_the_app_declares_every_key(tmp_path):
    job = Job(tmp_path / "run", tmp_path / "out", FLConfig(seed=5, server_opt="yogi", compress="int8"),
              FleetConfig(overselect=1.5), ModelConfig(embed_dim=32, hidden=64), expect_nodes=4, secagg=True,
              straggler_factor=2.5, placement="any", resume=True)
    rc = job.to_run_config()
    assert Job.from_run_config(rc) == Job(job.run_dir.resolve(), job.out_dir.resolve(), job.fl, job.fleet, job.model,
                                          4, job.wait_nodes_s, job.round_timeout_s, 2.5, True, job.secagg_clip,
                                          job.threads, "any", True)
    declared = tomllib.loads((write_app(tmp_path / "app") / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert set(rc) == set(declared["config"]) == set(RUN_CONFIG)  # `flwr run` only overrides declared keys
    assert declared["components"] == {"serverapp": "fl_core.flower.server_app:app",
                                      "clientapp": "fl_core.flower.client_app:app"}


def test_flower_engine_without_a_federation_is_a_one_line_error(tmp_path, capsys):
    from tests.test_flower_deploy import make_run

    run = make_run(tmp_path / "run", n_users=8, n_msgs=6)
    code = main(["train", "--run-dir", str(run), "--engine", "flower", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--superlink" in err and "--local-nodes" in err and "Traceback" not in err
    code = main(["train", "--run-dir", str(run), "--engine", "flower", "--superlink", "10.0.0.5:9092", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--root-certificates" in err and "Traceback" not in err
