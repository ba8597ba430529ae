"""Test-wide settings: fast mode for every run and notebook kernel, a headless plotting backend."""

import os

# Set before any kernel or subprocess starts, so nbval's kernels and the scripts the
# tests launch inherit them.
os.environ["COURSE_FAST"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
