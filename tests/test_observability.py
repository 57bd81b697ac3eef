"""Metrics, structured logs and the operator commands: units here, and a real worker on the
local stack (inside infra/netns-run) scraped over HTTP after real jobs."""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from avatarq import logs
from avatarq.events import JobStarted, Progress, Retrying
from avatarq.results import Failed, Played, Timestamps
from avatarq.settings import Settings, get_settings
from avatarq_cli.commands.ops import MASK, effective_config, mask_url
from avatarq_dev import stack as stack_module
from tasks import metrics
from tasks.link.stream import CHUNK_SECONDS
from tests import audio
from tests.netns import needs_netns
from tests.test_pipeline_e2e import run_job

#: Room and avatar of this module's jobs, looked for in the worker's log lines.
JOB = {"room": "obs-room", "avatar_id": "obs-avatar"}


# --- units ---------------------------------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def played(timestamps: Timestamps, *, seconds_streamed: float) -> Played:
    return Played(
        job_id="j", attempt=1, status="completed", audio_duration=seconds_streamed,
        seconds_streamed=seconds_streamed, playback_position=seconds_streamed,
        interrupted=False, playback_confirmed=True, avatar_server="default",
        avatar_session_id="s", warm=False, lead=0.5, sample_rate=16000, timestamps=timestamps,
    )  # fmt: skip


def test_events_feed_the_counters_and_histograms() -> None:
    before = {
        "started": sample("avatarq_jobs_started_total"),
        "done": sample("avatarq_jobs_completed_total"),
        "failed": sample("avatarq_jobs_failed_total", reason="avatar_timeout"),
        "retry": sample("avatarq_job_retries_total", reason="room_error"),
        "duration": sample("avatarq_job_duration_seconds_count"),
        "avatar": sample("avatarq_avatar_start_seconds_sum"),
    }
    now = time.time()
    metrics.observe(JobStarted(room="r", avatar_id="a", attempt=1))
    metrics.observe(Retrying(reason="room_error", attempt=1, retry_in=2.0))
    metrics.observe(Failed(job_id="j", attempt=1, reason="avatar_timeout", error="no avatar"))
    # The avatar's start counts from its ask, not from the join (made while the job waited).
    timestamps = Timestamps(
        picked=now - 12, room_joined=now - 11.5, avatar_requested=now - 11, avatar_ready=now - 9
    )
    metrics.observe(played(timestamps, seconds_streamed=8.0))
    metrics.observe(Progress(seconds_streamed=1.0, total_seconds=None))  # counted nowhere
    assert sample("avatarq_jobs_started_total") == before["started"] + 1
    assert sample("avatarq_jobs_completed_total") == before["done"] + 1
    assert sample("avatarq_jobs_failed_total", reason="avatar_timeout") == before["failed"] + 1
    assert sample("avatarq_job_retries_total", reason="room_error") == before["retry"] + 1
    assert sample("avatarq_job_duration_seconds_count") == before["duration"] + 1
    assert sample("avatarq_avatar_start_seconds_sum") == pytest.approx(before["avatar"] + 2)


def test_pacing_probe_measures_lateness_against_the_schedule() -> None:
    from tasks.link.pacing import Pacer

    clock = iter([0.0, 0.105, 0.4]).__next__
    pacer = Pacer(bytes_per_second=32000, lead=0.0, clock=clock)
    pacer.start()  # t0 = 0
    probe = metrics.PacingProbe(pacer)
    before = sample("avatarq_pacing_error_seconds_sum")
    probe.observe(3200)  # chunk 0 due at 0.0, written by 0.105
    probe.observe(6400)  # chunk 1 due at 0.1, written by 0.4
    assert sample("avatarq_pacing_error_seconds_sum") == pytest.approx(before + 0.105 + 0.3)


def test_json_lines_carry_the_job_and_text_lines_too() -> None:
    buf = io.StringIO()  # not a terminal: "auto" picks JSON
    logs.configure(logging.INFO, "auto", buf)
    try:
        logs.bind_job(job_id="j1", room="lobby", avatar_id="anna", source="ignored")
        logging.getLogger("avatarq.test").info("playing %d", 3)
        logs.clear_job()
        logging.getLogger("avatarq.test").warning("idle")
        first, second = (json.loads(line) for line in buf.getvalue().splitlines())
        assert first["message"] == "playing 3" and first["level"] == "info"
        assert (first["job_id"], first["room"], first["avatar_id"]) == ("j1", "lobby", "anna")
        assert "source" not in first and "job_id" not in second

        text = io.StringIO()
        logs.configure(logging.INFO, "text", text)
        logs.bind_job(job_id="j2", room="r", avatar_id="a")
        logging.getLogger("avatarq.test").info("hello")
        assert text.getvalue().rstrip().endswith("hello [job_id=j2 room=r avatar_id=a]")
    finally:
        logs.clear_job()
        logging.getLogger().handlers.clear()


