"""Training from token shards (data=fineweb_edu): the loader across shard boundaries and ranks, exact resume,
missing shards, and the gpt2_124m_fineweb experiment config."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.training.checkpoint import CHECKPOINT_NAME
from gpt2.errors import UsageError
from gpt2.data.batches import build_data
from gpt2.data.shards import ShardLoader, find_shards, shard_name, write_shard
from gpt2.training.loop import train
from helpers import TINY_SHARDS, compose_with, records

SIZES = [37, 50, 41]  # three shards, none a multiple of B*T: batches straddle every boundary


def make_shards(folder: Path, sizes=SIZES, val=300, seed=0) -> list:
    """A val shard and train shards whose concatenation is 0, 1, 2, ... (each token names its position)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_shard(folder / shard_name("edufineweb", 0), rng.integers(0, 50257, val, dtype=np.uint16))
    start, paths = 0, []
    for i, n in enumerate(sizes, 1):
        paths.append(folder / shard_name("edufineweb", i))
        write_shard(paths[-1], np.arange(start, start + n, dtype=np.uint16))
        start += n
    return paths


def epoch_inputs(loaders, calls: int) -> list:
    """Every x token the ranks read in `calls` rounds, and check each y is the token after its x."""
    seen = []
    for _ in range(calls):
        for loader in loaders:
            x, y = loader.next_batch()
            assert x.dtype == torch.int64 and x.shape == (loader.B, loader.T)
            torch.testing.assert_close(y, x + 1)  # targets cross shard boundaries too
            seen += x.flatten().tolist()
    return seen


@pytest.mark.parametrize("world", [1, 2])
def test_every_token_once_per_epoch_across_shard_boundaries(tmp_path, world):
    paths = make_shards(tmp_path)
    B, T = 2, 4  # 8 tokens a chunk; 128 tokens -> 15 chunks (the last 7 tokens are the epoch's remainder)
    loaders = [ShardLoader(paths, B, T, rank, world) for rank in range(world)]
    n_chunks = loaders[0].n_chunks
    assert n_chunks == (sum(SIZES) - 1) // (B * T) == 15
    calls = n_chunks // world
    seen = epoch_inputs(loaders, calls)
    assert sorted(seen) == list(range(calls * world * B * T))  # no token dropped or repeated
    # two ranks together read what one process reads
    single = ShardLoader(paths, B, T)
    assert sorted(epoch_inputs([single], calls * world)) == sorted(seen)


def test_the_loader_wraps_into_a_second_epoch(tmp_path):
    loader = ShardLoader(make_shards(tmp_path), 2, 4)
    first = epoch_inputs([loader], loader.n_chunks)
    second = epoch_inputs([loader], loader.n_chunks)
    assert first == second


def test_state_dict_names_the_shard_and_resumes_mid_shard(tmp_path):
    paths = make_shards(tmp_path)
    loader = ShardLoader(paths, 2, 4, rank=1, world_size=2)
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()  # 6 chunks read: stream token 48, 11 tokens into the second shard
    assert state == {"next_chunk": 6, "shard": "edufineweb_train_000002.npy", "position": 11, "tokens_per_chunk": 8}
    resumed = ShardLoader(paths, 2, 4, rank=1, world_size=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(10):  # into the next epoch
        a, b = loader.next_batch(), resumed.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_new_shard_at_the_end_does_not_move_the_position(tmp_path):
    paths = make_shards(tmp_path)
    loader = ShardLoader(paths, 2, 4)
    for _ in range(7):
        loader.next_batch()
    state = loader.state_dict()
    write_shard(tmp_path / shard_name("edufineweb", 4), np.arange(128, 200, dtype=np.uint16))
    more = ShardLoader(sorted(find_shards(tmp_path)["train"]), 2, 4)
    more.load_state_dict(state)
    assert torch.equal(more.next_batch()[0], loader.next_batch()[0])


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder; make the shards first with `python -m gpt2.prepare fineweb_edu --out"),
    ("empty", "holds no edufineweb_train_*.npy shards (and no edufineweb_val_*.npy); make them with `python -m "
              "gpt2.prepare fineweb_edu --out"),
    ("no-val", "holds no edufineweb_val_*.npy shard"),
    ("not-npy", "is not a readable .npy token shard"),
])
def test_missing_or_bad_shards_are_one_line_errors(tmp_path, case, message):
    folder = tmp_path / "shards"
    if case != "missing":
        folder.mkdir()
    if case == "no-val":
        make_shards(folder)
        (folder / shard_name("edufineweb", 0)).unlink()
    if case == "not-npy":
        make_shards(folder)
        (folder / shard_name("edufineweb", 2)).write_bytes(b"not a shard")
    with pytest.raises(UsageError) as e:
        run_on_shards(tmp_path, folder, "train.steps=1")
    assert message in str(e.value) and "\n" not in str(e.value)


