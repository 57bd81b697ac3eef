"""A job's transcript as caption cues: plain text, SRT or WebVTT in, cues and WebVTT out.

Pure (no LiveKit, no ffmpeg): producers validate transcripts at enqueue with it, workers time
and publish its cues, and the WebVTT file is rendered from it. Formats and timing rules:
docs/captions.md."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

#: The longest transcript a job may carry (characters).
MAX_TRANSCRIPT_CHARS = 64 * 1024
#: The most cues a transcript may hold (an hour of speech is about 1,000).
MAX_CUES = 5000
#: A plain-text phrase longer than this is cut at a word boundary: two caption lines.
MAX_CUE_CHARS = 84

_TIME = r"(?:(\d+):)?([0-5]\d):([0-5]\d)[.,](\d{3})"
_TIMING = re.compile(r"^\s*(\S+)\s+-->\s+(\S+)(?:\s+.*)?$")
_TIMESTAMP = re.compile(rf"^{_TIME}$")
_TAG = re.compile(r"<[^>]*>")
_SENTENCE_END = re.compile(r"(?<=[.!?…;:])\s+")


class CaptionError(ValueError):
    """A transcript that cannot be captioned; the message names the cue and the problem."""


@dataclass(frozen=True)
class Cue:
    """Text shown from `start` to `end`, in seconds of the job's source."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    """A parsed transcript: timed cues (SRT, WebVTT), or phrases to time over the audio."""

    format: str  # "plain", "srt" or "webvtt"
    timed: tuple[Cue, ...] = ()
    phrases: tuple[str, ...] = ()

    def cues(self, duration: float | None) -> list[Cue] | None:
        """The cues over `duration` seconds of audio: a timed transcript's own; plain text
        cut into phrases, each given the share of the audio its characters have of the text
        (None when the length of the audio is unknown)."""
        if self.format != "plain":
            return list(self.timed)
        if duration is None or duration <= 0:
            return None
        total = sum(len(p) for p in self.phrases)
        cues, before = [], 0
        for phrase in self.phrases:
            start = duration * before / total
            before += len(phrase)
            cues.append(Cue(round(start, 3), round(duration * before / total, 3), phrase))
        return cues


def parse_transcript(text: str, max_length: float | None = None) -> Transcript:
    """Read plain text, SRT or WebVTT (told apart by their headers and timing lines); raises
    CaptionError naming the problem: a bad cue time, an end before its start, cues out of
    order or overlapping, a cue past `max_length` seconds."""
    if len(text) > MAX_TRANSCRIPT_CHARS:
        raise CaptionError(
            f"transcript is {len(text)} characters, over the {MAX_TRANSCRIPT_CHARS} limit"
        )
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    first = next((line.strip() for line in lines if line.strip()), "")
    if first == "WEBVTT" or first.startswith(("WEBVTT ", "WEBVTT\t")):
        cues = _timed_blocks(lines, "webvtt")
        fmt = "webvtt"
    elif any("-->" in line and _TIMING.match(line) for line in lines):
        cues, fmt = _timed_blocks(lines, "srt"), "srt"
    else:
        phrases = _phrases(" ".join(text.split()))
        if not phrases:
            raise CaptionError("transcript has no text")
        if len(phrases) > MAX_CUES:
            raise CaptionError(f"transcript makes {len(phrases)} cues, over the {MAX_CUES} limit")
        return Transcript("plain", phrases=tuple(phrases))
    _check_order(cues, max_length)
    return Transcript(fmt, timed=tuple(cues))


def _timed_blocks(lines: list[str], fmt: str) -> list[Cue]:
    """The cues of an SRT or WebVTT file: blocks separated by blank lines, each with one
    timing line; WebVTT's header, NOTE, STYLE and REGION blocks are skipped."""
    cues: list[Cue] = []
    block: list[tuple[int, str]] = []
    for number, line in [*enumerate(lines, start=1), (len(lines) + 1, "")]:
        if line.strip():
            block.append((number, line))
            continue
        if block:
            cue = _cue(block, fmt, len(cues) + 1)
            if cue is not None:
                cues.append(cue)
                if len(cues) > MAX_CUES:
                    raise CaptionError(f"transcript has over {MAX_CUES} cues")
            block = []
    if not cues:
        raise CaptionError(f"{fmt} transcript has no cues")
    return cues


