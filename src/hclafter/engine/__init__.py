"""Running and keeping runs: a run end to end (run.py), the training loop (loop.py) with its
optimizer and schedule (optim.py) and inputs (inputs.py), evaluation, inference on finished runs,
the frozen baselines, experiment tracking, and the run-directory files (runfiles.py, their one owner)."""
