"""The training run's machinery, one room per concern (train.py's loop wires them through setup's `Run`): setup
(the run built and wired), parts (model, optimizer, loaders), step, state (checkpoints, each rank's epoch
progress), stop (signals, polls), report (metrics, the report sink), clock (the run clock), monitor (kNN), boxes
(ContrastiveCrop), bad_files, directory (the run folder and its lock)."""
