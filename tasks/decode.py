"""Decode a resolved audio source to mono s16le PCM with ffmpeg, streamed chunk by chunk.

ffmpeg writes to a pipe that is read only as playback asks, so memory stays a few chunks
whatever the audio's length; limits are checked on the decoded PCM, since many files never
declare their length. How a source reaches ffmpeg and how a resumed job seeks:
docs/architecture.md (the audio path) and docs/resume.md."""

from __future__ import annotations

import asyncio
import contextlib
import re
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

import ffmpeg
import imageio_ffmpeg

from avatarq.errors import DecodeError, JobError, Reason, SourceNotFound, SourceUnavailable
from avatarq.settings import Settings, get_settings
from avatarq.sourcepolicy import source_policy
from tasks.relay import RELAY_PROTOCOLS, SourceRelay
from tasks.source import ResolvedSource

STDERR_TAIL_BYTES = 4096
# ffmpeg's I/O timeout for network sources (microseconds): a stalled server fails the read
# instead of hanging the job; the reconnect options below then retry it.
_RW_TIMEOUT_US = 15_000_000
_RECONNECT_DELAY_MAX_S = 10
#: How long the input's dump may take to come: ffmpeg writes it once it opened the source,
#: before the first audio, so this only bounds a pathological input.
_DECLARED_TIMEOUT_S = 15.0
#: Decoded audio may run this much past `max_seconds`: codec priming and padding (a frame or
#: two) make a clip of exactly the limit decode a few milliseconds longer.
LIMIT_SLACK_S = 0.25
#: A decode counts as truncated when it falls short of the declared length by more than this
#: (or TRUNCATED_RATIO of it, if more): bitrate-based estimates of VBR files are a few % off.
TRUNCATED_SLACK_S = 1.0
TRUNCATED_RATIO = 0.05
# Phrases in ffmpeg's errors that mean the network, not the file, failed: retrying may help.
_NETWORK_FAULTS = (
    "connection refused",
    "connection reset",
    "connection timed out",
    "network is unreachable",
    "5xx server error",
    "server returned 5",
    "i/o error",
    "end of file",
)
# Phrases that mean the bytes are not (intact) audio.
_CORRUPT_SIGNS = (
    "invalid data found",
    "moov atom not found",
    "failed to read frame",
    "header missing",
    "error while decoding",
    "invalid argument",
)


def ffmpeg_binary(settings: Settings) -> str:
    """The configured ffmpeg, else the one bundled by imageio-ffmpeg (else, where it bundles
    none for the platform, the one on PATH). The bundled build is static and pinned with the
    package: it starts in a quarter of the time of a distribution's dynamically linked one
    (docs/performance.md), which every job pays once, and all workers run the same ffmpeg."""
    return settings.ffmpeg_binary or imageio_ffmpeg.get_ffmpeg_exe()


#: Demuxers a source may use: audio containers only. Playlists (HLS, concat, ...) are refused:
#: they would make the worker fetch whatever URLs they list, which a host check can't see.
AUDIO_FORMATS = ",".join(
    ("wav", "w64", "mp3", "aac", "mov", "ogg", "flac", "matroska", "aiff", "caf", "amr", "wv",
     "mpegts", "asf", "ac3", "eac3", "dts", "ape", "tta", "au", "voc", "mpc", "s16le")
)  # fmt: skip


def _input_options(resolved: ResolvedSource) -> dict[str, str | int]:
    options: dict[str, str | int] = {
        "protocol_whitelist": ",".join(resolved.protocols),
        "format_whitelist": AUDIO_FORMATS,
    }
    if resolved.kind in ("http", "s3"):
        # An hour of real-time playback keeps one HTTP response open for an hour, paced by
        # back-pressure; servers and proxies drop such connections, so ffmpeg must resume with
        # a Range request at the byte where it stopped (reconnect_streamed covers non-seekable
        # responses too).
        options.update(
            reconnect=1,
            reconnect_streamed=1,
            reconnect_on_network_error=1,
            reconnect_on_http_error="5xx",
            reconnect_delay_max=_RECONNECT_DELAY_MAX_S,
            rw_timeout=_RW_TIMEOUT_US,
        )
    return options


def seekable(resolved: ResolvedSource) -> bool:
    """Whether ffmpeg can seek the input itself. An http(s) source goes through the relay,
    and whether its origin serves ranges is only known once it answers: it is decoded and
    dropped, which is exact whatever the origin does."""
    if resolved.kind == "s3":
        return True
    if resolved.kind != "file":
        return False
    path = resolved.url_or_path.removeprefix("file:")
    try:
        return stat.S_ISREG(Path(path).stat().st_mode)
    except OSError:
        return False  # the decoder reports the missing file


