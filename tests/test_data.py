"""Specification of data preparation, the synthetic corpus and augmentation."""
import csv
import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile
import torch

from spkver.cli import main
from spkver.data.augment import BatchBabble, ColouredNoise, SimulatedReverb, build_augmenter, folder_to_csv
from spkver.data.synth import SAMPLE_RATE, synthesize_corpus
from spkver.data.voxceleb import PreparationError, prepare_voxceleb
from spkver.scoring import read_trials


def test_synth_writes_the_voxceleb1_layout_and_a_cross_session_trial_list(tiny_corpus):
    files = sorted((tiny_corpus / "wav").glob("*/*/*.wav"))
    assert len(files) == 40
    speaker, video, name = files[0].relative_to(tiny_corpus / "wav").parts
    assert speaker.startswith("id1") and len(speaker) == 7 and len(video) == 11 and len(name) == 9
    info = soundfile.info(str(files[0]))
    assert info.samplerate == SAMPLE_RATE and 1.2 <= info.duration <= 1.6
    trials = read_trials(tiny_corpus / "trials.txt")
    assert 0.4 <= trials.labels.mean() <= 0.6
    for label, a, b in zip(trials.labels, trials.enroll, trials.test):
        assert (a.split("/")[0] == b.split("/")[0]) == bool(label)
        if label:
            assert a.split("/")[1] != b.split("/")[1]  # targets come from different sessions
    assert {a.split("/")[0] for a in trials.enroll} == {f"id{10001 + s}" for s in range(7, 10)}


def test_synth_is_deterministic_given_the_seed(tmp_path):
    for name in ("a", "b"):
        synthesize_corpus(tmp_path / name, speakers=3, utterances=2, seed=7, min_seconds=1, max_seconds=1.2,
                          test_speakers=2, progress=False, workers=1)
    first = sorted((tmp_path / "a" / "wav").rglob("*.wav"))
    second = sorted((tmp_path / "b" / "wav").rglob("*.wav"))
    assert [p.relative_to(tmp_path / "a") for p in first] == [p.relative_to(tmp_path / "b") for p in second]
    for x, y in zip(first, second):
        assert x.read_bytes() == y.read_bytes()
    assert (tmp_path / "a" / "trials.txt").read_text() == (tmp_path / "b" / "trials.txt").read_text()


def test_synthetic_speakers_are_separable_by_a_simple_baseline_but_not_trivially(tmp_path):
    """MFCC-mean cosine scoring: clearly better than chance, clearly worse than perfect."""
    import torchaudio

    from spkver import metrics

    synthesize_corpus(tmp_path, speakers=20, utterances=8, seed=11, min_seconds=2, max_seconds=3,
                      test_speakers=20, trials_per_utterance=6, progress=False)
    trials = read_trials(tmp_path / "trials.txt")
    features = {}
    for utterance in set(trials.enroll) | set(trials.test):
        audio, _ = soundfile.read(str(tmp_path / "wav" / utterance), dtype="float32")
        mfcc = torchaudio.compliance.kaldi.mfcc(torch.from_numpy(audio)[None] * 32768, num_ceps=20)
        features[utterance] = torch.cat([mfcc.mean(0), mfcc.std(0)]).numpy()
    matrix = np.stack(list(features.values()))
    centre, spread = matrix.mean(0), matrix.std(0)
    unit = {u: (f - centre) / spread / np.linalg.norm((f - centre) / spread) for u, f in features.items()}
    scores = np.array([unit[a] @ unit[b] for a, b in zip(trials.enroll, trials.test)])
    eer = metrics.eer(scores, trials.labels)[0]
    assert 0.03 < eer < 0.4


def test_synth_can_list_every_cross_session_pair_of_the_test_speakers(tmp_path):
    synthesize_corpus(tmp_path, speakers=4, utterances=5, seed=3, min_seconds=0.5, max_seconds=0.6,
                      test_speakers=3, trials_per_utterance=None, progress=False, workers=1)
    trials = read_trials(tmp_path / "trials.txt")
    utterances = sorted({str(p.relative_to(tmp_path / "wav")) for p in (tmp_path / "wav").rglob("*.wav")
                         if p.parts[-3] in {"id10002", "id10003", "id10004"}})
    pairs = [tuple(sorted(pair)) for pair in zip(trials.enroll, trials.test)]
    assert len(set(pairs)) == len(pairs)  # each pair once, in one order
    same_session = {(a, b) for i, a in enumerate(utterances) for b in utterances[i + 1:]
                    if a.split("/")[:2] == b.split("/")[:2]}
    expected = {(a, b) for i, a in enumerate(utterances) for b in utterances[i + 1:]} - same_session
    assert set(pairs) == expected
    assert int(trials.labels.sum()) == sum(a.split("/")[0] == b.split("/")[0] for a, b in expected)
    with pytest.raises(ValueError, match="trials_per_utterance must be >= 1 or None"):
        synthesize_corpus(tmp_path / "bad", speakers=4, utterances=2, trials_per_utterance=0, progress=False)
    cli = tmp_path / "cli"
    assert main(["synth", "--out", str(cli), "--speakers", "4", "--utterances", "5", "--seed", "3",
                 "--min-seconds", "0.5", "--max-seconds", "0.6", "--test-speakers", "3",
                 "--trials-per-utterance", "all", "--workers", "1"]) == 0
    assert (cli / "trials.txt").read_text() == (tmp_path / "trials.txt").read_text()


