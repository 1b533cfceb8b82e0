"""Specification of `spkver score`: the table, the files it writes, and its errors."""
import json

import numpy as np
import pytest

from spkver import metrics
from spkver.cli import main
from spkver.scoring import save_embeddings


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    speakers = np.repeat(np.arange(30), 6)
    ids = [f"id{s:05d}/video{u % 2}/{u:05d}.wav" for u, s in enumerate(speakers)]
    embeddings = rng.normal(size=(30, 16))[speakers] + 0.9 * rng.normal(size=(180, 16))
    save_embeddings(tmp_path / "emb.npz", ids, embeddings)
    save_embeddings(tmp_path / "cohort.npz", [f"id9{s:04d}/v/{u:05d}.wav" for s in range(20) for u in range(5)],
                    rng.normal(size=(100, 16)))
    pairs = rng.integers(0, 180, (3000, 2))
    lines = [f"{int(speakers[a] == speakers[b])} {ids[a]} {ids[b]}" for a, b in pairs]
    (tmp_path / "O.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "E.txt").write_text("\n".join(lines[:1500]) + "\n")
    return tmp_path


def test_prints_one_row_per_trial_list_with_all_figures(corpus, capsys):
    assert main(["score", "--trials", str(corpus / "O.txt"), str(corpus / "E.txt"),
                 "--embeddings", str(corpus / "emb.npz"), "--json", str(corpus / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "EER %" in out and "minDCF(0.01)" in out and "TAR@FAR=0.001 %" in out
    assert "O.txt" in out and "E.txt" in out
    report = json.loads((corpus / "m.json").read_text())
    assert [row["name"] for row in report["lists"]] == ["O.txt", "E.txt"]
    assert report["lists"][0]["tar_at_far"]["0.0001"] is None  # 3,000 trials cannot measure 1e-4
    # The papers' operating point as a miss rate too: 100 - TAR at FAR = 0.1 %.
    header, _, first = out.splitlines()[:3]
    columns = header.split("  ")
    columns = [c.strip() for c in columns if c.strip()]
    values = first.split()
    tar, miss = values[columns.index("TAR@FAR=0.001 %")], values[columns.index("miss@FAR=0.1 %")]
    assert float(miss) == pytest.approx(100 - float(tar), abs=0.011)


def test_scores_file_and_metrics_agree_with_the_library(corpus):
    main(["score", "--trials", str(corpus / "O.txt"), "--embeddings", str(corpus / "emb.npz"),
          "--scores-out", str(corpus / "scores.txt"), "--json", str(corpus / "m.json")])
    rows = [line.split() for line in (corpus / "scores.txt").read_text().splitlines()]
    scores, labels = np.array([float(r[2]) for r in rows]), np.array([int(r[3]) for r in rows])
    report = json.loads((corpus / "m.json").read_text())["lists"][0]
    assert report["eer"] == pytest.approx(metrics.eer(scores, labels)[0], abs=1e-3)


def test_several_lists_write_one_scores_file_each_into_a_folder(corpus):
    main(["score", "--trials", str(corpus / "O.txt"), str(corpus / "E.txt"), "--embeddings",
          str(corpus / "emb.npz"), "--scores-out", str(corpus / "scores")])
    assert sorted(p.name for p in (corpus / "scores").iterdir()) == ["E.scores.txt", "O.scores.txt"]


def test_as_norm_and_det_plot(corpus, capsys):
    assert main(["score", "--trials", str(corpus / "O.txt"), "--embeddings", str(corpus / "emb.npz"),
                 "--cohort", str(corpus / "cohort.npz"), "--asnorm-topk", "20", "--det", str(corpus / "det.png")]) == 0
    assert (corpus / "det.png").stat().st_size > 1000


def test_two_column_list_is_scored_without_metrics(corpus, capsys):
    (corpus / "plain.txt").write_text("".join(" ".join(line.split()[1:]) + "\n"
                                              for line in (corpus / "O.txt").read_text().splitlines()[:10]))
    assert main(["score", "--trials", str(corpus / "plain.txt"), "--embeddings", str(corpus / "emb.npz"),
                 "--scores-out", str(corpus / "s.txt")]) == 0
    assert "no labels" in capsys.readouterr().out
    assert len((corpus / "s.txt").read_text().splitlines()) == 10


def test_a_list_without_non_targets_reports_metrics_undefined(corpus, capsys):
    target_lines = [line for line in (corpus / "O.txt").read_text().splitlines() if line.startswith("1")]
    (corpus / "T.txt").write_text("\n".join(target_lines) + "\n")
    assert main(["score", "--trials", str(corpus / "T.txt"), "--embeddings", str(corpus / "emb.npz")]) == 0
    assert "metrics undefined" in capsys.readouterr().out


def _error(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_malformed_line_is_reported_with_file_and_line(corpus, capsys):
    (corpus / "bad.txt").write_text("1 a.wav b.wav\n1 a.wav\n")
    err = _error(capsys, ["score", "--trials", str(corpus / "bad.txt"), "--embeddings", str(corpus / "emb.npz")])
    assert "bad.txt:2: expected 3 columns" in err and "Traceback" not in err


def test_missing_embeddings_are_counted_then_skipped_with_allow_missing(corpus, capsys):
    lines = (corpus / "O.txt").read_text().splitlines()[:20] + ["1 id77777/x/00001.wav id00000/video0/00000.wav"]
    (corpus / "m.txt").write_text("\n".join(lines) + "\n")
    err = _error(capsys, ["score", "--trials", str(corpus / "m.txt"), "--embeddings", str(corpus / "emb.npz")])
    assert "1 utterances have no embedding" in err and "id77777/x/00001.wav" in err
    assert main(["score", "--trials", str(corpus / "m.txt"), "--embeddings", str(corpus / "emb.npz"),
                 "--allow-missing"]) == 0
    assert "skipped 1 trials" in capsys.readouterr().err


def test_nan_embeddings_and_dimension_mismatch_are_clear_errors(corpus, capsys):
    with np.load(corpus / "emb.npz") as archive:
        ids, embeddings = archive["ids"], archive["embeddings"].copy()
    embeddings[0] = np.nan
    save_embeddings(corpus / "nan.npz", ids, embeddings)
    err = _error(capsys, ["score", "--trials", str(corpus / "O.txt"), "--embeddings", str(corpus / "nan.npz")])
    assert "NaN or inf" in err and str(ids[0]) in err
    save_embeddings(corpus / "small.npz", ["c/1.wav"], np.ones((1, 4)))
    err = _error(capsys, ["score", "--trials", str(corpus / "O.txt"), "--embeddings", str(corpus / "emb.npz"),
                          "--cohort", str(corpus / "small.npz")])
    assert "16-d" in err and "4-d" in err


def test_empty_trial_list_and_missing_store_are_clear_errors(corpus, capsys):
    (corpus / "empty.txt").write_text("")
    assert "empty" in _error(capsys, ["score", "--trials", str(corpus / "empty.txt"),
                                      "--embeddings", str(corpus / "emb.npz")])
    assert "no such embedding store" in _error(capsys, ["score", "--trials", str(corpus / "O.txt"),
                                                        "--embeddings", str(corpus / "nope.npz")])


def test_far_outside_zero_one_is_rejected_by_the_parser(corpus, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--trials", str(corpus / "O.txt"), "--embeddings", str(corpus / "emb.npz"), "--far", "2"])
    assert exit_info.value.code == 2 and "must lie in (0, 1)" in capsys.readouterr().err
