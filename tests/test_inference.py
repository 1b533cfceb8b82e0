"""Batched embedding extraction agrees with one-by-one extraction."""
import numpy as np
import pytest
import soundfile
import torch

from spkver.inference import AudioError, embed_files, embed_waveform, length_batches, read_audio, trimmed_length
from spkver.models import ecapa_tdnn, resnet34


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    paths = []
    for i, seconds in enumerate([1.0, 1.04, 1.55, 1.0, 2.01, 1.58, 0.05]):
        path = folder / f"{i}.wav"
        soundfile.write(path, (0.1 * rng.normal(size=int(seconds * 16000))).astype(np.float32), 16000)
        paths.append(path)
    return paths


@pytest.mark.parametrize("make", [lambda: ecapa_tdnn(channels=32, embedding_dim=16),
                                  lambda: resnet34(embedding_dim=16, base_channels=8)])
def test_batched_embeddings_equal_one_by_one_embeddings(files, make):
    torch.manual_seed(0)
    extractor = make().eval()
    batched = embed_files(extractor, files, batch_size=4, progress=False)
    for path, row in zip(files, batched):
        alone = embed_waveform(extractor, read_audio(path))
        # Embeddings are used L2-normalised; compare them at that scale.
        np.testing.assert_allclose(alone / np.linalg.norm(alone), row / np.linalg.norm(row), atol=1e-4, rtol=0)


def test_utterances_are_grouped_by_equal_trimmed_length():
    lengths = [trimmed_length(n, 1600) for n in (16000, 16640, 24800, 16000, 800)]
    assert lengths == [16000, 16000, 24000, 16000, 800]
    assert length_batches(lengths, batch_size=2) == [[2], [0, 1], [3], [4]]


def test_unreadable_and_wrong_rate_audio_are_named(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    with pytest.raises(AudioError, match="bad.wav: cannot read audio"):
        read_audio(tmp_path / "bad.wav")
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav: empty audio"):
        read_audio(tmp_path / "empty.wav")
    soundfile.write(tmp_path / "short.wav", np.zeros(1600, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match=r"short.wav: 0.10 s of audio, shorter than the 0.5 s minimum"):
        read_audio(tmp_path / "short.wav", min_seconds=0.5)
    soundfile.write(tmp_path / "nan.wav", np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav: audio contains NaN"):
        read_audio(tmp_path / "nan.wav")
    with pytest.raises(AudioError, match="nope.wav: no such file"):
        read_audio(tmp_path / "nope.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(AudioError, match="junk.wav: cannot read audio"):
        read_audio(tmp_path / "junk.wav")


def test_silence_and_audio_without_speech_energy_are_refused_by_name(tmp_path):
    soundfile.write(tmp_path / "silence.wav", np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match=r"silence.wav: digital silence"):
        read_audio(tmp_path / "silence.wav")
    hiss = 3e-4 * np.random.default_rng(0).standard_normal(16000)  # about -70 dBFS
    soundfile.write(tmp_path / "hiss.wav", hiss.astype(np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"hiss.wav: no speech energy: its loudest frames reach -[67]\d dBFS"):
        read_audio(tmp_path / "hiss.wav")
    quiet_voice = 0.01 * np.sin(2 * np.pi * 150 * np.arange(16000) / 16000)  # -43 dBFS: quiet, but a voice
    soundfile.write(tmp_path / "quiet.wav", quiet_voice.astype(np.float32), 16000, subtype="FLOAT")
    assert read_audio(tmp_path / "quiet.wav").shape == (16000,)


def test_other_rates_and_stereo_are_resampled_and_downmixed_with_one_log_line(tmp_path, caplog, recwarn):
    t = np.arange(8000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1).astype(np.float32)
    soundfile.write(tmp_path / "8k.wav", stereo, 8000)
    with caplog.at_level("INFO", logger="spkver.inference"):
        audio = read_audio(tmp_path / "8k.wav")
    assert audio.shape == (16000,)
    assert [record.getMessage() for record in caplog.records] == [
        f"{tmp_path / '8k.wav'}: 8000 Hz, 2 channels: resampled to 16 kHz, averaged to mono"]
    assert not recwarn.list  # not a Python warning with a source line
