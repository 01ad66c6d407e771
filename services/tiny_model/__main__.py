"""The tiny Phi-3 of tests, demos and the tiny profile."""

import sys

from services.cli import run_stage

sys.exit(run_stage("services.tiny_model.cli", prog="python -m services.tiny_model"))
