"""The operator console in a real headless Chromium (Debian's `chromium`, driven by selenium
through `chromium-driver`) against the whole local stack and a real `avatarq api`: the page is
refused without a key and opens with one; a job enqueued from the page shows up, its progress
bar advances and it ends completed; cancel from the page stops a playing job; a dead letter is
replayed from the page; the room view receives the avatar's video and shows the job's
captions; Chromium's own WebVTT parser reads the captions file back. Each state is saved as a
screenshot under `var/test-artefacts/` (or `$AVATARQ_TEST_ARTEFACTS`)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import requests

from avatarq.captions import Cue, parse_transcript, render_webvtt, webvtt_for
from avatarq.ledger.keys import DEAD_LETTER_KEY, job_enqueued_key, job_record_key
from avatarq_dev import livekit_official
from avatarq_dev.stack import LocalStack, local_stack
from producers.console import CONSOLE_DIST
from tests.audio import tone
from tests.httpserve import serving
from tests.netns import NETNS
from tests.producing import api_process

pytestmark = NETNS

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
KEY = "browser-key"
#: KEY is tenant acme's: the API queues its ids as `acme:{id}`, its rooms as `acme:{room}`.
TENANT = "acme"
#: Flags for a quiet, reproducible browser: no sandbox (root in a namespace), no GPU, no QUIC,
#: nothing fetched in the background, a fresh profile per run (added in `browser`).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1100",
    # The page plays the room's audio; a test has no user gesture to allow it.
    "--autoplay-policy=no-user-gesture-required",
)
T = TypeVar("T")


def _missing() -> str | None:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        return "chromium and chromium-driver not installed (infra/bootstrap installs them)"
    if not (CONSOLE_DIST / "index.html").is_file():
        return "console not built (infra/bootstrap: cd console && npm ci && npm run build)"
    return None


# CI must run these: a missing browser or build there is a failure, not a skip.
if (reason := _missing()) and os.environ.get("CI") != "true":
    pytestmark = [*NETNS, pytest.mark.skip(reason=reason)]


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def artefacts() -> Path:
    path = Path(os.environ.get("AVATARQ_TEST_ARTEFACTS", ROOT / "var" / "test-artefacts"))
    path = path / "console"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with local_stack(tmp_path_factory.mktemp("console-stack"), workers=1) as s:
        yield s


@pytest.fixture(scope="module")
def base(stack: LocalStack) -> Iterator[str]:
    env = {**stack.env(), "AVATARQ_API_KEYS": f"{TENANT}:{KEY}"}
    with api_process(env, stack.workdir / "logs") as proc:
        yield f"http://127.0.0.1:{proc.port}"


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tones served over HTTP (the API refuses local file sources)."""
    root = tmp_path_factory.mktemp("console-audio")
    for seconds in (4, 6, 8, 30):
        tone(root / f"tone{seconds}.wav", seconds=seconds)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations land there
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def js(browser: Any, script: str, *args: Any) -> Any:
    return browser.execute_script(script, *args)


def visible(browser: Any, selector: str) -> bool:
    script = "const e = document.querySelector(arguments[0]); return !!e && !e.closest('[hidden]')"
    return bool(js(browser, script, selector))


def open_console(browser: Any, base: str, key: str | None) -> None:
    browser.get(f"{base}/console/")
    js(browser, "sessionStorage.clear()")
    browser.get("about:blank")  # a fresh load: only the fragment would change otherwise
    browser.get(f"{base}/console/" + (f"#key={key}" if key else ""))


def enqueue_from_page(browser: Any, source: str, room: str) -> str:
    from selenium.webdriver.common.by import By

    previous = js(browser, "return document.getElementById('enqueue-result').dataset.jobId")
    for field, value in (("source", source), ("room", room), ("avatar", "anna")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.CSS_SELECTOR, "#enqueue button[type=submit]").click()
    job_id: str = wait_for(
        lambda: (
            (got := js(browser, "return document.getElementById('enqueue-result').dataset.jobId"))
            != previous
            and got
        ),
        "the page to report the enqueued job",
    )
    return job_id


