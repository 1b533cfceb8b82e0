"""Reusing trained extractors: SpeakerEmbedder, spkver embed/verify/export, SpeechBrain and ONNX."""
import json
import math
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from spkver import cli
from spkver.inference import AudioError, SpeakerEmbedder, read_audio
from spkver.scoring import load_embeddings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_corpus):
    """A tiny model trained by the recipe on the tiny synthetic corpus."""
    corpus = tiny_corpus
    output = tmp_path_factory.mktemp("pretrained") / "exp"
    argv = [str(ROOT / "recipes/voxceleb/train.py"), str(ROOT / "hparams/ecapa512_qmargin.yaml"),
            f"--data_folder={corpus}", f"--trial_lists=[{corpus}/trials.txt]", f"--output_folder={output}",
            "--number_of_epochs=2", "--channels=16", "--embedding_dim=16", "--batch_size=8", "--num_workers=0",
            "--lr_warmup_epochs=1", "--crop_seconds=1.0", "--mean_utterances=10", "--valid_fraction=0.3",
            "--calibration_min_nontargets=10"]  # a tiny corpus has a few dozen development pairs
    saved = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    finally:
        sys.argv = saved
    return output, corpus


def _wavs(corpus):
    return sorted((corpus / "wav").rglob("*.wav"))


def test_experiment_folder_holds_a_model_card_with_a_calibrated_threshold(experiment):
    output, _ = experiment
    card = json.loads((output / "spkver.json").read_text())
    assert card["extractor"]["architecture"] == "ecapa_tdnn" and card["extractor"]["channels"] == 16
    assert card["threshold"] is not None and "EER threshold" in card["calibration"]


def test_embedder_embeds_files_batches_and_verifies(experiment):
    output, corpus = experiment
    embedder = SpeakerEmbedder.from_pretrained(output)
    files = _wavs(corpus)[:5]
    one = embedder.embed_file(files[0])
    many = embedder.embed_files(files, batch_size=3, progress=False)
    assert one.shape == (16,) and many.shape == (5, 16)
    np.testing.assert_allclose(one / np.linalg.norm(one), many[0] / np.linalg.norm(many[0]), atol=1e-4)
    batch = embedder.embed_batch(torch.from_numpy(read_audio(files[0]))[None])
    np.testing.assert_allclose(batch[0].numpy(), embedder.extractor(torch.from_numpy(read_audio(files[0]))[None],
                                                                    torch.ones(1)).detach()[0].numpy(), atol=1e-5)
    result = embedder.verify(files[0], files[0])
    assert result.llr is not None and result.same == (result.llr >= result.threshold)
    assert result.threshold == pytest.approx(math.log(99.0))  # Bayes at the calibration's prior, 0.01
    assert embedder.verify(files[0], files[0], prior=0.5).threshold == 0.0
    uncalibrated = SpeakerEmbedder(embedder.extractor, mean=embedder.mean, threshold=embedder.threshold)
    score, same, llr, _ = uncalibrated.verify(files[0], files[0])
    assert score == pytest.approx(1.0, abs=1e-5) and same is True and llr is None


def test_enrolled_speakers_are_verified_and_identified_by_the_mean_of_normalised_embeddings(experiment):
    output, corpus = experiment
    embedder = SpeakerEmbedder.from_pretrained(output)
    by_speaker = {}
    for path in _wavs(corpus):
        by_speaker.setdefault(path.parent.parent.name, []).append(path)
    speakers = sorted(by_speaker)[:3]
    for speaker in speakers:
        embedder.enroll(speaker, by_speaker[speaker][:3])
    probe = by_speaker[speakers[1]][3]

    def unit(vector):
        centred = vector - embedder.mean
        return centred / np.linalg.norm(centred)

    models = {s: np.mean([unit(embedder.embed_file(f)) for f in by_speaker[s][:3]], axis=0) for s in speakers}
    independent = {s: float(models[s] @ unit(embedder.embed_file(probe)) / np.linalg.norm(models[s])) for s in speakers}
    result = embedder.verify(speakers[1], probe)
    assert result.llr is not None  # AS-norm + LLR: the folder's calibration applies to enrolled speakers too
    plain = SpeakerEmbedder(embedder.extractor, mean=embedder.mean, threshold=embedder.threshold)
    plain.enrolled = embedder.enrolled
    assert plain.verify(speakers[1], probe).score == pytest.approx(independent[speakers[1]], abs=1e-5)
    ranked = plain.identify(probe, top_k=2)
    assert [r.speaker for r in ranked] == sorted(speakers, key=lambda s: -independent[s])[:2]
    assert all(r.llr is None for r in ranked)
    calibrated = embedder.identify(probe, top_k=3)
    assert len(calibrated) == 3 and all(r.llr is not None for r in calibrated)
    assert [r.score for r in calibrated] == sorted((r.score for r in calibrated), reverse=True)


