import sys

from services.cli import run_stage

sys.exit(run_stage("services.converter.cli", prog="python -m services.converter"))
