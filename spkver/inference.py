"""Using trained extractors: embeddings of whole utterances, verification, pretrained folders.

:class:`SpeakerEmbedder` loads an extractor from an experiment folder (the
recipe's ``output_folder``) or from a folder written by ``spkver export``, and
embeds files, batches and lists of files, or verifies a pair against a
threshold stored with the model.

Backbones such as ECAPA-TDNN pad their convolutions by reflection, so a short
utterance zero-padded inside a batch does not see what it sees alone.  To make
batched and one-by-one embeddings agree, every utterance is trimmed to a
multiple of ``quantum_seconds`` (0.1 s by default: at most 99 ms of trailing
audio are dropped, the same way in both paths) and batches only hold
utterances of exactly equal trimmed length, so no batch is padded.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from spkver.errors import UserError
from spkver.models.folders import ModelFolderError

__all__ = ["AudioError", "ModelFolderError", "SpeakerEmbedder", "Verification", "Identification", "read_audio",
           "trimmed_length", "length_batches", "embed_files", "check_headers", "unembeddable", "embed_waveform",
           "audio_seconds", "extractor_fingerprint", "MIN_SECONDS", "PRECISIONS", "PrecisionError", "check_precision",
           "native_bfloat16"]

SAMPLE_RATE = 16000


class AudioError(UserError, ValueError):
    """An audio file cannot be embedded: the message names it."""


logger = logging.getLogger(__name__)

#: Shortest audio accepted for an embedding (ECAPA's frame layers see about 0.3 s of context).
MIN_SECONDS = 0.5


#: A file whose loudest frames (the 95th percentile of 25 ms frame levels) stay below this holds no speech.
SPEECH_LEVEL_DBFS = -55.0


def speech_level(audio: np.ndarray) -> float:
    """The level in dBFS of the loudest 5 % of 25 ms frames (``-inf`` for digital silence).

    >>> round(speech_level(0.1 * np.ones(16000, dtype=np.float32)))
    -20
    """
    frame = int(0.025 * SAMPLE_RATE)
    frames = audio[: audio.size // frame * frame].reshape(-1, frame) if audio.size >= frame else audio[None]
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    loud = float(np.percentile(rms, 95))
    return 20 * math.log10(loud) if loud > 0 else -math.inf


def read_audio(path, min_seconds: float = 0.0) -> np.ndarray:
    """Mono float32 samples at 16 kHz, refused by name when they cannot be a speaker's voice.

    Other rates are resampled and channels averaged (one log line each). A missing file, digital
    silence, audio without speech energy (:data:`SPEECH_LEVEL_DBFS`), NaN or inf samples and audio
    shorter than ``min_seconds`` are an :class:`AudioError` naming the file.
    """
    import soundfile

    audio, rate = _opened(path, lambda name: soundfile.read(name, dtype="float32", always_2d=True))
    channels = audio.shape[1]
    audio = audio.mean(axis=1)
    if not np.isfinite(audio).all():
        raise AudioError(f"{path}: audio contains NaN or inf samples")
    if audio.size == 0:
        raise AudioError(f"{path}: empty audio")
    if rate != SAMPLE_RATE or channels > 1:
        logger.info(f"{path}: {rate} Hz, {channels} channel{'s' if channels > 1 else ''}: "
                    f"{'resampled to 16 kHz' if rate != SAMPLE_RATE else ''}"
                    f"{', ' if rate != SAMPLE_RATE and channels > 1 else ''}"
                    f"{'averaged to mono' if channels > 1 else ''}")
    if rate != SAMPLE_RATE:
        import torchaudio

        audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, SAMPLE_RATE).numpy()
    if audio.size < min_seconds * SAMPLE_RATE:
        raise AudioError(_too_short(path, audio.size, min_seconds))
    level = speech_level(audio)
    if level == -math.inf:
        raise AudioError(f"{path}: digital silence (every sample is 0): no voice to embed")
    if level < SPEECH_LEVEL_DBFS:
        raise AudioError(f"{path}: no speech energy: its loudest frames reach {level:.0f} dBFS, below the "
                         f"{SPEECH_LEVEL_DBFS:g} dBFS a voice reaches")
    return audio


def _opened(path, read):
    """``read(name)`` of soundfile's on the file, its failures an :class:`AudioError` naming the file."""
    if not Path(path).exists():
        raise AudioError(f"{path}: no such file")
    try:
        return read(str(path))
    except Exception as error:
        raise AudioError(f"{path}: cannot read audio ({str(error).splitlines()[0]})") from None


