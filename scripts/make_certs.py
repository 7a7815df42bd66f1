#!/usr/bin/env python3
"""Make throwaway credentials for a Flower federation (tests and first trials, never production).

    python scripts/make_certs.py certs/ --nodes 3 --host 192.168.1.20 --host superlink.lan

writes certs/ca.crt (give it to every SuperNode and to whoever runs `flwr`), certs/server.pem and
certs/server.key (SuperLink only), and certs/supernode_<i>.key / .pub (SuperNode i keeps the .key;
register the .pub with `flwr supernode register`).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from fl_core.flower.certs import make_credentials  # noqa: E402


def main() -> None:
    """Parse flags and write the files."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="folder to write into (created)")
    p.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to make")
    p.add_argument("--host", action="append", default=[],
                   help="extra name or IP address the SuperLink is reached at (repeatable); loopback is always in")
    p.add_argument("--days", type=int, default=30, help="validity of the certificates")
    a = p.parse_args()
    c = make_credentials(a.out_dir, a.nodes, a.host, a.days)
    print(f"CA {c.ca_cert}\nSuperLink {c.server_cert} {c.server_key}\n"
          + "\n".join(f"SuperNode {i} {k} (+ .pub)" for i, k in enumerate(c.node_keys)))


if __name__ == "__main__":
    main()
