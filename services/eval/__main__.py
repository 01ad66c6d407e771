"""Evaluation: what the training achieved, per model, on dataset splits."""

import sys

from services.cli import run_stage

sys.exit(run_stage("services.eval.cli", prog="python -m services.eval"))
