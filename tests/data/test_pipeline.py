import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.config import DataConfig
from jaxllm.data import DataError, Pipeline, assemble_batch, pack_documents
from jaxllm.data.sources import split_fraction

B_, E_, P_ = 256, 257, 258
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@pytest.fixture
def corpus(tmp_path):
    """60 small text files of random letters: a few hundred windows of 16 tokens."""
    root = tmp_path / "corpus"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        n = int(rng.integers(20, 200))
        text = "".join(rng.choice(list("abcdefghij \n"), size=n))
        (root / f"doc_{i:03d}.txt").write_text(text)
    return root


def _cfg(path, **overrides):
    base = dict(source="text", path=str(path), seq_len=16, batch_size=4, val_fraction=0.2)
    base["num_threads"] = 0
    return DataConfig(**{**base, **overrides})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


def test_packing_by_hand():
    stream = pack_documents(
        [np.array([10, 11, 12]), np.array([20]), np.array([30, 31])],
        seq_len=4,
        bos_id=B_,
        eos_id=E_,
        pad_id=P_,
    )
    # [B 10 11 12 E | B 20 E | B 30 31 E] + one PAD to fill 3 windows of 4 (+1).
    assert stream.tokens_N.tolist() == [B_, 10, 11, 12, E_, B_, 20, E_, B_, 30, 31, E_, P_]
    assert (stream.n_documents, stream.n_tokens, stream.n_windows) == (3, 12, 3)
    batch = assemble_batch(stream, np.array([0, 1, 2]))
    assert batch["inputs"].tolist() == [[B_, 10, 11, 12], [E_, B_, 20, E_], [B_, 30, 31, E_]]
    assert batch["targets"].tolist() == [[10, 11, 12, E_], [B_, 20, E_, B_], [30, 31, E_, P_]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1], [1, 2, 2, 2], [1, 1, 1, 1]]
    assert batch["positions"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 3]]
    assert batch["loss_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 0], [1, 1, 1, 0]]
    assert {k: v.dtype for k, v in batch.items()} == {
        "inputs": np.int32,
        "targets": np.int32,
        "segment_ids": np.int32,
        "positions": np.int32,
        "loss_mask": np.float32,
    }


def test_padding_has_segment_zero():
    stream = pack_documents([np.array([7])], seq_len=6, bos_id=B_, eos_id=E_, pad_id=P_)
    batch = assemble_batch(stream, np.array([0]))
    assert batch["inputs"].tolist() == [[B_, 7, E_, P_, P_, P_]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 0, 0, 0]]
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[1, 1, 0, 0, 0, 0]]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=8),
    seq_len=st.integers(2, 9),
)
def test_packing_invariants(lengths, seq_len):
    docs = [np.arange(n, dtype=np.int32) + 100 * (i + 1) % 250 for i, n in enumerate(lengths)]
    stream = pack_documents(docs, seq_len=seq_len, bos_id=B_, eos_id=E_, pad_id=P_)
    batch = assemble_batch(stream, np.arange(stream.n_windows))
    inputs, targets = batch["inputs"], batch["targets"]
    # Targets are the inputs shifted by one, also across consecutive windows.
    assert np.array_equal(inputs[:, 1:], targets[:, :-1])
    assert np.array_equal(targets[:-1, -1], inputs[1:, 0])
    # The windows cover the whole stream once.
    flat = np.concatenate([inputs.reshape(-1), targets[-1, -1:]])
    assert np.array_equal(flat, stream.tokens_N)
    # No loss across a document boundary: exactly where the target is a BOS or PAD.
    assert np.array_equal(batch["loss_mask"] == 0, (targets == B_) | (targets == P_))
    seg, pos = batch["segment_ids"], batch["positions"]
    real = inputs != P_
    # A segment starts at a BOS or at a window's first column; positions count from there.
    starts = (inputs == B_) | (np.arange(seq_len) == 0)
    assert np.array_equal(pos[real] == 0, starts[real])
    assert np.all(np.diff(seg, axis=1)[real[:, 1:]] == starts[:, 1:][real[:, 1:]])
    assert np.all(seg[real] >= 1) and np.all(seg[~real] == 0) and np.all(pos[~real] == 0)
    assert np.all(pos < seq_len)


def test_batches_have_the_promised_shapes(corpus):
    pipeline = Pipeline(_cfg(corpus), seed=0)
    batch = next(pipeline.train_iterator())
    assert set(batch) == set(KEYS)
    for k in KEYS:
        assert batch[k].shape == (4, 16)
    for batch in pipeline.val_batches(2):
        assert {k: v.shape for k, v in batch.items()} == dict.fromkeys(KEYS, (4, 16))
    stats = pipeline.stats()
    assert stats["train_documents"] + stats["val_documents"] == 60
    assert stats["train_windows"] > 10 and stats["val_windows"] > 0


def test_shuffle_is_determined_by_the_seed(corpus):
    run = lambda seed, **kw: _take(Pipeline(_cfg(corpus, **kw), seed=seed).train_iterator(), 4)
    assert _same(run(1), run(1))
    assert not _same(run(1), run(2))
    # With shuffle=False the seed does not matter and windows come in stream order.
    assert _same(run(1, shuffle=False), run(2, shuffle=False))
    first = run(1, shuffle=False)[0]
    assert np.array_equal(first["inputs"][0, 1:], first["targets"][0, :-1])
    assert np.array_equal(first["targets"][:-1, -1], first["inputs"][1:, 0])


