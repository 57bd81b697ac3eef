"""Offline speech with the `espeak-ng` binary: no account, no network, runs in CI.

Debian's package as a subprocess rather than a PyPI wheel (why: docs/compatibility.md);
`AVATARQ_ESPEAK` points at another binary. SSML is supported (`-m`); voices are checked
against `espeak-ng --voices` first, so a typo fails clearly instead of with espeak's error."""

from __future__ import annotations

import re
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from avatarq.settings import Settings
from producers.tts.base import Speech, TtsRejected, TtsUnavailable

DEFAULT_VOICE = "en"
_OTHER_LANGUAGE = re.compile(r"\(([\w-]+) \d+\)")


@lru_cache(maxsize=4)
def installed_voices(binary: str) -> frozenset[str]:
    """Every name `-v` accepts: language codes, voice names and voice files."""
    try:
        listing = subprocess.run(
            [binary, "--voices"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except OSError as e:
        # A missing binary is a setup problem: no retry will install it.
        raise TtsRejected(
            f"espeak: cannot run {binary} ({e}): apt-get install espeak-ng or set AVATARQ_ESPEAK"
        ) from None
    except subprocess.SubprocessError as e:
        raise TtsUnavailable(f"espeak: {binary} --voices failed: {e}") from None
    names: set[str] = set()
    # Columns: Pty Language Age/Gender VoiceName File [Other Languages]
    for line in listing.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5:
            names.update(n.lower() for n in (cols[1], cols[3], cols[4]))
            # "(en 2)(en-gb 3)": languages this voice also serves, which `-v en` selects.
            names.update(m.lower() for m in _OTHER_LANGUAGE.findall(line))
    return frozenset(names)


class EspeakEngine:
    name = "espeak"
    supports_ssml = True

    def __init__(self, settings: Settings) -> None:
        self.binary = settings.espeak_binary
        self.timeout = settings.tts_timeout_s

    @property
    def cache_identity(self) -> str:
        return f"{self.name}:wav"

    def synthesize(self, text: str, voice: str | None, language: str | None, ssml: bool) -> Speech:
        voice = voice or (language.lower() if language else DEFAULT_VOICE)
        # `en+f3` is voice `en` with variant `f3`: only the voice part is in the list.
        if voice.split("+")[0].lower() not in installed_voices(self.binary):
            raise TtsRejected(
                f"espeak: voice {voice!r} is not installed (see `espeak-ng --voices`)"
            )
        with tempfile.TemporaryDirectory(prefix="avatarq-espeak-") as tmp:
            out = Path(tmp) / "speech.wav"
            # Text on stdin, not argv: text starting with "-" must not be read as an option.
            argv = [self.binary, "--stdin", "-v", voice, "-w", str(out)]
            if ssml:
                argv.append("-m")
            try:
                done = subprocess.run(
                    argv, input=text, capture_output=True, text=True, timeout=self.timeout
                )
            except subprocess.TimeoutExpired:
                raise TtsUnavailable(f"espeak: no audio within {self.timeout:g}s") from None
            if done.returncode != 0 or not out.exists() or out.stat().st_size <= 44:
                # espeak's stderr, on one line (it can span several, e.g. for MBROLA voices).
                lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
                message = "; ".join(lines)[:500] or f"exit status {done.returncode}, no audio"
                raise TtsRejected(f"espeak: {message}")
            return Speech(out.read_bytes(), "audio/wav", "wav")