def _cue(block: list[tuple[int, str]], fmt: str, index: int) -> Cue | None:
    head = block[0][1].strip()
    if fmt == "webvtt" and (
        head.startswith("WEBVTT") or head.split(" ")[0] in ("NOTE", "STYLE", "REGION")
    ):
        return None
    timing = next((i for i, (_n, line) in enumerate(block) if "-->" in line), None)
    if timing is None or timing > 1:
        raise CaptionError(f"line {block[0][0]}: a cue block without a timing line ('A --> B')")
    number, line = block[timing]
    match = _TIMING.match(line)
    if match is None:
        raise CaptionError(f"line {number}: bad cue timing {line.strip()!r}")
    start, end = (_seconds(t, number) for t in match.groups())
    if end <= start:
        raise CaptionError(
            f"cue {index} (line {number}): its end {match.group(2)} is not after its start "
            f"{match.group(1)}"
        )
    text = plain_text("\n".join(line for _n, line in block[timing + 1 :]))
    return Cue(start, end, text) if text else None  # an empty cue shows nothing


def _seconds(stamp: str, line: int) -> float:
    match = _TIMESTAMP.match(stamp)
    if match is None:
        raise CaptionError(f"line {line}: bad cue time {stamp!r} (use HH:MM:SS.mmm)")
    hours, minutes, secs, millis = match.groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(secs) + int(millis) / 1000


def _check_order(cues: list[Cue], max_length: float | None) -> None:
    for index, (before, cue) in enumerate(zip(cues, cues[1:], strict=False), start=2):
        if cue.start < before.end:
            raise CaptionError(
                f"cue {index} starts at {timestamp(cue.start)}, before cue {index - 1} ends at "
                f"{timestamp(before.end)}: cues must be in order and must not overlap"
            )
    if max_length is not None and cues[-1].end > max_length:
        raise CaptionError(
            f"cue {len(cues)} ends at {timestamp(cues[-1].end)}, past the job's maximum "
            f"length of {max_length:g}s"
        )


def plain_text(text: str) -> str:
    """Text without markup (WebVTT, SRT or SSML tags, entities), on one line."""
    return " ".join(html.unescape(_TAG.sub("", text)).split())


def _phrases(text: str) -> list[str]:
    """Sentences (and clauses) of at most MAX_CUE_CHARS, cut at word boundaries."""
    phrases: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        line = ""
        for word in sentence.split():
            if line and len(line) + 1 + len(word) > MAX_CUE_CHARS:
                phrases.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        if line:
            phrases.append(line)
    return phrases


def timestamp(seconds: float) -> str:
    """WebVTT's HH:MM:SS.mmm."""
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}.{rest % 1000:03d}"


def render_webvtt(cues: list[Cue]) -> str:
    """A WebVTT file of `cues` (text escaped, so no cue text can end its block)."""
    blocks = ["WEBVTT"]
    for number, cue in enumerate(cues, start=1):
        text = html.escape(cue.text, quote=False).replace("-->", "--&gt;")
        blocks.append(f"{number}\n{timestamp(cue.start)} --> {timestamp(cue.end)}\n{text}")
    return "\n\n".join(blocks) + "\n"


def webvtt_for(
    transcript: str, duration: float | None, start_at: float = 0.0, until: float | None = None
) -> str | None:
    """The WebVTT file beside a recording of the transcript's audio from `start_at` seconds of
    the source (a resumed attempt's recording starts there), its cues on the recording's time
    and, given `until` (a partial recording's length), cut there; None when plain text meets
    audio of unknown length."""
    cues = parse_transcript(transcript).cues(duration)
    if cues is None:
        return None
    shifted = [
        Cue(max(0.0, c.start - start_at), c.end - start_at, c.text)
        for c in cues
        if c.end > start_at
    ]
    if until is not None:
        shifted = [Cue(c.start, min(c.end, until), c.text) for c in shifted if c.start < until]
    return render_webvtt(shifted)
