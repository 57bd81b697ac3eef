"""Only the ledger package (avatarq/ledger/) spells a Redis key or holds a Lua script: every
other module asks `avatarq.ledger.keys` for a key and `avatarq.ledger.scripts` for a script."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEDGER = ROOT / "avatarq" / "ledger"
# Not the dev stack (devstack/, a distribution of its own): its fault lab scans every key.
SCANNED = [ROOT / top for top in ("avatarq", "avatarq_cli", "producers", "tasks", "tests")]
EXEMPT = [LEDGER, Path(__file__).resolve()]

#: `avatarq:` followed by a key's next part (prose such as "avatarq: light" is no key).
KEY = re.compile(r"avatarq:[\w*{\[-]")
LUA = re.compile(r"redis\.p?call\s*\(|\bKEYS\[\d|\bARGV\[\d")
#: The calls that run Lua on a client.
RUNS_LUA = {"register_script", "eval", "evalsha", "eval_ro", "evalsha_ro", "script_load"}


def _docstrings(tree: ast.Module) -> set[int]:
    """The nodes that are docstrings: prose may name a key."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _text(node: ast.AST) -> str | None:
    """A string literal's text; an f-string's with `{}` for each placeholder."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(str(v.value) if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def offences(source: str) -> list[str]:
    """Each Redis key, Lua body or Lua call in `source`, as `line: what`."""
    tree = ast.parse(source)
    # An f-string is read whole, not again piece by piece.
    skipped = _docstrings(tree) | {
        id(part) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for part in n.values
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.expr):
            continue
        text = None if id(node) in skipped else _text(node)
        if text is not None and LUA.search(text):
            found.append(f"{node.lineno}: a Lua body")
        elif text is not None and KEY.search(text):
            found.append(f"{node.lineno}: a Redis key {text!r}")
        elif isinstance(node, ast.Attribute) and node.attr in RUNS_LUA:
            found.append(f"{node.lineno}: runs Lua ({node.attr})")
    return found


def _modules() -> list[Path]:
    paths = {p for d in SCANNED for p in d.rglob("*.py")}
    return sorted(p for p in paths if not any(p.is_relative_to(e) for e in EXEMPT))


def test_no_module_outside_the_ledger_spells_a_key_or_holds_lua() -> None:
    modules = _modules()
    assert ROOT / "tasks" / "render.py" in modules and ROOT / "producers" / "client.py" in modules
    found = [f"{p.relative_to(ROOT)}:{o}" for p in modules for o in offences(p.read_text())]
    assert found == []


def test_every_lua_script_is_a_file_of_the_ledger() -> None:
    scripts = {p for d in SCANNED for p in d.rglob("*.lua")}
    assert scripts and all(p.is_relative_to(LEDGER / "lua") for p in scripts), scripts


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('KEY = "avatarq:dead"', "1: a Redis key 'avatarq:dead'"),
        ('def k(j):\n    return f"avatarq:{j}:x"', "2: a Redis key 'avatarq:{}:x'"),
        ("S = '''\nreturn redis.call('GET', KEYS[1])\n'''", "1: a Lua body"),
        ("client.register_script(body)", "1: runs Lua (register_script)"),
        ('async def f(r):\n    await r.eval(body, 1, "k")', "2: runs Lua (eval)"),
    ],
)
def test_the_check_finds_keys_lua_and_lua_calls(source: str, expected: str) -> None:
    assert offences(source) == [expected]


def test_the_check_leaves_prose_alone() -> None:
    source = '"""Keys live under `avatarq:job:{id}`."""\nX = "avatarq: light, no worker"\n'
    assert offences(source) == []


def test_no_job_id_names_another_records_key() -> None:
    # Job ids may hold ':' (JOB_ID_PATTERN): a job's keys must not share a prefix with the
    # keys of avatar servers, rooms or workers, or a crafted id would write into them.
    from avatarq.ledger import keys

    crafted = "default:sessions"
    job_keys = {
        keys.job_avatar_key(crafted),
        keys.job_record_key(crafted),
        keys.job_lease_key(crafted),
        keys.job_events_key(crafted),
        keys.job_waiting_key(crafted),
    }
    others = {keys.avatar_quota_key("default", part) for part in ("sessions", "waiting", "cap")}
    assert not job_keys & others