def test_synth_refuses_a_trial_count_that_is_neither_a_count_nor_all(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path), "--trials-per-utterance", "every"])
    assert "expected a count or 'all', got 'every'" in capsys.readouterr().err


def test_prepare_can_hold_speakers_out_of_training_for_calibration(tiny_corpus, tmp_path):
    summary = prepare_voxceleb(tmp_path, vox1=tiny_corpus, trials=[tiny_corpus / "trials.txt"],
                               calibration_speakers=3, progress=False)
    train = {r["spk_id"] for r in csv.DictReader(open(tmp_path / "train.csv"))}
    valid = {r["spk_id"] for r in csv.DictReader(open(tmp_path / "valid.csv"))}
    rows = list(csv.DictReader(open(tmp_path / "calibration.csv")))
    held_out = {r["spk_id"] for r in rows}
    trial_speakers = {r["spk_id"] for r in csv.DictReader(open(tmp_path / "trial_utterances.csv"))}
    assert len(held_out) == 3 and len(rows) == 12  # every file of the three, whole
    assert all(r["start"] == "0" and float(r["duration"]) >= 1.2 for r in rows)
    assert not held_out & (train | valid | trial_speakers)
    assert set(json.loads((tmp_path / "speakers.json").read_text())) == train and len(train) == 4
    assert summary["calibration"] == {"speakers": 3, "utterances": 12}
    again = tmp_path / "again"
    prepare_voxceleb(again, vox1=tiny_corpus, trials=[tiny_corpus / "trials.txt"], calibration_speakers=3,
                     progress=False)
    assert (again / "calibration.csv").read_text() == (tmp_path / "calibration.csv").read_text()  # seeded
    prepare_voxceleb(again, vox1=tiny_corpus, trials=[tiny_corpus / "trials.txt"], progress=False)
    assert not (again / "calibration.csv").exists()  # no stale split left behind
    with pytest.raises(PreparationError, match=r"calibration_speakers must lie in \[2, 6\].*got 7"):
        prepare_voxceleb(tmp_path / "bad", vox1=tiny_corpus, trials=[tiny_corpus / "trials.txt"],
                         calibration_speakers=7, progress=False)


def test_prepare_writes_manifests_and_holds_out_trial_speakers(tiny_corpus, tmp_path):
    summary = prepare_voxceleb(tmp_path, vox1=tiny_corpus, trials=[tiny_corpus / "trials.txt"],
                               chunk_seconds=1.0, min_seconds=0.5, valid_fraction=0.0, progress=False)
    assert summary["train"]["speakers"] == 7 and summary["excluded_speakers"] == 3
    rows = list(csv.DictReader(open(tmp_path / "train.csv")))
    assert set(rows[0]) == {"ID", "duration", "wav", "start", "stop", "spk_id"}
    assert all(r["wav"].startswith("$vox1_root/wav/") for r in rows)
    for r in rows:
        assert float(r["duration"]) == pytest.approx((int(r["stop"]) - int(r["start"])) / 16000, abs=1e-3)
        assert 0.5 <= float(r["duration"]) <= 1.0
    speakers = json.loads((tmp_path / "speakers.json").read_text())
    assert sorted(speakers.values()) == list(range(7)) and {r["spk_id"] for r in rows} == set(speakers)
    trial_rows = list(csv.DictReader(open(tmp_path / "trial_utterances.csv")))
    assert len(trial_rows) == 12 and not {r["spk_id"] for r in trial_rows} & set(speakers)
    # Total chunked duration equals the audio of the training utterances (less dropped remainders).
    audio = sum(soundfile.info(str(p)).duration for p in (tiny_corpus / "wav").glob("id1000[1-7]/*/*.wav"))
    assert sum(float(r["duration"]) for r in rows) == pytest.approx(audio, rel=0.3)


