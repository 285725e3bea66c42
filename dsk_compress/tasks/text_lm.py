"""The ``text-lm`` task: any causal LM on the user's own text or JSONL files, tokenized by the teacher's tokenizer.

Files: ``.txt`` (one document per file) or ``.jsonl`` (one document per line, text under
``text_field``). The tokenizer is loaded from a local directory only (never a hub). Metrics: token
accuracy (%) and perplexity on a fixed sample of validation windows; the same code scores torch
models and ONNX Runtime sessions.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from dsk_compress.errors import TaskError
from dsk_compress.tasks.base import Metrics, PredictFn, WindowedLMTask

FORMATS = ("auto", "text", "jsonl", "json")


def _decode(p: Path, encoding: str) -> str:
    """The file's text; a decoding error names the file, the line and the byte, and the ``encoding`` option."""
    data = p.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise TaskError(
            f"{p}:{line}: byte 0x{data[e.start]:02x} is not valid {encoding} ({e.reason})",
            hint="convert the file to UTF-8 or set task.encoding (e.g. latin-1, cp1252)",
        ) from None


def file_format(p: Path, fmt: str = "auto", text: str | None = None) -> str:
    """``text``, ``jsonl`` or ``json`` for ``p``: ``fmt`` when given, else by suffix in any case (.jsonl / .ndjson,
    .json); any other file is text, refused when its content is JSON, which would otherwise be trained on as prose."""
    if fmt != "auto":
        return fmt
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    head = (text or "").lstrip()[:1]
    if head in ("{", "["):
        first = (text or "").lstrip().splitlines()[0]
        for candidate in (first, text or ""):
            try:
                json.loads(candidate)
            except ValueError:
                continue
            raise TaskError(
                f"{p} holds JSON but would be read as plain text (its suffix is {p.suffix or 'none'!r})",
                hint="set task.format: jsonl (one record per line) or json (a list of records), or task.format: text "
                "to train on it as text",
            )
    return "text"


def _record_text(rec, p: Path, where: str, text_field: str) -> str:
    if not isinstance(rec, dict):
        raise TaskError(
            f"{p}:{where} is a JSON {type(rec).__name__}, not an object with a {text_field!r} field", hint="one object per record"
        )
    if text_field not in rec:
        raise TaskError(f"{p}:{where} has no field {text_field!r}", hint="set task.text_field")
    return str(rec[text_field])


def read_documents(paths: list[str], text_field: str = "text", fmt: str = "auto", encoding: str = "utf-8") -> list[str]:
    """The documents in ``paths``: a text file is one document, a JSONL line or a JSON list item one each."""
    docs: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise TaskError(f"text-lm file not found: {p}", hint="give existing .txt, .jsonl or .json files in task.train / task.eval")
        text = _decode(p, encoding)
        kind = file_format(p, fmt, text)
        if kind == "jsonl":
            for i, line in enumerate(text.splitlines()):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise TaskError(f"{p}:{i + 1} is not valid JSON", hint="one JSON object per line, or set task.format") from None
                docs.append(_record_text(rec, p, str(i + 1), text_field))
        elif kind == "json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise TaskError(
                    f"{p}:{e.lineno} is not valid JSON ({e.msg})",
                    hint="a .json file holds a list of records; for one record per line use .jsonl or task.format: jsonl",
                ) from None
            records = data if isinstance(data, list) else [data]
            docs.extend(_record_text(rec, p, f"item {k}", text_field) for k, rec in enumerate(records))
        else:
            docs.append(text)
    return docs


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise TaskError(f"tokenizer directory not found: {p}", hint="set task.tokenizer to the teacher's local directory")
    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise TaskError(f"cannot load a tokenizer from {p}: {str(e).splitlines()[0][:200]}") from None


def tokenize(docs: list[str], tok) -> np.ndarray:
    sep = tok.eos_token_id if tok.eos_token_id is not None else 0
    from dsk_compress.models.hf import quiet_transformers

    ids: list[int] = []
    # a whole document is tokenized at once and cut into windows later: the tokenizer's "Token indices sequence length
    # is longer than the specified maximum" warning is about feeding it to the model whole, which never happens
    with quiet_transformers():
        for d in docs:
            ids.extend(tok(d, add_special_tokens=False)["input_ids"])
            ids.append(sep)
    return np.asarray(ids, dtype=np.int32)


def eval_window_starts(n_tokens: int, seq_len: int, eval_sequences: int) -> np.ndarray:
    """Starts of the validation windows: ``eval_sequences`` windows of ``seq_len`` tokens spread evenly over the split,
    never overlapping. A split too short for that many gets the windows that fit side by side, with a warning that says
    how many tokens are scored (overlapping windows would score the same tokens again and overstate the sample)."""
    import warnings

    fit = n_tokens // seq_len
    windows = min(eval_sequences, fit)
    if windows < eval_sequences:
        warnings.warn(
            f"task.eval has {n_tokens:,} tokens: room for {fit} validation windows of seq_len {seq_len} that do not "
            f"overlap, fewer than eval_sequences = {eval_sequences}; scoring {fit} windows ({fit * (seq_len - 1):,} "
            "predictions). Add validation text, or lower task.seq_len, to score more.",
            UserWarning,
            stacklevel=3,
        )
    # k <= n_tokens // seq_len windows over n_tokens - seq_len starts: consecutive starts are >= seq_len apart
    return np.unique(np.linspace(0, n_tokens - seq_len, windows).astype(np.int64))


class TextLMTask(WindowedLMTask):
    """Next-token prediction on the user's own documents with the teacher's tokenizer."""

    name = "text-lm"
    logits_dtype = np.float32  # [B, T, vocab] in float64 would be large for real tokenizers

    def __init__(
        self,
        train: list[str],
        eval: list[str],
        tokenizer: str,
        text_field: str = "text",
        seq_len: int = 256,
        eval_sequences: int = 64,
        seed: int = 0,
        format: str = "auto",
        encoding: str = "utf-8",
    ) -> None:
        self.seq_len = seq_len
        self.seed = seed
        self.tok = load_tokenizer(tokenizer)
        self.vocab_size = len(self.tok)
        self.train = tokenize(read_documents(train, text_field, format, encoding), self.tok)
        self.val = tokenize(read_documents(eval, text_field, format, encoding), self.tok)
        for split, arr in (("train", self.train), ("eval", self.val)):
            if len(arr) < seq_len + 1:
                raise TaskError(
                    f"task.{split} has {len(arr)} tokens, fewer than seq_len + 1 = {seq_len + 1}", hint="add text or lower task.seq_len"
                )
        self._eval_starts = eval_window_starts(len(self.val), seq_len, eval_sequences)
        h = hashlib.sha256(self.train.tobytes() + self.val.tobytes()).hexdigest()[:16]
        self._fp = f"text-lm:{h}:L{seq_len}:E{len(self._eval_starts)}"

    def fingerprint(self) -> str:
        return self._fp

    def describe(self) -> dict:
        return {
            "name": self.name,
            "train_tokens": int(len(self.train)),
            "val_tokens": int(len(self.val)),
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "eval_windows": int(len(self._eval_starts)),
            "eval_tokens": int(len(self._eval_starts) * (self.seq_len - 1)),
        }  # predictions scored, each token once

    def evaluate(self, predict: PredictFn, batch_size: int = 4) -> Metrics:
        correct, nll, count = self.score(predict, batch_size)
        return Metrics(
            accuracy=100.0 * correct / count, extra={"perplexity": math.exp(nll / count), "nll": nll / count, "eval_tokens": float(count)}
        )