def status_at(browser: Any, selector: str) -> str | None:
    found = js(
        browser,
        "const r = document.querySelector(arguments[0]); return r && r.dataset.status",
        selector,
    )
    return str(found) if found else None


def row_status(browser: Any, job_id: str) -> str | None:
    """The job's status in the Playing or Queue list."""
    return status_at(browser, f".job[data-job-id='{job_id}']")


def ended_as(browser: Any, job_id: str) -> str | None:
    """The job's status in the Recently ended table (None while it is not there)."""
    return status_at(browser, f"#recent tr[data-job-id='{job_id}']")


def bar(browser: Any, job_id: str) -> tuple[float, float] | None:
    value = js(
        browser,
        "const p = document.querySelector(`.job[data-job-id='${arguments[0]}'] progress`);"
        "return p && p.position >= 0 && [p.value, p.max];",  # position -1: indeterminate
        job_id,
    )
    return (float(value[0]), float(value[1])) if value else None


@pytest.mark.timeout(120)
def test_page_is_refused_without_a_key_and_opens_with_one(
    browser: Any, base: str, artefacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    open_console(browser, base, None)
    wait_for(lambda: visible(browser, "#key-form"), "the key form")
    assert not visible(browser, "#console")
    status = js(browser, "return fetch('/console/api/overview').then(r => r.status)")
    assert status == 401
    browser.find_element(By.ID, "key").send_keys("not-a-key")
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    error = wait_for(lambda: browser.find_element(By.ID, "key-error").text, "the refusal")
    assert "key refused" in error and "invalid API key" in error
    assert not visible(browser, "#console")
    browser.save_screenshot(str(artefacts / "01-refused-without-key.png"))

    open_console(browser, base, KEY)
    wait_for(lambda: visible(browser, "#console"), "the console")
    assert "key=" not in browser.current_url  # taken out of the address bar
    assert js(browser, "return sessionStorage.getItem('avatarq.apiKey')") == KEY
    # The avatar servers' session quota (tasks/link/quota.py): the default server, quota 10.
    row = "#capacity tr[data-server='default']"
    quota = wait_for(
        lambda: js(browser, f'return document.querySelector("{row} .quota")?.textContent'),
        "the quota",
    )
    assert quota == "10"
    browser.save_screenshot(str(artefacts / "02-opened-with-key.png"))
    assert csp_violations(browser) == []  # the built page runs under the API's policy


@pytest.mark.timeout(180)
def test_enqueued_job_shows_up_progresses_and_completes(
    browser: Any, base: str, audio: str, artefacts: Path
) -> None:
    open_console(browser, base, KEY)
    wait_for(lambda: visible(browser, "#console"), "the console")
    # Long enough for several progress events (one a second) after the page shows it playing.
    first = enqueue_from_page(browser, f"{audio}/tone6.wav", "console-a")
    second = enqueue_from_page(browser, f"{audio}/tone4.wav", "console-a")
    # The room plays one job at a time: the second waits behind the first.
    wait_for(lambda: row_status(browser, first) == "playing", "the first job to play")
    # Its row may come a poll of the page after the first one's.
    assert wait_for(lambda: row_status(browser, second), "the second job's row", 5) == "queued"
    browser.save_screenshot(str(artefacts / "03-playing-and-queued.png"))

    seen: list[float] = []
    deadline = time.monotonic() + 30
    while ended_as(browser, first) is None and time.monotonic() < deadline:
        if (b := bar(browser, first)) and (not seen or b[0] != seen[-1]):
            seen.append(b[0])
            assert b[1] == pytest.approx(6.0, abs=0.1)  # the bar's length is the audio's
        time.sleep(0.2)
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] > seen[0], seen
    assert wait_for(lambda: ended_as(browser, first), "the first job to end") == "completed"
    assert wait_for(lambda: ended_as(browser, second), "the second job to end") == "completed"
    browser.save_screenshot(str(artefacts / "04-completed.png"))
    status = requests.get(f"{base}/jobs/{first}", headers={"X-API-Key": KEY}, timeout=10).json()
    assert status["status"] == "completed"


