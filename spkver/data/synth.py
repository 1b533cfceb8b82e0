r"""A synthetic speaker corpus in the VoxCeleb1 layout, from a source-filter voice model.

``spkver synth --out DIR --speakers N --utterances M --seed S`` writes
``DIR/wav/id<5 digits>/<11-character video id>/<5 digits>.wav`` (16 kHz, 16-bit)
and ``DIR/trials.txt`` (VoxCeleb format), so that ``DIR`` is a valid ``--vox1``
input of ``spkver prepare voxceleb`` and every later stage runs on it through
the same code as on VoxCeleb.

Voices differ the way voices do (a source-filter model):

* **glottal source**: a Rosenberg pulse train at a per-speaker F0 (mean, range
  of intonation), with jitter (cycle-to-cycle period noise), shimmer
  (cycle-to-cycle amplitude noise), spectral tilt (a one-pole low-pass of the
  pulses) and breathiness (aspiration noise mixed into the source);
* **vocal tract**: five formant resonators; each speaker has a vocal-tract
  length (scaling every formant) and their own offsets of the vowel formants;
* **speaking rate**: phone durations scale per speaker.

With ``espeak_fraction > 0`` (and ``espeak-ng`` installed) that fraction of
the speakers is voiced by espeak-ng instead — random pseudo-words in a
language, voice variant, pitch and speed of their own — as an additional
voice source; the default needs no system package.

Utterances are random phone-like sequences (vowels, voiced and voiceless
fricatives, stops, pauses).  Each *session* ("video") has its own channel: a
random microphone response (peaking/shelving EQ and band limits), a noise floor
(coloured noise at a random SNR) and reverberation (an exponentially decaying
noise impulse response with a random RT60), so that same-speaker trials across
sessions are not trivial.

``difficulty`` (default 1.0) scales channel severity and within-speaker
variation up and the spread between speakers down.  Generation is
deterministic given the seed (each utterance has its own generator).
"""
from __future__ import annotations

import os
import shutil
import string
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from scipy import signal

from spkver.data.manifests import cross_session_trials
from spkver.errors import UserError

__all__ = ["SynthesisError", "SAMPLE_RATE", "Voice", "Channel", "synthesize_corpus", "make_voice", "make_channel",
           "render_utterance"]

SAMPLE_RATE = 16000
_VIDEO_ALPHABET = np.array(list(string.ascii_letters + string.digits + "-_"))

# Vowel formants (Hz) of an average adult vocal tract: F1..F4.
_VOWELS = np.array([
    [730, 1090, 2440, 3400],  # a
    [530, 1840, 2480, 3500],  # e
    [270, 2290, 3010, 3700],  # i
    [570, 840, 2410, 3400],   # o
    [300, 870, 2240, 3300],   # u
    [660, 1720, 2410, 3450],  # ae
    [490, 1350, 1690, 3300],  # er
], dtype=np.float64)
_F5 = 4500.0
_BANDWIDTHS = np.array([80, 100, 140, 200, 260], dtype=np.float64)


class SynthesisError(UserError, ValueError):
    """Settings the synthetic corpus cannot be made with: names the setting."""


@dataclass
class Voice:
    """A speaker's source-filter parameters."""

    f0: float               # mean fundamental frequency (Hz)
    f0_range: float         # intonation standard deviation (semitones)
    jitter: float           # relative period perturbation per cycle
    shimmer: float          # relative amplitude perturbation per cycle
    tilt: float             # pole of the one-pole low-pass on the pulses (0..1)
    breathiness: float      # aspiration noise level relative to the pulses
    tract_scale: float      # formant scaling from vocal-tract length (short tract: > 1)
    vowel_offsets: np.ndarray  # (7, 4) multiplicative formant offsets per vowel
    rate: float             # phone-duration multiplier (fast speaker: < 1)
    espeak: Optional[Tuple[str, str, int, int]] = None  # (language, variant, pitch, words/min) when espeak-ng speaks


