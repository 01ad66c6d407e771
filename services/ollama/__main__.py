import sys

from services.cli import run_stage

sys.exit(run_stage("services.ollama.cli", prog="python -m services.ollama"))
