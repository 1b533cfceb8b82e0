"""spkver: speaker-verification recipes with alpha-divergence margin losses."""
from spkver.environment import check_environment as _check_environment

__version__ = "0.1.0"

# Before torch, torchaudio or SpeechBrain load: a mismatched pair fails here in one readable line
# (the installed versions and the fix), not later with a linker message from deep inside an import.
_check_environment()
