"""Tasks: paired clean/corrupted inputs with a metric, and generators of task data."""

from circuits.tasks.code import (
    HELDOUT_MODULES,
    CodeCorpus,
    code_corpus,
    code_induction_task,
    encode_texts,
    random_windows,
    stdlib_dir,
)
from circuits.tasks.induction import induction_task, repeated_random_tokens, second_half_positions
from circuits.tasks.markov import MarkovChain, bigram_task, markov_chain
from circuits.tasks.skip_trigram import SkipTrigramTable, skip_trigram_table, skip_trigram_task
from circuits.tasks.task import Metric, Task, normalise
from circuits.tasks.tracr import ProgramTask, program_task

__all__ = [
    "HELDOUT_MODULES", "CodeCorpus", "MarkovChain", "Metric", "SkipTrigramTable", "Task", "bigram_task",
    "code_corpus", "code_induction_task", "encode_texts", "induction_task", "markov_chain", "normalise",
    "random_windows", "repeated_random_tokens", "second_half_positions", "skip_trigram_table", "skip_trigram_task",
    "stdlib_dir", "ProgramTask", "program_task",
]