def _too_short(path, samples: int, min_seconds: float) -> str:
    return f"{path}: {samples / SAMPLE_RATE:.2f} s of audio, shorter than the {min_seconds} s minimum"


def _resampled_frames(path) -> int:
    import soundfile

    info = _opened(path, soundfile.info)
    if info.frames <= 0:
        raise AudioError(f"{path}: empty audio")
    if info.samplerate == SAMPLE_RATE:
        return info.frames
    return math.ceil(info.frames * SAMPLE_RATE / info.samplerate)


def _read_headers(paths: Sequence, min_seconds: float = 0.0) -> Tuple[Dict[int, int], List[Tuple[int, str]]]:
    """Every file's 16 kHz length from its header, and the (index, reason) of each that cannot be embedded."""
    frames, problems = {}, []
    for index, path in enumerate(paths):
        try:
            count = _resampled_frames(path)
        except AudioError as error:
            problems.append((index, str(error)))
            continue
        if count < min_seconds * SAMPLE_RATE:
            problems.append((index, _too_short(path, count, min_seconds)))
        else:
            frames[index] = count
    return frames, problems


def unembeddable(problems: Sequence[Tuple[int, str]], total: int) -> str:
    """The one line that reports every file :func:`check_headers` found unembeddable."""
    listing = "; ".join(reason for _, reason in problems[:3])
    return (f"{len(problems)} of {total} files cannot be embedded ({listing}{'; ...' if len(problems) > 3 else ''}): "
            "fix them, or skip them with --skip-unreadable")


def check_headers(paths: Sequence, min_seconds: float = 0.0) -> List[Tuple[int, str]]:
    """Every file's header read before any audio is: the (index, reason) of each that cannot be embedded."""
    return _read_headers(paths, min_seconds)[1]


def audio_seconds(paths: Sequence) -> np.ndarray:
    """Duration in seconds of each file, from its header (no decoding)."""
    return np.array([_resampled_frames(path) / SAMPLE_RATE for path in paths], dtype=np.float32)


