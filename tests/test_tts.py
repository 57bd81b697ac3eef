"""TTS pre-generation: the engines (espeak-ng for real; OpenAI-compatible and ElevenLabs
against faithful local HTTP servers), the content-hash cache (local directory and moto S3),
the schema's `tts` source and `producers.enqueue`'s rendering step."""

from __future__ import annotations

import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from avatarq.errors import InvalidJob
from avatarq.jobs import TtsSource, parse_job
from avatarq.settings import Settings, get_settings
from producers.tts import TtsRejected, TtsUnavailable, render_job, render_tts
from producers.tts.elevenlabs import ElevenLabsEngine
from producers.tts.espeak import EspeakEngine
from producers.tts.openai import OpenAiEngine
from tests import audio, tts_servers
from tests.s3 import aws_env, s3_client, s3_server
from tests.tts_servers import ELEVEN_ERRORS, ELEVEN_KEY, OPENAI_ERRORS, OPENAI_KEY, FakeTts

__all__ = ["aws_env", "s3_server"]  # fixtures used by name below

pytestmark = pytest.mark.timeout(60)

JOB = {"room": "lobby", "avatar_id": "anna"}


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Fast retries and a private cache, so tests neither wait nor share renders."""
    base: dict[str, Any] = {
        "tts_cache_dir": tmp_path / "tts-cache",
        "retry_base_s": 0.01,
        "retry_cap_s": 0.05,
        "tts_attempts": 3,
        "tts_timeout_s": 10,
    }
    return Settings(**{**base, **overrides})


@pytest.fixture(scope="module")
def mp3(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Real MP3 bytes for the hosted fakes to return (what both providers send by default)."""
    return audio.tone(tmp_path_factory.mktemp("mp3") / "speech.mp3", seconds=0.5).read_bytes()


@pytest.fixture
def openai(mp3: bytes) -> Iterator[FakeTts]:
    yield from tts_servers.openai_server(mp3)


@pytest.fixture
def eleven(mp3: bytes) -> Iterator[FakeTts]:
    yield from tts_servers.elevenlabs_server(mp3)


def openai_settings(tmp_path: Path, fake: FakeTts, key: str = OPENAI_KEY) -> Settings:
    return settings(tmp_path, openai_tts_url=fake.url, openai_api_key=key)


def eleven_settings(tmp_path: Path, fake: FakeTts, key: str = ELEVEN_KEY) -> Settings:
    return settings(tmp_path, elevenlabs_url=fake.url, elevenlabs_api_key=key)


def tts(**fields: Any) -> TtsSource:
    return TtsSource.model_validate({"type": "tts", "text": "Hello there.", **fields})


# --- espeak-ng (the real binary) ---------------------------------------------------------------


def test_espeak_renders_real_audio(tmp_path: Path) -> None:
    speech = EspeakEngine(settings(tmp_path)).synthesize(
        "Welcome to the lobby.", "en-us", None, False
    )
    assert (speech.content_type, speech.extension) == ("audio/wav", "wav")
    path = tmp_path / "s.wav"
    path.write_bytes(speech.audio)
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        assert 0.5 < w.getnframes() / w.getframerate() < 5


def test_espeak_ssml_and_language_pick_the_voice(tmp_path: Path) -> None:
    engine = EspeakEngine(settings(tmp_path))
    plain = engine.synthesize("Guten Tag", None, "de", False)
    ssml = engine.synthesize('<speak>Hello <break time="1s"/> world</speak>', None, None, True)
    assert plain.audio[:4] == b"RIFF" and ssml.audio[:4] == b"RIFF"
    # The one-second break is rendered as silence, not read out as markup.
    assert len(ssml.audio) > len(engine.synthesize("Hello world", None, None, False).audio)


def test_espeak_unknown_voice_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(TtsRejected, match="voice 'xx-nowhere' is not installed") as info:
        EspeakEngine(settings(tmp_path)).synthesize("hi", "xx-nowhere", None, False)
    assert info.value.permanent and info.value.reason == "tts_rejected"


