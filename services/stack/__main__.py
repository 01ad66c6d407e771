import sys

from services.cli import run_stage

sys.exit(run_stage("services.stack.cli", prog="python -m services.stack"))