@pytest.mark.timeout(180)
def test_cancel_from_the_page_stops_a_playing_job(
    browser: Any, base: str, audio: str, artefacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    open_console(browser, base, KEY)
    wait_for(lambda: visible(browser, "#console"), "the console")
    job_id = enqueue_from_page(browser, f"{audio}/tone30.wav", "console-b")
    wait_for(lambda: (b := bar(browser, job_id)) and b[0] >= 1.0, "a second of playback")
    browser.find_element(By.CSS_SELECTOR, f".job[data-job-id='{job_id}'] button.cancel").click()
    assert wait_for(lambda: ended_as(browser, job_id), "the cancellation", 15) == "cancelled"
    browser.save_screenshot(str(artefacts / "05-cancelled.png"))
    status = requests.get(f"{base}/jobs/{job_id}", headers={"X-API-Key": KEY}, timeout=10).json()
    assert status["status"] == "cancelled" and status["cancelled_while"] == "playing"
    assert status["seconds_streamed"] < 10


@pytest.mark.timeout(120)
def test_retry_a_dead_letter_from_the_page(
    browser: Any, base: str, audio: str, stack: LocalStack, artefacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    # A job as a worker leaves it after its last retry (tasks/: record, marker, dead entry).
    job = {"job_id": f"{TENANT}:console-dead-1", "room": f"{TENANT}:console-d", "avatar_id": "anna"}
    job["source"] = f"{audio}/tone4.wav"
    r = redis.Redis.from_url(stack.redis.url)
    failed = {"job_id": job["job_id"], "status": "failed", "reason": "avatar_timeout"}
    r.set(job_record_key(job["job_id"]), json.dumps(failed))
    r.hset(job_enqueued_key(job["job_id"]), "ts", "1")
    # tasks/render.py: {"job": payload, **result, "ts"}; the result has attempt, error, ...
    entry = {"job": job, **failed, "error": "the avatar never joined", "attempt": 5}
    r.lpush(DEAD_LETTER_KEY, json.dumps({**entry, "ts": time.time()}))

    open_console(browser, base, KEY)
    selector = "#dead tr[data-job-id='console-dead-1'] button.retry"
    wait_for(lambda: visible(browser, selector), "the dead letter")
    browser.save_screenshot(str(artefacts / "06-dead-letter.png"))
    browser.find_element(By.CSS_SELECTOR, selector).click()
    assert wait_for(lambda: ended_as(browser, "console-dead-1"), "the replay") == "completed"
    assert not visible(browser, selector)


#: Share of the emulator's level meter (devstack/avatarq_dev/avatar_emulator/video.py: a green
#: bar under the face, lit in proportion to the audio level) lit in the frame the page shows now.
METER_LIT = """
const v = document.getElementById('video');
if (!v.videoWidth) return -1;
const c = document.createElement('canvas');
c.width = 160; c.height = 120;
const g = c.getContext('2d');
g.drawImage(v, 0, 0, 160, 120);
const row = g.getImageData(8, 115, 144, 1).data;
let lit = 0;
for (let i = 0; i < row.length; i += 4) if (row[i + 1] > 150 && row[i] < 150) lit++;
return lit / 144;
"""


def meter(browser: Any) -> float:
    """The lit share of the meter in the shown frame, -1 while there is no video."""
    return float(js(browser, METER_LIT))


def frames(browser: Any) -> tuple[int, int]:
    """(frames presented, per requestVideoFrameCallback; frames decoded, per the element)."""
    got = js(
        browser,
        "const v = document.getElementById('video');"
        "return [Number(v.dataset.frames || 0), v.getVideoPlaybackQuality().totalVideoFrames];",
    )
    return int(got[0]), int(got[1])


@pytest.mark.timeout(180)
def test_room_view_shows_the_avatars_video_following_the_audio(
    browser: Any, base: str, audio: str, stack: LocalStack, artefacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    if stack.server != "official":
        # The embedded dev server forwards no media; CI has the official one (infra/bootstrap).
        why = livekit_official.why_unavailable()
        reason = f"media flows only through the official livekit-server: {why}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    open_console(browser, base, KEY)
    wait_for(lambda: visible(browser, "#console"), "the console")
    browser.find_element(By.ID, "watch-room").send_keys("console-v")
    browser.find_element(By.CSS_SELECTOR, "#watch button[type=submit]").click()
    status = browser.find_element(By.ID, "watch-status")
    wait_for(lambda: "waiting for the avatar" in status.text, "the viewer to join")
    job_id = enqueue_from_page(browser, f"{audio}/tone8.wav", "console-v")

    wait_for(lambda: frames(browser)[1] > 10, "decoded video frames", 45)
    shown = js(browser, "return document.getElementById('video').dataset.participant")
    assert shown == "avatar-anna"
    # The avatar's audio track plays in the page too, as viewers hear it.
    playing_audio = "const a = document.querySelector(arguments[0]); return !!a && !a.paused"
    selector = "#stage audio[data-participant='avatar-anna']"
    wait_for(lambda: js(browser, playing_audio, selector), "the avatar's audio to play")
    before = frames(browser)
    time.sleep(1.0)
    after = frames(browser)
    assert after[0] > before[0] and after[1] > before[1], (before, after)  # counting up
    # The tone is loud: the meter lights up while it plays ...
    wait_for(lambda: meter(browser) > 0.3, "the meter to light up", 15)
    browser.save_screenshot(str(artefacts / "07-room-view.png"))
    assert wait_for(lambda: ended_as(browser, job_id), "the job to end", 30) == "completed"
    # ... and goes dark when the audio ends (the avatar stays a while for the next job).
    wait_for(lambda: 0 <= meter(browser) < 0.05, "the meter to go dark", 10)
    # The room the page watched and the job played in is the tenant's own in LiveKit.
    sessions = f"{stack.avatar_url}/v1/sessions"
    assert requests.get(sessions, params={"room": f"{TENANT}:console-v"}, timeout=10).json()
    assert requests.get(sessions, params={"room": "console-v"}, timeout=10).json() == []
    assert csp_violations(browser) == []


def needs_media(stack: LocalStack) -> None:
    if stack.server != "official":
        # The embedded dev server forwards no media; CI has the official one (infra/bootstrap).
        why = livekit_official.why_unavailable()
        reason = f"media flows only through the official livekit-server: {why}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


CAPTIONS = """WEBVTT

00:00.500 --> 00:02.000
Welcome to the lobby.

00:02.600 --> 00:04.400
Captions follow the voice.

00:05.000 --> 00:07.000
Goodbye &amp; thanks.
"""

SHOWN = """const c = document.getElementById('captions');
return [c.textContent, c.dataset.segments || '0', c.dataset.final || ''];"""


@pytest.mark.timeout(180)
def test_room_view_shows_the_jobs_captions_in_turn(
    browser: Any, base: str, audio: str, stack: LocalStack, artefacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    needs_media(stack)
    open_console(browser, base, KEY)
    wait_for(lambda: visible(browser, "#console"), "the console")
    browser.find_element(By.ID, "watch-room").send_keys("console-c")
    browser.find_element(By.CSS_SELECTOR, "#watch button[type=submit]").click()
    status = browser.find_element(By.ID, "watch-status")
    wait_for(lambda: "waiting for the avatar" in status.text, "the viewer to join")
    job = {"room": "console-c", "avatar_id": "anna", "source": f"{audio}/tone8.wav"}
    r = requests.post(
        f"{base}/jobs", json={**job, "transcript": CAPTIONS}, headers={"X-API-Key": KEY}, timeout=10
    )
    assert r.status_code in (200, 201, 202), r.text
    job_id = r.json()["job_id"]

    # Poll what the page shows until the job ends: each cue in turn, then nothing.
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ended_as(browser, job_id):
        text, _segments, _final = js(browser, SHOWN)
        if text and (not seen or seen[-1] != text):
            seen.append(text)
            browser.save_screenshot(str(artefacts / f"08-captions-{len(seen)}.png"))
        time.sleep(0.05)
    assert ended_as(browser, job_id) == "completed"
    expected = [c.text for c in parse_transcript(CAPTIONS).cues(None) or []]
    assert seen == expected == ["Welcome to the lobby.", "Captions follow the voice.",
                                "Goodbye & thanks."]  # fmt: skip
    assert wait_for(lambda: js(browser, SHOWN)[0] == "" and js(browser, SHOWN), "a clear") == [
        "",
        "3",
        "true",
    ]
    assert csp_violations(browser) == []


VTT_PAGE = """<!doctype html><title>vtt</title><video id="v"></video>"""
READ_TRACK = """const done = arguments[arguments.length - 1];
const track = document.createElement('track');
track.kind = 'captions';
track.src = arguments[0];
track.default = true;
track.addEventListener('load', () => done([...track.track.cues].map(
  c => [c.startTime, c.endTime, c.getCueAsHTML().textContent])));
track.addEventListener('error', () => done('error'));
document.getElementById('v').appendChild(track);
track.track.mode = 'hidden';"""


@pytest.mark.timeout(60)
def test_the_captions_webvtt_file_reads_back_in_chromiums_parser(
    browser: Any, tmp_path: Path
) -> None:
    plain = "Fish & chips --> <b>now</b>! " + "And a long sentence. " * 12
    hours = [Cue(0.0, 1.5, "a"), Cue(3599.5, 3661.25, "over an hour")]
    resumed = [Cue(0.6, 2.4, "Captions follow the voice."), Cue(3.0, 5.0, "Goodbye & thanks.")]
    files = {  # name: (the file, the cues it must hold)
        "timed.vtt": (webvtt_for(CAPTIONS, 8.0), parse_transcript(CAPTIONS).cues(None)),
        "resumed.vtt": (webvtt_for(CAPTIONS, 8.0, start_at=2.0), resumed),
        "plain.vtt": (webvtt_for(plain, 12.34), parse_transcript(plain).cues(12.34)),
        "hours.vtt": (render_webvtt(hours), hours),
    }
    for name, (vtt, _cues) in files.items():
        assert vtt is not None
        (tmp_path / name).write_text(vtt, encoding="utf-8")
    (tmp_path / "page.html").write_text(VTT_PAGE)
    (tmp_path / "broken.vtt").write_text("not a webvtt file\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)) as url:
        for name, (_vtt, cues) in files.items():
            assert cues
            browser.get(f"{url}/page.html")
            read = browser.execute_async_script(READ_TRACK, f"{url}/{name}")
            assert [r[2] for r in read] == [c.text for c in cues], name
            times = [t for c in cues for t in (c.start, c.end)]
            assert [t for r in read for t in r[:2]] == pytest.approx(times, abs=1e-6), name
        browser.get(f"{url}/page.html")  # the parser does refuse what is not WebVTT
        assert browser.execute_async_script(READ_TRACK, f"{url}/broken.vtt") == "error"


def csp_violations(browser: Any) -> list[str]:
    """What the Content-Security-Policy blocked since the last call (Chromium's console)."""
    logs = browser.get_log("browser")
    return [e["message"] for e in logs if "Content Security Policy" in e["message"]]