def test_train_repeats_forever_with_a_new_order_each_epoch(corpus):
    pipeline = Pipeline(_cfg(corpus, batch_size=1), seed=0)
    n = pipeline.stats()["train_windows"]
    rows = [b["inputs"][0].tobytes() for b in _take(pipeline.train_iterator(), 2 * n)]
    first, second = rows[:n], rows[n:]
    assert sorted(first) == sorted(second)
    assert first != second


@pytest.mark.parametrize("threads", [0, 2])
def test_iterator_state_resumes_with_identical_batches(corpus, threads):
    cfg = _cfg(corpus, num_threads=threads)
    iterator = Pipeline(cfg, seed=5).train_iterator()
    _take(iterator, 5)
    state = iterator.get_state()
    want = _take(iterator, 3)
    fresh = Pipeline(cfg, seed=5).train_iterator()
    fresh.set_state(state)
    assert _same(_take(fresh, 3), want)


def test_state_of_another_pipeline_is_refused(corpus):
    state = Pipeline(_cfg(corpus), seed=5).train_iterator().get_state()
    other = Pipeline(_cfg(corpus, seq_len=8), seed=5).train_iterator()
    with pytest.raises(DataError, match="seq_len"):
        other.set_state(state)


def test_orbax_checkpoint_round_trip(corpus, tmp_path):
    cfg = _cfg(corpus, num_threads=2)
    iterator = Pipeline(cfg, seed=7).train_iterator()
    _take(iterator, 5)
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        mngr.wait_until_finished()
    want = _take(iterator, 3)

    fresh = Pipeline(cfg, seed=7).train_iterator()
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
        assert mngr.latest_step() == 5
        mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert _same(_take(fresh, 3), want)


def test_processes_get_disjoint_halves_of_the_global_batch(corpus):
    def rows(batch):
        return sorted(map(bytes, np.concatenate([batch[k] for k in KEYS], axis=1).view("u1")))

    single = _take(Pipeline(_cfg(corpus), seed=3).train_iterator(), 4)
    parts = [
        _take(Pipeline(_cfg(corpus), seed=3, process_index=p, process_count=2).train_iterator(), 4)
        for p in range(2)
    ]
    for step in range(4):
        a, b = parts[0][step], parts[1][step]
        assert a["inputs"].shape == b["inputs"].shape == (2, 16)
        assert set(rows(a)).isdisjoint(rows(b))
        assert sorted(rows(a) + rows(b)) == rows(single[step])
    val = [Pipeline(_cfg(corpus), seed=3, process_index=p, process_count=2) for p in range(2)]
    va, vb = (v.val_batches(1)[0] for v in val)
    assert sorted(rows(va) + rows(vb)) == rows(Pipeline(_cfg(corpus), seed=3).val_batches(1)[0])


def test_val_batches_are_deterministic_and_cycle(corpus):
    pipeline = Pipeline(_cfg(corpus), seed=0)
    n_windows = pipeline.stats()["val_windows"]
    # Batches of 4 windows: more than two passes over the split.
    n = 2 * n_windows // 4 + 2
    batches = pipeline.val_batches(n)
    assert _same(batches, Pipeline(_cfg(corpus), seed=1).val_batches(n))
    inputs = np.concatenate([b["inputs"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    assert np.array_equal(inputs[n_windows : 2 * n_windows], inputs[:n_windows])
    # Unshuffled: each window starts where the one before it ended.
    assert np.array_equal(inputs[1:n_windows, 0], targets[: n_windows - 1, -1])


def _name(prefix, *, val):
    """A file name that the split puts in validation (val=True) or train at val_fraction=0.5."""
    return next(
        f"{prefix}{i}.txt" for i in range(1000) if (split_fraction(f"{prefix}{i}.txt") < 0.5) == val
    )


def test_configuration_errors(tmp_path, corpus):
    with pytest.raises(DataError, match="multiple of the number of processes"):
        Pipeline(_cfg(corpus, batch_size=3), seed=0, process_count=2)
    with pytest.raises(DataError, match="does not exist"):
        Pipeline(_cfg(corpus), seed=0, process_index=2, process_count=2)
    with pytest.raises(DataError, match="does not exist"):
        Pipeline(_cfg(tmp_path / "nowhere"), seed=0)
    only = tmp_path / "only"
    only.mkdir()
    # One document, in validation: no training data.
    (only / _name("f", val=True)).write_text("text")
    with pytest.raises(DataError, match="validation split"):
        Pipeline(_cfg(only, val_fraction=0.5), seed=0)
    # One document, in train: no validation data.
    (only / _name("f", val=True)).rename(only / _name("g", val=False))
    pipeline = Pipeline(_cfg(only, val_fraction=0.5), seed=0)
    with pytest.raises(DataError, match="validation split is empty"):
        pipeline.val_batches(1)


def test_stdlib_corpus_pipeline():
    pipeline = Pipeline(DataConfig(seq_len=64, batch_size=2, num_threads=0), seed=0)
    stats = pipeline.stats()
    assert stats["train_documents"] > 100 and stats["val_documents"] > 0
    assert stats["train_tokens"] > 1_000_000
    batch = next(pipeline.train_iterator())
    assert batch["inputs"].shape == (2, 64)
    assert pipeline.tokenizer.decode(batch["inputs"][0])
