"""Start, drive and stop a real Flower federation on this machine: one SuperLink, N SuperNodes, `flwr run`.

Used by `fedkey train --engine flower-sim` (a SuperLink in simulation mode, Ray behind it), the loopback
tests and `fedkey bench engines`. Every process runs in its own session; `stop()` kills whole process trees
(Flower's own children start in new sessions too, so killing a process group is not enough).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from fedkey.errors import FedkeyError
from fl_core.flower.certs import Credentials, make_credentials

CONNECTION = "fedkey"  # name of the SuperLink connection in this federation's private FLWR_HOME


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A Flower console script from this interpreter's environment (works without an activated venv)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FedkeyError(f"`{name}` not found: install Flower with `pip install 'flwr[simulation]'`")
    return found


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent dies, so a killed test or bench leaves no SuperLink
    behind (Flower's own helpers already exit when their parent does). Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def kill_tree(pid: int | list[int], grace_s: float = 5.0) -> None:
    """SIGTERM processes and all their descendants, SIGKILL whatever is left after `grace_s`."""
    procs = []
    for p in [pid] if isinstance(pid, int) else pid:
        try:
            root = psutil.Process(p)
            procs += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def tree_memory_mib(pid: int) -> tuple[float, int]:
    """(proportional set size of a process and all its descendants in MiB, number of processes).

    PSS splits pages shared between processes (torch's libraries, Ray's shared-memory object store)
    among them, so the sum is what the tree really costs; RSS would count shared pages once per process.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0
    total, n = 0, 0
    for p in procs:
        try:
            mi = p.memory_full_info()
            total += getattr(mi, "pss", mi.rss)
            n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total / 2**20, n


@dataclass
class RunResult:
    """What `flwr run` left behind."""

    returncode: int
    seconds: float
    log: str


