"""Entry points: one module per job, each runnable locally or under ``ray job submit``."""
