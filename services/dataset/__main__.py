import sys

from services.cli import run_stage

sys.exit(run_stage("services.dataset.cli", prog="python -m services.dataset"))
