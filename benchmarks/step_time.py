"""Step-time benchmark of AdamP/SGDP against torch.optim and the reference package.

A thin wrapper: the implementation is ``torch_adamp.benchmark`` (also ``torch-adamp bench``).
Run ``python benchmarks/step_time.py --help`` for the options; docs/performance.md has the method
and the measured table.
"""

import sys

from torch_adamp.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
