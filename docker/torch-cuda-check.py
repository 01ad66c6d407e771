"""Fail the image build when pip installed a torch that is not the CUDA build the image is for.

    python torch-cuda-check.py https://download.pytorch.org/whl/cu130     torch.version.cuda must be 13.0
    python torch-cuda-check.py ""                                        no index: the CPU image, nothing to check

A CPU wheel (PyPI's, or the wheelhouse's) in the CUDA image would make every CUDA profile unusable: the trainer
would refuse to run (or, told --allow-cpu, train on the CPU).
"""

import re
import sys

import torch

index = sys.argv[1] if len(sys.argv) > 1 else ""
m = re.search(r"/cu(\d+)/?$", index)
if not m:
    print(f"torch {torch.__version__}: no CUDA index given, nothing to check")
    sys.exit(0)
want = m.group(1)
got = (torch.version.cuda or "").replace(".", "")
if got != want:
    sys.exit(
        f"torch {torch.__version__} is built for CUDA {torch.version.cuda or 'none (a CPU build)'}, the image for "
        f"cu{want} ({index}): pip installed the wrong wheel"
    )
print(f"torch {torch.__version__}: CUDA {torch.version.cuda}, as the image needs")
