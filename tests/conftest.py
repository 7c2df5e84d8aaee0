import os
import sys
from pathlib import Path

# Tests never touch the network; the hub code reads the local cache only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import aim_mlx  # noqa: E402,F401  (first, so MLX gets the fast BLAS before anything imports mlx.core)