def decode_command(
    resolved: ResolvedSource,
    *,
    sample_rate: int = 16000,
    binary: str | None = None,
    start_at: float = 0.0,
) -> list[str]:
    """The ffmpeg argv decoding `resolved` from `start_at` seconds to mono s16le PCM at
    `sample_rate` on stdout."""
    binary = binary or ffmpeg_binary(get_settings())
    options: dict[str, str | int | float] = dict(_input_options(resolved))
    drop: dict[str, float] = {}
    if start_at > 0:
        if seekable(resolved):
            options["ss"] = start_at
        else:
            drop["ss"] = start_at
    stream = ffmpeg.input(resolved.url_or_path, **options)
    # ["a:0"] maps only the first audio stream: video/cover art is never decoded, and a file
    # without audio fails with "matches no streams" instead of producing silence.
    out = stream["a:0"].output(
        "pipe:", format="s16le", acodec="pcm_s16le", ac=1, ar=sample_rate, **drop
    )
    # Global options first: -nostdin so ffmpeg never competes for the worker's stdin. Info
    # level for the input's declared length (no ffprobe of its own); each line tagged with its
    # level, so the errors are told apart from the rest.
    argv: list[str] = out.compile(
        cmd=[binary, "-nostdin", "-hide_banner", "-nostats", "-loglevel", "level+info"]
    )
    return argv


#: One line of ffmpeg's log with `-loglevel level+…`: an optional `[component @ 0x…] `, the
#: level tag, the message.
_LOG_LINE = re.compile(rb"^(\[[^\]]* @ [^\]]*\] )?\[(\w+)\] (.*)$")
_ERROR_LEVELS = (b"error", b"fatal", b"panic")
#: The input's declared length in ffmpeg's dump of it (the first `Duration:`, input #0's).
_DURATION = re.compile(rb"^\s*Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
#: Once the output is described, the input's dump (and its Duration, if any) is over.
_DUMP_OVER = (b"Output #0", b"Stream mapping:")


def _declared_length(message: bytes) -> float | None:
    m = _DURATION.match(message)
    if m is None:
        return None
    hours, minutes, seconds = m.groups()
    length = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return length if length > 0 else None


# Any URL query string in ffmpeg's messages may hold a signature or token (presigned S3 URLs).
_URL_QUERY = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s?'\"]+)\?[^\s'\"]*", re.IGNORECASE)


def _scrub(stderr: str, resolved: ResolvedSource) -> str:
    """ffmpeg's stderr made safe for logs and job results: the source URL shown by description."""
    return _URL_QUERY.sub(r"\1?…", stderr.replace(resolved.url_or_path, resolved.description))


def _classify(stderr: str, returncode: int | None, resolved: ResolvedSource) -> JobError:
    """Turn ffmpeg's (scrubbed) stderr into a JobError whose class says if a retry can help."""
    description = resolved.description
    network = resolved.kind != "file"
    low = stderr.lower()
    last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {returncode}"
    if "format not on whitelist" in low:
        return DecodeError(
            f"not an audio file: {description} is in a format that is not allowed (audio "
            f"containers only; playlists and other indirections are refused)",
            reason=Reason.FORMAT_NOT_ALLOWED,
        )
    if "not on whitelist" in low:
        return DecodeError(
            f"{description} tries to open a disallowed protocol: {last}",
            reason=Reason.PROTOCOL_NOT_ALLOWED,
        )
    if network and any(s in low for s in ("404 not found", "410 gone", "403 forbidden")):
        return SourceNotFound(f"audio source not found at {description}: {last}")
    if network and any(s in low for s in _NETWORK_FAULTS):
        return SourceUnavailable(f"audio source unavailable ({description}): {last}")
    if "matches no streams" in low or "does not contain any stream" in low:
        return DecodeError(
            f"not an audio file (no audio stream): {description}", reason=Reason.NO_AUDIO_STREAM
        )
    if any(s in low for s in _CORRUPT_SIGNS):
        return DecodeError(
            f"not an audio file or corrupt data: {description}: {last}", reason=Reason.INVALID_AUDIO
        )
    if "no such file" in low:
        return SourceNotFound(f"audio file not found: {description}")
    return DecodeError(f"ffmpeg failed on {description}: {last}")


