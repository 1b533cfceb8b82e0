"""The user's own data in the layouts people have: a folder of speakers, a Kaldi data directory, CN-Celeb.

Each test builds its layout from the tiny synthetic corpus (with 8 kHz stereo files, unreadable,
empty and too-short files mixed in) and checks the manifests every corpus shares.
"""
import csv
import json
import shutil

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from spkver.cli import main
from spkver.data.manifests import PreparationError
from spkver.scoring import read_trials


def _rows(path):
    with open(path) as rows:
        return list(csv.DictReader(rows))


def _resolve(row, roots):
    wav = row["wav"]
    for placeholder, folder in roots.items():
        wav = wav.replace(f"${placeholder}", folder)
    return wav


def _write_8k_stereo(source, target):
    audio, _ = soundfile.read(source, dtype="float32")
    low = torchaudio.functional.resample(torch.from_numpy(audio), 16000, 8000).numpy()
    soundfile.write(target, np.stack([low, 0.5 * low], axis=1), 8000)


@pytest.fixture
def speaker_folder(tiny_corpus, tmp_path):
    """ROOT/<speaker>/<session>/<file>: every fourth file 8 kHz stereo flac; a speaker of broken files."""
    root = tmp_path / "mine"
    for index, path in enumerate(sorted((tiny_corpus / "wav").glob("*/*/*.wav"))):
        speaker, session, name = path.relative_to(tiny_corpus / "wav").parts
        target = root / f"spk_{speaker}" / session / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if index % 4 == 0:
            _write_8k_stereo(path, target.with_suffix(".flac"))
        else:
            shutil.copy(path, target)
    broken = root / "spk_broken"
    broken.mkdir()
    (broken / "corrupt.wav").write_bytes(b"RIFF0000WAVEjunk")
    soundfile.write(broken / "empty.wav", np.zeros(0), 16000)
    soundfile.write(broken / "short.wav", 0.1 * np.ones(3200), 16000)
    (root / "README.txt").write_text("not audio")
    return root


