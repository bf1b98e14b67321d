"""Tasks: paired clean/corrupted inputs with a metric, and generators of task data."""

from circuits.tasks.induction import induction_task, repeated_random_tokens, second_half_positions
from circuits.tasks.task import Metric, Task, normalise

__all__ = ["Metric", "Task", "induction_task", "normalise", "repeated_random_tokens", "second_half_positions"]
