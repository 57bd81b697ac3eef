"""PcmDecoder against the real ffmpeg: formats, errors, protocol whitelist, HTTP/S3, memory."""

from __future__ import annotations

import asyncio
import http.server
import os
import shutil
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import imageio_ffmpeg
import pytest

from avatarq.errors import DecodeError, SourceNotFound, SourceUnavailable
from avatarq.settings import Settings
from tasks.decode import (
    AUDIO_FORMATS,
    LIMIT_SLACK_S,
    PcmDecoder,
    decode_command,
    seekable,
)
from tasks.source import HTTP_PROTOCOLS, ResolvedSource, resolve
from tests import audio
from tests.httpserve import serving
from tests.ports import refused_port
from tests.s3 import aws_env, s3_client, s3_server

__all__ = ["aws_env", "s3_server"]  # fixtures used by name below

pytestmark = pytest.mark.timeout(120)

# The HTTP tests serve audio from loopback, which production settings refuse (SSRF).
SETTINGS = Settings(allow_private_sources=True)
RATE = 16000
CHUNK = 3200  # 100 ms of 16 kHz mono s16le, what the streamer sends per frame batch
# ffmpeg reads ~100 KB while opening a WAV (format and codec probing) before it decodes.
HEAD_START = 256 * 1024


async def _decode(
    resolved: ResolvedSource, rate: int, chunk_bytes: int, start_at: float = 0.0
) -> list[bytes]:
    async with PcmDecoder(resolved, sample_rate=rate, settings=SETTINGS, start_at=start_at) as dec:
        return [chunk async for chunk in dec.chunks(chunk_bytes)]


def decode(
    resolved: ResolvedSource, rate: int = RATE, chunk_bytes: int = CHUNK, start_at: float = 0.0
) -> bytes:
    """Decode everything, checking the chunking contract on the way."""
    chunks = asyncio.run(_decode(resolved, rate, chunk_bytes, start_at))
    assert all(len(c) == chunk_bytes for c in chunks[:-1])
    assert chunks and 0 < len(chunks[-1]) <= chunk_bytes and len(chunks[-1]) % 2 == 0
    return b"".join(chunks)


def local(path: Path) -> ResolvedSource:
    return resolve(str(path), SETTINGS)


# --- local files -------------------------------------------------------------------------


