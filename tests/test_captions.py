"""Captions: transcripts read as plain text, SRT and WebVTT, their errors at enqueue, the
WebVTT they render, and the hook that shows each cue as the avatar plays its start (a real
pacer's clock, a recording stand-in for the room)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from avatarq.budget import Budget
from avatarq.captions import (
    MAX_CUE_CHARS,
    CaptionError,
    Cue,
    parse_transcript,
    render_webvtt,
    webvtt_for,
)
from avatarq.errors import InvalidJob
from avatarq.jobs import parse_job
from avatarq.settings import Settings, get_settings
from tasks.captions import CaptionCues
from tasks.context import JobHook, PlayContext, Segment
from tasks.control import JobControl, StopReason
from tasks.link.pacing import Pacer
from tests.fakes import FakeLedger, FakeReporter

BASE = {"room": "lobby", "avatar_id": "anna", "source": "s3://clips/hello.mp3"}

SRT = """1
00:00:00,500 --> 00:00:02,000
Hello <i>there</i>.

2
00:00:02,000 --> 00:00:03,250
Second line
goes on.
"""

VTT = """WEBVTT - a header note

NOTE a comment block

intro
00:00.500 --> 00:02.000 align:start
<v Anna>Hello &amp; welcome</v>

00:00:02.000 --> 00:00:03.250
Bye
"""


def test_srt_and_webvtt_give_their_cues_without_markup() -> None:
    srt = parse_transcript(SRT)
    assert srt.format == "srt"
    assert srt.cues(None) == [
        Cue(0.5, 2.0, "Hello there."),
        Cue(2.0, 3.25, "Second line goes on."),
    ]
    vtt = parse_transcript(VTT)
    assert vtt.format == "webvtt"
    assert vtt.cues(10.0) == [Cue(0.5, 2.0, "Hello & welcome"), Cue(2.0, 3.25, "Bye")]


def test_plain_text_is_cut_into_phrases_timed_by_their_share_of_characters() -> None:
    long = " ".join(["word"] * 40)
    text = f"Hello there. How are you today? {long}"
    plain = parse_transcript(text)
    assert plain.format == "plain"
    assert plain.cues(None) is None  # no length, no timing
    cues = plain.cues(20.0)
    assert cues is not None
    assert [c.text for c in cues[:2]] == ["Hello there.", "How are you today?"]
    assert all(len(c.text) <= MAX_CUE_CHARS for c in cues)
    assert cues[0].start == 0.0 and cues[-1].end == 20.0
    assert all(a.end == b.start for a, b in zip(cues, cues[1:], strict=False))
    total = sum(len(c.text) for c in cues)
    assert cues[1].end - cues[1].start == pytest.approx(20.0 * len(cues[1].text) / total, abs=0.002)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "1\n00:00:01,000 --> 00:00:00,500\nx\n",
            "cue 1 (line 2): its end 00:00:00,500 is not after",
        ),
        ("1\n00:00:01,000 --> 00:61:00,000\nx\n", "line 2: bad cue time '00:61:00,000'"),
        ("1\nabc --> 00:00:01,000\nx\n", "line 2: bad cue time 'abc'"),
        (
            "1\n00:00:01,000 --> 00:00:03,000\na\n\n2\n00:00:02,000 --> 00:00:04,000\nb\n",
            "cue 2 starts at 00:00:02.000, before cue 1 ends at 00:00:03.000",
        ),
        (
            "WEBVTT\n\n00:05.000 --> 00:06.000\na\n\n00:01.000 --> 00:02.000\nb\n",
            "must be in order",
        ),
        ("WEBVTT\n\n00:01.000 --> 00:02.000\na\n\nstray text\n", "line 6: a cue block without"),
        ("WEBVTT\n\nNOTE only a note\n", "webvtt transcript has no cues"),
        ("   \n ", "transcript has no text"),
    ],
)
def test_bad_transcripts_name_the_problem(text: str, words: str) -> None:
    with pytest.raises(CaptionError, match=re.escape(words)):
        parse_transcript(text)


def test_a_job_refuses_a_cue_past_its_maximum_length_at_enqueue() -> None:
    vtt = "WEBVTT\n\n00:00.000 --> 00:01.000\na\n\n00:01.000 --> 10:00.000\nb\n"
    with pytest.raises(InvalidJob, match="transcript: cue 2 ends at 00:10:00.000, past the job's"):
        parse_job({**BASE, "transcript": vtt, "max_duration": 300})
    settings = Settings(max_job_duration_s=120)
    with pytest.raises(InvalidJob, match="maximum length of 120s"):
        parse_job({**BASE, "transcript": vtt}, settings)
    with pytest.raises(InvalidJob, match="transcript: String should have at least 1 character"):
        parse_job({**BASE, "transcript": ""})
    job = parse_job({**BASE, "transcript": SRT})
    assert parse_job(job.payload()).transcript == SRT


def test_webvtt_renders_every_cue_escaped_and_reads_back() -> None:
    cues = [Cue(0.0, 1.5, "Fish & chips --> <b>now</b>"), Cue(3661.25, 3662.0, "an hour on")]
    vtt = render_webvtt(cues)
    assert vtt.startswith("WEBVTT\n\n1\n00:00:00.000 --> 00:00:01.500\n")
    assert "02:01:01.250" not in vtt and "01:01:01.250 --> 01:01:02.000" in vtt
    assert "Fish &amp; chips --&gt; &lt;b&gt;now&lt;/b&gt;" in vtt
    assert parse_transcript(vtt).cues(None) == cues


def test_the_webvtt_beside_a_recording_is_on_the_recordings_time() -> None:
    assert webvtt_for("Hello there.", None) is None  # plain text, length unknown
    whole = webvtt_for(SRT, 3.5)
    assert whole is not None and parse_transcript(whole).cues(None) == parse_transcript(SRT).cues(
        None
    )
    # A resumed attempt's recording starts 1.5 s into the source: cue one runs on from 0.
    resumed = webvtt_for(SRT, 3.5, start_at=1.5)
    assert resumed is not None
    assert parse_transcript(resumed).cues(None) == [
        Cue(0.0, 0.5, "Hello there."),
        Cue(0.5, 1.75, "Second line goes on."),
    ]


# -- the hook ------------------------------------------------------------------------------


class RecordingCaptions:
    """Captions that note when each cue was shown and ended (time.monotonic())."""

    def __init__(self, playback_started_at: float | None = None) -> None:
        self.playback_started_at = playback_started_at
        self.shown: list[tuple[str, str, float]] = []
        self.ended: list[tuple[str, float]] = []

    async def show(self, cue_id: str, text: str) -> None:
        self.shown.append((cue_id, text, time.monotonic()))

    async def end(self, cue_id: str) -> None:
        self.ended.append((cue_id, time.monotonic()))


TIMED = (
    "WEBVTT\n\n00:00.200 --> 00:00.500\none\n\n00:00.600 --> 00:00.900\ntwo\n\n"
    "00:01.000 --> 00:01.200\nthree\n"
)
BPS = 32000


def _play(transcript: str | None) -> PlayContext:
    job = parse_job({**BASE, "job_id": "cap-1", "transcript": transcript} if transcript else BASE)
    settings = Settings()
    return PlayContext(
        job, Budget.of(job, settings), "tok", JobControl(), FakeLedger(), FakeReporter()
    )


async def _stream(
    hook: JobHook, segment: Segment, seconds: float, stop_after: float | None = None
) -> None:
    """Send like the sender: the pacer starts, a chunk every 0.1 s of audio, in real time."""
    hook.on_stream_start(segment)
    segment.pacer.start()
    sent, step = 0, BPS // 10
    while sent < seconds * BPS:
        await segment.pacer.wait(sent)
        sent += step
        hook.on_chunk_sent(segment, sent)
        if stop_after is not None and sent >= stop_after * BPS:
            return
    await asyncio.sleep(seconds - (time.monotonic() - (segment.pacer.t0 or 0.0)))


def test_a_job_without_transcript_gets_no_caption_hook() -> None:
    assert type(CaptionCues.of(_play(None))) is JobHook


def test_cues_show_as_the_avatar_plays_their_start() -> None:
    asyncio.run(_cues_show_as_the_avatar_plays_their_start())


async def _cues_show_as_the_avatar_plays_their_start() -> None:
    run = _play(TIMED)
    hook, out = CaptionCues.of(run), RecordingCaptions()
    segment = Segment(run.job, BPS, 1.3, Pacer(BPS, lead=0.3), 0.0, out)
    await _stream(hook, segment, 1.3)
    hook.on_stream_end(segment)
    await hook.on_released()
    t0 = segment.pacer.t0 or 0.0
    assert [(i, t) for i, t, _ in out.shown] == [
        ("cap-1-1", "one"),
        ("cap-1-2", "two"),
        ("cap-1-3", "three"),
    ]
    for (_i, _t, at), want in zip(out.shown, (0.2, 0.6, 1.0), strict=True):
        assert at - t0 == pytest.approx(want, abs=0.05)
    for (_i, at), want in zip(out.ended, (0.5, 0.9, 1.2), strict=True):
        assert at - t0 == pytest.approx(want, abs=0.05)


def test_the_avatars_reported_start_moves_the_cues() -> None:
    asyncio.run(_the_avatars_reported_start_moves_the_cues())


async def _the_avatars_reported_start_moves_the_cues() -> None:
    run = _play(TIMED)
    hook = CaptionCues.of(run)
    out = RecordingCaptions(playback_started_at=time.monotonic() + 0.25)
    segment = Segment(run.job, BPS, 1.3, Pacer(BPS, lead=0.3), 0.0, out)
    await _stream(hook, segment, 1.3)
    await asyncio.sleep(0.3)
    hook.on_stream_end(segment)
    await hook.on_released()
    assert out.playback_started_at is not None
    assert out.shown[0][2] - out.playback_started_at == pytest.approx(0.2, abs=0.05)


def test_a_resumed_attempt_skips_what_was_heard_and_a_stop_ends_the_open_cue() -> None:
    asyncio.run(_a_resumed_attempt_skips_what_was_heard_and_a_stop_ends_the_open_cue())


async def _a_resumed_attempt_skips_what_was_heard_and_a_stop_ends_the_open_cue() -> None:
    run = _play(TIMED)
    hook, out = CaptionCues.of(run), RecordingCaptions()
    # Resumed at 0.7 s: cue one was heard; cue two runs, so it shows at once.
    segment = Segment(run.job, BPS, 1.3, Pacer(BPS, lead=0.3), 0.7, out)
    task = asyncio.ensure_future(_stream(hook, segment, 0.6, stop_after=0.2))
    await task
    await asyncio.sleep(0.05)
    run.control.request_stop(StopReason.CANCELLED)
    await asyncio.sleep(0.05)
    stopped = time.monotonic()
    hook.on_stream_end(segment)
    await hook.on_released()
    assert [i for i, _t, _a in out.shown] == ["cap-1-2"]
    assert out.shown[0][2] - (segment.pacer.t0 or 0.0) < 0.05
    assert [i for i, _a in out.ended] == ["cap-1-2"]
    assert out.ended[0][1] <= stopped  # at the stop, not at the cue's own end


# -- avatarq enqueue --transcript ----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"1\n00:00:02,000 --> 00:00:01,000\nx\n", "transcript: cue 1 (line 2): its end"),
        (b"\xff\xfe not utf-8", "--transcript: cannot read"),
        (None, "--transcript: cannot read"),
    ],
)
def test_enqueue_refuses_a_bad_transcript_file_before_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes | None, words: str
) -> None:
    from typer.testing import CliRunner

    from avatarq_cli.app import app

    path = tmp_path / "captions.srt"
    if content is not None:
        path.write_bytes(content)
    # No broker is reachable: failing before enqueue is the only way these can exit cleanly.
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    try:
        args = ["enqueue", "a.wav", "--room", "r", "--avatar", "a", "--transcript", str(path)]
        result = CliRunner().invoke(app, args)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