@dataclass
class Channel:
    """A recording session's channel."""

    eq: List[Tuple[np.ndarray, np.ndarray]]  # biquads (b, a)
    snr_db: float
    noise_colour: float     # spectral exponent of the noise floor (0 white, 1 pink, 2 brown)
    rir: Optional[np.ndarray]


_ESPEAK_LANGUAGES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "de", "fr", "es", "it", "nl", "pt"]
_ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak", "whisper"]


def make_espeak_voice(rng: np.random.Generator) -> Tuple[str, str, int, int]:
    """An espeak-ng voice: language, variant, pitch (0-99) and speed (words per minute)."""
    return (str(rng.choice(_ESPEAK_LANGUAGES)), str(rng.choice(_ESPEAK_VARIANTS)), int(rng.integers(20, 80)),
            int(rng.integers(130, 200)))


def make_voice(rng: np.random.Generator, difficulty: float = 1.0) -> Voice:
    """Draw a speaker; higher ``difficulty`` narrows the spread between speakers."""
    spread = 1.0 / max(difficulty, 1e-3) ** 0.5
    female = rng.random() < 0.5
    f0 = rng.uniform(165, 255) if female else rng.uniform(85, 155)
    tract = (1.12 if female else 1.0) * np.exp(rng.normal(0, 0.06 * spread))
    return Voice(
        f0=f0,
        f0_range=rng.uniform(1.0, 3.5),
        jitter=rng.uniform(0.003, 0.02),
        shimmer=rng.uniform(0.02, 0.10),
        tilt=float(np.clip(rng.normal(0.85, 0.07 * spread), 0.5, 0.97)),
        breathiness=rng.uniform(0.02, 0.35),
        tract_scale=float(tract),
        vowel_offsets=np.exp(rng.normal(0, 0.08 * spread, size=_VOWELS.shape)),
        rate=float(np.exp(rng.normal(0, 0.15 * spread))),
    )


def _peaking(frequency, gain_db, q):
    a = 10 ** (gain_db / 40)
    w = 2 * np.pi * frequency / SAMPLE_RATE
    alpha = np.sin(w) / (2 * q)
    b = np.array([1 + alpha * a, -2 * np.cos(w), 1 - alpha * a])
    den = np.array([1 + alpha / a, -2 * np.cos(w), 1 - alpha / a])
    return b / den[0], den / den[0]


def make_channel(rng: np.random.Generator, difficulty: float = 1.0) -> Channel:
    """Draw a session: microphone EQ, noise floor and room."""
    eq = [_peaking(rng.uniform(200, 6000), rng.normal(0, 4 * difficulty), rng.uniform(0.7, 2.5))
          for _ in range(rng.integers(2, 5))]
    low = rng.uniform(50, 300)
    high = rng.uniform(3400, 7600)
    b, a = signal.butter(2, [low, high], btype="bandpass", fs=SAMPLE_RATE)
    eq.append((b, a))
    rir = None
    if rng.random() < min(0.9, 0.5 * difficulty + 0.2):
        rt60 = rng.uniform(0.1, 0.3 + 0.3 * difficulty)
        length = int(rt60 * SAMPLE_RATE)
        t = np.arange(length) / SAMPLE_RATE
        rir = rng.normal(size=length) * np.exp(-6.9 * t / rt60)
        rir[0] = 1.0 / rng.uniform(0.3, 1.0)  # direct path against the reverberant tail
        rir /= np.sqrt(np.sum(rir ** 2))
    snr = rng.uniform(30 - 12 * difficulty, 40 - 10 * difficulty)
    return Channel(eq=eq, snr_db=float(snr), noise_colour=float(rng.uniform(0, 2)), rir=rir)


def _resonator(frequency, bandwidth):
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    theta = 2 * np.pi * frequency / SAMPLE_RATE
    a = np.array([1.0, -2 * r * np.cos(theta), r * r])
    return np.array([a.sum()]), a  # unit gain at DC