def extractor_fingerprint(extractor: torch.nn.Module) -> str:
    """SHA-256 of an extractor's state (every parameter and buffer, BatchNorm statistics included).

    Two extractors share a fingerprint exactly when they compute the same embeddings from the same
    weights; a calibration stores it and refuses scores from any other extractor.
    """
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(extractor.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def trimmed_length(samples: int, quantum: int) -> int:
    """Length used for embedding: a multiple of ``quantum`` (whole file if shorter than one)."""
    if quantum <= 0 or samples < quantum:
        return samples
    return samples // quantum * quantum


def length_batches(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Indices grouped into batches of equal length, longest first."""
    groups: Dict[int, List[int]] = defaultdict(list)
    for index, length in enumerate(lengths):
        groups[length].append(index)
    batches = []
    for length in sorted(groups, reverse=True):
        members = groups[length]
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    return batches


#: Arithmetic of CPU embedding: ``fp32`` (the default: the eager extractor's embeddings to 1e-6) or
#: ``bf16`` (bfloat16 on CPUs that multiply it natively: AMX or AVX512-BF16; see :func:`compiled_for_inference`).
PRECISIONS = ("fp32", "bf16")

#: The least cosine between a ``bf16`` embedding and the float32 one: below it the backbone runs in float32.
BF16_MIN_COSINE = 0.9999


class PrecisionError(UserError, ValueError):
    """An embedding precision this machine or device cannot run: the message names it and why."""


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16), as oneDNN's convolutions use it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str, device="cpu") -> str:
    """``precision`` if this machine runs it, else :class:`PrecisionError` naming the value and the reason."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and torch.device(device).type != "cpu":
        raise PrecisionError(f"precision 'bf16' is the CPU's bfloat16 path; on {device} embed in fp32")
    if precision == "bf16" and not native_bfloat16():
        raise PrecisionError("precision 'bf16': this CPU has no bfloat16 arithmetic (AMX or AVX512-BF16), "
                             "where it would run slower than fp32; embed in fp32")
    return precision


class CompiledBackboneExtractor(torch.nn.Module):
    """An extractor whose backbone is prepared for CPU inference: the same embeddings, faster.

    The front-end stays eager (Kaldi filterbanks are computed one utterance at a time); the backbone,
    built by :func:`compiled_for_inference`, sees at most ``micro_batch`` utterances at a time: on a
    CPU a batch of 16 long utterances outgrows the caches and runs slower per utterance than one of 4.
    """

    def __init__(self, extractor, backbone, micro_batch: int = 4):
        super().__init__()
        self.frontend, self.backbone, self.embedding_dim = extractor.frontend, backbone, extractor.embedding_dim
        self.micro_batch = micro_batch

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        features = self.frontend(waveforms, lengths)
        embeddings = torch.cat([self.backbone(features[i:i + self.micro_batch], lengths[i:i + self.micro_batch])
                                for i in range(0, features.shape[0], self.micro_batch)])
        return embeddings.reshape(embeddings.shape[0], -1)


class Bfloat16Backbone(torch.nn.Module):
    """A copy of a backbone that computes in bfloat16 and returns float32 embeddings.

    Each BatchNorm is folded into the convolution before it while still in float32 (so a folded weight
    is rounded to bfloat16 once), then the weights are cast to bfloat16 and 4-D ones laid out
    channels-last, the layout in which oneDNN's AMX convolutions need no reorder between layers (without
    it a ResNet spends a third of its time copying activations). Features are rounded to bfloat16 on the
    way in; relative lengths stay float32 (a bfloat16 0.73 would move a mask by frames).
    """

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        import copy

        try:
            from torch.fx.experimental.optimization import fuse

            backbone = fuse(backbone.eval())  # a folded copy
        except Exception:  # not symbolically traceable: the BatchNorms stay, an affine map in bfloat16
            backbone = copy.deepcopy(backbone).eval()
        self.backbone = backbone.to(torch.bfloat16).to(memory_format=torch.channels_last)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # where a float32 mask promotes, back to bfloat16
            return self.backbone(features.to(torch.bfloat16), lengths).float()


@torch.no_grad()
def compiled_for_inference(extractor, frames: int = 300, precision: str = "fp32"):
    """The extractor with its backbone prepared for CPU inference, checked against the eager backbone.

    ``fp32``: traced, frozen and optimised by TorchScript (each BatchNorm folded into its convolution,
    activations in oneDNN's layouts): about 1.2x on ResNet34, at 1e-6 of the eager embeddings, and
    85 % of a 2-core CPU's float32 matrix peak, so no exact float32 loop can be much faster
    (docs/pretrained.md). ``bf16`` (:class:`Bfloat16Backbone`): bfloat16 weights and activations
    with float32 accumulation, on CPUs with AMX 1.7-3.4x faster than float32 on the public architectures
    (ResNet34: 2.5x), the embeddings at cosine >= :data:`BF16_MIN_COSINE` of the float32 ones (1 - 1e-5
    to 1 - 6e-5 on them; a trained extractor's scores move by up to about 5e-3, docs/pretrained.md).

    Checked on an input of another length than the traced one, with unequal relative lengths in
    ``bf16``: a backbone that fails, or changes an embedding beyond these bounds, runs eagerly in
    float32 (with a log line when ``bf16`` was asked for).
    """
    import warnings

    check_precision(precision)
    extractor.eval()
    n_mels = extractor.frontend.n_mels
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, frames, n_mels, generator=generator)
    check = torch.randn(3, frames // 2 + 37, n_mels, generator=generator)
    if precision == "bf16":
        lengths = torch.tensor([1.0, 0.83, 0.61])
        try:
            backbone = Bfloat16Backbone(extractor.backbone)
            got = backbone(check, lengths).reshape(3, -1)
            reference = extractor.backbone(check, lengths).reshape(3, -1)
            cosine = float(torch.nn.functional.cosine_similarity(got, reference).min())
        except Exception as error:  # any failure falls back to float32, said in the log
            logger.warning("bf16 embedding: the backbone does not run in bfloat16 (%s); embedding in fp32", error)
        else:
            if cosine >= BF16_MIN_COSINE:
                return CompiledBackboneExtractor(extractor, backbone)
            logger.warning("bf16 embedding: cosine %.6f to the float32 embeddings, under %g; embedding in fp32",
                           cosine, BF16_MIN_COSINE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python values; the check below decides
            traced = torch.jit.trace(extractor.backbone, (example, torch.ones(2)), check_trace=False)
            backbone = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            got = backbone(check, torch.ones(3)).reshape(3, -1)
        expected = extractor.backbone(check, torch.ones(3)).reshape(3, -1)
    except Exception:  # any model TorchScript cannot trace runs eagerly, unchanged
        return extractor
    if not bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))):
        return extractor
    return CompiledBackboneExtractor(extractor, backbone)