@contextlib.asynccontextmanager
async def ffmpeg_input(
    resolved: ResolvedSource, settings: Settings
) -> AsyncIterator[tuple[ResolvedSource, SourceRelay | None]]:
    """What ffmpeg should open for `resolved`: an http(s) source becomes its relay's
    loopback URL (with the same log-safe description) for the duration of the block."""
    if resolved.kind != "http":
        yield resolved, None
        return
    async with SourceRelay(resolved.url_or_path, source_policy(settings)) as relay:
        yield ResolvedSource(relay.local_url, RELAY_PROTOCOLS, resolved.description, "http"), relay


class PcmDecoder:
    """An ffmpeg child decoding one source to mono s16le PCM, read as fixed-size chunks.

    `async with PcmDecoder(resolved) as dec: async for chunk in dec.chunks(3200): ...`
    Leaving the block kills ffmpeg if it still runs and reaps it. When the stream ends with
    ffmpeg failing, or with no audio at all, `chunks()` raises DecodeError (or SourceNotFound /
    SourceUnavailable for network sources) carrying the tail of ffmpeg's stderr; for an
    http(s) source a refused redirect or address raises the policy's InvalidJob.

    `start_at`: decode from that many seconds into the source. `max_seconds`: `chunks()`
    raises DecodeError(reason="too_long") as soon as the audio passes it (plus LIMIT_SLACK_S)
    in the source, whether or not the file declared its length. `expected_seconds` (the
    declared length, by default what ffmpeg reads from the source's header, see
    `declared_seconds`): at the end, `chunks()` raises
    DecodeError(reason="truncated_audio") when the audio ended clearly short of it (see
    `truncated`). Both count source seconds, `start_at` included.
    """

    def __init__(
        self,
        resolved: ResolvedSource,
        *,
        sample_rate: int = 16000,
        settings: Settings | None = None,
        max_seconds: float | None = None,
        expected_seconds: float | None = None,
        start_at: float = 0.0,
    ) -> None:
        if start_at < 0:
            raise ValueError(f"start_at must not be negative, got {start_at}")
        self.resolved = resolved
        self.start_at = start_at
        self.sample_rate = sample_rate
        self.settings = settings or get_settings()
        self.max_seconds = max_seconds
        self.expected_seconds = expected_seconds
        self.bytes_read = 0
        self._input = resolved
        self._relay: SourceRelay | None = None
        self._exits = contextlib.AsyncExitStack()
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        #: ffmpeg's error lines only (what `-loglevel error` would print).
        self._stderr_tail = bytearray()
        self._declared: asyncio.Future[float | None] | None = None

    @property
    def argv(self) -> list[str]:
        return decode_command(
            self._input,
            sample_rate=self.sample_rate,
            binary=ffmpeg_binary(self.settings),
            start_at=self.start_at,
        )

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def decoded_seconds(self) -> float:
        """Seconds of audio read so far, from `start_at` (all of it once `chunks()` ended)."""
        return self.bytes_read / (2 * self.sample_rate)

    @property
    def truncated(self) -> bool:
        """The audio decoded clearly short of `expected_seconds` (only meaningful at the end)."""
        if self.expected_seconds is None:
            return False
        slack = max(TRUNCATED_SLACK_S, TRUNCATED_RATIO * self.expected_seconds)
        return self.start_at + self.decoded_seconds < self.expected_seconds - slack

    @property
    def stderr_tail(self) -> str:
        """The last few KB of ffmpeg's stderr, with URL secrets removed."""
        return _scrub(self._stderr_tail.decode("utf-8", "replace"), self._input)

    async def __aenter__(self) -> PcmDecoder:
        self._input, self._relay = await self._exits.enter_async_context(
            ffmpeg_input(self.resolved, self.settings)
        )
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            await self._exits.aclose()
            # A missing/broken ffmpeg is the worker's fault: another worker may do better.
            raise SourceUnavailable(
                f"cannot start ffmpeg: {exc}", reason=Reason.FFMPEG_MISSING
            ) from exc
        except BaseException:
            await self._exits.aclose()
            raise
        self._declared = asyncio.get_running_loop().create_future()
        self._stderr_task = asyncio.create_task(self._drain_stderr())
        return self

    async def declared_seconds(self, timeout: float = _DECLARED_TIMEOUT_S) -> float | None:
        """The length the source declares (its header, or ffmpeg's estimate from the bitrate),
        None when it declares none or ffmpeg has not said within `timeout`."""
        assert self._declared is not None, "declared_seconds() needs `async with` first"
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self._declared)
        except TimeoutError:
            return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Kill ffmpeg if it still runs (the consumer stopped early), then reap it."""
        try:
            await self._reap()
        finally:
            await self._exits.aclose()

    async def _reap(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        # asyncio's wait() also waits for every pipe to close, and a consumer that stopped
        # early leaves stdout paused (buffer full) so its EOF is never seen: discard what is
        # left, at most a pipe's worth once ffmpeg is dead.
        if proc.stdout is not None:
            while await proc.stdout.read(65536):
                pass
        await proc.wait()
        if self._stderr_task is not None:
            # stderr hits EOF once ffmpeg is gone, so this finishes promptly.
            await self._stderr_task

    async def _drain_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        pending = b""
        try:
            while block := await self._proc.stderr.read(4096):
                *lines, pending = (pending + block).split(b"\n")
                pending = pending[-STDERR_TAIL_BYTES:]
                for line in lines:
                    self._log_line(line)
            if pending:
                self._log_line(pending)
        finally:
            self._declare(None)

    def _log_line(self, line: bytes) -> None:
        m = _LOG_LINE.match(line.rstrip(b"\r"))
        context, level, message = m.groups(b"") if m else (b"", b"error", line)
        if level in _ERROR_LEVELS:
            self._stderr_tail += context + message + b"\n"
            del self._stderr_tail[:-STDERR_TAIL_BYTES]
        elif (length := _declared_length(message)) is not None:
            self._declare(length)
        elif message.startswith(_DUMP_OVER):
            self._declare(None)

    def _declare(self, length: float | None) -> None:
        if self._declared is not None and not self._declared.done():
            self._declared.set_result(length)

    async def chunks(self, chunk_bytes: int = 3200) -> AsyncIterator[bytes]:
        """Yield PCM in chunks of exactly `chunk_bytes` (the last may be shorter, always even)."""
        if chunk_bytes <= 0 or chunk_bytes % 2:
            raise ValueError(f"chunk_bytes must be a positive even number, got {chunk_bytes}")
        if self._proc is None or self._proc.stdout is None:
            raise RuntimeError("PcmDecoder.chunks() needs `async with PcmDecoder(...)` first")
        stdout = self._proc.stdout
        limit = None
        if self.max_seconds is not None:
            limit = int((self.max_seconds + LIMIT_SLACK_S - self.start_at) * self.sample_rate) * 2
        while True:
            try:
                chunk = await stdout.readexactly(chunk_bytes)
            except asyncio.IncompleteReadError as eof:
                # A half sample only appears if ffmpeg died mid-write; it is not audio.
                chunk = eof.partial[: len(eof.partial) & ~1]
                if not chunk:
                    break
            if limit is not None and self.bytes_read + len(chunk) > limit:
                raise DecodeError(
                    f"audio is longer than the {self.max_seconds:g}s maximum: "
                    f"{self.resolved.description} was still playing at {self.max_seconds:g}s",
                    reason=Reason.TOO_LONG,
                )
            self.bytes_read += len(chunk)
            yield chunk
            if len(chunk) < chunk_bytes:
                break
        await self._finish()

    async def _finish(self) -> None:
        assert self._proc is not None and self._stderr_task is not None
        returncode = await self._proc.wait()
        await self._stderr_task
        stderr = self.stderr_tail
        relay = self._relay
        if relay is not None and relay.refusal is not None:
            raise relay.refusal
        if returncode != 0:
            error = _classify(stderr, returncode, self._input)
            if relay is not None and relay.failure and isinstance(error, SourceUnavailable):
                raise SourceUnavailable(
                    f"audio source unavailable ({self.resolved.description}): {relay.failure}"
                )
            raise error
        if self.bytes_read == 0:
            detail = stderr.strip()
            raise DecodeError(
                f"no audio decoded from {self.resolved.description}"
                + (f" from {self.start_at:g}s" if self.start_at else "")
                + (f": {detail.splitlines()[-1]}" if detail else ""),
                reason=Reason.NO_AUDIO,
            )
        if self.truncated:
            raise DecodeError(
                f"truncated audio: {self.resolved.description} declares "
                f"{self.expected_seconds:.2f}s but ends at "
                f"{self.start_at + self.decoded_seconds:.2f}s",
                reason=Reason.TRUNCATED_AUDIO,
            )
