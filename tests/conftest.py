"""Test-wide settings.

Unit tests use tiny models, where several threads per process only add synchronization
cost; on a 2-core machine running subprocess tests (DDP) beside the main process,
oversubscribed OpenMP threads make steps tens of times slower. One thread each.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
