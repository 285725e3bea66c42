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


def read_documents(paths: list[str], text_field: str = "text") -> list[str]:
    docs: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise TaskError(f"text-lm file not found: {p}", hint="give existing .txt or .jsonl files in task.train / task.eval")
        if p.suffix == ".jsonl":
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise TaskError(f"{p}:{i + 1} is not valid JSON") from None
                if text_field not in rec:
                    raise TaskError(f"{p}:{i + 1} has no field {text_field!r}", hint="set task.text_field")
                docs.append(str(rec[text_field]))
        else:
            docs.append(p.read_text(encoding="utf-8"))
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
    ids: list[int] = []
    for d in docs:
        ids.extend(tok(d, add_special_tokens=False)["input_ids"])
        ids.append(sep)
    return np.asarray(ids, dtype=np.int32)


class TextLMTask(WindowedLMTask):
    """Next-token prediction on the user's own documents with the teacher's tokenizer."""

    name = "text-lm"
    logits_dtype = np.float32  # [B, T, vocab] in float64 would be large for real tokenizers

    def __init__(self, train: list[str], eval: list[str], tokenizer: str, text_field: str = "text", seq_len: int = 256,
                 eval_sequences: int = 64, seed: int = 0) -> None:
        self.seq_len = seq_len
        self.seed = seed
        self.tok = load_tokenizer(tokenizer)
        self.vocab_size = len(self.tok)
        self.train = tokenize(read_documents(train, text_field), self.tok)
        self.val = tokenize(read_documents(eval, text_field), self.tok)
        for split, arr in (("train", self.train), ("eval", self.val)):
            if len(arr) < seq_len + 1:
                raise TaskError(f"task.{split} has {len(arr)} tokens, fewer than seq_len + 1 = {seq_len + 1}", hint="add text or lower task.seq_len")
        n = len(self.val) - seq_len
        self._eval_starts = np.unique(np.linspace(0, n, eval_sequences).astype(np.int64))
        h = hashlib.sha256(self.train.tobytes() + self.val.tobytes()).hexdigest()[:16]
        self._fp = f"text-lm:{h}:L{seq_len}:E{len(self._eval_starts)}"

    def fingerprint(self) -> str:
        return self._fp

    def describe(self) -> dict:
        return {"name": self.name, "train_tokens": int(len(self.train)), "val_tokens": int(len(self.val)), "seq_len": self.seq_len,
                "vocab_size": self.vocab_size, "eval_tokens": int(len(self._eval_starts) * (self.seq_len - 1))}

    def evaluate(self, predict: PredictFn, batch_size: int = 4) -> Metrics:
        correct, nll, count = self.score(predict, batch_size)
        return Metrics(accuracy=100.0 * correct / count, extra={"perplexity": math.exp(nll / count), "nll": nll / count, "eval_tokens": float(count)})
