"""Word statistics stages for the procd ``textstats`` example pipeline."""

__version__ = "1.0.0"