def _glottal_source(rng, voice: Voice, n: int, f0_contour: np.ndarray) -> np.ndarray:
    """Rosenberg pulses at the contour's F0 with jitter and shimmer, tilted, plus aspiration."""
    source = np.zeros(n)
    position = 0.0
    while position < n:
        f0 = f0_contour[min(int(position), n - 1)]
        period = SAMPLE_RATE / f0 * (1 + voice.jitter * rng.normal())
        length = max(int(period), 8)
        opening = int(0.4 * length)
        closing = int(0.16 * length)
        pulse = np.zeros(length)
        k = np.arange(opening)
        pulse[:opening] = 0.5 * (1 - np.cos(np.pi * k / max(opening, 1)))
        k = np.arange(closing)
        pulse[opening:opening + closing] = np.cos(0.5 * np.pi * k / max(closing, 1))
        start = int(position)
        stop = min(start + length, n)
        source[start:stop] += (1 + voice.shimmer * rng.normal()) * pulse[: stop - start]
        position += period
    derivative = np.diff(source, prepend=0.0)  # lip radiation
    tilted = signal.lfilter([1 - voice.tilt], [1, -voice.tilt], derivative)
    aspiration = rng.normal(size=n) * np.std(tilted) * voice.breathiness
    return tilted + aspiration


def _filter_formants(excitation, formants):
    out = excitation
    for frequency, bandwidth in zip(formants, _BANDWIDTHS):
        if frequency < SAMPLE_RATE / 2 - 200:
            b, a = _resonator(frequency, bandwidth)
            out = signal.lfilter(b, a, out)
    return out


def render_utterance(rng: np.random.Generator, voice: Voice, channel: Channel, seconds: float,
                     difficulty: float = 1.0) -> np.ndarray:
    """A random phone sequence in ``voice`` through ``channel``; float32 in [-1, 1]."""
    n = int(seconds * SAMPLE_RATE)
    speech = _espeak_speech(rng, voice, n) if voice.espeak is not None else \
        _source_filter_speech(rng, voice, n, difficulty)
    return _through_channel(rng, channel, speech)


def _source_filter_speech(rng: np.random.Generator, voice: Voice, n: int, difficulty: float) -> np.ndarray:
    # Session-to-session drift of the speaker (mood, effort) grows with difficulty.
    f0_mean = voice.f0 * np.exp(rng.normal(0, 0.04 * difficulty))
    t = np.arange(n) / SAMPLE_RATE
    semitones = voice.f0_range * (np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 6))
                                  + 0.5 * rng.normal(size=1))
    f0_contour = f0_mean * 2 ** (semitones / 12) * np.linspace(1.05, 0.92, n)  # declination
    voiced = _glottal_source(rng, voice, n, f0_contour)
    output = np.zeros(n)
    position = int(rng.uniform(0.05, 0.2) * SAMPLE_RATE)
    while position < n:
        kind = rng.choice(["vowel", "vowel", "vowel", "fricative", "stop", "pause"], p=None)
        duration = int(voice.rate * {"vowel": rng.uniform(0.07, 0.22), "fricative": rng.uniform(0.05, 0.14),
                                     "stop": rng.uniform(0.03, 0.08), "pause": rng.uniform(0.05, 0.3)}[kind]
                       * SAMPLE_RATE)
        stop = min(position + duration, n)
        segment = slice(position, stop)
        length = stop - position
        fade = min(160, length // 2)  # 10 ms raised-cosine fades against clicks
        ramp = np.ones(length)
        if fade:
            window = np.hanning(2 * fade + 2)[1:-1]
            ramp[:fade], ramp[length - fade:] = window[:fade], window[fade:]
        if kind == "vowel":
            vowel = rng.integers(len(_VOWELS))
            formants = np.r_[_VOWELS[vowel] * voice.vowel_offsets[vowel], _F5] * voice.tract_scale
            padded = slice(max(position - 400, 0), stop)  # let the resonators settle
            piece = _filter_formants(voiced[padded], formants)[position - padded.start:]
            output[segment] += ramp * piece
        elif kind == "fricative":
            centre = rng.uniform(2500, 6500) * voice.tract_scale ** 0.5
            b, a = signal.butter(2, [centre * 0.7, min(centre * 1.3, 7800)], btype="bandpass", fs=SAMPLE_RATE)
            noise = signal.lfilter(b, a, rng.normal(size=length)) * 0.3 * np.std(voiced)
            if rng.random() < 0.4:  # voiced fricative
                noise += 0.3 * _filter_formants(voiced[segment], np.r_[_VOWELS[2], _F5] * voice.tract_scale)
            output[segment] += ramp * noise
        elif kind == "stop":
            burst = rng.normal(size=length) * np.exp(-np.arange(length) / (0.01 * SAMPLE_RATE))
            output[segment] += 0.5 * np.std(voiced) * burst
        position = stop
    return output


_SYLLABLE_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "sh", "ch", ""]
_SYLLABLE_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ou", "ee", "oo"]


