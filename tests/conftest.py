"""Suite-wide settings.

The test models are tiny: on this 2-core CI machine, OpenMP intra-op threads cost more than they
bring (measured 4x slower for a 200-step kernel on an MLP, worse with the prefetch thread), so
the suite runs torch single-threaded. Results do not depend on it (CPU kernels are deterministic
for a fixed thread count, and the tests compare against references computed in the same process).
"""

from __future__ import annotations

import matplotlib
import torch

matplotlib.use("Agg")
torch.set_num_threads(1)
