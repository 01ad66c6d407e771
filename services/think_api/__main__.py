import sys

from services.cli import run_stage

sys.exit(run_stage("services.think_api.cli", prog="python -m services.think_api"))