def damage(path: Path, how: str) -> None:
    """Turn a good uint16 shard into one of the bad files a shard folder can hold."""
    raw = path.read_bytes()
    header = len(raw) - 2 * len(np.load(path))
    if how == "empty":
        path.write_bytes(b"")
    elif how == "not-npy":
        path.write_text("token,count\n50256,1\n")
    elif how == "header-cut":
        path.write_bytes(raw[:40])
    elif how == "truncated":
        path.write_bytes(raw[:header + 11])  # a copy cut short, mid-token
    elif how == "trailing-bytes":
        path.write_bytes(raw + b"\0" * 6)  # np.load ignores these; a whole shard never has them
    elif how in ("int32", "2-D", "big-endian"):
        arr = np.load(path)
        np.save(path, {"int32": arr.astype(np.int32), "2-D": arr[:40].reshape(2, 20),
                       "big-endian": arr.astype(">u2")}[how])


@pytest.mark.parametrize("how, message", [
    ("empty", "is not a readable .npy token shard (the file is empty)"),
    ("not-npy", "is not a readable .npy token shard (the magic string is not correct"),
    ("header-cut", "is not a readable .npy token shard (EOF: reading array header"),
    ("truncated", "is cut short: 139 bytes, but its header's 50 tokens take 228"),
    ("trailing-bytes", "is longer than its header says: 234 bytes, but its header's 50 tokens take 228"),
    ("int32", "holds a int32 array of shape (50,), not 1-D uint16 GPT-2 tokens"),
    ("2-D", "holds a uint16 array of shape (2, 20), not 1-D uint16 GPT-2 tokens"),
    ("big-endian", "holds a >u2 array of shape (50,), not 1-D uint16 GPT-2 tokens"),
])
def test_a_damaged_shard_file_is_refused_when_opened_naming_it(tmp_path, how, message):
    folder = tmp_path / "shards"
    bad = make_shards(folder)[1]  # edufineweb_train_000002.npy, 50 tokens
    damage(bad, how)
    before = bad.read_bytes()
    with pytest.raises(UsageError) as e:
        run_on_shards(tmp_path, folder, "train.steps=1")
    assert str(e.value).startswith(f"{bad} ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and "delete it and run `python -m gpt2.prepare" in str(e.value)
    assert bad.read_bytes() == before  # reported, never repaired or removed


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_token_id_outside_the_vocabulary_is_refused_before_the_first_step(tmp_path, split):
    # today's failure: an IndexError at the shard's batch, hours in (here: step 10 of 12)
    folder = tmp_path / "shards"
    paths = make_shards(folder, sizes=[300, 300])
    bad = paths[1] if split == "train" else folder / shard_name("edufineweb", 0)
    tokens = np.load(bad)
    tokens[[250, 260]] = [60000, 50257]  # 50257: the first id past GPT-2's 50257 (0 ... 50256)
    write_shard(bad, tokens)
    with pytest.raises(UsageError) as e:
        run_on_shards(tmp_path, folder, "train.steps=12", "train.val_every=0")
    assert str(e.value).startswith(f"{bad} holds token id 60,000 at position 250 (and 1 more), outside the "
                                   f"model's vocabulary of 50,257 GPT-2 ids"), str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "run" / CHECKPOINT_NAME).exists()


def test_the_vocabulary_limit_is_the_models_and_its_edge_is_exact(tmp_path):
    folder = tmp_path / "shards"
    paths = make_shards(folder, sizes=[300, 300])
    cfg = compose_with(["data=fineweb_edu", *TINY_SHARDS, f"data.shards_dir={folder}"])
    build_data(cfg.data, 2, 16)  # the ids 0 ... 599 and < 50257 in the val shard: all below the default
    tokens = np.load(paths[1])
    tokens[5] = 50256  # <|endoftext|>, the last GPT-2 id: fine
    write_shard(paths[1], tokens)
    build_data(cfg.data, 2, 16)
    with pytest.raises(UsageError, match=rf"{paths[0].name} holds token id 299 at position 299, outside the "
                                         "model's vocabulary of 299 GPT-2 ids"):
        build_data(cfg.data, 2, 16, vocab_size=299)
    loader = ShardLoader([np.arange(10, dtype=np.uint16)], 2, 4, names=["mine"], vocab_size=10)
    assert loader.n_tokens == 10
    with pytest.raises(UsageError, match="mine holds token id 9 at position 9"):
        ShardLoader([np.arange(10, dtype=np.uint16)], 2, 4, names=["mine"], vocab_size=9)


# ---- runs ----------------------------------------------------------------------------------------

def run_on_shards(tmp_path, shards_dir, *overrides, name="run", experiment=None):
    cfg = compose_with(([f"+experiment={experiment}"] if experiment else ["data=fineweb_edu"])
                       + TINY_SHARDS + [f"data.shards_dir={shards_dir}", *overrides])
    run_dir = tmp_path / name
    run_dir.mkdir()
    summary = {"stage": cfg.stage.name}
    train(cfg, run_dir, summary)
    return summary, run_dir


@pytest.mark.slow
def test_training_resumed_mid_shard_equals_the_uninterrupted_run(tmp_path):
    shards = tmp_path / "shards"
    make_shards(shards, sizes=[150, 90, 200], seed=1)  # 32 tokens a step: step 5 starts inside the second shard
    # a constant learning rate: the first run's shorter train.steps changes nothing but where it stops
    common = ["optim.lr=1e-3", "optim.grad_clip=1.0", "train.steps=8", "train.val_every=4"]
    full, full_dir = run_on_shards(tmp_path, shards, *common, name="full")
    first, first_dir = run_on_shards(tmp_path, shards, *common, "train.steps=5", "train.checkpoint_every=5",
                                     name="first")
    saved = torch.load(first_dir / CHECKPOINT_NAME, weights_only=True)
    assert saved["data"]["shard"] == "edufineweb_train_000002.npy" and saved["data"]["position"] == 10
    resumed, resumed_dir = run_on_shards(tmp_path, shards, *common, f"train.resume={first_dir}", name="resumed")
    assert resumed["status"] == "ok" and resumed["start_step"] == 5
    assert [r["loss"] for r in records(resumed_dir)] == [r["loss"] for r in records(full_dir)][5:]
    assert resumed["final_loss"] == full["final_loss"] and resumed["val_loss"] == full["val_loss"]


def test_the_experiment_config_has_build_nanogpts_settings():
    cfg = compose_with(["+experiment=gpt2_124m_fineweb"])
    t, o = cfg.train, cfg.optim
    assert (t.total_batch_size, t.batch_size, t.seq_len, t.steps) == (524288, 64, 1024, 19073)
    assert (o.lr, o.warmup_steps, o.min_lr_ratio, o.weight_decay, o.grad_clip) == (6e-4, 715, 0.1, 0.1, 1.0)
    assert list(o.betas) == [0.9, 0.95] and o.decay_2d_only and str(o.schedule.value) == "cosine"
    assert (t.val_every, t.hellaswag_every, t.checkpoint_every) == (250, 250, 1000)
    assert t.compile and t.autocast_dtype.value == "bf16" and t.matmul_precision.value == "high"
    assert (cfg.model.name, cfg.model.vocab_size, cfg.model.attention.value) == ("gpt2", 50304, "flash")
    assert cfg.data.name == "fineweb_edu" and cfg.data.shards_dir.endswith("edu_fineweb10B")
    smoke = compose_with(["+experiment=gpt2_124m_fineweb_smoke"])
    assert smoke.train.steps == 200 and smoke.train.total_batch_size == 524288 and smoke.stage.name.endswith("smoke")


def test_the_smoke_experiment_runs_on_cpu_with_the_tiny_model(tmp_path):
    shards = tmp_path / "shards"
    make_shards(shards, sizes=[400, 400], seed=2)
    rows = tmp_path / "hellaswag.jsonl"
    rows.write_text("".join(json.dumps({"ctx": f"Row {i}: a man opens the door and", "label": i % 4,
                                        "endings": ["walks in.", "sits down.", "sings a song.", "closes it."]}) + "\n"
                            for i in range(3)))
    summary, run_dir = run_on_shards(
        tmp_path, shards, "train.compile=false", "train.total_batch_size=64", "train.steps=3", "train.val_every=2",
        "train.hellaswag_every=2", f"train.hellaswag_data={rows}", "train.checkpoint_every=2",
        experiment="gpt2_124m_fineweb_smoke")
    assert summary["status"] == "ok" and summary["steps"] == 3 and summary["stage"] == "gpt2_124m_fineweb_smoke"
    assert summary["effective"]["autocast_dtype"] == "bfloat16" and summary["effective"]["loss"] == "fused"
    hs = records(run_dir, "hellaswag_acc_norm")
    assert [r["step"] for r in hs] == [1, 2] and all(r["hellaswag_n"] == 3 for r in hs)
    assert summary["hellaswag_acc_norm"] == hs[-1]["hellaswag_acc_norm"]
    assert len(records(run_dir, "val_loss")) == 2 and (run_dir / CHECKPOINT_NAME).is_file()