# --- OpenAI-compatible /v1/audio/speech ------------------------------------------------------


def test_openai_success_sends_the_documented_request(
    tmp_path: Path, openai: FakeTts, mp3: bytes
) -> None:
    speech = OpenAiEngine(openai_settings(tmp_path, openai)).synthesize("Hi", "nova", "en", False)
    assert speech.audio == mp3 and speech.content_type == "audio/mpeg"
    [req] = openai.requests
    assert req["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert req["json"] == {
        "model": "gpt-4o-mini-tts",
        "input": "Hi",
        "voice": "nova",
        "response_format": "mp3",
    }


def test_openai_bad_key_is_permanent_and_never_leaks(tmp_path: Path, openai: FakeTts) -> None:
    wrong = "sk-wrong-secret-value"
    engine = OpenAiEngine(openai_settings(tmp_path, openai, key=wrong))
    with pytest.raises(TtsRejected, match="HTTP 401: Incorrect API key provided") as info:
        engine.synthesize("Hi", None, None, False)
    assert wrong not in info.value.message and len(openai.requests) == 1


def test_openai_bad_voice_is_permanent_with_the_engine_message(
    tmp_path: Path, openai: FakeTts
) -> None:
    with pytest.raises(TtsRejected, match="HTTP 400: Invalid value: 'robot'. Supported values"):
        OpenAiEngine(openai_settings(tmp_path, openai)).synthesize("Hi", "robot", None, False)


def test_openai_quota_is_permanent_rate_limit_is_not(tmp_path: Path, openai: FakeTts) -> None:
    engine = OpenAiEngine(openai_settings(tmp_path, openai))
    openai.fail_next(OPENAI_ERRORS["quota"], OPENAI_ERRORS["rate_limit"])
    with pytest.raises(TtsRejected, match="HTTP 429: You exceeded your current quota"):
        engine.synthesize("Hi", None, None, False)
    with pytest.raises(TtsUnavailable, match="HTTP 429: Rate limit reached"):
        engine.synthesize("Hi", None, None, False)


def test_openai_5xx_is_retried_then_succeeds(tmp_path: Path, openai: FakeTts) -> None:
    openai.fail_next(OPENAI_ERRORS["server_error"], OPENAI_ERRORS["overloaded"])
    rendered = render_tts(tts(engine="openai"), openai_settings(tmp_path, openai))
    assert openai.synth_calls() == 3 and Path(rendered.source).suffix == ".mp3"


def test_openai_5xx_gives_up_after_the_attempts(tmp_path: Path, openai: FakeTts) -> None:
    openai.fail_next(*[OPENAI_ERRORS["server_error"]] * 3)
    with pytest.raises(TtsUnavailable, match="HTTP 500: .*gave up after 3 attempts") as info:
        render_tts(tts(engine="openai"), openai_settings(tmp_path, openai))
    assert not info.value.permanent and openai.synth_calls() == 3


def test_openai_refuses_ssml_before_calling(tmp_path: Path, openai: FakeTts) -> None:
    with pytest.raises(TtsRejected, match="SSML is not supported"):
        render_tts(tts(engine="openai", ssml=True), openai_settings(tmp_path, openai))
    assert openai.synth_calls() == 0


# --- ElevenLabs /v1/text-to-speech/{voice_id} -------------------------------------------------


def test_elevenlabs_success_sends_the_documented_request(
    tmp_path: Path, eleven: FakeTts, mp3: bytes
) -> None:
    engine = ElevenLabsEngine(eleven_settings(tmp_path, eleven))
    speech = engine.synthesize("Hallo", "EXAVITQu4vr4xnSDxMaL", "de-DE", False)
    assert speech.audio == mp3 and speech.extension == "mp3"
    [req] = eleven.requests
    assert req["headers"]["xi-api-key"] == ELEVEN_KEY
    assert req["query"] == {"output_format": ["mp3_44100_128"]}
    assert req["json"] == {
        "text": "Hallo",
        "model_id": "eleven_multilingual_v2",
        "language_code": "de",
    }


