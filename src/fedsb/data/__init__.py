"""Tasks, the arithmetic word-problem generator, tokenization for training and client partitioning."""

from fedsb.data.arithmetic import CATEGORIES, generate_problems, make_arithmetic_dataset, split_of
from fedsb.data.partition import SCHEMES, partition_dataset, partition_stats
from fedsb.data.tasks import (
    IGNORE_INDEX,
    TASKS,
    TRAIN_COLUMNS,
    ArithmeticTask,
    Task,
    collate_for_training,
    encode_prompts,
    extract_number,
    get_task,
    make_train_loader,
    register_task,
    tokenize_for_training,
)

__all__ = [
    "CATEGORIES",
    "IGNORE_INDEX",
    "SCHEMES",
    "TASKS",
    "TRAIN_COLUMNS",
    "ArithmeticTask",
    "Task",
    "collate_for_training",
    "encode_prompts",
    "extract_number",
    "generate_problems",
    "get_task",
    "make_arithmetic_dataset",
    "make_train_loader",
    "partition_dataset",
    "partition_stats",
    "register_task",
    "split_of",
    "tokenize_for_training",
]
