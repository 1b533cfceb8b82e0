"""Verification reports: the figures of a scored trial list, as a table, Markdown or JSON."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from spkver import metrics
from spkver.scoring import ScoredTrials, Stage, mapped_stage

__all__ = ["DEFAULT_FARS", "verification_report", "calibration_report", "stage_rows", "text_table", "markdown_table"]

DEFAULT_FARS = (1e-2, 1e-3, 1e-4, 1e-5)


def verification_report(scores: np.ndarray, labels: Optional[np.ndarray], fars=DEFAULT_FARS) -> dict:
    """EER, minDCF(0.01), minDCF(0.05) and TAR@FAR of one scored list; undefined figures are None."""
    result = {"trials": int(scores.size)}
    if labels is None:
        result.update(targets=None, nontargets=None, eer=None, min_dcf_0_01=None, min_dcf_0_05=None,
                      tar_at_far={}, note="no labels: scored only")
        return result
    targets = int(labels.sum())
    result.update(targets=targets, nontargets=int(labels.size - targets))
    if targets == 0 or targets == labels.size:
        result.update(eer=None, eer_threshold=None, min_dcf_0_01=None, min_dcf_0_05=None, tar_at_far={},
                      note="metrics undefined: the list needs both targets and non-targets")
        return result
    rate, threshold = metrics.eer(scores, labels)
    result.update(eer=rate, eer_threshold=threshold,
                  min_dcf_0_01=metrics.min_dcf(scores, labels, p_target=0.01)[0],
                  min_dcf_0_05=metrics.min_dcf(scores, labels, p_target=0.05)[0])
    result["tar_at_far"] = {f"{point.far:g}": point.tar for point in metrics.tar_at_far(scores, labels, fars)}
    return result


def calibration_report(llrs: np.ndarray, labels: Optional[np.ndarray], prior: float) -> dict:
    """Cllr, minCllr, and actual against minimum DCF at ``prior``, of LLRs; None where undefined."""
    result = {"calibration_prior": prior, "cllr": None, "min_cllr": None, "act_dcf": None, "min_dcf_at_prior": None}
    if labels is None or labels.all() or not labels.any():
        return result
    result.update(cllr=metrics.cllr(llrs, labels), min_cllr=metrics.min_cllr(llrs, labels),
                  act_dcf=metrics.actual_dcf(llrs, labels, p_target=prior),
                  min_dcf_at_prior=metrics.min_dcf(llrs, labels, p_target=prior)[0])
    return result


#: The miss rate is also shown at this FAR, the papers' low-FAR operating point (when it is among the fars).
MISS_FAR = 1e-3


def _miss_cells(rows: List[dict], fars, cell) -> tuple:
    """``miss@FAR=0.1 %`` = 100 - TAR at that FAR: header and per-row cells (none if not measured)."""
    if MISS_FAR not in fars:
        return [], [[] for _ in rows]
    key = f"{MISS_FAR:g}"

    def miss(row):
        tar = row["tar_at_far"].get(key)
        return None if tar is None else 1.0 - tar

    return [f"miss@FAR={100 * MISS_FAR:g} %"], [[cell(miss(row), 100, 2)] for row in rows]


def _calibration_cells(rows: List[dict], cell) -> tuple:
    """Header and per-row cells of the calibration columns, when some row carries them."""
    if not any("cllr" in row for row in rows):
        return [], [[] for _ in rows]
    priors = sorted({row["calibration_prior"] for row in rows if "calibration_prior" in row})
    label = f"{priors[0]:g}" if len(priors) == 1 else "p"
    header = ["Cllr", "minCllr", f"actDCF({label})", f"minDCF({label})"]
    cells = [[cell(row.get("cllr")), cell(row.get("min_cllr")), cell(row.get("act_dcf")),
              cell(row.get("min_dcf_at_prior"))] for row in rows]
    return header, cells


def _extra_columns(rows: List[dict], fars, cell) -> tuple:
    """The columns after TAR@FAR, in both tables: the miss rate at FAR 0.1 %, then calibration."""
    miss_header, miss = _miss_cells(rows, fars, cell)
    calibration_header, calibration = _calibration_cells(rows, cell)
    return miss_header + calibration_header, [m + c for m, c in zip(miss, calibration)]


def text_table(rows: List[dict], fars=DEFAULT_FARS) -> str:
    """The aligned plain-text table ``spkver score`` prints, with notes on undefined figures."""
    header = ["trial list", "trials", "targets", "EER %", "minDCF(0.01)", "minDCF(0.05)"] + \
        [f"TAR@FAR={far:g} %" for far in fars]

    def cell(value, scale=1.0, digits=4):
        return "n/a" if value is None else f"{scale * value:.{digits}f}"

    extra_header, extra = _extra_columns(rows, fars, cell)
    header += extra_header
    lines = [header]
    for row, extra_cells in zip(rows, extra):
        lines.append([row["name"], str(row["trials"]), "-" if row["targets"] is None else str(row["targets"]),
                      cell(row["eer"], 100, 3), cell(row["min_dcf_0_01"]), cell(row["min_dcf_0_05"])]
                     + [cell(row["tar_at_far"].get(f"{far:g}"), 100, 2) for far in fars] + extra_cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(value.rjust(width) if i else value.ljust(width) for i, (value, width) in
                      enumerate(zip(line, widths))) for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    notes = [f"{row['name']}: {row['note']}" for row in rows if row.get("note")]
    undefined = []
    for row in rows:
        missing = [f"{far:g}" for far in fars if row["tar_at_far"] and row["tar_at_far"].get(f"{far:g}") is None]
        if missing:
            undefined.append(f"{row['name']}: TAR@FAR={', '.join(missing)} undefined: {row['nontargets']} "
                             "non-targets, and a FAR f needs at least 1/f")
    return "\n".join(text + notes + undefined)


def markdown_table(rows: List[dict], fars=DEFAULT_FARS) -> str:
    """The same figures as a Markdown table (n/a where undefined)."""
    header = ["trial list", "trials", "EER %", "minDCF(0.01)", "minDCF(0.05)"] + [f"TAR@FAR={f:g} %" for f in fars]

    def cell(value, scale=1.0, digits=4):
        return "n/a" if value is None else f"{scale * value:.{digits}f}"

    extra_header, extra = _extra_columns(rows, fars, cell)
    header += extra_header
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, extra_cells in zip(rows, extra):
        lines.append("| " + " | ".join([row["name"], str(row["trials"]), cell(row["eer"], 100, 3),
                                        cell(row["min_dcf_0_01"]), cell(row["min_dcf_0_05"])]
                                       + [cell(row["tar_at_far"].get(f"{f:g}"), 100, 2) for f in fars]
                                       + extra_cells) + " |")
    return "\n".join(lines)


def stage_rows(name: str, scored: Dict[Stage, ScoredTrials], stages: Sequence[Stage],
               calibration=None, fars=DEFAULT_FARS) -> Dict[Stage, dict]:
    """The report row of each of ``stages`` for one list scored by :func:`score_stages`: EER, minDCF and
    TAR@FAR; the calibrated row has those of the scores it maps, with Cllr, minCllr and actual DCF."""
    reports: Dict[Stage, dict] = {}

    def report(stage):  # each list's EER and the rest, computed once per stage
        if stage not in reports:
            result = scored[stage]
            reports[stage] = {"name": name, **verification_report(result.scores, result.trials.labels, fars)}
            if result.num_skipped:
                reports[stage]["skipped_missing"] = result.num_skipped
        return dict(reports[stage])

    rows = {}
    for stage in stages:
        rows[stage] = report(mapped_stage(calibration) if stage is Stage.CALIBRATED else stage)
        if stage is Stage.CALIBRATED:
            llrs = scored[Stage.CALIBRATED]
            rows[stage].update(calibration_report(llrs.scores, llrs.trials.labels, calibration.prior))
    return rows