def test_prepare_folder_converts_once_reports_bad_files_and_holds_out_test_and_calibration_speakers(
        speaker_folder, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["prepare", "folder", str(speaker_folder), "--out", str(out), "--test-speakers", "3",
                 "--calibration-speakers", "2", "--min-seconds", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "resampled / down-mixed to 16 kHz mono once: 10 files" in printed
    skipped = (out / "skipped.tsv").read_text()
    for name, reason in (("corrupt.wav", "Error"), ("empty.wav", "empty"), ("short.wav", "shorter than the 0.5 s")):
        assert any(name in line and reason in line for line in skipped.splitlines())
    roots = json.loads((out / "roots.json").read_text())
    train, test = _rows(out / "train.csv"), _rows(out / "trial_utterances.csv")
    calibration = _rows(out / "calibration.csv")
    speakers = [{row["spk_id"] for row in rows} for rows in (train, test, calibration)]
    assert len(speakers[1]) == 3 and len(speakers[2]) == 2
    assert not speakers[0] & speakers[1] and not speakers[0] & speakers[2]
    assert set(json.loads((out / "speakers.json").read_text())) == speakers[0]
    for row in train + test + calibration:  # every file the manifests name is 16 kHz mono, converted or not
        info = soundfile.info(_resolve(row, roots))
        assert info.samplerate == 16000 and info.channels == 1
    flac = [row for row in train + test if ".flac" in row["ID"]]
    assert flac and all(row["wav"].startswith("$cache_root/") for row in flac)
    trials = read_trials(out / "trials.txt")
    ids = {row["ID"] for row in test}
    assert set(trials.enroll) | set(trials.test) <= ids
    for label, a, b in zip(trials.labels, trials.enroll, trials.test):
        assert (a.split("/")[0] == b.split("/")[0]) == bool(label)
        assert not label or a.split("/")[1] != b.split("/")[1]  # targets across sessions
    converted = sorted((out / "cache").rglob("*.wav"))
    stamps = [path.stat().st_mtime_ns for path in converted]
    assert main(["prepare", "folder", str(speaker_folder), "--out", str(out), "--test-speakers", "3"]) == 0
    assert [path.stat().st_mtime_ns for path in converted] == stamps  # converted once, not again


def test_spkver_trials_pairs_every_cross_session_pair_or_a_seeded_sample(speaker_folder, tmp_path):
    out = tmp_path / "prepared"
    assert main(["prepare", "folder", str(speaker_folder), "--out", str(out), "--test-speakers", "4"]) == 0
    records = _rows(out / "trial_utterances.csv")
    assert main(["trials", "--manifest", str(out / "trial_utterances.csv"), "--out", str(tmp_path / "all.txt")]) == 0
    every = read_trials(tmp_path / "all.txt")
    sessions = {row["ID"]: row["ID"].split("/")[1] for row in records}
    speakers = {row["ID"]: row["spk_id"] for row in records}
    expected = sum(1 for i, a in enumerate(records) for b in records[i + 1:]
                   if speakers[a["ID"]] != speakers[b["ID"]] or sessions[a["ID"]] != sessions[b["ID"]])
    assert len(every) == expected
    sampled = []
    for _ in range(2):
        assert main(["trials", "--manifest", str(out / "trial_utterances.csv"), "--out", str(tmp_path / "s.txt"),
                     "--per-utterance", "4", "--seed", "3"]) == 0
        sampled.append((tmp_path / "s.txt").read_text())
    assert sampled[0] == sampled[1] and len(sampled[0].splitlines()) == 4 * len(records)


def test_prepare_kaldi_reads_files_pipes_and_segments(tiny_corpus, tmp_path):
    kaldi = tmp_path / "data" / "train"
    kaldi.mkdir(parents=True)
    files = sorted((tiny_corpus / "wav").glob("*/*/*.wav"))
    scp, utt2spk, segments = [], [], []
    long_recordings = tmp_path / "recordings"
    long_recordings.mkdir()
    for index, path in enumerate(files):
        speaker = path.relative_to(tiny_corpus / "wav").parts[0]
        recording = f"rec{index:03d}"
        if index % 4 == 0:  # a stereo 8 kHz recording decoded by a pipe
            _write_8k_stereo(path, long_recordings / f"{recording}.flac")
            scp.append(f"{recording} cat {long_recordings / f'{recording}.flac'} |")
            segments.append(f"{recording}-all {recording} 0.0 {soundfile.info(path).duration:.3f}")
        else:  # two segments of a recording made of the file twice
            audio, _ = soundfile.read(path, dtype="float32")
            audio = audio[:audio.size // 16 * 16]  # whole milliseconds: segment times are exact
            soundfile.write(long_recordings / f"{recording}.wav", np.concatenate([audio, audio]), 16000)
            scp.append(f"{recording} {long_recordings / f'{recording}.wav'}")
            seconds = audio.size / 16000
            for part, (start, end) in enumerate(((0.0, seconds), (seconds, 2 * seconds))):
                segments.append(f"{recording}-{part} {recording} {start:.3f} {end:.3f}")
                utt2spk.append(f"{recording}-{part} {speaker}")
            continue
        utt2spk.append(f"{recording}-all {speaker}")
    utt2spk.append("orphan-0 id10001")  # in utt2spk, not in segments
    (kaldi / "wav.scp").write_text("\n".join(scp) + "\n")
    (kaldi / "utt2spk").write_text("\n".join(utt2spk) + "\n")
    (kaldi / "segments").write_text("\n".join(segments) + "\n")
    out = tmp_path / "prepared"
    assert main(["prepare", "kaldi", str(kaldi), "--out", str(out), "--min-seconds", "0.5"]) == 0
    skipped = (out / "skipped.tsv").read_text()
    assert "orphan-0" in skipped and "not in segments" in skipped
    assert "segment of a piped recording" in skipped  # pipes are whole recordings
    roots = json.loads((out / "roots.json").read_text())
    rows = _rows(out / "train.csv") + _rows(out / "valid.csv")
    ids = {row["ID"].rsplit("_", 2)[0] for row in rows}
    assert len(ids) == 2 * (len(files) - len(files[::4]))
    first = next(row for row in rows if row["ID"].endswith("-1_0_" + row["stop"]))  # a second half, cut out
    audio, rate = soundfile.read(_resolve(first, roots), dtype="float32")
    assert rate == 16000 and first["wav"].startswith("$cache_root/")
    original = soundfile.read(files[int(first["ID"].split("/")[1][3:])], dtype="float32")[0]
    np.testing.assert_allclose(audio, original[:audio.size], atol=1e-4)  # the segment is the file again
    piped = tmp_path / "data" / "piped"  # without segments: a pipe is a whole utterance
    piped.mkdir()
    (piped / "wav.scp").write_text("".join(line + "\n" for line in scp if line.endswith("|")))
    recordings = [line.split()[0] for line in scp if line.endswith("|")]
    (piped / "utt2spk").write_text("".join(f"{name} spk{index % 2}\n" for index, name in enumerate(recordings)))
    assert main(["prepare", "kaldi", str(piped), "--out", str(tmp_path / "piped_out"), "--min-seconds", "0.5",
                 "--valid-fraction", "0"]) == 0
    rows = _rows(tmp_path / "piped_out" / "train.csv")
    assert len(rows) == len(recordings) and all(row["wav"].startswith("$cache_root/") for row in rows)


def test_prepare_kaldi_names_the_file_and_line_of_a_malformed_table(tmp_path, capsys):
    (tmp_path / "wav.scp").write_text("rec1 /a.wav\nrec2\n")
    (tmp_path / "utt2spk").write_text("rec1 s1\n")
    assert main(["prepare", "kaldi", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "wav.scp:2: expected 2 fields" in capsys.readouterr().err


def test_prepare_cnceleb_reads_the_distributed_layout_and_its_enrolment_map(tiny_corpus, tmp_path):
    root = tmp_path / "CN-Celeb_flac"
    genres = ["singing", "interview", "vlog", "speech"]
    files = sorted((tiny_corpus / "wav").glob("*/*/*.wav"))
    by_speaker = {}
    for path in files:
        speaker = "id0" + path.relative_to(tiny_corpus / "wav").parts[0][3:]
        by_speaker.setdefault(speaker, []).append(path)
    speakers = sorted(by_speaker)
    evaluation = speakers[-3:]
    enroll_map, trials = [], []
    for speaker, paths in by_speaker.items():
        for index, path in enumerate(paths):
            target = root / "data" / speaker / f"{genres[index]}-01-{index:03d}.flac"
            target.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(target, soundfile.read(path)[0], 16000)
        if speaker in evaluation:
            (root / "eval" / "enroll").mkdir(parents=True, exist_ok=True)
            (root / "eval" / "test").mkdir(parents=True, exist_ok=True)
            joined = np.concatenate([soundfile.read(p)[0] for p in paths[:2]])
            soundfile.write(root / "eval" / "enroll" / f"{speaker}-enroll.flac", joined, 16000)
            enroll_map.append(f"{speaker}-enroll " + " ".join(f"{speaker}/{genres[i]}-01-{i:03d}.wav" for i in (0, 1)))
            for index in (2, 3):
                name = f"{speaker}-{genres[index]}-02-{index:03d}"
                soundfile.write(root / "eval" / "test" / f"{name}.flac", soundfile.read(paths[index])[0], 16000)
                for other in evaluation:
                    trials.append(f"{other}-enroll test/{name}.wav {int(other == speaker)}")
    (root / "eval" / "lists").mkdir(parents=True)
    (root / "eval" / "lists" / "enroll.map").write_text("\n".join(enroll_map) + "\n")
    (root / "eval" / "lists" / "trials.lst").write_text("\n".join(trials) + "\n")
    out = tmp_path / "prepared"
    assert main(["prepare", "cnceleb", str(root), "--out", str(out), "--min-seconds", "0.5"]) == 0
    train_speakers = set(json.loads((out / "speakers.json").read_text()))
    assert train_speakers == set(speakers) - set(evaluation)
    listed = read_trials(out / "trials.txt")
    assert len(listed) == len(trials) and listed.labels.sum() == 2 * len(evaluation)
    enrolment = dict(line.split(None, 1) for line in (out / "enroll.map").read_text().splitlines())
    assert set(listed.enroll) == set(enrolment)
    ids = {row["ID"].rsplit(".", 1)[0] for row in _rows(out / "trial_utterances.csv")}
    for files_of in enrolment.values():
        assert set(files_of.split()) <= ids
    assert set(listed.test) <= ids
    concat = read_trials(out / "trials_concat.txt")
    assert set(concat.enroll) == {f"enroll/{name}" for name in enrolment} and set(concat.enroll) <= ids
    # The evaluation reads the enrolment map beside the manifests: every trial is scored.
    from tests.layouts import write_wespeaker_folder

    model = write_wespeaker_folder(tmp_path / "model", "ResNet18", {"feat_dim": 80, "embed_dim": 256}, classes=4)
    assert main(["evaluate", "--model", str(model), "--manifests", str(out), "--trials", str(out / "trials.txt"),
                 "--stages", "cosine", "--out", str(tmp_path / "evaluated")]) == 0
    results = json.loads((tmp_path / "evaluated" / "results.json").read_text())
    assert results["stages"]["cosine"]["after_training"][0]["trials"] == len(trials)


def test_preparing_a_folder_that_is_not_there_or_holds_no_speakers_is_one_line(tmp_path, capsys):
    assert main(["prepare", "folder", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    (tmp_path / "flat.wav").write_bytes(b"")
    assert main(["prepare", "folder", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no audio files in speaker folders" in capsys.readouterr().err
    with pytest.raises(PreparationError, match="data/ folder"):
        from spkver.data.cnceleb import prepare_cnceleb

        prepare_cnceleb([tmp_path], tmp_path / "o")