def test_an_empty_validation_manifest_is_refused_by_name(tiny_corpus, tmp_path):
    from spkver.data.datasets import speaker_datasets

    prepare_voxceleb(tmp_path, vox1=tiny_corpus, trials=[tiny_corpus / "trials.txt"], valid_fraction=0.0,
                     progress=False)
    with pytest.raises(PreparationError, match=r"valid\.csv lists no utterances \(raise valid_fraction"):
        speaker_datasets(tmp_path)


def _copy_tree(src, dst):
    shutil.copytree(src / "wav", dst / "wav")


def test_prepare_lists_corrupt_files_and_missing_trial_utterances_without_crashing(tiny_corpus, tmp_path):
    corpus = tmp_path / "vox1"
    _copy_tree(tiny_corpus, corpus)
    corrupt = next((corpus / "wav" / "id10001").glob("*/*.wav"))
    corrupt.write_bytes(b"RIFF\x00\x00not audio at all")
    trials = tmp_path / "trials.txt"
    trials.write_text((tiny_corpus / "trials.txt").read_text() + "1 id10012/nope0000000/00001.wav "
                      + read_trials(tiny_corpus / "trials.txt").enroll[0] + "\n")
    summary = prepare_voxceleb(tmp_path / "out", vox1=corpus, trials=[trials], progress=False)
    assert summary["unreadable"] == 1
    assert summary["trials"]["trials.txt"]["missing_utterances"] == 1
    assert any("id10012/nope0000000/00001.wav" in w for w in summary["warnings"])
    assert str(corrupt) in (tmp_path / "out" / "skipped.tsv").read_text()


def test_training_on_voxceleb2_only_is_one_flag_away(tiny_corpus, tmp_path):
    _copy_tree(tiny_corpus, tmp_path / "vox1")
    shutil.copytree(tiny_corpus / "wav", tmp_path / "vox2" / "aac")
    summary = prepare_voxceleb(tmp_path / "out", vox1=tmp_path / "vox1", vox2=tmp_path / "vox2",
                               trials=[tiny_corpus / "trials.txt"], train_on=["vox2"], progress=False)
    rows = list(csv.DictReader(open(tmp_path / "out" / "train.csv")))
    assert rows and all(r["wav"].startswith("$vox2_root/aac/") for r in rows)
    assert any("official count" in w for w in summary["warnings"])  # a tiny VoxCeleb2 is reported


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_prepare_reads_m4a_and_convert_m4a_is_resumable(tiny_corpus, tmp_path):
    source = tmp_path / "vox2" / "aac" / "id00001" / "vid00000001"
    source.mkdir(parents=True)
    wav = next((tiny_corpus / "wav").rglob("*.wav"))
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(wav), str(source / "00001.m4a")], check=True)
    summary = prepare_voxceleb(tmp_path / "out", vox2=tmp_path / "vox2", progress=False)
    assert summary["scanned"]["vox2"] == 1 and summary["unreadable"] == 0
    assert main(["convert-m4a", str(tmp_path / "vox2" / "aac"), str(tmp_path / "wav")]) == 0
    converted = tmp_path / "wav" / "id00001" / "vid00000001" / "00001.wav"
    assert soundfile.info(str(converted)).samplerate == 16000
    stamp = converted.stat().st_mtime_ns
    assert main(["convert-m4a", str(tmp_path / "vox2" / "aac"), str(tmp_path / "wav")]) == 0
    assert converted.stat().st_mtime_ns == stamp  # done files are skipped


