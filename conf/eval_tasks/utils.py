"""The shipped tasks' data, read from this folder whatever the working directory.

lm-eval 0.4.13 hands a task's `dataset_kwargs` to `datasets.load_dataset` as written, and a relative
`data_files` path is taken from the working directory, not the YAML's folder. So each shipped task names its
file relative to this folder and loads it through `custom_dataset: !function utils.load_beside`, which lm-eval
calls with the task's `metadata` and `dataset_kwargs` as keywords.
"""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_beside(data_files: dict, **_metadata) -> datasets.DatasetDict:
    """The JSONL data files (split -> path relative to this folder) through HF datasets' `json` builder."""
    return datasets.load_dataset("json", data_files={split: str(HERE / f) for split, f in data_files.items()})
