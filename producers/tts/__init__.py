"""Text-to-speech pre-generation: render a `tts` source once, store it, enqueue plain audio.

Light like the rest of `producers`: engines are a subprocess (espeak-ng) or HTTP via urllib.
"""

from producers.tts.base import TtsEngine, TtsRejected, TtsUnavailable
from producers.tts.render import render_job, render_tts

__all__ = ["TtsEngine", "TtsRejected", "TtsUnavailable", "render_job", "render_tts"]
