"""`avatarq demo`: the whole product on the embedded local stack, in one command."""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console

from avatarq_dev.processes import python_module
from avatarq_dev.stack import HOST, LocalStack, local_stack

if TYPE_CHECKING:
    from producers.api import TenantIds

DEMO_TIMEOUT_S = 300.0
#: `--keep` serves the API and console here (on another port when this one is taken).
CONSOLE_PORT = 8000
#: `--keep` stops by itself after this long, in case nobody is there to press Ctrl-C.
KEEP_MAX_S = 24 * 3600.0
console = Console(stderr=True)


def sample_path() -> Path:
    return Path(str(resources.files("avatarq") / "assets" / "sample.ogg"))


class Follow(Protocol):
    """Waits for a job to end and returns its record (the CLI's draws a progress bar)."""

    def __call__(self, job_id: str, *, timeout: float, show_progress: bool) -> dict[str, Any]: ...


def run_demo(
    follow: Follow,
    *,
    source: str | dict[str, Any] | None = None,
    workdir: Path | None = None,
    show_progress: bool = True,
    keep: bool = False,
) -> dict[str, Any]:
    """`source` is audio or a `tts` source (rendered by `producers.enqueue` before sending).
    `keep`: afterwards, serve the API and its console on the stack until Ctrl-C or SIGTERM."""
    from avatarq.settings import get_settings

    source = source or str(sample_path())
    with local_stack(workdir) as stack:
        console.print(
            f"local stack up in {stack.workdir}: LiveKit {stack.livekit_url}, "
            f"avatar emulator {stack.avatar_url}, Redis {stack.redis.url}"
        )
        stack.start_worker("demo", concurrency=4)
        metrics_url = f"http://{HOST}:{stack.metrics_ports['demo']}/metrics"
        console.print(f"worker metrics (Prometheus) at {metrics_url}")
        # Point this process's producer at the stack, as a user's environment would.
        os.environ.update(stack.env())
        get_settings.cache_clear()
        from avatarq.jobs import new_job_id
        from producers import enqueue

        access = ConsoleAccess.from_env() if keep else None
        job: dict[str, Any] = {"room": "demo", "avatar_id": "demo", "source": source}
        if access:
            # In the key's tenant namespace (as the API names it), so its console shows it.
            scope = access.scope()
            job.update(job_id=scope.internal(new_job_id()), room=scope.livekit_room("demo"))
        started = time.monotonic()
        handle = enqueue(job)
        result = follow(handle.job_id, timeout=DEMO_TIMEOUT_S, show_progress=show_progress)
        wall = time.monotonic() - started
        summary = summarize(result, wall, stack.recordings)
        summary["metrics_url"] = metrics_url
        summary["metrics_jobs_completed"] = scrape(metrics_url, "avatarq_jobs_completed_total")
        if show_progress:
            for key, value in summary.items():
                console.print(f"  {key}: {value}")
        if access:
            serve_console(stack, access)
        return summary


@dataclass(frozen=True)
class ConsoleAccess:
    """The API keys `--keep` serves with, and the first one's key and tenant (for the URL)."""

    api_keys: str
    key: str
    tenant: str

    @classmethod
    def from_env(cls) -> ConsoleAccess:
        """`AVATARQ_API_KEYS` when set, else a fresh key of tenant `demo`."""
        from producers.api import parse_api_keys

        keys = os.environ.get("AVATARQ_API_KEYS", "").strip(" ,")
        keys = keys or f"demo:{secrets.token_urlsafe(16)}"
        key, tenant = next(iter(parse_api_keys(keys).items()))
        return cls(keys, key, tenant)

    def scope(self) -> TenantIds:
        """The tenant's job ids and rooms, as the API serving these keys names them."""
        from producers.api import TenantIds, parse_api_keys, rooms_namespaced

        return TenantIds(self.tenant, own_rooms=rooms_namespaced(parse_api_keys(self.api_keys)))


def serve_console(stack: LocalStack, access: ConsoleAccess) -> None:
    """`avatarq api` on the stack, its console's URL (with a key) printed, until stopped."""
    api = python_module(
        "api",
        "avatarq_cli",
        lambda ports: ["api", "--host", HOST, "--port", str(ports[0])],
        ports=["tcp"],
        prefer=(CONSOLE_PORT,),
        env={**stack.env(), "AVATARQ_API_KEYS": access.api_keys},
        log_dir=stack.workdir / "logs",
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with api:
        line = console_line(f"http://{HOST}:{api.port}", access)
        console.print(line, soft_wrap=True, highlight=False)
        if stack.server != "official":
            console.print(
                "  (room view without video: the embedded LiveKit server forwards no media; "
                "the official livekit-server runs inside infra/netns-run)",
                soft_wrap=True,
            )
        console.print("the stack stays up: Ctrl-C stops it")
        stop.wait(KEEP_MAX_S)


def console_line(base: str, access: ConsoleAccess) -> str:
    """The console's URL with the key in it; without the console's build (`make demo` does not
    build it) the API serves all the same, and the line says where, with which key, instead
    of pointing at a page that answers 503."""
    from producers.console import BUILD_HINT, CONSOLE_DIST

    if (CONSOLE_DIST / "index.html").is_file():
        return f"console: {base}/console/#key={urllib.parse.quote(access.key, safe='')}"
    return f"console: not built ({BUILD_HINT}); the API serves at {base}, X-API-Key: {access.key}"


def scrape(url: str, metric: str) -> float | None:
    """One sample's value from a Prometheus text page (None if absent or unreachable)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as page:
            text = page.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == metric:
            return float(value)
    return None


def summarize(result: dict[str, Any], wall_s: float, recordings: Path) -> dict[str, Any]:
    ts = result.get("timestamps") or {}
    audio = result.get("audio_duration") or 0.0

    def span(a: str, b: str) -> float | None:
        return round(ts[b] - ts[a], 3) if ts.get(a) and ts.get(b) else None

    wavs = sorted(recordings.glob("*.wav")) if recordings.exists() else []
    return {
        "job_id": result.get("job_id"),
        "status": result.get("status"),
        "error": result.get("error"),
        "audio_seconds": audio,
        "wall_seconds": round(wall_s, 3),
        "real_time_factor": round(wall_s / audio, 3) if audio else None,
        "join_s": span("picked", "room_joined"),
        "avatar_ready_s": span("avatar_requested", "avatar_ready"),
        "streaming_s": span("first_byte", "last_byte"),
        "playback_finished_after_last_byte_s": span("last_byte", "playback_finished"),
        "playback_position": result.get("playback_position"),
        "received_wav": str(wavs[-1]) if wavs else None,
    }
