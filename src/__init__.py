"""Shared building blocks of the ReSA scripts: models, data, distributed helpers,
schedules, checkpoints, logging and the train/eval loops."""
