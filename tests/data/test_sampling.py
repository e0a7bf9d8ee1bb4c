"""MAX_SAMPLES from a file of any size: one pass, uniform, reproducible for SEED, memory for the sample
only; then the validation split. And dataset directories read through `datasets` streaming."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.errors import UserError
from app.data import record_sources
from app.data.records import BAD_KEPT, read_examples, sample_examples, split


def write_records(path, n, bad_every=0):
    """n context/target records, one per line; every ``bad_every``-th line is broken JSON."""
    with path.open("w", encoding="utf-8") as fh:
        for i in range(1, n + 1):
            fh.write(
                "{oops\n"
                if bad_every and not i % bad_every
                else json.dumps({"context": f"句子{i}", "target": f"答{i}"}, ensure_ascii=False) + "\n"
            )
    return path


def lines(examples):
    return [e.line for e in examples]


@pytest.fixture
def records(tmp_path):
    return lambda n, **kw: write_records(tmp_path / f"r{n}.jsonl", n, **kw)


def test_sample_is_reproducible_for_a_seed_and_differs_for_another(records):
    path = records(1000)
    a = sample_examples(path, 50, seed=1)[0]
    assert lines(a) == lines(sample_examples(path, 50, seed=1)[0])
    assert set(lines(a)) != set(lines(sample_examples(path, 50, seed=2)[0]))
    assert len(set(lines(a))) == 50 and set(lines(a)) <= set(range(1, 1001))
    assert lines(a) != sorted(lines(a))  # a random order, not the file's


def test_all_records_come_back_shuffled_when_max_samples_is_all_or_above_the_size(records):
    path = records(100)
    for k in (None, 100, 5000):
        pool, report = sample_examples(path, k, seed=3)
        assert sorted(lines(pool)) == list(range(1, 101)) and report.valid == 100
        assert lines(pool) != list(range(1, 101))


def test_sample_is_uniform_over_the_file(records):
    """Chi-square of where the sampled records sit in the file (10 equal slices): a sampler biased to the
    head (take the first N) or the tail (a buffer that is never shuffled) fails by orders of magnitude."""
    n, k, bins = 20_000, 4_000, 10
    counts = [0] * bins
    for line in lines(sample_examples(records(n), k, seed=0)[0]):
        counts[(line - 1) * bins // n] += 1
    expected = k / bins
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert chi2 < 27.88, (chi2, counts)  # p = 0.001 with 9 degrees of freedom


def test_bad_records_are_counted_and_never_sampled(records):
    path = records(3000, bad_every=10)
    pool, report = sample_examples(path, 200, seed=0)
    assert (report.total, report.bad_count, report.valid) == (3000, 300, 2700)
    assert all(line % 10 for line in lines(pool)) and len(pool) == 200
    with pytest.raises(UserError, match=r"DATA_PATH=.*: 300 of 3000 records are bad, more than MAX_BAD_RATIO=0.05"):
        sample_examples(path, 200, seed=0, max_bad_ratio=0.05)


def test_only_the_first_bad_lines_are_remembered_all_are_counted(records):
    path = records(3 * BAD_KEPT)
    with path.open("a") as fh:
        fh.write("{oops\n" * (2 * BAD_KEPT))
    report = read_examples(path, warn=False)[1]
    assert report.bad_count == 2 * BAD_KEPT and len(report.bad) == BAD_KEPT and report.valid == 3 * BAD_KEPT
    assert report.bad[0][0] == 3 * BAD_KEPT + 1 and f"; {2 * BAD_KEPT - 3} more" in report.first_bad()


@pytest.mark.parametrize(
    "n,max_samples,has_val,val_size,n_train,n_val",
    [
        (100, None, False, 0.1, 90, 10),  # 10 %
        (5000, None, False, 0.1, 4800, 200),  # capped at 200
        (3000, None, False, 0.5, 2800, 200),
        (10, None, False, 0.1, 9, 1),  # at least one
        (9, None, False, 0.1, 9, 0),  # too few records to hold any out
        (100, None, True, 0.1, 100, 0),  # a VAL_PATH file: no split
        (100, None, False, 0.0, 100, 0),  # VAL_SIZE=0: no split
        (1000, 50, False, 0.1, 45, 5),  # MAX_SAMPLES first, then the split
        (1000, 50, True, 0.1, 50, 0),
        (30, 50, False, 0.1, 27, 3),  # MAX_SAMPLES above the data size: all of it
        (1000, 9, False, 0.1, 9, 0),
    ],
)
def test_split_sizes(records, n, max_samples, has_val, val_size, n_train, n_val):
    train, val = split(sample_examples(records(n), max_samples, seed=7)[0], val_size, has_val)
    assert (len(train), len(val)) == (n_train, n_val)
    assert not set(lines(train)) & set(lines(val))
    assert len(set(lines(train))) == len(train)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_split_has_no_overlap_and_loses_nothing(records, seed):
    train, val = split(sample_examples(records(57), None, seed=seed)[0], 0.1, False)
    assert not set(lines(train)) & set(lines(val))
    assert sorted(lines(train) + lines(val)) == list(range(1, 58))
    assert len(val) == 6  # round(5.7)


MEMORY_PROBE = r"""
import resource, sys
from app.data.records import sample_examples
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pool, report = sample_examples(sys.argv[1], 1000, seed=0)
assert len(pool) == 1000
print(report.valid, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_sampling_a_large_file_holds_only_the_sample(tmp_path):
    """A 40 MB file (~80k records) sampled to 1000 records: the reader's peak grows by a few MB, not by
    the file's size (the reader before this built every record first: ~20x the file in memory)."""
    path = tmp_path / "big.jsonl"
    line = json.dumps({"context": "句子" * 100, "target": "答" * 100}, ensure_ascii=False) + "\n"
    n = 40 * 2**20 // len(line.encode())
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(n // 1000):
            fh.write(line * 1000)
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True, check=True)
    valid, grew_mb = map(int, out.stdout.split())
    assert valid == n // 1000 * 1000 and grew_mb < 30, (valid, grew_mb)


def test_a_big_json_array_asks_for_jsonl(tmp_path, monkeypatch):
    monkeypatch.setattr(record_sources, "JSON_ARRAY_MAX_MB", 0)
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"context": "c", "target": "t"}] * 10))
    with pytest.raises(
        UserError,
        match=r"DATA_PATH=.*big\.json: a 0\.0 GB \.json array must be parsed whole.*"
        r"jq -c '\.\[\]'",
    ):
        read_examples(path)


