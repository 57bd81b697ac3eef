"""SSRF guard for http(s) sources past the first URL: redirects and the addresses actually
connected to (DNS rebinding), with the real ffmpeg reading through the loopback relay."""

from __future__ import annotations

import asyncio
import http.server
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import aiohttp
import pytest

from avatarq.errors import InvalidJob
from avatarq.settings import Settings
from avatarq.sourcepolicy import parse_address, source_policy
from tasks.decode import PcmDecoder
from tasks.relay import RELAY_PROTOCOLS
from tasks.safehttp import MAX_REDIRECTS, SafeHttp
from tasks.source import ResolvedSource, resolve
from tests import audio
from tests.httpserve import serving

pytestmark = pytest.mark.timeout(120)

RATE = 16000
# The test servers listen on loopback: sources there need AVATARQ_ALLOW_PRIVATE_SOURCES, and
# the allowlist (AVATARQ_SOURCE_HOSTS) is what these tests then exercise.
LOOPBACK_ONLY = Settings(allow_private_sources=True, source_hosts="127.0.0.1")


@dataclass
class Site:
    """A loopback HTTP server: files under `root`, `/redirect/<url>` answers 302 to `<url>`,
    `/loop` redirects to itself. `requests` records every path asked."""

    root: Path
    url: str = ""
    port: int = 0
    requests: list[str] = field(default_factory=list)
    ranges: list[str | None] = field(default_factory=list)
    dropped: bool = False


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    state = Site(root=tmp_path)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            state.ranges.append(self.headers.get("Range"))
            if self.path.startswith("/redirect/") or self.path == "/loop":
                self.send_response(302)
                self.send_header("Location", self.path.removeprefix("/redirect/"))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path.startswith("/ranged/"):
                return self.ranged(self.path.removeprefix("/ranged/"))
            super().do_GET()

        def ranged(self, name: str) -> None:
            """Range requests served. `drop-*`: the first response that ffmpeg reads through
            (the one after its seek to the WAV data) breaks off halfway through the file, as
            a server or proxy cutting a long download does."""
            data = (tmp_path / name).read_bytes()
            start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if name.startswith("drop-") and 0 < start < len(data) // 2 and not state.dropped:
                state.dropped = True
                self.wfile.write(data[start : len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(data[start:])

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(Handler, directory=str(tmp_path))
    )
    with serving(server) as url:
        state.url, state.port = url, server.server_address[1]
        yield state


async def _decode(resolved: ResolvedSource, settings: Settings) -> bytes:
    async with PcmDecoder(resolved, sample_rate=RATE, settings=settings) as dec:
        return b"".join([c async for c in dec.chunks(3200)])


def decode(resolved: ResolvedSource, settings: Settings) -> bytes:
    return asyncio.run(_decode(resolved, settings))


def test_redirect_within_the_policy_is_followed(site: Site) -> None:
    src = audio.chirp(site.root / "voice.wav", seconds=1, rate=RATE)
    url = f"{site.url}/redirect/{site.url}/voice.wav"
    assert decode(resolve(url, LOOPBACK_ONLY), LOOPBACK_ONLY) == audio.wav_samples(src)
    assert site.requests == [f"/redirect/{site.url}/voice.wav", "/voice.wav"]


def test_dropped_download_resumes_with_a_range_request(site: Site) -> None:
    """What ffmpeg's reconnect does for hour-long streams still works through the relay."""
    src = audio.chirp(site.root / "drop-voice.wav", seconds=20, rate=RATE)
    url = f"{site.url}/ranged/drop-voice.wav"
    assert decode(resolve(url, LOOPBACK_ONLY), LOOPBACK_ONLY) == audio.wav_samples(src)
    # The last request resumed where the cut one broke off instead of starting over.
    assert site.dropped and site.ranges[-1] == f"bytes={src.stat().st_size // 2}-"


def test_seeking_formats_work_through_the_relay(site: Site) -> None:
    """An m4a whose index (moov) comes last: ffmpeg seeks with Range requests to read it."""
    # 30 s: the index lies beyond what ffmpeg reads in one go, so it must seek to it.
    src = audio.tone(site.root / "late-index.m4a", seconds=30, rate=RATE)
    assert src.read_bytes().index(b"moov") > src.read_bytes().index(b"mdat") > 0
    pcm = decode(resolve(f"{site.url}/ranged/late-index.m4a", LOOPBACK_ONLY), LOOPBACK_ONLY)
    assert abs(len(pcm) // 2 - 30 * RATE) <= 1024
    assert any(r not in (None, "bytes=0-") for r in site.ranges)


def test_redirect_outside_the_allowlist_is_refused(site: Site) -> None:
    """Plain ffmpeg follows Location wherever it points; the relay re-checks the hop."""
    audio.chirp(site.root / "voice.wav", seconds=1, rate=RATE)
    elsewhere = f"http://localhost:{site.port}/voice.wav"  # the same server, another host name
    resolved = resolve(f"{site.url}/redirect/{elsewhere}", LOOPBACK_ONLY)
    with pytest.raises(InvalidJob, match="'localhost' is not in AVATARQ_SOURCE_HOSTS") as info:
        decode(resolved, LOOPBACK_ONLY)
    assert info.value.reason == "source_not_allowed" and info.value.permanent
    assert "/voice.wav" not in site.requests and site.requests


def test_redirect_to_an_unreadable_url_fails_the_job_at_once(site: Site) -> None:
    # The origin's own Location: no retry makes it readable (it was taken for a 5xx and
    # retried as a network fault).
    resolved = resolve(f"{site.url}/redirect/http://127.0.0.1:99999/voice.wav", LOOPBACK_ONLY)
    with pytest.raises(InvalidJob, match="redirected to an unreadable URL") as info:
        decode(resolved, LOOPBACK_ONLY)
    assert info.value.permanent


def test_redirect_loop_is_bounded(site: Site) -> None:
    with pytest.raises(InvalidJob, match=f"redirects more than {MAX_REDIRECTS} times"):
        decode(resolve(f"{site.url}/loop", LOOPBACK_ONLY), LOOPBACK_ONLY)
    # ffmpeg may ask again (it reconnects on errors), but each attempt stops at the bound.
    assert site.requests and len(site.requests) % (MAX_REDIRECTS + 1) == 0


def loopback_name() -> str:
    """A host name that is no IP literal and not `localhost` but resolves to loopback (the
    machine's own name, from /etc/hosts): only a check at connect time catches it."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)
    except OSError:
        pytest.skip(f"host name {name!r} does not resolve")
    if not infos or any(parse_address(str(i[4][0])).is_global for i in infos):
        pytest.skip(f"host name {name!r} does not resolve to loopback only")
    return name


def test_private_address_refused_at_connect_time(site: Site) -> None:
    """As after DNS rebinding: the name passed the URL check, its address is only seen when
    connecting, and the relay refuses it there (default settings: no private sources)."""
    audio.chirp(site.root / "voice.wav", seconds=1, rate=RATE)
    url = f"http://{loopback_name()}:{site.port}/voice.wav"
    # What `resolve` hands over once the host has passed its check.
    resolved = ResolvedSource(url, RELAY_PROTOCOLS, url, "http")
    with pytest.raises(InvalidJob, match="private address") as info:
        decode(resolved, Settings())
    assert info.value.reason == "source_not_allowed"
    assert site.requests == []


def test_safe_http_checks_the_socket_address(site: Site) -> None:
    (site.root / "x.txt").write_text("hello")
    name = loopback_name()

    async def get(settings: Settings) -> bytes:
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            SafeHttp(source_policy(settings), timeout=timeout) as http_client,
            await http_client.request("GET", f"http://{name}:{site.port}/x.txt") as resp,
        ):
            return await resp.read()

    with pytest.raises(InvalidJob, match=rf"{name}.*private address \(127\."):
        asyncio.run(get(Settings()))
    assert site.requests == []
    assert asyncio.run(get(Settings(allow_private_sources=True))) == b"hello"
