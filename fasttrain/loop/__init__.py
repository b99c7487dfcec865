"""The training loop's parts: the step engine, the decisions made once per run, evaluation, optimisers and LR
schedules, checkpoints, and what every rank must agree on. `fasttrain/train.py` puts them together in order."""
