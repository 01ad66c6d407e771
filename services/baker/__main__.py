import sys

from services.cli import run_stage

sys.exit(run_stage("services.baker.cli", prog="python -m services.baker"))