def test_config_masks_secrets_and_url_passwords() -> None:
    settings = Settings(
        LIVEKIT_API_SECRET="lk-secret-value",
        AVALUMA_LICENSE_KEY="license-value",
        REDIS_URL="redis://user:pw-value@redis.internal:6380/2",
    )
    config = effective_config(settings)
    assert config["LIVEKIT_API_SECRET"] == MASK and config["AVALUMA_LICENSE_KEY"] == MASK
    assert config["REDIS_URL"] == f"redis://user:{MASK}@redis.internal:6380/2"
    assert config["AVATARQ_WEBHOOK_SECRET"] == ""  # unset secrets show as empty
    assert not any(v in json.dumps(config) for v in ("lk-secret", "license-value", "pw-value"))
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


# --- on the local stack ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack_module.LocalStack]:
    # Distinctive secrets, so finding them in a log cannot be a coincidence.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stack_module, "DEV_API_SECRET", "lk-" + secrets.token_hex(16))
        mp.setattr(stack_module, "DEV_LICENSE_KEY", "lic-" + secrets.token_hex(16))
        with stack_module.local_stack(tmp_path_factory.mktemp("obs")) as s:
            s.start_worker("obs", concurrency=2)
            mp.setattr(os, "environ", {**os.environ, **s.env()})
            get_settings.cache_clear()
            try:
                yield s
            finally:
                get_settings.cache_clear()


def scrape(stack: stack_module.LocalStack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    port = stack.metrics_ports["obs"]
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@needs_netns
@pytest.mark.netns
def test_worker_metrics_move_after_jobs(stack: stack_module.LocalStack, tmp_path: Path) -> None:
    before = scrape(stack)
    ok = run_job(stack, **JOB, source=str(audio.tone(tmp_path / "t.wav", seconds=1.5)))
    bad = run_job(stack, **JOB, source=str(tmp_path / "missing.wav"))
    assert ok["status"] == "completed" and bad["reason"] == "source_not_found"
    after = scrape(stack)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("avatarq_jobs_started_total") == 2
    assert moved("avatarq_jobs_completed_total") == 1
    assert moved("avatarq_jobs_failed_total", reason="source_not_found") == 1
    assert moved("avatarq_job_duration_seconds_count") == 1
    assert moved("avatarq_job_duration_seconds_sum") >= 1.5
    assert moved("avatarq_avatar_start_seconds_count") == 1
    # One observation per chunk of the 1.5 s clip.
    assert moved("avatarq_pacing_error_seconds_count") >= int(1.5 / CHUNK_SECONDS)
    assert after[("avatarq_streams_in_flight", ())] == 0


@needs_netns
@pytest.mark.netns
def test_worker_logs_are_json_with_job_context_and_no_secrets(
    stack: stack_module.LocalStack, tmp_path: Path
) -> None:
    result = run_job(stack, **JOB, source=str(tmp_path / "missing.wav"))
    (worker,) = stack.workers
    text = worker.log_path.read_text()
    for secret in (stack_module.DEV_API_SECRET, stack_module.DEV_LICENSE_KEY):
        assert secret not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(line["message"].endswith(" ready.") for line in lines)
    job_lines = [line for line in lines if line.get("job_id") == result["job_id"]]
    assert job_lines, "no log line carried the job id"
    for line in job_lines:
        assert (line["room"], line["avatar_id"]) == (JOB["room"], JOB["avatar_id"])


@needs_netns
@pytest.mark.netns
def test_status_overview_lists_the_worker(stack: stack_module.LocalStack) -> None:
    argv = [str(Path(sys.executable).with_name("avatarq")), "status", "--json"]
    env = {**os.environ, **stack.env()}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    overview = json.loads(out.stdout)
    assert overview["queue"] == "avatarq" and overview["queue_depth"] == 0
    assert [w["worker"].split("@")[0] for w in overview["workers"]] == ["obs"]
    assert overview["workers"][0]["concurrency"] == 2
    assert all(f["reason"] for f in overview["recent_failures"])
