"""The training run's machinery, one room per concern (train.py wires them): parts (model, optimizer,
loaders), step, state (checkpoints), stop (signals, polls), report (metrics, clock), monitor (kNN), boxes
(ContrastiveCrop), bad_files, directory (the run folder and its lock)."""
