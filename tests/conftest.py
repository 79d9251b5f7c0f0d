import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the paper's commands (gen_data.py, main.py, sample.py) are imported by the tests as modules;
# ld3 itself comes from the installed package (make install: editable)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(1)
