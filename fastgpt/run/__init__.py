"""The training run: the config, the corpus, the trainer and what keeps a run safe (checkpoint,
lock, atomic files, metrics log), progress, plots and distributed setup."""