@pytest.mark.parametrize(
    ("voice", "key", "fault", "words"),
    [
        ("nobody", ELEVEN_KEY, None, "HTTP 400: voice_not_found: A voice with the voice_id nobody"),
        (None, "xi-wrong", None, "HTTP 401: invalid_api_key: Invalid API key"),
        (None, ELEVEN_KEY, "quota", "HTTP 401: quota_exceeded: This request exceeds your quota"),
        (None, ELEVEN_KEY, "validation", "HTTP 422: body.voice_settings.stability: ensure"),
    ],
)
def test_elevenlabs_refusals_are_permanent(
    tmp_path: Path, eleven: FakeTts, voice: str | None, key: str, fault: str | None, words: str
) -> None:
    if fault:
        eleven.fail_next(ELEVEN_ERRORS[fault])
    with pytest.raises(TtsRejected) as info:
        render_tts(tts(engine="elevenlabs", voice=voice), eleven_settings(tmp_path, eleven, key))
    assert words in info.value.message and info.value.permanent
    assert eleven.synth_calls() == 1  # permanent: never retried


def test_elevenlabs_busy_and_5xx_are_retried(tmp_path: Path, eleven: FakeTts) -> None:
    eleven.fail_next(ELEVEN_ERRORS["busy"], ELEVEN_ERRORS["server_error"])
    rendered = render_tts(tts(engine="elevenlabs"), eleven_settings(tmp_path, eleven))
    assert eleven.synth_calls() == 3 and not rendered.cached


# --- the cache ---------------------------------------------------------------------------------


def test_local_cache_synthesizes_once(tmp_path: Path, openai: FakeTts) -> None:
    s = openai_settings(tmp_path, openai)
    first = render_tts(tts(engine="openai", voice="coral"), s)
    again = render_tts(tts(engine="openai", voice="coral"), s)
    other = render_tts(tts(engine="openai", voice="sage"), s)
    assert openai.synth_calls() == 2  # the repeat is a cache hit; another voice is not
    assert (first.cached, again.cached, other.cached) == (False, True, False)
    assert first.source == again.source != other.source
    assert Path(first.source).is_absolute() and Path(first.source).read_bytes()
    assert Path(first.source).is_relative_to(tmp_path / "tts-cache")


def test_s3_cache_synthesizes_once(
    tmp_path: Path, openai: FakeTts, s3_server: str, aws_env: dict[str, str], mp3: bytes
) -> None:
    s3_client(s3_server).create_bucket(Bucket="speech")
    s = openai_settings(tmp_path, openai).model_copy(
        update={
            "tts_bucket": "speech",
            "tts_prefix": "rendered/",
            "s3_endpoint_url": s3_server,
            "aws_region": "us-east-1",
        }
    )
    first = render_tts(tts(engine="openai"), s)
    again = render_tts(tts(engine="openai"), s)
    assert openai.synth_calls() == 1 and again.cached and first.source == again.source
    assert first.source == f"s3://speech/rendered/{first.key}.mp3"
    obj = s3_client(s3_server).get_object(Bucket="speech", Key=f"rendered/{first.key}.mp3")
    assert obj["Body"].read() == mp3 and obj["ContentType"] == "audio/mpeg"
    assert not (tmp_path / "tts-cache").exists()


def test_s3_missing_bucket_is_permanent(
    tmp_path: Path, openai: FakeTts, s3_server: str, aws_env: dict[str, str]
) -> None:
    s = openai_settings(tmp_path, openai).model_copy(
        update={"tts_bucket": "no-such-speech-bucket", "s3_endpoint_url": s3_server}
    )
    with pytest.raises(Exception, match="no-such-speech-bucket.*NoSuchBucket") as info:
        render_tts(tts(engine="openai"), s)
    assert getattr(info.value, "permanent", False) and openai.synth_calls() == 0


