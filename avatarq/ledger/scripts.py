"""The ledger's Lua scripts: `lua/{name}.lua`, package data, read once and registered once
per Redis client (redis-py then calls each by its SHA, loading it again after a restart)."""

from __future__ import annotations

from enum import StrEnum
from functools import cache
from importlib.resources import files
from typing import Any, overload
from weakref import WeakKeyDictionary

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript, Script


class Lua(StrEnum):
    """Each script, by its file name; what it does is in the file's head."""

    CLAIM = "claim"
    WATCH = "watch"
    RELEASE = "release"
    FINISH = "finish"
    TAKE_ORPHANS = "take_orphans"
    TAKE_STRANDED = "take_stranded"
    TAKE_LOST = "take_lost"
    LANES_KEEP = "lanes_keep"
    SEEN = "seen"
    REGISTER = "register"
    SLOTS_ACQUIRE = "slots_acquire"
    SLOTS_RENEW = "slots_renew"
    ROOM_AGENT = "room_agent"


@cache
def source(lua: Lua) -> str:
    return files(__package__).joinpath("lua", f"{lua.value}.lua").read_text()


# Weak: a client closed and dropped takes its scripts with it.
_registered: WeakKeyDictionary[Any, dict[Lua, Any]] = WeakKeyDictionary()


@overload
def script(client: aioredis.Redis, lua: Lua) -> AsyncScript: ...
@overload
def script(client: redis.Redis, lua: Lua) -> Script: ...
def script(client: redis.Redis | aioredis.Redis, lua: Lua) -> Script | AsyncScript:
    """`lua` registered on `client` (the first call for that pair registers it)."""
    scripts = _registered.setdefault(client, {})
    if lua not in scripts:
        scripts[lua] = client.register_script(source(lua))
    return scripts[lua]