@dataclass
class Federation:
    """One SuperLink and `len(node_configs)` SuperNodes on 127.0.0.1, optionally with TLS and node auth.

    `simulation=True` starts a SuperLink with Flower's simulation runtime instead and no SuperNodes;
    `flwr run` then gets the simulated federation's size through `federation_config`.
    """

    workdir: Path
    node_configs: list[dict[str, Any]] = field(default_factory=list)
    tls: bool = True
    auth: bool = True
    simulation: bool = False
    host: str = "127.0.0.1"
    startup_timeout_s: float = 90.0
    env: dict[str, str] = field(default_factory=dict)
    spare_keys: int = 0  # extra SuperNode key pairs that are never registered (to show they are refused)
    address: str | None = None  # a SuperLink someone else runs: start nothing, only talk to it
    root_certificates: Path | None = None  # ...and the CA certificate its TLS certificate is signed by

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.home = self.workdir / "flwr_home"
        self.logs = self.workdir / "logs"
        self.port = 0
        self.superlink: subprocess.Popen | None = None
        self.run_proc: subprocess.Popen | None = None  # the `flwr run` client while a run is in progress
        self.supernodes: list[subprocess.Popen | None] = []
        self.creds: Credentials | None = None
        if self.simulation:
            self.auth = False  # no SuperNode ever connects to a simulation SuperLink

    # --- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> "Federation":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self.env, "FLWR_HOME": str(self.home), "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        # Flower's processes start their helpers (flower-superexec, flwr-clientapp...) from PATH: make it
        # this environment's, so the harness works from a venv that was never activated
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        # SuperExec looks for new ServerApp/ClientApp work once a second by default; a round waits on it twice
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
        return env

    def _popen(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / log_name, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        try:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self._env(),
                                    start_new_session=True, cwd=self.workdir, preexec_fn=_die_with_parent)
        finally:
            out.close()

    def start(self) -> None:
        """Start the SuperLink, register and start the SuperNodes, wait until every node is online."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        if self.address:
            self._write_connection()
            return
        if self.tls:
            self.creds = make_credentials(self.workdir / "certs", len(self.node_configs) + self.spare_keys)
        self.port = free_port(self.host)
        self._write_connection()
        cmd = [_bin("flower-superlink"), "--host", self.host, "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        cmd += self._tls_server_flags()
        if self.auth:
            cmd.append("--enable-supernode-auth")
        if self.simulation:
            cmd.append("--simulation")
        self.superlink = self._popen(cmd, "superlink.log")
        self._wait(lambda: self._listening(self.port), "the SuperLink to listen", self.superlink, "superlink.log")
        if self.auth:
            self.register_nodes(range(len(self.node_configs)))
        for i in range(len(self.node_configs)):
            self.start_node(i)
        for i in range(len(self.node_configs)):
            self.wait_node(i)

    def _tls_server_flags(self) -> list[str]:
        if not self.creds:
            return ["--insecure"]
        return ["--ssl-certfile", str(self.creds.server_cert), "--ssl-keyfile", str(self.creds.server_key),
                "--ssl-ca-certfile", str(self.creds.ca_cert)]

    def _write_connection(self) -> None:
        conn: dict[str, Any] = {"address": self.address or f"{self.host}:{self.port}"}
        ca = self.creds.ca_cert if self.creds else self.root_certificates
        if not self.tls:
            conn["insecure"] = True
        elif ca:
            conn["root-certificates"] = str(Path(ca).resolve())
        # else: TLS against the system's trusted CAs
        (self.home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))

    def _listening(self, port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            return s.connect_ex((self.host, port)) == 0

    def _wait(self, ok, what: str, proc: subprocess.Popen | None, log_name: str) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise FedkeyError(f"Flower process exited (code {proc.returncode}) while waiting for {what}; "
                                  f"see {self.logs / log_name}")
            if ok():
                return
            time.sleep(0.3)
        raise FedkeyError(f"timed out after {self.startup_timeout_s:.0f} s waiting for {what}; see {self.logs}")

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run the `flwr` CLI against this federation's SuperLink."""
        return subprocess.run([_bin("flwr"), *args], env=self._env(), cwd=self.workdir, capture_output=True,
                              text=True, timeout=timeout)

    def register_nodes(self, which: Iterable[int]) -> None:
        """Register these SuperNodes' public keys with the SuperLink (only registered nodes may connect)."""
        assert self.creds
        # one `flwr` CLI call each (it is the documented interface), run side by side: each is mostly start-up
        procs = {i: subprocess.Popen([_bin("flwr"), "supernode", "register", str(self.creds.node_public(i)),
                                      CONNECTION, "--format", "json"], env=self._env(), cwd=self.workdir,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in which}
        for i, p in procs.items():
            out, err = p.communicate(timeout=120)
            try:
                ok = json.loads(out or "{}").get("success")
            except json.JSONDecodeError:
                ok = False
            if p.returncode != 0 or not ok:
                raise FedkeyError(f"registering SuperNode {i} failed: {out.strip()} {err.strip()}")

    def wait_node(self, i: int) -> None:
        """Wait until SuperNode i has connected (its log shows the node id the SuperLink gave it)."""
        log = self.logs / f"supernode_{i}.log"
        self._wait(lambda: log.exists() and b"SuperNode ID:" in log.read_bytes(), f"SuperNode {i} to connect",
                   self.supernodes[i], log.name)

    def start_node(self, i: int, key_index: int | None = None) -> subprocess.Popen:
        """Start SuperNode i (again, if it was stopped); `key_index` picks another node's key (for tests)."""
        cfg = " ".join(f"{k}={json.dumps(v)}" for k, v in self.node_configs[i].items())
        cmd = [_bin("flower-supernode"), "--superlink", f"{self.host}:{self.port}",
               "--port", str(free_port(self.host)), "--node-config", cfg]
        if self.creds:
            cmd += ["--root-certificates", str(self.creds.ca_cert)]
            if self.auth:
                cmd += ["--auth-supernode-private-key", str(self.creds.node_keys[i if key_index is None else key_index])]
        else:
            cmd.append("--insecure")
        log = self.logs / f"supernode_{i}.log"
        if log.exists():  # a restart: keep the old log, start a fresh one so `wait_node` sees the new id
            log.rename(log.with_suffix(f".{time.time_ns()}.log"))
        proc = self._popen(cmd, log.name)
        while len(self.supernodes) <= i:
            self.supernodes.append(None)
        self.supernodes[i] = proc
        return proc

    def start_unregistered_node(self, node_config: dict[str, Any]) -> subprocess.Popen:
        """A SuperNode with a key the SuperLink never registered (node auth must refuse it)."""
        assert self.creds and self.spare_keys, "needs TLS and spare_keys >= 1"
        self.node_configs.append(node_config)
        i = len(self.node_configs) - 1
        return self.start_node(i, key_index=i)

    def kill_node(self, i: int) -> None:
        """Kill SuperNode i and everything it started, without warning (a device that vanished)."""
        proc = self.supernodes[i]
        if proc is not None:
            kill_tree(proc.pid, grace_s=0.0)
            proc.wait()

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperLink's view of its SuperNodes (`flwr supernode ls`)."""
        res = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        if res.returncode != 0:
            return []
        try:
            return json.loads(res.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return []

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink sees online."""
        return sum(n.get("status") == "online" for n in self.nodes())

    def run(self, app_dir: Path, run_config: dict[str, Any], federation_config: dict[str, Any] | None = None,
            timeout_s: float = 600.0, log_name: str = "flwr_run.log") -> RunResult:
        """`flwr run APP --stream` with `run_config` overrides; waits for the run to end (or `timeout_s`)."""
        overrides = self.workdir / "run_config.toml"
        overrides.write_text(tomli_w.dumps(run_config))
        cmd = ["run", str(app_dir), CONNECTION, "--run-config", str(overrides), "--stream"]
        if federation_config:
            cmd += ["--federation-config", " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config.items())]
        t0 = time.perf_counter()
        self.run_proc = self._popen([_bin("flwr"), *cmd], log_name)
        try:
            rc = self.run_proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(self.run_proc.pid)
            rc = -1
        finally:
            self.run_proc = None
        return RunResult(rc, time.perf_counter() - t0, (self.logs / log_name).read_text(errors="replace"))

    def pids(self) -> list[int]:
        """Process ids of the SuperLink, live SuperNodes and `flwr run` (roots of the trees to measure or kill)."""
        procs = [self.superlink, *self.supernodes, self.run_proc]
        return [p.pid for p in procs if p is not None and p.poll() is None]

    def stop(self) -> None:
        """Kill every process this federation started, children included."""
        procs = [p for p in [*self.supernodes, self.superlink] if p is not None]
        kill_tree([p.pid for p in procs if p.poll() is None], grace_s=3.0)
        for proc in procs:
            if proc is not None:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self.supernodes, self.superlink = [], None