@torch.no_grad()
def embed_waveform(extractor, audio: np.ndarray, quantum_seconds: float = 0.1, device="cpu") -> np.ndarray:
    """Embedding of one utterance (the one-by-one path)."""
    samples = trimmed_length(audio.size, int(quantum_seconds * SAMPLE_RATE))
    waveform = torch.from_numpy(np.ascontiguousarray(audio[:samples]))[None].to(device)
    return extractor(waveform, torch.ones(1, device=device)).cpu().numpy()[0]


@torch.no_grad()
def embed_files(extractor, paths: Sequence, batch_size: int = 16, quantum_seconds: float = 0.1, device="cpu",
                progress: bool = True, min_seconds: float = 0.0, max_seconds: Optional[float] = None,
                skipped: Optional[list] = None) -> np.ndarray:
    """Embeddings ``(N, D)`` of whole files, batched by trimmed length, in the order of ``paths``.

    Every file's header is read before the first batch: files that are missing, unreadable, empty or
    too short are reported all at once in one :class:`AudioError`, not one at a time after hours of
    work. With a ``skipped`` list, they (and files refused when decoded: silence, no speech energy)
    are appended to it as ``(index, reason)`` instead, and the rows returned are the other files'.
    ``max_seconds``: of each file's first ``max_seconds`` only (short crops, batched as well).
    """
    from tqdm import tqdm

    frames, problems = _read_headers(paths, min_seconds)
    if problems and skipped is None:
        raise AudioError(unembeddable(problems, len(paths)))
    if skipped is not None:
        skipped.extend(problems)
    quantum = int(quantum_seconds * SAMPLE_RATE)
    longest = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
    kept = sorted(frames)
    lengths = {i: trimmed_length(min(frames[i], longest or math.inf), quantum) for i in kept}
    extractor.eval()
    output = {}
    for batch in tqdm(length_batches([lengths[i] for i in kept], batch_size), desc="embedding", unit="batch",
                      disable=not progress):
        indices, audio = [], []
        for position in batch:
            index = kept[position]
            try:
                audio.append(read_audio(paths[index], min_seconds)[:lengths[index]])
                indices.append(index)
            except AudioError as error:
                if skipped is None:
                    raise
                skipped.append((index, str(error)))
        if not audio:
            continue
        waveforms = torch.from_numpy(np.stack(audio)).to(device)
        embeddings = extractor(waveforms, torch.ones(len(audio), device=device)).cpu().numpy()
        output.update(zip(indices, embeddings))
    if not output:
        raise AudioError("no files to embed" if not paths else f"none of the {len(paths)} files could be embedded")
    return np.stack([output[i] for i in sorted(output)]).astype(np.float32)


