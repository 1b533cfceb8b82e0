"""spkver: speaker-verification recipes with alpha-divergence margin losses."""

__version__ = "0.1.0"
