"""Command-line tools around training: demos, SFT, the study and its report, analyses."""
