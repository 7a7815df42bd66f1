"""Throwaway credentials for a Flower federation: a CA, a SuperLink TLS certificate, SuperNode auth keys.

For tests and first trials only: real deployments should get certificates from their organisation's CA.
All crypto is done by the `cryptography` package.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedkey.io import atomic_write_bytes


@dataclass(frozen=True)
class Credentials:
    """Paths of the files `make_credentials` writes."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path]  # OpenSSH EC private keys; the public key is beside each, with ".pub"

    def node_public(self, i: int) -> Path:
        """Public key file of SuperNode i (what `flwr supernode register` takes)."""
        return self.node_keys[i].with_suffix(".pub")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_credentials(out_dir: Path, nodes: int, hosts: list[str] | None = None, days: int = 30) -> Credentials:
    """Write ca.crt, server.pem/server.key (valid for `hosts` + loopback) and `nodes` SuperNode key pairs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hosts = ["localhost", "127.0.0.1", "::1"] + [h for h in (hosts or []) if h not in ("localhost", "127.0.0.1", "::1")]
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew between machines
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedkey throwaway CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv_cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedkey superlink")]))
                .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(until)
                .add_extension(_san(hosts), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    atomic_write_bytes(out_dir / "ca.crt", ca_cert.public_bytes(pem))
    atomic_write_bytes(out_dir / "ca.key", _pem_key(ca_key))
    atomic_write_bytes(out_dir / "server.pem", srv_cert.public_bytes(pem))
    atomic_write_bytes(out_dir / "server.key", _pem_key(srv_key))

    # SuperNode authentication keys: Flower wants OpenSSH-format keys on a NIST elliptic curve.
    node_keys = []
    for i in range(nodes):
        k = ec.generate_private_key(ec.SECP384R1())
        priv = out_dir / f"supernode_{i}.key"
        atomic_write_bytes(priv, k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                 serialization.NoEncryption()))
        atomic_write_bytes(priv.with_suffix(".pub"), k.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" supernode_{i}\n".encode())
        node_keys.append(priv)
    for p in [out_dir / "ca.key", out_dir / "server.key", *node_keys]:
        p.chmod(0o600)
    return Credentials(out_dir / "ca.crt", out_dir / "server.pem", out_dir / "server.key", node_keys)