# ---- what a SEED picks, pinned: a change to it changes what a run trains on, and what its resume continues ---

SEED_PIN = (
    Path(__file__).resolve().parents[1] / "fixtures" / "seed_pin.jsonl"
)  # records r01..r40; lines 7 and 22 are bad
PINNED = {  # SEED -> MAX_SAMPLES -> (training records, validation records) at VAL_SIZE=0.1, in the run's order
    42: {
        20: ([13, 10, 8, 27, 28, 24, 14, 11, 17, 4, 3, 26, 23, 35, 9, 12, 33, 16], [20, 2]),
        None: (
            [
                8,
                27,
                28,
                24,
                14,
                11,
                17,
                4,
                3,
                26,
                23,
                35,
                9,
                12,
                33,
                16,
                36,
                40,
                18,
                30,
                38,
                1,
                15,
                6,
                22,
                32,
                5,
                21,
                31,
                19,
                37,
                29,
                39,
                7,
                25,
                34,
            ],
            [20, 2, 13, 10],
        ),
    },
    7: {
        20: ([7, 35, 34, 11, 4, 12, 26, 15, 25, 2, 29, 36, 16, 24, 27, 39, 1, 6], [9, 22]),
        None: (
            [
                34,
                11,
                4,
                12,
                26,
                15,
                25,
                2,
                29,
                36,
                16,
                24,
                27,
                39,
                1,
                6,
                32,
                20,
                13,
                38,
                10,
                8,
                5,
                33,
                19,
                30,
                40,
                17,
                31,
                3,
                37,
                28,
                14,
                23,
                18,
                21,
            ],
            [9, 22, 7, 35],
        ),
    },
}
PINNED_CACHED = {42: [28, 18, 5, 9], 7: [38, 7, 33, 25]}  # MAX_SAMPLES=all of a .jsonl: the token cache's split


