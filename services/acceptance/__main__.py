import sys

from services.cli import run_stage

sys.exit(run_stage("services.acceptance.cli", prog="python -m services.acceptance"))