def test_empty_or_missing_input_folders_are_errors_naming_them(tmp_path, capsys):
    (tmp_path / "empty" / "wav").mkdir(parents=True)
    with pytest.raises(PreparationError, match="empty.*no audio files"):
        prepare_voxceleb(tmp_path / "out", vox1=tmp_path / "empty", progress=False)
    assert main(["prepare", "voxceleb", "--vox1", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope: --vox1 folder does not exist" in capsys.readouterr().err


def test_coloured_noise_and_babble_mix_at_the_requested_snr():
    torch.manual_seed(0)
    clean = torch.randn(4, 16000)
    for module in (ColouredNoise(snr_low=10, snr_high=10), BatchBabble(speakers=2, snr_low=10, snr_high=10)):
        noisy = module(clean, torch.ones(4))
        noise = noisy - clean
        snr = 10 * torch.log10(clean.pow(2).mean(1) / noise.pow(2).mean(1))
        torch.testing.assert_close(snr, torch.full((4,), 10.0), atol=0.05, rtol=0)


def test_noise_leaves_padding_silent():
    clean = torch.zeros(2, 1000)
    clean[:, :500] = torch.randn(2, 500)
    noisy = ColouredNoise(5, 5)(clean, torch.tensor([0.5, 0.5]))
    assert torch.all(noisy[:, 500:] == 0)


def test_simulated_reverb_keeps_length_and_spreads_energy_in_time():
    impulse = torch.zeros(1, 16000)
    impulse[0, 100] = 1.0
    wet = SimulatedReverb(0.4, 0.4)(impulse, torch.ones(1))
    assert wet.shape == impulse.shape
    assert (wet[0, 2000:].abs() > 1e-4).sum() > 1000


def test_augmenter_uses_real_folders_through_speechbrain_csvs(tmp_path):
    noise_dir = tmp_path / "musan" / "noise"
    noise_dir.mkdir(parents=True)
    soundfile.write(noise_dir / "n.wav", np.random.default_rng(0).normal(size=16000).astype(np.float32) * 0.1, 16000)
    csv_file = folder_to_csv(noise_dir, tmp_path / "noise.csv")
    assert "ID,duration,wav" in csv_file.read_text()
    augmenter = build_augmenter(tmp_path / "csv", noise_folders=[noise_dir])
    out, lengths = augmenter(torch.randn(2, 16000), torch.ones(2))
    assert out.shape == (4, 16000) and lengths.shape == (4,)  # clean + augmented
    fallback = build_augmenter(tmp_path / "csv2")
    out, _ = fallback(torch.randn(3, 8000), torch.ones(3))
    assert out.shape == (6, 8000) and torch.isfinite(out).all()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_espeak_ng_can_voice_some_speakers_deterministically(tmp_path):
    for name in ("a", "b"):
        synthesize_corpus(tmp_path / name, speakers=3, utterances=2, seed=4, min_seconds=1.0, max_seconds=1.2,
                          test_speakers=2, espeak_fraction=1.0, progress=False, workers=1)
    files = sorted((tmp_path / "a" / "wav").rglob("*.wav"))
    assert len(files) == 6
    for path in files:
        audio, rate = soundfile.read(str(path))
        assert rate == 16000 and np.abs(audio).max() > 0.1
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()


def test_espeak_fraction_is_validated(tmp_path):
    with pytest.raises(ValueError, match="espeak_fraction"):
        synthesize_corpus(tmp_path, speakers=2, utterances=2, espeak_fraction=1.5, progress=False)


def test_speed_perturbation_plays_crops_at_each_speed_as_new_classes(tiny_corpus, tmp_path):
    """Every crop has the crop's length whatever its speed; speaker i at the k-th speed is class i + k S."""
    import random as random_module

    import torch

    from spkver.data.datasets import SpeedPerturbation, speaker_datasets

    prepare_voxceleb(tmp_path, vox1=tiny_corpus, trials=[tiny_corpus / "trials.txt"], chunk_seconds=1.2,
                     min_seconds=1.0, valid_fraction=0.2, progress=False)
    speakers = json.loads((tmp_path / "speakers.json").read_text())
    perturbation = SpeedPerturbation([0.9, 1.0, 1.1])
    assert perturbation.factors == [1.0, 0.9, 1.1]
    train, valid, classes = speaker_datasets(tmp_path, crop_seconds=0.5, speed_perturb=perturbation)
    assert classes == 3 * len(speakers) and speaker_datasets(tmp_path, crop_seconds=0.5)[2] == len(speakers)
    rows = {row["ID"]: row for row in csv.DictReader(open(tmp_path / "train.csv"))}
    random_module.seed(3)
    seen = set()
    for _ in range(60):
        item = train[random_module.randrange(len(train))]
        speaker = speakers[rows[item["id"]]["spk_id"]]
        speed = (int(item["speaker_index"]) - speaker) // len(speakers)
        assert int(item["speaker_index"]) % len(speakers) == speaker and speed in (0, 1, 2)
        assert abs(item["sig"].shape[0] - 8000) <= 2  # 0.5 s at 16 kHz at every speed
        seen.add(speed)
    assert seen == {0, 1, 2}
    assert all(int(valid[i]["speaker_index"]) < len(speakers) for i in range(len(valid)))  # never perturbed
    # Played 1.1x faster, a tone's frequency rises 1.1x.
    tone = torch.sin(2 * torch.pi * 500 * torch.arange(16000) / 16000)
    faster = SpeedPerturbation.play(tone, 1.1)
    assert faster.shape[0] == pytest.approx(16000 / 1.1, abs=2)
    spectrum = torch.fft.rfft(faster).abs()
    assert float(spectrum.argmax()) / faster.shape[0] * 16000 == pytest.approx(550, abs=5)
    with pytest.raises(ValueError, match="must include 1.0"):
        SpeedPerturbation([0.9, 1.1])
    with pytest.raises(ValueError, match="summing to 1"):
        SpeedPerturbation([1.0, 0.9], [0.5, 0.6])
