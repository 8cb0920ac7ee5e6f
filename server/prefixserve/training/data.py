"""Training data: read a local file into rows, tokenize them into (input_ids, labels), pad batches.

Files are read with the standard library (JSONL / JSON / CSV / TSV / text) and pyarrow (Parquet, only
if installed), not with `datasets`: the files that adapters are trained on are small, and `datasets`
would add pyarrow, pandas and a hub client to every install of `prefixserve[train]`. A hub data set name
is accepted when `datasets` happens to be installed.

Two row shapes: `text` (loss on every token) or `prompt` + `completion` (loss on the completion only).
Labels that must not count are -100, which transformers' causal-LM loss ignores.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from prefixserve.training.errors import TrainingError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".text", ".md")
SUPPORTED = ".jsonl, .json, .csv, .tsv, .parquet, .txt"


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where the token is context, not target


def load_rows(source: str | Path) -> list[dict[str, Any]]:
    """Rows of a local data file (format from its suffix), or of a hub data set's train split."""
    path = Path(source)
    if not path.exists():
        return _load_hub(str(source))
    if path.is_dir():
        raise TrainingError(f"{path} is a directory; pass one data file ({SUPPORTED})")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            return [_json_line(line, path, n) for n, line in _lines(path) if line.strip()]
        if suffix == ".json":
            return _load_json(path)
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".parquet":
            return _load_parquet(path)
        if suffix in TEXT_SUFFIXES:
            # One row per non-empty line, as `datasets`' text loader does.
            return [{"text": line} for _, line in _lines(path) if line.strip()]
    except UnicodeDecodeError as exc:
        raise TrainingError(f"{path} is not UTF-8 text: {exc}") from None
    raise TrainingError(f"{path}: unknown data file type {suffix!r}; use one of {SUPPORTED}")


def _lines(path: Path) -> list[tuple[int, str]]:
    with path.open(encoding="utf-8") as f:
        return [(n, line.rstrip("\n")) for n, line in enumerate(f, start=1)]


def _json_line(line: str, path: Path, n: int) -> dict[str, Any]:
    try:
        return _object(json.loads(line), path, n)
    except json.JSONDecodeError as exc:
        raise TrainingError(
            f"{path}:{n}: not valid JSON ({exc.msg}); each line must be one JSON object"
        ) from None


def _object(value: Any, path: Path, line: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TrainingError(f'{path}:{line}: each line must be a JSON object like {{"text": ...}}')
    return value


def _load_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        # A .json file that is really JSON Lines is common; accept it.
        return [_json_line(line, path, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise TrainingError(f"{path}: expected a JSON array of objects (or JSON Lines)")
    return [_object(v, path, i) for i, v in enumerate(value, 1)]


def _load_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TrainingError(
            f"reading {path} needs pyarrow: pip install pyarrow (or convert the file to JSONL)"
        ) from None
    return pq.read_table(path).to_pylist()


def _load_hub(name: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise TrainingError(
            f"data file {name!r} does not exist (a hub data set name needs `pip install datasets`)"
        ) from None
    try:
        return list(datasets.load_dataset(name, split="train"))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise TrainingError(
            f"data file {name!r} does not exist and loading it as a hub data set failed: {exc}"
        ) from None


def tokenize_rows(
    rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, max_length: int, add_eos: bool = True
) -> list[Example]:
    """Turn rows into examples, truncated to `max_length` tokens. Raises TrainingError on unusable data."""
    if not rows:
        raise TrainingError(
            "the data file holds no rows; add rows with a `text` column or `prompt`/`completion` columns"
        )
    columns = set(rows[0])
    if {"prompt", "completion"} <= columns:
        kind = "prompt/completion"
    elif "text" in columns:
        kind = "text"
    else:
        raise TrainingError(
            f"the data has columns {sorted(columns)}; it needs a `text` column (loss on every token) "
            "or `prompt` and `completion` columns (loss on the completion only)"
        )
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    examples, truncated, dropped = [], 0, 0
    for n, row in enumerate(rows, start=1):
        if kind == "text":
            ids = _ids(tokenizer, _field(row, "text", n), special=True) + eos
            labels = list(ids)
        else:
            # Tokenized apart so that the boundary is exact; special tokens (a BOS) only before the prompt.
            prompt = _ids(tokenizer, _field(row, "prompt", n), special=True)
            target = _ids(tokenizer, _field(row, "completion", n), special=False) + eos
            ids, labels = prompt + target, [IGNORE_INDEX] * len(prompt) + target
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        # The model predicts token i+1 from token i, so a target at position 0 teaches nothing.
        if not any(label != IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        examples.append(Example(ids, labels))
    if truncated:
        log.warning(
            "%d of %d rows were truncated to --max-length %d tokens", truncated, len(rows), max_length
        )
    if dropped:
        log.warning(
            "%d rows have nothing to learn within --max-length %d (empty, or prompt too long)",
            dropped,
            max_length,
        )
    if not examples:
        raise TrainingError(
            f"no usable rows: all {len(rows)} rows are empty or their prompt fills --max-length {max_length}; "
            "raise --max-length or shorten the prompts"
        )
    return examples


def _field(row: dict[str, Any], name: str, n: int) -> str:
    value = row.get(name)
    if value is None:
        raise TrainingError(f"row {n} has no `{name}` value (columns: {sorted(row)}); every row needs one")
    return str(value)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def split_examples(
    examples: list[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded random held-out split; at least one example on each side when a split is asked for."""
    if eval_fraction <= 0:
        return examples, []
    if len(examples) < 2:
        raise TrainingError(f"--eval-fraction needs at least 2 usable rows, got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * eval_fraction)))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


class ExampleDataset(torch.utils.data.Dataset):
    """What Trainer iterates over: one dict per example, padded later by `PadCollator`."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.examples[i].input_ids, "labels": self.examples[i].labels}


@dataclass
class PadCollator:
    """Right-pads a batch; padding gets attention 0 and label -100 so it never counts in the loss."""

    pad_token_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[i, :n] = torch.tensor(item["input_ids"])
            labels[i, :n] = torch.tensor(item["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
