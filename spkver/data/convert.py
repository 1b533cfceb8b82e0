"""Decode VoxCeleb2's m4a files to 16 kHz mono wav/flac with ffmpeg, resumably.

``spkver convert-m4a SRC DST [--format wav|flac] [--workers N]`` mirrors
``SRC/.../*.m4a`` as ``DST/.../*.wav``.  A file whose output exists and reads
back with a positive length is skipped, so an interrupted run continues where
it stopped; each output is written to a temporary name and renamed only once
ffmpeg succeeded and the result verified.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

from spkver.errors import UserError

__all__ = ["ConversionError", "convert_m4a", "FFMPEG_HELP"]

FFMPEG_HELP = ("ffmpeg is not installed or not on PATH. Install it, e.g. `apt-get install ffmpeg` "
               "(Debian/Ubuntu), `conda install -c conda-forge ffmpeg`, or `brew install ffmpeg` (macOS).")


class ConversionError(UserError, RuntimeError):
    """Conversion cannot start (ffmpeg missing, bad folders)."""


def _is_complete(path: Path) -> bool:
    import soundfile

    try:
        return soundfile.info(str(path)).frames > 0
    except Exception:
        return False


def _convert_one(job: Tuple[Path, Path]) -> Optional[str]:
    source, target = job
    if target.exists() and _is_complete(target):
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.stem + ".partial" + target.suffix)
    result = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(source),
                             "-ac", "1", "-ar", "16000", str(tmp)], capture_output=True, text=True)
    if result.returncode != 0 or not _is_complete(tmp):
        tmp.unlink(missing_ok=True)
        return f"{source}: {(result.stderr.strip() or 'ffmpeg produced no audio').splitlines()[-1]}"
    os.replace(tmp, target)
    return None


def convert_m4a(source, target, audio_format: str = "wav", workers: Optional[int] = None,
                progress: bool = True) -> dict:
    """Convert every m4a under ``source``; return counts and the failures."""
    if shutil.which("ffmpeg") is None:
        raise ConversionError(FFMPEG_HELP)
    source, target = Path(source), Path(target)
    if not source.is_dir():
        raise ConversionError(f"{source}: source folder does not exist")
    if audio_format not in ("wav", "flac"):
        raise ConversionError(f"--format must be wav or flac, got {audio_format!r}")
    files = sorted(source.rglob("*.m4a"))
    if not files:
        raise ConversionError(f"{source}: no .m4a files under it")
    jobs = [(f, target / f.relative_to(source).with_suffix("." + audio_format)) for f in files]
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        errors: List[Optional[str]] = list(tqdm(pool.map(_convert_one, jobs), total=len(jobs), desc="converting m4a",
                                                unit="file", disable=not progress))
    failures = [e for e in errors if e is not None]
    return {"files": len(files), "converted_or_present": len(files) - len(failures), "failures": failures}