# --- schema and enqueue -----------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Set environment variables for code that reads the process-wide settings."""
    yield monkeypatch
    monkeypatch.undo()
    get_settings.cache_clear()


def test_text_over_the_limit_names_it() -> None:
    # The limit is the validating process's setting, passed in, not read from the environment.
    settings = Settings(AVATARQ_TTS_MAX_CHARS=20)
    parse_job({**JOB, "source": {"type": "tts", "text": "x" * 20}}, settings)
    with pytest.raises(InvalidJob) as info:
        parse_job({**JOB, "source": {"type": "tts", "text": "x" * 21}}, settings)
    assert "source.tts.text: text is 21 characters, over the AVATARQ_TTS_MAX_CHARS limit of 20" in (
        info.value.message
    )


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ({"type": "tts"}, "source.tts.text: Field required"),
        ({"type": "tts", "text": "hi", "engine": "polly"}, "source.tts.engine: Input should be"),
        ({"type": "tts", "text": "hi", "pitch": 3}, "source.tts.pitch: Extra inputs"),
        ({"type": "tts", "text": ""}, "source.tts.text: String should have at least 1"),
    ],
)
def test_bad_tts_sources_are_named(source: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidJob) as info:
        parse_job({**JOB, "source": source})
    assert words in info.value.message


def test_render_job_points_at_the_audio_and_keeps_the_request(tmp_path: Path) -> None:
    text = "This announcement is long enough to be cut short in the metadata preview. " * 3
    job = parse_job(
        {
            **JOB,
            "metadata": {"campaign": "x"},
            "source": {"type": "tts", "text": text, "voice": "en-us"},
        }
    )
    rendered = render_job(job, settings(tmp_path))
    assert isinstance(rendered.source, str) and Path(rendered.source).suffix == ".wav"
    meta = rendered.metadata["tts"]
    assert rendered.metadata["campaign"] == "x" and rendered.job_id == job.job_id
    assert meta["engine"] == "espeak" and meta["voice"] == "en-us" and meta["chars"] == len(text)
    assert len(meta["preview"]) == 80 and meta["preview"].endswith("…")
    assert Path(rendered.source).stem == meta["sha256"]
    assert rendered.transcript == text
    assert render_job(parse_job({**JOB, "source": "a.wav"})).source == "a.wav"


def test_a_rendered_job_carries_its_spoken_text_as_transcript(tmp_path: Path) -> None:
    ssml = '<speak>Hello <break time="200ms"/> &amp; <emphasis>welcome</emphasis>.</speak>'
    job = parse_job({**JOB, "source": {"type": "tts", "text": ssml, "ssml": True}})
    assert render_job(job, settings(tmp_path)).transcript == "Hello & welcome."
    own = "WEBVTT\n\n00:00.000 --> 00:00.800\nHi!\n"
    job = parse_job({**JOB, "transcript": own, "source": {"type": "tts", "text": "Hi there."}})
    assert render_job(job, settings(tmp_path)).transcript == own


# --- avatarq say ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--voice", "xx-nowhere"], 1, "tts_rejected: espeak: voice 'xx-nowhere' is not"),
        (["--engine", "polly"], 2, "source.tts.engine: Input should be"),
    ],
)
def test_say_reports_refusals_without_enqueueing(
    tmp_path: Path, env: pytest.MonkeyPatch, args: list[str], code: int, words: str
) -> None:
    from typer.testing import CliRunner

    from avatarq_cli.app import app

    env.setenv("AVATARQ_TTS_CACHE_DIR", str(tmp_path))
    # No broker is reachable: failing before enqueue is the only way these can exit cleanly.
    env.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["say", "hello", "--room", "r", "--avatar", "a", *args])
    assert result.exit_code == code, result.output
    assert words in " ".join(result.output.split())