class Verification(NamedTuple):
    """The outcome of :meth:`SpeakerEmbedder.verify`.

    ``score`` is the cosine (AS-norm when the folder's calibration maps AS-norm
    scores); ``llr`` the calibrated natural-log likelihood ratio, or ``None``
    without a calibration; ``same`` the decision (``None`` with neither a
    calibration nor a threshold); ``threshold`` what was compared: the Bayes
    LLR threshold at the prior, or the stored score threshold.
    """

    score: float
    same: Optional[bool]
    llr: Optional[float] = None
    threshold: Optional[float] = None


class Identification(NamedTuple):
    """One candidate of :meth:`SpeakerEmbedder.identify`: an enrolled speaker, its score and calibrated LLR."""

    speaker: str
    score: float
    llr: Optional[float] = None


class SpeakerEmbedder:
    """A trained extractor with its training-mean embedding and verification threshold.

    Scores are cosines in [-1, 1] between embeddings after subtracting the
    training mean (when stored); ``verify`` accepts a pair when the score is
    ``>= threshold``.  The threshold is the EER threshold on the recipe's
    development pairs (the calibration speakers', else the training speakers'
    validation files; ``calibration`` says which); with an LLR calibration in
    the folder ``verify`` decides on the LLR instead.

    On a CPU the backbone runs prepared by :func:`compiled_for_inference`; ``precision="bf16"`` runs it
    in bfloat16 where the CPU multiplies it natively (AMX: 2.5x faster than float32 on ResNet34,
    embeddings at cosine >= 0.9999 of the float32 ones), the default ``fp32`` in float32.

    Examples
    --------
    >>> embedder = SpeakerEmbedder.from_pretrained("results/demo/ecapa_small_qmargin/1986")  # doctest: +SKIP
    >>> result = embedder.verify("a.wav", "b.wav")  # doctest: +SKIP
    >>> result.score, result.llr, result.same  # doctest: +SKIP
    """

    def __init__(self, extractor, mean=None, threshold: Optional[float] = None, calibration: str = "",
                 device="cpu", min_seconds: float = MIN_SECONDS, quantum_seconds: float = 0.1,
                 llr_calibration=None, cohort=None, precision: str = "fp32"):
        from spkver.models import EmbeddingExtractor

        if precision == "bf16" and not isinstance(extractor, EmbeddingExtractor):
            raise PrecisionError(f"precision 'bf16' is for filterbank extractors (spkver's, WeSpeaker's, "
                                 f"SpeechBrain's); this {type(extractor).__name__} embeds in fp32")
        self.device = torch.device(device)
        #: ``fp32`` or ``bf16`` (:data:`PRECISIONS`): the arithmetic of CPU embedding.
        self.precision = check_precision(precision, device)
        self.extractor = extractor.to(self.device).eval()
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self.threshold = threshold
        self.calibration = calibration
        self.min_seconds = min_seconds
        self.quantum_seconds = quantum_seconds
        #: A :class:`spkver.calibration.Calibration` (the folder's ``calibration.json``), checked against
        #: this extractor's fingerprint; and the AS-norm cohort (``cohort.npz``) its scores may need.
        self.llr_calibration = llr_calibration
        self.cohort = cohort
        #: Enrolled speakers (:meth:`enroll`): name -> (embedding, seconds of audio).
        self.enrolled: Dict[str, tuple] = {}
        self._compiled = None
        if llr_calibration is not None:
            llr_calibration.check_fingerprint(extractor_fingerprint(extractor), "this extractor")
            if llr_calibration.trained_on.get("scores") == "as-norm" and cohort is None:
                raise ModelFolderError("the calibration maps AS-norm scores, and no cohort was given (cohort.npz)")

    @classmethod
    def from_pretrained(cls, folder, device="cpu", precision: str = "fp32") -> "SpeakerEmbedder":
        """Load from any model folder spkver reads (:func:`spkver.models.load_model`).

        spkver's experiment folders (the averaged extractor when there is one, else the latest
        checkpoint) and exported folders bring their threshold, training mean, calibration and cohort;
        SpeechBrain hub folders bring the extractor and their global embedding mean; WeSpeaker folders
        the extractor.
        """
        from spkver.models import load_model

        return cls.from_model(load_model(folder), device, precision)

    @classmethod
    def from_model(cls, model, device="cpu", precision: str = "fp32") -> "SpeakerEmbedder":
        """From a folder already read (a :class:`spkver.models.StartingModel`), with the calibration and cohort
        files beside it."""
        folder, card, extractor, mean = Path(model.folder), model.card, model.extractor, model.mean
        llr_calibration = cohort = None
        if (folder / "calibration.json").exists():
            from spkver.calibration import load_calibration

            llr_calibration = load_calibration(folder / "calibration.json")
        if (folder / "cohort.npz").exists():
            from spkver.scoring import load_embeddings

            cohort = load_embeddings(folder / "cohort.npz")
        return cls(extractor, mean=mean, threshold=card.get("threshold"), calibration=card.get("calibration", ""),
                   device=device, llr_calibration=llr_calibration, cohort=cohort, precision=precision)

    @torch.no_grad()
    def embed_batch(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embeddings ``(B, D)`` of 16 kHz waveforms ``(B, T)`` with relative lengths ``(B,)``.

        Always by the eager float32 extractor, the reference the prepared CPU paths are checked against;
        :meth:`embed_file` and :meth:`embed_files` run the prepared backbone at :attr:`precision`.
        """
        if waveforms.dim() == 1:
            waveforms = waveforms[None]
        if not bool(torch.isfinite(waveforms).all()):
            raise AudioError("waveforms contain NaN or inf samples")
        lengths = torch.ones(waveforms.shape[0]) if lengths is None else lengths
        return self.extractor(waveforms.float().to(self.device), lengths.to(self.device)).cpu()

    def _fast_extractor(self):
        """On a CPU, the extractor with a compiled backbone (:func:`compiled_for_inference`), built once."""
        from spkver.models import EmbeddingExtractor

        if self.device.type != "cpu" or not isinstance(self.extractor, EmbeddingExtractor):
            return self.extractor
        if self._compiled is None:
            self._compiled = compiled_for_inference(self.extractor, precision=self.precision)
        return self._compiled

    def embed_file(self, path) -> np.ndarray:
        """Embedding ``(D,)`` of one whole file."""
        return embed_waveform(self._fast_extractor(), read_audio(path, self.min_seconds), self.quantum_seconds,
                              self.device)

    def embed_files(self, paths: Sequence, batch_size: int = 16, progress: bool = True,
                    skipped: Optional[list] = None) -> np.ndarray:
        """Embeddings ``(N, D)`` of whole files, batched by length, with a progress bar (``skipped``: see
        :func:`embed_files`)."""
        return embed_files(self._fast_extractor(), paths, batch_size, self.quantum_seconds, self.device, progress,
                           self.min_seconds, skipped=skipped)

    def score_embeddings(self, a: np.ndarray, b: np.ndarray) -> float:
        """Cosine of two embeddings after subtracting the training mean."""
        if self.mean is not None:
            a, b = a - self.mean, b - self.mean
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    def enroll(self, name: str, files: Sequence) -> None:
        r"""Enrol a speaker from several files: the mean of their normalised embeddings (as ``spkver score --enroll``).

        ``verify(name, file)`` then scores against it, and ``identify`` ranks it.
        """
        from spkver.scoring import EmbeddingStore, with_enrolment

        if not files:
            raise AudioError(f"enrol {name!r}: no files")
        keys = [f"file{index}" for index in range(len(files))]
        store = EmbeddingStore(keys, self.embed_files(files, progress=False), durations=audio_seconds(files))
        enrolled = with_enrolment(store, {name: keys}, self.mean, source=f"enrolment of {name!r}")
        self.enrolled[name] = (enrolled.embeddings[-1], float(enrolled.durations[-1]))

    def _entry(self, name_or_path):
        """(embedding, seconds) of an enrolled speaker, or of a file."""
        if isinstance(name_or_path, str) and name_or_path in self.enrolled:
            return self.enrolled[name_or_path]
        return self.embed_file(name_or_path), float(audio_seconds([name_or_path])[0])

    def _score(self, entries, enroll_rows, test_rows):
        """Scores (and LLRs with a calibration) of trials between stored entries, as the folder's evaluation scores."""
        from spkver.scoring import EmbeddingStore, Trials, as_norm, cosine_scores

        ids = [f"entry{index}" for index in range(len(entries))]
        store = EmbeddingStore(ids, np.stack([vector for vector, _ in entries]),
                               durations=np.array([seconds for _, seconds in entries]))
        trials = Trials([ids[i] for i in enroll_rows], [ids[i] for i in test_rows], None)
        calibration = self.llr_calibration
        if calibration is not None and calibration.trained_on.get("scores") == "as-norm":
            scored = as_norm(store, trials, self.cohort, calibration.trained_on.get("asnorm_topk", 300), mean=self.mean)
        else:
            scored = cosine_scores(store, trials, mean=self.mean)
        llrs = None if calibration is None else calibration.scored_llrs(store, scored, self.cohort, self.mean)
        return scored.scores, llrs

    def _warn_outside_calibration(self, scores, seconds) -> None:
        """One log line when trials fall outside what the folder's calibration was fitted on."""
        if self.llr_calibration is not None:
            warning = self.llr_calibration.range_warning(np.atleast_1d(scores), np.asarray(seconds))
            if warning:
                logger.warning(warning)

    def verify(self, enrolled_or_path, path, prior: Optional[float] = None) -> Verification:
        r"""Score a file against an enrolled speaker (:meth:`enroll`) or another file, and decide.

        With a calibration the decision is Bayes's: accept when the LLR is at
        least :math:`\log((1-p)/p)` for the target prior ``p`` (by default the
        calibration's); without one, when the score reaches the stored threshold.
        """
        entries = [self._entry(enrolled_or_path), self._entry(path)]
        scores, llrs = self._score(entries, [0], [1])
        self._warn_outside_calibration(scores, [[entries[0][1], entries[1][1]]])
        score = float(scores[0])
        if llrs is None:
            return Verification(score, None if self.threshold is None else score >= self.threshold, None,
                                self.threshold)
        from spkver import metrics

        threshold = metrics.bayes_threshold(self.llr_calibration.prior if prior is None else prior)
        return Verification(score, float(llrs[0]) >= threshold, float(llrs[0]), threshold)

    def identify(self, path, top_k: int = 5) -> List[Identification]:
        """The ``top_k`` enrolled speakers closest to a file, best first, with calibrated LLRs when the folder has
        a calibration (an LLR for each speaker on its own: they are not posteriors over the enrolled set)."""
        if not self.enrolled:
            raise AudioError("identify: no speaker is enrolled (embedder.enroll(name, files) first)")
        names = list(self.enrolled)
        entries = [self.enrolled[name] for name in names] + [self._entry(path)]
        scores, llrs = self._score(entries, list(range(len(names))), [len(names)] * len(names))
        order = np.argsort(-scores, kind="stable")[:top_k]
        self._warn_outside_calibration(scores[order[:1]], [[entries[order[0]][1], entries[-1][1]]])
        return [Identification(names[i], float(scores[i]), None if llrs is None else float(llrs[i])) for i in order]