# Lossy codecs may add or trim up to a frame of priming/padding (aac 1024, mp3 1152 samples at
# the source rate); ffmpeg trims most of it with the containers' gapless metadata.
@pytest.mark.parametrize(
    ("suffix", "tolerance"), [("wav", 0), ("mp3", 1152), ("m4a", 1024), ("ogg", 960)]
)
def test_formats_decode_to_expected_length(tmp_path: Path, suffix: str, tolerance: int) -> None:
    src = audio.tone(tmp_path / f"tone.{suffix}", seconds=3, rate=RATE)
    pcm = decode(local(src))
    assert abs(len(pcm) // 2 - 3 * RATE) <= tolerance
    assert max(pcm) > 0  # not silence


def test_wav_at_target_rate_is_bit_exact(tmp_path: Path) -> None:
    src = audio.chirp(tmp_path / "chirp.wav", seconds=2.5, rate=RATE)
    assert decode(local(src), chunk_bytes=4000) == audio.wav_samples(src)


def test_resamples_and_downmixes_44k1_stereo(tmp_path: Path) -> None:
    src = audio.tone(tmp_path / "cd.wav", seconds=3, rate=44100, channels=2)
    pcm = decode(local(src))
    assert abs(len(pcm) // 2 - 3 * RATE) <= 16


def test_file_name_with_colon_is_not_a_protocol(tmp_path: Path) -> None:
    src = audio.tone(tmp_path / "take:2.wav", seconds=1, rate=RATE)
    assert len(decode(local(src))) == 2 * RATE


@pytest.mark.parametrize("odd", [1, 3201])
def test_chunk_size_must_be_even(tmp_path: Path, odd: int) -> None:
    src = audio.tone(tmp_path / "t.wav", seconds=1, rate=RATE)
    with pytest.raises(ValueError, match="even"):
        decode(local(src), chunk_bytes=odd)


def test_image_is_not_audio(tmp_path: Path) -> None:
    # An image container is not on the audio-only format whitelist: refused before probing.
    with pytest.raises(DecodeError, match="not an audio file.*format that is not allowed") as info:
        decode(local(audio.image(tmp_path / "photo.png")))
    assert info.value.reason == "format_not_allowed" and info.value.permanent


def test_text_file_is_not_audio(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="not an audio file") as info:
        decode(local(audio.text_file(tmp_path / "notes.mp3")))
    assert "notes.mp3" in info.value.message


@pytest.mark.parametrize("suffix", ["m4a", "mp3"])
def test_corrupt_file(tmp_path: Path, suffix: str) -> None:
    good = audio.tone(tmp_path / f"good.{suffix}", seconds=2, rate=RATE)
    bad = audio.corrupt(tmp_path / f"bad.{suffix}", source=good)
    with pytest.raises(DecodeError, match="corrupt") as info:
        decode(local(bad))
    assert info.value.reason == "invalid_audio"
    assert f"bad.{suffix}" in info.value.message


def test_file_removed_after_resolve(tmp_path: Path) -> None:
    src = audio.tone(tmp_path / "gone.wav", seconds=1, rate=RATE)
    resolved = local(src)
    src.unlink()
    with pytest.raises(SourceNotFound, match="gone.wav"):
        decode(resolved)


def test_stopping_early_kills_and_reaps_ffmpeg(tmp_path: Path) -> None:
    src = audio.tone(tmp_path / "long.wav", seconds=120, rate=RATE)

    async def first_chunk() -> int | None:
        async with PcmDecoder(local(src), settings=SETTINGS) as dec:
            async for _ in dec.chunks(CHUNK):
                break
        return dec.returncode

    started = time.monotonic()
    assert asyncio.run(first_chunk()) is not None  # reaped: the exit status is known
    assert time.monotonic() - started < 10


# --- protocol whitelist ------------------------------------------------------------------


@dataclass
class HttpFiles:
    """A threaded HTTP server on loopback serving one directory, recording the paths asked."""

    root: Path
    url: str
    requests: list[str] = field(default_factory=list)
    # While cleared, "/slow/<name>" sends HEAD_START bytes and waits: a download under way.
    release: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def http_files(tmp_path: Path) -> Iterator[HttpFiles]:
    root = tmp_path / "www"
    root.mkdir()
    state = HttpFiles(root=root, url="")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            if not self.path.startswith("/slow/"):
                return super().do_GET()
            data = (root / self.path.removeprefix("/slow/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:HEAD_START])
            self.wfile.flush()
            state.release.wait(30)
            self.wfile.write(data[HEAD_START:])

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(Handler, directory=str(root))
    )
    with serving(server) as url:
        state.url = url
        try:
            yield state
        finally:
            state.release.set()  # before shutdown: a held response must not block it


def test_playlist_cannot_reach_the_network(tmp_path: Path, http_files: HttpFiles) -> None:
    """An HLS playlist pointing at an internal URL: plain ffmpeg fetches it (SSRF), as the
    control run shows; our decoder refuses playlists, and a local source may not open http."""
    seg = tmp_path / "seg.m4a"
    audio.tone(seg, seconds=2, rate=RATE)
    audio.remux_ts(seg, http_files.root / "seg.ts")
    playlist = tmp_path / "innocent.m3u8"
    playlist.write_text(
        "#EXTM3U\n#EXT-X-TARGETDURATION:3\n#EXT-X-MEDIA-SEQUENCE:0\n"
        f"#EXTINF:2.0,\n{http_files.url}/seg.ts\n#EXT-X-ENDLIST\n"
    )
    resolved = local(playlist)

    with pytest.raises(DecodeError, match="playlists and other indirections") as info:
        decode(resolved)
    assert info.value.reason == "format_not_allowed"
    # Even with http allowed (as for an http source), the playlist is refused.
    permissive = ResolvedSource(
        resolved.url_or_path, ("file", "http", "tcp"), resolved.description, "file"
    )
    with pytest.raises(DecodeError, match="playlists"):
        decode(permissive)
    assert http_files.requests == []

    # Control: without our whitelists the same input does reach the server and decodes.
    argv = [a for a in decode_command(permissive, sample_rate=RATE) if a != AUDIO_FORMATS]
    argv.remove("-format_whitelist")
    out = subprocess.run(argv, capture_output=True, timeout=60, check=True).stdout
    assert len(out) // 2 >= 1.5 * RATE  # MPEG-TS adds its own padding
    assert http_files.requests == ["/seg.ts"]


# --- HTTP and S3 -------------------------------------------------------------------------


def test_http_source_is_bit_exact(http_files: HttpFiles) -> None:
    src = audio.chirp(http_files.root / "voice.wav", seconds=2, rate=RATE)
    resolved = resolve(f"{http_files.url}/voice.wav?token=s3cret", SETTINGS)
    assert decode(resolved) == audio.wav_samples(src)


def test_http_playback_starts_before_download_ends(http_files: HttpFiles) -> None:
    src = audio.chirp(http_files.root / "long.wav", seconds=30, rate=RATE)

    async def run() -> bytes:
        async with PcmDecoder(
            resolve(f"{http_files.url}/slow/long.wav", SETTINGS), settings=SETTINGS
        ) as dec:
            stream = dec.chunks(CHUNK)
            # The server holds back all but the first 8 s of the file until released.
            first = await asyncio.wait_for(anext(stream), 10)
            assert not http_files.release.is_set()
            http_files.release.set()
            return first + b"".join([c async for c in stream])

    assert asyncio.run(run()) == audio.wav_samples(src)


def test_stopping_early_on_a_stalled_download_is_prompt(http_files: HttpFiles) -> None:
    """A job cancelled while its server holds back the rest: ffmpeg and the relay go at once."""
    audio.chirp(http_files.root / "held.wav", seconds=30, rate=RATE)

    async def first_chunk() -> float:
        async with PcmDecoder(
            resolve(f"{http_files.url}/slow/held.wav", SETTINGS), settings=SETTINGS
        ) as dec:
            async for _ in dec.chunks(CHUNK):
                break
            started = time.monotonic()
        return time.monotonic() - started

    assert asyncio.run(first_chunk()) < 3
    assert not http_files.release.is_set()


def test_http_404_is_source_not_found(http_files: HttpFiles) -> None:
    with pytest.raises(SourceNotFound, match="404") as info:
        decode(resolve(f"{http_files.url}/missing.wav?X-Amz-Signature=deadbeef", SETTINGS))
    assert "deadbeef" not in info.value.message


@pytest.mark.slow
def test_http_connection_refused_is_transient() -> None:
    with (
        refused_port() as port,
        pytest.raises(SourceUnavailable, match="Connection refused") as info,
    ):
        decode(resolve(f"http://127.0.0.1:{port}/a.wav", SETTINGS))
    assert not info.value.permanent


def test_s3_object_decodes_via_presigned_url(
    tmp_path: Path, s3_server: str, aws_env: dict[str, str]
) -> None:
    src = audio.tone(tmp_path / "s3.mp3", seconds=2, rate=RATE)
    s3 = s3_client(s3_server)
    s3.create_bucket(Bucket="decode-me")
    s3.upload_file(str(src), "decode-me", "in/s3.mp3")
    settings = Settings(s3_endpoint_url=s3_server, aws_region="us-east-1")
    resolved = resolve("s3://decode-me/in/s3.mp3", settings)
    assert resolved.protocols == HTTP_PROTOCOLS
    assert abs(len(decode(resolved)) // 2 - 2 * RATE) <= 1152


# --- memory ------------------------------------------------------------------------------


def test_memory_stays_flat_for_long_audio(tmp_path: Path) -> None:
    """20 minutes of audio (38 MB of PCM) pass through while Python holds about a chunk."""
    minutes = 20
    src = audio.tone(tmp_path / "hour.wav", seconds=minutes * 60, rate=RATE)
    pcm_bytes = minutes * 60 * RATE * 2

    async def run() -> tuple[int, int]:
        total = 0
        async with PcmDecoder(local(src), settings=SETTINGS) as dec:
            async for chunk in dec.chunks(CHUNK):
                total += len(chunk)
        return total, tracemalloc.get_traced_memory()[1]

    tracemalloc.start()
    try:
        total, peak = asyncio.run(run())
    finally:
        tracemalloc.stop()
    assert total == pcm_bytes
    # Pipe read buffer (asyncio pauses at 2x its 64 KB limit) plus a chunk or two in flight.
    assert peak < 1_000_000, f"peak {peak} bytes while decoding {pcm_bytes} bytes"


# --- command ---------------------------------------------------------------------------


def test_decode_command_shape(tmp_path: Path) -> None:
    src = audio.tone(tmp_path / "t.wav", seconds=1, rate=RATE)
    argv = decode_command(local(src), sample_rate=24000, binary="ffmpeg")
    assert argv[:6] == ["ffmpeg", "-nostdin", "-hide_banner", "-nostats", "-loglevel", "level+info"]
    assert argv[argv.index("-protocol_whitelist") + 1] == "file"
    assert argv.index("-protocol_whitelist") < argv.index("-i")
    assert "-reconnect" not in argv
    for flag, value in [("-f", "s16le"), ("-ac", "1"), ("-ar", "24000"), ("-map", "0:a:0")]:
        assert argv[argv.index(flag) + 1] == value
    assert argv[-1] == "pipe:"

    # An http(s) source is read through the loopback relay: plain http only.
    http = decode_command(resolve("https://h.example/a.mp3", SETTINGS), binary="ffmpeg")
    assert http[http.index("-protocol_whitelist") + 1] == "http,tcp"
    assert http[http.index("-reconnect") + 1] == "1"
    assert http.index("-reconnect") < http.index("-i")


def declared(path: Path, settings: Settings = SETTINGS) -> float | None:
    """The length the decoder reads from the source's header as it starts."""

    async def run() -> float | None:
        async with PcmDecoder(local(path), settings=settings) as dec:
            return await dec.declared_seconds()

    return asyncio.run(run())


def test_the_decoder_reads_the_declared_length(tmp_path: Path) -> None:
    src = audio.tone(tmp_path / "t.m4a", seconds=4, rate=RATE)
    length = declared(src)
    assert length is not None and abs(length - 4.0) < 0.1
    assert declared(audio.corrupt(tmp_path / "bad.m4a", source=src)) is None


def test_only_ffmpegs_errors_are_kept_for_messages(tmp_path: Path) -> None:
    # ffmpeg logs at info level for the declared length; a job's error shows only its errors.
    bad = audio.corrupt(tmp_path / "bad.m4a", source=audio.tone(tmp_path / "t.m4a", seconds=1))

    async def run() -> PcmDecoder:
        async with PcmDecoder(local(bad), settings=SETTINGS) as dec:
            with pytest.raises(DecodeError, match="corrupt data"):
                async for _ in dec.chunks(CHUNK):
                    pass
        return dec

    tail = asyncio.run(run()).stderr_tail
    assert "moov atom not found" in tail
    assert "[error]" not in tail and "[info]" not in tail and "Duration" not in tail


@pytest.mark.parametrize("which", ["bundled", "PATH"])
def test_either_ffmpeg_reads_the_declared_length(tmp_path: Path, which: str) -> None:
    # The length comes from ffmpeg's own input dump (imageio-ffmpeg ships no ffprobe), and a
    # distribution's older ffmpeg (AVATARQ_FFMPEG) prints it the same way.
    binary = imageio_ffmpeg.get_ffmpeg_exe() if which == "bundled" else shutil.which("ffmpeg")
    if binary is None:
        pytest.skip("no ffmpeg on PATH")
    settings = Settings(ffmpeg_binary=binary)
    length = declared(audio.tone(tmp_path / "t.wav", seconds=1, rate=RATE), settings)
    assert length == pytest.approx(1.0, abs=0.05)


# --- length limits and truncation --------------------------------------------------------


def piped(path: Path, seconds: float, codec: list[str], fmt: str) -> Path:
    """A tone encoded to a pipe, as a streaming encoder writes it: no length in the header."""
    argv = [*audio.FFMPEG_ARGS, "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]
    out = subprocess.run(
        [*argv, *codec, "-f", fmt, "pipe:1"], capture_output=True, check=True, timeout=60
    ).stdout
    path.write_bytes(out)
    return path


UNDECLARED = [("flac", ["-c:a", "flac"], "flac"), ("mka", ["-c:a", "libopus"], "matroska")]


@pytest.mark.parametrize(("suffix", "codec", "fmt"), UNDECLARED)
def test_limit_is_enforced_while_decoding(
    tmp_path: Path, suffix: str, codec: list[str], fmt: str
) -> None:
    src = piped(tmp_path / f"long.{suffix}", 12, codec, fmt)
    assert declared(src) is None  # the premise: nothing to check before decoding
    got: list[bytes] = []

    async def run() -> None:
        async with PcmDecoder(local(src), settings=SETTINGS, max_seconds=5) as dec:
            async for chunk in dec.chunks(CHUNK):
                got.append(chunk)

    with pytest.raises(DecodeError, match="longer than the 5s maximum") as info:
        asyncio.run(run())
    assert info.value.reason == "too_long" and info.value.permanent
    # Stopped at the limit (plus the codec slack), not at the end of the file.
    assert 5 * RATE * 2 <= len(b"".join(got)) <= (5 + LIMIT_SLACK_S) * RATE * 2


def test_audio_within_the_limit_plays_in_full(tmp_path: Path) -> None:
    src = piped(tmp_path / "short.flac", 3, ["-c:a", "flac"], "flac")

    async def run() -> tuple[int, float]:
        # Exactly at the limit: a clip of max_duration seconds is allowed.
        async with PcmDecoder(local(src), settings=SETTINGS, max_seconds=3) as dec:
            pcm = b"".join([c async for c in dec.chunks(CHUNK)])
        return len(pcm), dec.decoded_seconds

    size, seconds = asyncio.run(run())
    assert size == 3 * RATE * 2 and seconds == pytest.approx(3.0)


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    """An mp3 cut to 30 %: its header still declares 10 s, ffmpeg decodes 3 s and exits 0."""
    whole = audio.tone(tmp_path / "whole.mp3", seconds=10, rate=RATE)
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 3 // 10])
    length = declared(cut)
    assert length is not None and length > 9.5

    async def run(path: Path, expected: float | None) -> PcmDecoder:
        async with PcmDecoder(local(path), settings=SETTINGS, expected_seconds=expected) as dec:
            async for _ in dec.chunks(CHUNK):
                pass
        return dec

    with pytest.raises(DecodeError, match=r"truncated audio: .*cut.mp3 declares 10\.\d\ds") as info:
        asyncio.run(run(cut, length))
    assert info.value.reason == "truncated_audio"
    # Without a declared length there is nothing to compare; the whole file is fine.
    assert asyncio.run(run(cut, None)).decoded_seconds == pytest.approx(3.0, abs=0.2)
    intact = asyncio.run(run(whole, declared(whole)))
    assert not intact.truncated and intact.decoded_seconds == pytest.approx(10.0, abs=0.1)


# --- starting part-way (a resumed job) ---------------------------------------------------

START = 3.0


def _from_start(src: Path) -> bytes:
    """The source's own samples from START on."""
    return audio.wav_samples(src)[int(START * RATE) * 2 :]


def test_seek_in_a_file_is_sample_exact(tmp_path: Path) -> None:
    src = audio.chirp(tmp_path / "chirp.wav", seconds=5, rate=RATE)
    resolved = local(src)
    assert seekable(resolved)
    argv = decode_command(resolved, start_at=START)
    assert argv.index("-ss") < argv.index("-i")  # an input seek: nothing before START is read
    assert decode(resolved, start_at=START) == _from_start(src)


def test_seek_in_a_pipe_decodes_and_drops(tmp_path: Path) -> None:
    """ffmpeg cannot seek a pipe (an input seek yields no audio at all): it decodes from the
    start and drops what lies before START."""
    src = audio.chirp(tmp_path / "chirp.wav", seconds=5, rate=RATE)
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    resolved = ResolvedSource(f"file:{fifo}", ("file",), "a pipe", "file")
    assert not seekable(resolved)

    def feed() -> None:
        with fifo.open("wb") as out:
            out.write(src.read_bytes())

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        assert decode(resolved, start_at=START) == _from_start(src)
    finally:
        writer.join(10)


def test_seek_in_an_http_source(http_files: HttpFiles) -> None:
    # SimpleHTTPRequestHandler serves no ranges: the decoder must not count on them.
    src = audio.chirp(http_files.root / "voice.wav", seconds=5, rate=RATE)
    assert decode(resolve(f"{http_files.url}/voice.wav", SETTINGS), start_at=START) == (
        _from_start(src)
    )


def test_seek_in_a_compressed_file_lands_within_20ms(tmp_path: Path) -> None:
    """An mp3 seek is exact to its frames' timestamps: the PCM from START matches the full
    decode's from START, found by the offset where the two agree best."""
    src = audio.chirp(tmp_path / "chirp.mp3", seconds=6, rate=RATE)
    full = decode(local(src))
    part = decode(local(src), start_at=START)
    window = part[: RATE // 5 * 2]  # 200 ms
    at = int(START * RATE)
    offsets = range(-RATE // 50, RATE // 50 + 1)  # ±20 ms in samples
    best = min(offsets, key=lambda o: _distance(full, window, at + o))
    assert abs(best) <= RATE // 50
    assert _distance(full, window, at + best) < _distance(full, window, at + RATE // 10)


def _distance(full: bytes, window: bytes, sample: int) -> int:
    a = memoryview(full)[sample * 2 : sample * 2 + len(window)].cast("h")
    b = memoryview(window).cast("h")
    return sum(abs(x - y) for x, y in zip(a, b, strict=True))


def test_limits_count_source_seconds_from_the_start(tmp_path: Path) -> None:
    """A resumed decode is judged on the source: 5 s played from START is not truncated
    against a declared 5 s, and passes a 5 s limit."""
    src = audio.chirp(tmp_path / "chirp.wav", seconds=5, rate=RATE)

    async def run() -> PcmDecoder:
        dec = PcmDecoder(
            local(src), settings=SETTINGS, start_at=START, max_seconds=5, expected_seconds=5
        )
        async with dec:
            async for _ in dec.chunks(CHUNK):
                pass
        return dec

    dec = asyncio.run(run())
    assert not dec.truncated
    assert dec.decoded_seconds == pytest.approx(5 - START)
