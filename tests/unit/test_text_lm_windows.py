"""text-lm validation windows never overlap: a short validation file gets fewer windows, says so, and reports the tokens
it really scores."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import bpe_tokenizer

from dsk_compress.tasks.text_lm import TextLMTask


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    words = [f"word{i % 97} value{i % 13}" for i in range(4000)]
    train = d / "train.txt"
    train.write_text(" ".join(words))
    short = d / "short.txt"
    short.write_text(" ".join(words[:300]))
    tok = bpe_tokenizer([" ".join(words)], vocab_size=300)
    tok.save_pretrained(d / "tok")
    return train, short, d / "tok"


def _starts(task):
    return np.asarray(task._eval_starts)


def test_short_validation_file_gets_non_overlapping_windows_and_a_warning(files):
    train, short, tok = files
    with pytest.warns(UserWarning, match="fewer than eval_sequences = 64"):
        task = TextLMTask([str(train)], [str(short)], str(tok), seq_len=64, eval_sequences=64)
    n_val = len(task.val)
    starts = _starts(task)
    assert len(starts) == n_val // 64 < 64
    assert np.all(np.diff(starts) >= 64) and starts[-1] + 64 <= n_val  # no token scored twice
    scored = len(starts) * 63
    assert task.describe()["eval_tokens"] == scored <= n_val
    assert task.describe()["eval_windows"] == len(starts)
    assert sum(b.shape[0] for b in task.eval_batches(16)) == len(starts)


def test_long_validation_file_keeps_the_windows_it_asked_for(files, recwarn):
    train, _, tok = files
    task = TextLMTask([str(train)], [str(train)], str(tok), seq_len=32, eval_sequences=16)
    assert len(_starts(task)) == 16 and np.all(np.diff(_starts(task)) >= 32)
    assert task.describe()["eval_tokens"] == 16 * 31
    assert not [w for w in recwarn if "eval_sequences" in str(w.message)]
