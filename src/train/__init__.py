"""Training: start-up of a run (startup.py), the loop shared by pretraining and the
linear probe (loop.py), exact resume (resume.py), stop signals (preemption.py),
optimizers (optim.py) and per-iteration schedules (schedules.py)."""
