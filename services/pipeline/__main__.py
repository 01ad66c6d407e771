import sys

from services.cli import run_stage

sys.exit(run_stage("services.pipeline.cli", prog="python -m services.pipeline"))