def test_verify_warns_in_one_line_when_the_audio_is_unlike_the_calibrations(experiment, tmp_path, caplog):
    output, corpus = experiment
    embedder = SpeakerEmbedder.from_pretrained(output)
    low, high = embedder.llr_calibration.trained_on["ranges"]["seconds"]
    files = _wavs(corpus)
    long = np.concatenate([read_audio(path) for path in files[:8]])  # far longer than any calibration file
    assert long.size / 16000 > high
    soundfile.write(tmp_path / "long.wav", long, 16000)
    with caplog.at_level("WARNING", logger="spkver.inference"):
        embedder.verify(files[0], tmp_path / "long.wav")
    (warning,) = [record.getMessage() for record in caplog.records]
    assert f"audio of {low:.1f} to {high:.1f} s" in warning and "calibrate on your own data with `spkver calibrate`" \
        in warning


def test_embed_reads_every_header_first_and_reports_all_bad_files_at_once_or_skips_them(experiment, tmp_path,
                                                                                       capsys):
    output, corpus = experiment
    good = _wavs(corpus)[:3]
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF0000WAVEjunk")
    soundfile.write(tmp_path / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    listed = [str(path) for path in good] + [str(tmp_path / "gone.wav"), str(tmp_path / "corrupt.wav"),
                                               str(tmp_path / "silent.wav")]
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    store = tmp_path / "emb.npz"
    assert cli.main(["embed", "--model", str(output), "--list", str(tmp_path / "list.txt"), "--out", str(store)]) == 2
    error = capsys.readouterr().err
    assert "2 of 6 files cannot be embedded" in error and "gone.wav: no such file" in error
    assert "corrupt.wav: cannot read audio" in error and "--skip-unreadable" in error
    assert not store.with_name("emb.npz.parts").exists()  # refused before the first batch
    assert cli.main(["embed", "--model", str(output), "--list", str(tmp_path / "list.txt"), "--out", str(store),
                     "--skip-unreadable"]) == 0
    assert load_embeddings(store).ids == [str(path) for path in good]
    report = (tmp_path / "emb.skipped.tsv").read_text()
    for name, reason in (("gone.wav", "no such file"), ("corrupt.wav", "cannot read"), ("silent.wav", "silence")):
        assert any(name in line and reason in line for line in report.splitlines()), report
    assert "3 files skipped, listed with the reason in" in capsys.readouterr().err


def test_an_unfinished_checkpoint_save_is_not_loaded(experiment, tmp_path):
    """A run killed while saving leaves a newer folder without CKPT.yaml: the embedder ignores it."""
    output, corpus = experiment
    copy = tmp_path / "exp"
    shutil.copytree(output, copy)
    unfinished = copy / "save" / "CKPT+9999-12-31+23-59-59+00"
    unfinished.mkdir()
    (unfinished / "CKPT.yaml.partial").write_text("end-of-epoch: false\n")
    (unfinished / "embedding_model.ckpt").write_bytes(b"truncated")
    wav = _wavs(corpus)[0]
    np.testing.assert_array_equal(SpeakerEmbedder.from_pretrained(copy).embed_file(wav),
                                  SpeakerEmbedder.from_pretrained(output).embed_file(wav))


def test_bad_audio_is_an_error_naming_the_file(experiment, tmp_path):
    embedder = SpeakerEmbedder.from_pretrained(experiment[0])
    (tmp_path / "x.wav").write_bytes(b"junk")
    with pytest.raises(AudioError, match="x.wav"):
        embedder.embed_file(tmp_path / "x.wav")
    with pytest.raises(AudioError, match="NaN"):
        embedder.embed_batch(torch.full((1, 16000), float("nan")))
    with pytest.raises(FileNotFoundError, match="spkver.json"):
        SpeakerEmbedder.from_pretrained(tmp_path)


def test_embed_cli_writes_a_store_that_score_reads_and_resumes_from_finished_parts(experiment, tmp_path,
                                                                                   monkeypatch, capsys):
    output, corpus = experiment
    monkeypatch.setattr("spkver.cli.extractors.EMBED_PART", 10)
    out = tmp_path / "emb.npz"
    # A finished first part from an interrupted run is reused as it is.
    parts = tmp_path / "emb.npz.parts"
    parts.mkdir()
    ids = [p.relative_to(corpus / "wav").as_posix() for p in _wavs(corpus)]
    from spkver.inference import audio_seconds, extractor_fingerprint
    from spkver.scoring import save_embeddings

    fingerprint = extractor_fingerprint(SpeakerEmbedder.from_pretrained(output).extractor)
    durations = audio_seconds(_wavs(corpus)[:10])
    save_embeddings(parts / "part-00000.npz", ids[:10], np.full((10, 16), 7.0), durations, "another model")
    assert cli.main(["embed", "--model", str(output), "--dir", str(corpus / "wav"), "--out", str(out)]) == 2
    assert "another model" in capsys.readouterr().err  # a part of another extractor is never mixed in
    for part in parts.iterdir():
        part.unlink()
    save_embeddings(parts / "part-00000.npz", ids[:10], np.full((10, 16), 7.0), durations, fingerprint)
    assert cli.main(["embed", "--model", str(output), "--dir", str(corpus / "wav"), "--out", str(out)]) == 0
    store = load_embeddings(out)
    assert store.ids == ids and np.all(store.embeddings[:10] == 7.0) and not np.all(store.embeddings[10:] == 7.0)
    assert store.fingerprint == fingerprint and np.allclose(store.durations, audio_seconds(_wavs(corpus)))
    assert not parts.exists()
    (tmp_path / "list.txt").write_text("\n".join(str(p) for p in _wavs(corpus)[:3]) + "\n")
    assert cli.main(["embed", "--model", str(output), "--list", str(tmp_path / "list.txt"),
                     "--out", str(tmp_path / "l.npz")]) == 0
    assert len(load_embeddings(tmp_path / "l.npz").ids) == 3


def test_verify_cli_prints_score_and_decision(experiment, capsys):
    output, corpus = experiment
    files = _wavs(corpus)
    assert cli.main(["verify", "--model", str(output), str(files[0]), str(files[1])]) == 0
    printed = capsys.readouterr().out
    assert "score" in printed and "LLR" in printed and "Bayes threshold" in printed
    assert cli.main(["verify", "--model", str(output), str(files[0]), "missing.wav"]) == 2
    assert "missing.wav" in capsys.readouterr().err


def test_exported_folder_works_with_speechbrain_and_onnx(experiment, tmp_path):
    from speechbrain.inference.speaker import EncoderClassifier, SpeakerRecognition

    output, corpus = experiment
    pretrained = tmp_path / "pretrained"
    assert cli.main(["export", "--model", str(output), "--out", str(pretrained), "--onnx"]) == 0
    ours = SpeakerEmbedder.from_pretrained(pretrained)
    files = _wavs(corpus)[:2]
    classifier = EncoderClassifier.from_hparams(source=str(pretrained), savedir=str(tmp_path / "sb"))
    for path in files:
        audio = torch.from_numpy(read_audio(path))[None]
        theirs = classifier.encode_batch(audio).reshape(-1).numpy()
        mine = ours.embed_batch(audio)[0].numpy()
        np.testing.assert_allclose(theirs / np.linalg.norm(theirs), mine / np.linalg.norm(mine), atol=1e-4)
    verification = SpeakerRecognition.from_hparams(source=str(pretrained), savedir=str(tmp_path / "sb2"))
    score, _ = verification.verify_files(str(files[0]), str(files[1]))
    a, b = (ours.embed_batch(torch.from_numpy(read_audio(p))[None])[0].numpy() for p in files)
    assert float(score) == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-3)

    import onnxruntime

    session = onnxruntime.InferenceSession(str(pretrained / "embedding_model.onnx"))
    extractor = ours.extractor
    for seconds in (0.7, 1.3, 3.1):
        waveform = torch.randn(2, int(16000 * seconds)) * 0.1
        features = extractor.frontend(waveform, torch.ones(2))
        expected = extractor.backbone(features).reshape(2, -1).detach().numpy()
        (got,) = session.run(None, {"features": features.detach().numpy()})
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
