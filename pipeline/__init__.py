"""Files -> batches on the training device: one batch contract for every loader backend."""

import torch

# Importing FFCV sets torch to one thread (ffcv.pipeline.compiler calls torch.set_num_threads(1)), which
# halves a CPU training step on two cores. Recorded before any module here imports FFCV; those restore it.
TORCH_THREADS = torch.get_num_threads()