def _espeak_speech(rng: np.random.Generator, voice: Voice, n: int) -> np.ndarray:
    """Random pseudo-words spoken by espeak-ng in the speaker's voice variant, pitch and speed."""
    import io
    import subprocess

    import soundfile

    language, variant, pitch, speed = voice.espeak
    pieces, total = [], 0
    while total < n:
        words = " ".join("".join(rng.choice(_SYLLABLE_ONSETS) + rng.choice(_SYLLABLE_NUCLEI)
                                 for _ in range(rng.integers(1, 4))) for _ in range(8))
        result = subprocess.run(["espeak-ng", "-v", f"{language}+{variant}", "-p", str(pitch), "-s", str(speed),
                                 "--stdout", words], capture_output=True, check=True)
        audio, rate = soundfile.read(io.BytesIO(result.stdout), dtype="float64")
        audio = signal.resample_poly(audio, SAMPLE_RATE, rate)
        pieces.append(audio)
        total += audio.size
    return np.concatenate(pieces)[:n]


def _through_channel(rng: np.random.Generator, channel: Channel, output: np.ndarray) -> np.ndarray:
    """Microphone response, room and noise floor of a session."""
    n = output.size
    for b, a in channel.eq:
        output = signal.lfilter(b, a, output)
    if channel.rir is not None:
        output = signal.fftconvolve(output, channel.rir)[:n]
    speech_power = np.mean(output ** 2) + 1e-12
    spectrum = np.fft.rfft(rng.normal(size=n))
    frequencies = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)
    noise = np.fft.irfft(spectrum / frequencies ** (channel.noise_colour / 2), n)
    noise *= np.sqrt(speech_power / (np.mean(noise ** 2) + 1e-12) / 10 ** (channel.snr_db / 10))
    output = output + noise
    peak = np.max(np.abs(output)) + 1e-12
    return (output / peak * rng.uniform(0.3, 0.9)).astype(np.float32)


@dataclass
class _Job:
    path: Path
    seed: Tuple[int, ...]
    voice: Voice
    channel: Channel
    seconds: float
    difficulty: float


def _render_job(job: _Job) -> None:
    import soundfile

    rng = np.random.default_rng(job.seed)
    audio = render_utterance(rng, job.voice, job.channel, job.seconds, job.difficulty)
    job.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.path.with_name(job.path.stem + ".tmp.wav")
    soundfile.write(tmp, audio, SAMPLE_RATE, subtype="PCM_16")
    os.replace(tmp, job.path)


def _video_id(rng) -> str:
    return "".join(rng.choice(_VIDEO_ALPHABET, 11))


