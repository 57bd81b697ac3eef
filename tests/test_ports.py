"""Ports without races: every service of the dev stack and the tests is started by
ManagedProcess on ports it picks, and a start that loses a port is retried on new ones."""

from __future__ import annotations

import ast
import contextlib
import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from avatarq_dev import livekit_official, processes
from avatarq_dev.processes import ManagedProcess, RabbitMQServer, RedisServer
from avatarq_dev.stack import livekit_process
from tests.netns import needs_netns

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("avatarq", "avatarq_cli", "producers", "tasks", "devstack", "tests", "bench")
#: The one place that picks a port for a service to bind later (and retries when it loses).
PICKER = ROOT / "devstack" / "avatarq_dev" / "processes.py"


def python_files() -> Iterator[Path]:
    for top in SOURCES:
        yield from (ROOT / top).rglob("*.py")


def let_go_ports(tree: ast.AST) -> list[int]:
    """Lines of functions that return the number of a socket they bound to port 0: once they
    return, the socket is closed and the number free for anyone until its user binds it."""
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        nodes = list(ast.walk(func))
        binds_zero = any(
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr == "bind"
            and n.args
            and isinstance(n.args[0], ast.Tuple)
            and isinstance(port := n.args[0].elts[-1], ast.Constant)
            and port.value == 0
            for n in nodes
        )

        def reads_port(expr: ast.AST, names: set[str]) -> bool:
            return any(
                (isinstance(n, ast.Attribute) and n.attr == "getsockname")
                or (isinstance(n, ast.Name) and n.id in names)
                for n in ast.walk(expr)
            )

        numbers: set[str] = set()
        for n in nodes:
            if isinstance(n, ast.Assign) and reads_port(n.value, numbers):
                numbers |= {t.id for t in n.targets if isinstance(t, ast.Name)}
        if binds_zero:
            found += [
                n.lineno
                for n in nodes
                if isinstance(n, ast.Return) and n.value and reads_port(n.value, numbers)
            ]
    return found


def test_nothing_hands_out_a_port_number_to_bind_later() -> None:
    # `free_port()` did: bind port 0, close, return the number; a service started on it
    # could find it taken (CI: "listen tcp :55461: bind: address already in use").
    assert not hasattr(processes, "free_port")
    offenders = []
    for path in python_files():
        text = path.read_text()
        tree = ast.parse(text, str(path))
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        if "free_port" in names:
            offenders.append(f"{path}: free_port")
        if path != PICKER and "_pick_ports" in names:
            offenders.append(f"{path}: _pick_ports outside ManagedProcess")
        if path != PICKER:
            offenders += [f"{path}:{line}: returns a let-go port" for line in let_go_ports(tree)]
    assert offenders == []


def test_the_guard_sees_the_old_helper() -> None:
    old = """
def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])

def spelled_out():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return port
"""
    assert let_go_ports(ast.parse(old)) == [5, 11]


@contextlib.contextmanager
def holding(kind: socket.SocketKind = socket.SOCK_STREAM) -> Iterator[int]:
    """A port held by this process: a listener for TCP (it would answer a plain connect),
    a bound socket for UDP."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("0.0.0.0", 0))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def taken() -> Iterator[int]:
    with holding() as port:
        yield port


def test_a_service_whose_port_is_taken_starts_on_another(tmp_path: Path, taken: int) -> None:
    server = ManagedProcess(
        "files",
        lambda ports: (
            [sys.executable, "-m", "http.server", str(ports[0])]
            + ["--bind", "127.0.0.1", "--directory", str(tmp_path)]
        ),
        ports=["tcp"],
        prefer=(taken,),  # as if another process took the pick before the server bound it
        log_dir=tmp_path,
    )
    (tmp_path / "hello.txt").write_text("mine")
    with server:
        assert server.port != taken
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/hello.txt") as page:
            assert page.read() == b"mine"
    assert "Address already in use" in server.log_path.read_text()


def test_a_service_ready_without_its_port_is_started_again(tmp_path: Path, taken: int) -> None:
    # As a Celery worker does with a taken metrics port: the failure never reaches its log,
    # and it says " ready." all the same.
    quiet = """
import socket, sys, time
sock = socket.socket()
try:
    sock.bind(("0.0.0.0", int(sys.argv[1])))
    sock.listen()
except OSError:
    pass
print("ready", flush=True)
time.sleep(60)
"""
    proc = ManagedProcess(
        "quiet",
        lambda ports: [sys.executable, "-c", quiet, str(ports[0])],
        ready=lambda: "ready" in proc.tail(),
        ports=["tcp"],
        prefer=(taken,),
        log_dir=tmp_path,
    )
    with proc:
        assert proc.port != taken and proc.listens(proc.port)
        assert proc.log_path.read_text().count("ready") == 2


def test_a_restart_keeps_its_port(tmp_path: Path) -> None:
    with RedisServer(log_dir=tmp_path) as redis:
        first = redis.port
        redis.stop()
        redis.start()
        assert redis.port == first and redis.listens(first)


def test_losing_every_pick_gives_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Bounded: a service that always reports a bind error is started START_ATTEMPTS times.
    fails = ManagedProcess(
        "unlucky",
        lambda ports: [
            sys.executable,
            "-c",
            f"raise OSError(98, 'Address already in use: {ports[0]}')",
        ],
        ports=["tcp"],
        log_dir=tmp_path,
    )
    with pytest.raises(processes.ServiceError, match="taken on 5 starts"):
        fails.start()
    assert fails.log_path.read_text().count("Address already in use") == processes.START_ATTEMPTS


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["amqp", "distribution", "epmd"])
def test_rabbitmq_retries_each_of_its_ports(tmp_path: Path, lost: str) -> None:
    """Erlang says each loss its own way (`processes.BIND_ERROR`); its epmd goes with it."""
    if not Path(processes.RABBITMQ_SERVER).exists():
        pytest.skip("rabbitmq-server is not installed")
    server = RabbitMQServer(data_dir=tmp_path / "data", consumer_timeout_s=60, log_dir=tmp_path)
    slot = ["amqp", "distribution", "epmd"].index(lost)
    with holding() as taken:
        server.prefer = tuple(taken if i == slot else 0 for i in range(3))
        with server:
            assert taken not in server.ports
    assert processes.BIND_ERROR.search(server.log_path.read_text())
    epmds = [p.info for p in psutil.process_iter(["name", "environ"]) if p.info["name"] == "epmd"]
    assert str(tmp_path / "data") not in [(e["environ"] or {}).get("HOME") for e in epmds]


@needs_netns
@pytest.mark.parametrize("lost", ["signalling", "ice_tcp", "ice_udp"])
def test_livekit_server_retries_each_of_its_ports(tmp_path: Path, lost: str) -> None:
    """The official server binds three ports (signalling, ICE/TCP, the ICE/UDP mux): losing any
    of them is a retry, not a failed stack."""
    if missing := livekit_official.why_unavailable():
        pytest.skip(f"official LiveKit server: {missing}")
    server = livekit_process("official", {"devkey": "secret"}, tmp_path)
    slot = ["signalling", "ice_tcp", "ice_udp"].index(lost)
    with holding(socket.SOCK_DGRAM if lost == "ice_udp" else socket.SOCK_STREAM) as taken:
        server.prefer = tuple(taken if i == slot else 0 for i in range(3))
        with server:
            assert taken not in server.ports
            assert server.listens(server.port)
    assert "address already in use" in server.log_path.read_text()
