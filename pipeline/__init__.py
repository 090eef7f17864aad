"""Files -> batches on the training device: one batch contract for every loader backend."""