def ids(examples):
    return [int(e.answer[1:]) for e in examples]


@pytest.mark.parametrize("max_samples", [20, None])
@pytest.mark.parametrize("seed", PINNED)
def test_a_seed_picks_the_same_records_in_every_version(seed, max_samples):
    pool, report = sample_examples(SEED_PIN, max_samples, seed)
    assert (report.valid, report.bad_count) == (40, 2)
    train, val = split(pool, 0.1, False)
    assert (ids(train), ids(val)) == PINNED[seed][max_samples]


@pytest.mark.parametrize("seed", PINNED_CACHED)
def test_a_seed_holds_out_the_same_rows_of_the_token_cache_in_every_version(seed, glm_tok, tmp_path):
    from app.data.cache import open_or_build

    data = tmp_path / SEED_PIN.name
    shutil.copyfile(SEED_PIN, data)
    cache = open_or_build(str(data), "auto", glm_tok, str(tmp_path / "cache"), 1)
    train, val = cache.split(seed, 0.1, False)
    assert [int(cache.example(str(data), int(i)).answer[1:]) for i in val] == PINNED_CACHED[seed]
    assert [train[i] + 1 for i in range(len(train))] == sorted(set(range(1, 41)) - set(PINNED_CACHED[seed]))


@pytest.mark.parametrize("max_samples", [20, "all"])
def test_a_run_trains_on_the_records_its_seed_picks(max_samples, tiny_glm_dir, tmp_path, monkeypatch):
    """Through the run's own data step (SEED=7, not the default): its validation records and its training rows, in
    order, are the pinned ones."""
    from app import Config, FineTuner
    from app.data.encode import encode_all

    monkeypatch.chdir(tmp_path)
    shutil.copyfile(SEED_PIN, tmp_path / "data.jsonl")
    cfg = Config.from_dict(
        {
            "MODEL_NAME": str(tiny_glm_dir),
            "DATA_PATH": "data.jsonl",
            "MAX_SAMPLES": max_samples,
            "SEED": 7,
            "VAL_SIZE": 0.1,
            "TIER": "none",
            "MAX_SEQ_LEN": 64,
            "OUTPUT_DIR": "out",
            "QUANT_LEVEL": "none",
        }
    )
    ft = FineTuner(cfg).setup().prepare_data()
    if max_samples == "all":  # the token cache: every row but the held-out ones, in file order
        val = PINNED_CACHED[7]
        train = sorted(set(range(1, 41)) - set(val))
    else:
        train, val = PINNED[7][max_samples]
    assert ids(ft.val_examples) == val
    record = {ids([e])[0]: e for e in read_examples(SEED_PIN, warn=False)[0]}
    assert [ft.train_rows[i] for i in range(len(ft.train_rows))] == encode_all(
        [record[i] for i in train], ft.tokenizer, 64
    )[0]


# ---- dataset directories (the hub's code path, offline) -----------------------------------------


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_dataset_directory_streams_through_datasets(tmp_path, kind):
    shards = tmp_path / "ds" / "data"
    shards.mkdir(parents=True)
    rows = [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}"} for i in range(300)]
    for s in range(3):
        part = rows[s * 100 : (s + 1) * 100]
        if kind == "jsonl":
            (shards / f"train-{s}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(part), shards / f"train-{s}.parquet")
    everything, report = read_examples(tmp_path / "ds")
    assert report.format == "alpaca" and report.valid == 300
    assert [e.messages[0]["content"] for e in everything] == [f"问题{i}" for i in range(300)]
    some = sample_examples(tmp_path / "ds", 50, seed=0)[0]
    again = sample_examples(tmp_path / "ds", 50, seed=0)[0]
    answers = [e.answer for e in some]
    assert len(set(answers)) == 50 and answers == [e.answer for e in again]
    assert answers != [f"回答{i}" for i in range(50)]  # through the shuffle buffer, not the first 50


def test_a_directory_of_mixed_shards_is_one_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "b.parquet").write_bytes(b"")
    with pytest.raises(UserError, match=r"is a directory with 1 json, 1 parquet; point it at a data file"):
        read_examples(tmp_path)