def synthesize_corpus(out, speakers: int = 100, utterances: int = 20, seed: int = 0,
                      difficulty: float = 1.0, min_seconds: float = 3.0, max_seconds: float = 6.0,
                      sessions: Tuple[int, int] = (3, 5), test_speakers: Optional[int] = None,
                      trials_per_utterance: Optional[int] = 8, workers: Optional[int] = None,
                      progress: bool = True, espeak_fraction: float = 0.0) -> dict:
    """Write the corpus and its trial list; return a summary (counts, paths).

    Parameters
    ----------
    speakers, utterances : int
        Speakers, and utterances per speaker, spread over 3-5 sessions each.
    test_speakers : int, optional
        Speakers reserved for the trial list (default: a fifth, at least 2);
        ``spkver prepare`` then keeps them out of training.
    trials_per_utterance : int or None
        Trials with each test utterance as enrolment, half targets (from
        another session of the same speaker), half non-targets.  ``None``:
        every pair of test utterances once, targets across sessions only
        (20 speakers x 20 utterances: about 3,800 targets and 76,000
        non-targets, enough for FAR = 1e-4 and for a DCF at p = 0.01 whose
        false alarms count 0.001 each rather than 0.06).
    espeak_fraction : float
        Fraction of the speakers voiced by espeak-ng (a language, a voice
        variant, pitch and speed each) instead of the source-filter model, through
        the same session channels; needs ``espeak-ng`` on PATH.
    """
    if speakers < 2 or utterances < 2:
        raise SynthesisError(f"need at least 2 speakers and 2 utterances each, got {speakers} and {utterances}")
    if not 0 < min_seconds <= max_seconds:
        raise SynthesisError(f"need 0 < min_seconds <= max_seconds, got {min_seconds} and {max_seconds}")
    if difficulty <= 0:
        raise SynthesisError(f"difficulty must be > 0, got {difficulty}")
    if not 0.0 <= espeak_fraction <= 1.0:
        raise SynthesisError(f"espeak_fraction must lie in [0, 1], got {espeak_fraction}")
    if trials_per_utterance is not None and trials_per_utterance < 1:
        raise SynthesisError(f"trials_per_utterance must be >= 1 or None (every pair), got {trials_per_utterance}")
    if espeak_fraction > 0 and shutil.which("espeak-ng") is None:
        raise SynthesisError("espeak_fraction > 0 needs espeak-ng on PATH (e.g. apt-get install espeak-ng)")
    test_speakers = max(2, speakers // 5) if test_speakers is None else test_speakers
    if not 2 <= test_speakers <= speakers:
        raise SynthesisError(f"test_speakers must lie in [2, {speakers}], got {test_speakers}")
    out = Path(out)
    root = np.random.SeedSequence(seed)
    speaker_seeds = root.spawn(speakers)
    jobs, records = [], []
    for s, speaker_seed in enumerate(speaker_seeds):
        rng = np.random.default_rng(speaker_seed)
        voice = make_voice(rng, difficulty)
        if espeak_fraction > 0 and rng.random() < espeak_fraction:  # no draw by default: same corpus
            voice.espeak = make_espeak_voice(rng)
        n_sessions = int(rng.integers(sessions[0], sessions[1] + 1))
        n_sessions = min(n_sessions, utterances)
        channels = [(_video_id(rng), make_channel(rng, difficulty)) for _ in range(n_sessions)]
        session_of = np.r_[np.arange(n_sessions), rng.integers(0, n_sessions, utterances - n_sessions)]
        speaker_id = f"id{10001 + s:05d}"
        for u in range(utterances):
            video, channel = channels[session_of[u]]
            utterance_id = f"{speaker_id}/{video}/{u + 1:05d}.wav"
            jobs.append(_Job(out / "wav" / utterance_id, (seed, s, u), voice, channel,
                             float(rng.uniform(min_seconds, max_seconds)), difficulty))
            records.append((utterance_id, s, int(session_of[u])))
    pending = [job for job in jobs if not job.path.exists()]
    workers = workers or min(len(pending), os.cpu_count() or 1) or 1
    if pending:
        from tqdm import tqdm

        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(tqdm(pool.map(_render_job, pending, chunksize=4), total=len(pending), desc="synthesising",
                      unit="utt", disable=not progress))
    trials = cross_session_trials([r for r in records if r[1] >= speakers - test_speakers], trials_per_utterance,
                                  seed)
    (out / "trials.txt").write_text("".join(f"{label} {a} {b}\n" for label, a, b in trials))
    return {"speakers": speakers, "utterances": len(records), "test_speakers": test_speakers,
            "trials": len(trials), "targets": sum(t[0] for t in trials), "out": str(out)}
