"""The keyword-spotting set of ``reproduce audio``: words synthesised by espeak-ng, noise, log-mel features.

Run once (``python scripts/make_kws_features.py``, needs Debian's ``espeak-ng``)
to write ``torch_adamp_reproduce/data/espeak_kws_logmel.npz``, which ships with the
package, so that the task itself needs neither espeak-ng nor any download.

Each clip: one of :data:`WORDS` spoken by espeak-ng (``-w``, 22,050 Hz) with
a dialect from :data:`DIALECTS`, a voice variant (``+name``), a speed (words
per minute) and a pitch drawn from a fixed ``numpy`` generator; resampled to
16 kHz (linear interpolation), silence trimmed, placed at a random offset in a
one-second window, mixed with white noise at a random signal-to-noise ratio,
then turned into a log-mel spectrogram (512-point Hann FFT, hop 320 = 20 ms,
:data:`N_MELS` triangular mel bands from 20 Hz to 8 kHz, natural log of the
band power + 1e-6) and quantised to uint8 over ``[LOG_LO, LOG_HI]``. The
training clips use :data:`TRAIN_VARIANTS`, the test clips the unseen
:data:`TEST_VARIANTS` (new speakers' timbres). The output depends only on
the espeak-ng version (recorded in the file) and numpy.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from dataclasses import dataclass

import numpy as np

WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
DIALECTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m6", "m7", "f1", "f2", "f4", "croak", "klatt", "klatt3", "whisper", "Andy")
TEST_VARIANTS = ("m5", "f3", "f5", "klatt2", "Mike", "Annie")
SPEED = (110, 210)
PITCH = (20, 80)
SNR_DB = (5.0, 25.0)
RATE = 16000
N_FFT, HOP, N_MELS = 512, 320, 32
LOG_LO, LOG_HI = -8.0, 8.0
TRAIN_PER_WORD, TEST_PER_WORD = 150, 50
FILE = "espeak_kws_logmel.npz"


@dataclass(frozen=True)
class Clip:
    word: int
    dialect: str
    variant: str
    speed: int
    pitch: int
    snr_db: float
    offset: float  # where in the free part of the window the word starts, 0..1
    noise_seed: int


def plan(seed: int = 0) -> tuple[list[Clip], list[Clip]]:
    """The training and test clips (their random choices), in a fixed order."""
    rng = np.random.default_rng(seed)
    out: tuple[list[Clip], list[Clip]] = ([], [])
    for split, variants, per_word in ((0, TRAIN_VARIANTS, TRAIN_PER_WORD), (1, TEST_VARIANTS, TEST_PER_WORD)):
        for w in range(len(WORDS)):
            for _ in range(per_word):
                out[split].append(
                    Clip(
                        word=w,
                        dialect=DIALECTS[int(rng.integers(len(DIALECTS)))],
                        variant=variants[int(rng.integers(len(variants)))],
                        speed=int(rng.integers(SPEED[0], SPEED[1] + 1)),
                        pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)),
                        snr_db=float(rng.uniform(*SNR_DB)),
                        offset=float(rng.uniform()),
                        noise_seed=int(rng.integers(2**31)),
                    )
                )
    return out


def espeak_version() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    return subprocess.run([exe, "--version"], check=True, capture_output=True, text=True).stdout.split("  ")[0].strip()


def synthesise(clip: Clip) -> np.ndarray:
    """The word as float64 samples at 16 kHz (espeak-ng's 22,050 Hz output, linearly resampled)."""
    cmd = ["espeak-ng", "-v", f"{clip.dialect}+{clip.variant}", "-s", str(clip.speed), "-p", str(clip.pitch)]
    wav = subprocess.run([*cmd, "--stdout", WORDS[clip.word]], check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(wav)) as f:
        rate = f.getframerate()
        x = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").astype(np.float64) / 32768.0
    t = np.arange(int(len(x) * RATE / rate)) / RATE
    return np.interp(t, np.arange(len(x)) / rate, x)


def place(x: np.ndarray, clip: Clip) -> np.ndarray:
    """Trim silence (|x| < 1% of the peak), put into one second at ``clip.offset``, add white noise at
    ``clip.snr_db`` (relative to the word's mean power)."""
    loud = np.flatnonzero(np.abs(x) >= 0.01 * np.abs(x).max())
    x = x[loud[0] : loud[-1] + 1][:RATE]
    out = np.zeros(RATE)
    start = round(clip.offset * (RATE - len(x)))
    out[start : start + len(x)] = x
    power = float(np.mean(x**2))
    noise = np.random.default_rng(clip.noise_seed).standard_normal(RATE)
    noisy: np.ndarray = out + noise * np.sqrt(power / 10 ** (clip.snr_db / 10))
    return noisy


def mel_filters() -> np.ndarray:
    """``(N_MELS, N_FFT // 2 + 1)`` triangular filters, equally spaced on the HTK mel scale, 20 Hz .. 8 kHz."""

    def mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    edges_mel = np.linspace(mel(np.array(20.0)), mel(np.array(RATE / 2)), N_MELS + 2)
    edges = 700.0 * (10 ** (edges_mel / 2595.0) - 1.0)
    freqs = np.arange(N_FFT // 2 + 1) * RATE / N_FFT
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    out: np.ndarray = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return out


def log_mel(x: np.ndarray) -> np.ndarray:
    """``(N_MELS, frames)`` natural log of the mel band power + 1e-6 (Hann window, no padding)."""
    frames = 1 + (len(x) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(N_FFT), axis=1)) ** 2
    out: np.ndarray = np.log(spec @ mel_filters().T + 1e-6).T
    return out


def quantise(logmel: np.ndarray) -> np.ndarray:
    q = np.round((logmel - LOG_LO) / (LOG_HI - LOG_LO) * 255.0)
    out: np.ndarray = np.clip(q, 0, 255).astype(np.uint8)
    return out


def features(clip: Clip) -> np.ndarray:
    """The uint8 ``(N_MELS, 49)`` log-mel features of one clip (needs espeak-ng)."""
    return quantise(log_mel(place(synthesise(clip), clip)))


def build(seed: int = 0) -> dict[str, np.ndarray]:
    """Every array of the shipped file."""
    train, test = plan(seed)
    return {
        "train_features": np.stack([features(c) for c in train]),
        "train_labels": np.array([c.word for c in train], dtype=np.uint8),
        "test_features": np.stack([features(c) for c in test]),
        "test_labels": np.array([c.word for c in test], dtype=np.uint8),
        "words": np.array(WORDS),
        "espeak_ng_version": np.array(espeak_version()),
        "seed": np.array(seed),
    }
