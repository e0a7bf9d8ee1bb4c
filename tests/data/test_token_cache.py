"""The token cache of MAX_SAMPLES=all runs: the rows it serves are encode()'s, it is found again (a hit) until
the file or the tokenizer changes, a killed build is never trusted, and it refuses to fill the disk."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from app.core.errors import UserError
from app.core.ownership import MARKER
from app.data import cache_build
from app.data.cache import CachedRows, cache_key, open_or_build
from app.data.encode import encode, encode_all
from app.data.records import read_examples, split
from app.data.synthetic import generate_samples


def write_jsonl(path, n, seed=0, long_every=0):
    rows = generate_samples(n, seed=seed)
    with path.open("w", encoding="utf-8") as fh:
        for i, r in enumerate(rows, 1):
            if long_every and not i % long_every:  # long prompts: MAX_SEQ_LEN cuts them
                r = {**r, "context": r["context"] * 6}
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.write("{broken\n")
    return path


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", 120, long_every=7)


@pytest.mark.parametrize("max_seq_len", [64, 4096])
def test_rows_and_stats_are_encodes_at_any_max_seq_len(data, tmp_path, glm_tok, max_seq_len):
    cache = open_or_build(str(data), "auto", glm_tok, str(tmp_path / "c"), 1)
    examples, report = read_examples(data)
    expected, stats = encode_all(examples, glm_tok, max_seq_len)
    rows = CachedRows(cache, range(len(cache)), max_seq_len)
    assert len(rows) == len(expected) == 120 and [rows[i] for i in range(len(rows))] == expected
    got = cache.stats(max_seq_len)
    assert (got.samples, got.tokens, got.prompt_truncated, got.answer_truncated) == (
        stats.samples,
        stats.tokens,
        stats.prompt_truncated,
        stats.answer_truncated,
    )
    assert max_seq_len > 1000 or stats.prompt_truncated > 0  # the cut is exercised
    r = cache.report()
    assert (r.total, r.bad_count, r.format, r.bad) == (report.total, 1, "context_target", [(121, "bad JSON")])


def test_validation_split_and_its_records(data, tmp_path, glm_tok):
    cache = open_or_build(str(data), "auto", glm_tok, str(tmp_path / "c"), 1)
    train, val = cache.split(seed=3, val_size=0.1, has_val_file=False)
    assert (len(train), len(val)) == (108, 12) and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(120))
    assert list(val) == list(cache.split(seed=3, val_size=0.1, has_val_file=False)[1])
    assert list(val) != list(cache.split(seed=4, val_size=0.1, has_val_file=False)[1])
    examples = read_examples(data)[0]
    assert [cache.example(str(data), int(i)).messages for i in val] == [examples[int(i)].messages for i in val]
    assert len(cache.split(seed=3, val_size=0.1, has_val_file=True)[1]) == 0
    assert (len(train), len(val)) == tuple(map(len, split(examples, 0.1, False)))  # the in-memory sizes
    # the training rows' stats leave the validation rows out, as encode_all over the training records would
    kept = [examples[i] for i in sorted(set(range(120)) - set(map(int, val)))]
    want = encode_all(kept, glm_tok, 64)[1]
    got = cache.stats(64, val)
    assert (got.samples, got.tokens, got.prompt_truncated, got.answer_truncated) == (
        want.samples,
        want.tokens,
        want.prompt_truncated,
        want.answer_truncated,
    )
    assert sorted(got.lengths) == sorted(encode_all(kept, glm_tok, 1 << 30)[1].lengths)


@pytest.mark.parametrize("n, skip", [(10, []), (10, [0]), (10, [9]), (10, [0, 1, 2]), (50, [3, 4, 17, 30, 49])])
def test_training_rows_are_every_row_but_the_validation_ones(n, skip):
    from app.data.cache import TrainRows

    rows = TrainRows(n, skip)
    assert [rows[i] for i in range(len(rows))] == [i for i in range(n) if i not in skip]
    with pytest.raises(IndexError):
        rows[len(rows)]


def test_second_open_is_a_hit_and_a_changed_file_or_tokenizer_rebuilds(data, tmp_path, glm_tok, qwen2_tok, caplog):
    root = str(tmp_path / "c")
    with caplog.at_level(logging.INFO, logger="app.data.cache"):
        first = open_or_build(str(data), "auto", glm_tok, root, 1)
        again = open_or_build(str(data), "auto", glm_tok, root, 1)
    assert again.path == first.path and "token cache hit" in caplog.text
    key = cache_key(str(data), "auto", glm_tok)
    assert cache_key(str(data), "auto", qwen2_tok) != key  # another tokenizer
    assert cache_key(str(data), "context_target", glm_tok) != key  # another DATA_FORMAT
    time.sleep(0.01)
    with data.open("a", encoding="utf-8") as fh:  # the file changes: one more record
        fh.write(json.dumps(generate_samples(1, seed=9)[0], ensure_ascii=False) + "\n")
    assert cache_key(str(data), "auto", glm_tok) != key
    rebuilt = open_or_build(str(data), "auto", glm_tok, root, 1)
    assert rebuilt.path != first.path and len(rebuilt) == len(first) + 1


BUILD = r"""
import sys
from transformers import AutoTokenizer
from app.data import cache, cache_build
cache_build._CHUNK = 16  # many small writes, so the kill lands inside the build
tok = AutoTokenizer.from_pretrained(sys.argv[1])
cache.open_or_build(sys.argv[2], "auto", tok, sys.argv[3], 1)
"""


def test_a_killed_build_is_never_trusted_and_the_next_run_rebuilds(tmp_path, tiny_glm_dir, glm_tok, child_env):
    data = write_jsonl(tmp_path / "big.jsonl", 3000)
    root = tmp_path / "c"
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILD, str(tiny_glm_dir), str(data), str(root)],
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 300  # a hang guard only
    while not list((root / "tokens").glob(".*.partial-*/ids")) or not any(
        p.stat().st_size for p in (root / "tokens").glob(".*.partial-*/ids")
    ):
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in (root / "tokens").iterdir() if not p.name.startswith(".")] == [MARKER]  # nothing final
    cache = open_or_build(str(data), "auto", glm_tok, str(root), 1)
    assert len(cache) == 3000 and not list((root / "tokens").glob(".*.partial-*"))  # debris removed


def test_a_second_run_waits_for_a_build_in_progress_and_leaves_it_alone(
    tmp_path, tiny_glm_dir, glm_tok, child_env, caplog
):
    """Two runs on the same data (two OUTPUT_DIRs, host and container): the second must not take the first's
    temporary folder for a killed build's and delete it under it."""
    data = write_jsonl(tmp_path / "big.jsonl", 3000)
    root = tmp_path / "c"
    first = subprocess.Popen(
        [sys.executable, "-c", BUILD, str(tiny_glm_dir), str(data), str(root)],
        env=child_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300  # a hang guard only
    while not list((root / "tokens").glob(".*.partial-*/ids")):
        assert first.poll() is None and time.monotonic() < deadline, "the first build ended before the second began"
        time.sleep(0.01)
    with caplog.at_level(logging.INFO, logger="app.data.cache"):
        second = open_or_build(str(data), "auto", glm_tok, str(root), 1)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    assert "waiting for another process that is building the token cache" in caplog.text
    assert "token cache hit" in caplog.text and len(second) == 3000


def test_parallel_workers_build_the_same_cache(tmp_path, glm_tok, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", 2000, long_every=5)
    monkeypatch.setattr(cache_build, "_PARALLEL_MB", 0)
    one = open_or_build(str(data), "auto", glm_tok, str(tmp_path / "a"), 1)
    two = open_or_build(str(data), "auto", glm_tok, str(tmp_path / "b"), 2)
    for f in cache_build.FILES:
        assert (one.path / f).read_bytes() == (two.path / f).read_bytes(), f


def test_a_cache_that_does_not_fit_on_disk_is_one_line(data, tmp_path, glm_tok, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(UserError) as ei:
        open_or_build(str(data), "auto", glm_tok, str(tmp_path / "c"), 1)
    msg = str(ei.value)
    assert (
        msg.startswith(f"CACHE_DIR={tmp_path / 'c'}: the token cache of DATA_PATH={data} needs about ")
        and "GB are free there" in msg
        and "MAX_SAMPLES" in msg
        and "\n" not in msg
    )
    assert [p.name for p in (tmp_path / "c" / "tokens").iterdir()] == [MARKER]  # nothing but the folder's mark


def test_training_on_all_records_uses_the_cache(tiny_glm_dir, data, tmp_path, monkeypatch, caplog):
    from app import Config, FineTuner

    monkeypatch.chdir(tmp_path)
    cfg = Config.from_dict(
        {
            "MODEL_NAME": str(tiny_glm_dir),
            "DATA_PATH": str(data),
            "TIER": "none",
            "MAX_SEQ_LEN": 64,
            "OUTPUT_DIR": "o",
            "QUANT_LEVEL": "none",
        }
    )
    with caplog.at_level(logging.INFO):
        ft = FineTuner(cfg).setup().prepare_data()
        FineTuner(cfg).setup().prepare_data()
    assert isinstance(ft.train_rows, CachedRows) and len(ft.train_rows) + len(ft.val_rows) == 120
    assert "token cache built" in caplog.text and "token cache hit" in caplog.text
    assert list((tmp_path / "models" / ".cache" / "tokens").iterdir())
    assert all(len(ft.train_rows[i]["input_ids"]) <= 64 for i in range(len(ft.train_rows)))
    # the same records, encoded in memory, at the same length
    everything = encode_all(read_examples(data)[0], ft.tokenizer, 64)[0]
    assert sorted(map(str, [*[ft.train_rows[i] for i in range(len(ft.train_rows))], *ft.val_rows])) == sorted(
        map(str, everything)
    )
    assert encode(read_examples(data)[0][0], ft.tokenizer, 64) == ft.train_rows.cache.row(0, 64)


def test_info_builds_no_cache_and_says_what_building_it_costs(tiny_glm_dir, data, tmp_path, run_app):
    args = [
        "info",
        f"MODEL_NAME={tiny_glm_dir}",
        f"DATA_PATH={data}",
        "TIER=cpu-l",
        "MAX_SAMPLES=all",
        f"CACHE_DIR={tmp_path / 'c'}",
        "NUM_PROC=2",
    ]
    before = run_app(args)
    assert before.returncode == 0, before.stderr
    assert (
        f"DATA_PATH={data}: MAX_SAMPLES=all first tokenizes its 120 records into the token cache under "
        f"CACHE_DIR={tmp_path / 'c'} (not built yet"
        in before.stdout
        and "NUM_PROC=2" in before.stdout
    )
    assert not (tmp_path / "c").exists()  # info writes nothing
    from transformers import AutoTokenizer

    open_or_build(str(data), "auto", AutoTokenizer.from_pretrained(tiny_glm_dir), str(tmp_path / "c"), 1)
    after = run_app(args)
    assert after.returncode == 0 and "first tokenizes" not in after.stdout, after.stderr


@pytest.mark.parametrize("n", [1, 2, 3, 10, 257, 5000])
def test_lazy_shuffle_is_a_permutation_per_epoch_and_seed(n):
    from app.training.trainer import LazyShuffle

    s = LazyShuffle(n, seed=0)
    first = list(s)
    assert sorted(first) == list(range(n)) and len(s) == n and list(s) == first  # reproducible
    s.set_epoch(1)
    second = list(s)
    assert sorted(second) == list(range(n))
    if n >= 10:
        assert second != first and first != list(range(n)) and list(LazyShuffle(n, seed=1)) != first


def test_training_from_the_cache_shuffles_lazily(tiny_glm_dir, data, tmp_path, monkeypatch):
    """The Trainer's RandomSampler would list a permutation of every row as Python ints (~1 GB at 30M rows)."""
    from transformers import TrainerCallback

    from app import Config, FineTuner
    from app.training.trainer import LazyShuffle

    seen = []

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            seen.append(train_dataloader.batch_sampler.sampler)

    monkeypatch.chdir(tmp_path)
    cfg = Config.from_dict(
        {
            "MODEL_NAME": str(tiny_glm_dir),
            "DATA_PATH": str(data),
            "TIER": "none",
            "MAX_SEQ_LEN": 64,
            "OUTPUT_DIR": "o",
            "QUANT_LEVEL": "none",
            "MAX_STEPS": 2,
            "BATCH_SIZE": 2,
            "GRAD_ACCUM": 1,
            "EVAL_STEPS": 1000,
            "SAVE_STEPS": 1000,
        }
    )
    result = FineTuner(cfg).setup().prepare_data().train(callbacks=[Spy()])
    assert result.steps == 2 and len(seen) == 1 and isinstance(seen[0], LazyShuffle), seen
