import sys

from services.cli import run_stage

sys.exit(run_stage("services.trainer.cli", prog="python -m services.trainer"))
