"""The bench's peers phase (gpt2/peers*.py): llm.c through a stand-in checkout, transformers on a tiny CPU model."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2.benchmark import peers
from gpt2.benchmark import peers_hf
from gpt2.benchmark import peers_llmc
from gpt2.benchmark import peers_table
from gpt2.errors import UsageError
from helpers import make_fake_llmc

FAILING_MAKEFILE = """train_gpt2cu:
\t@echo "nvcc -O3 train_gpt2.cu -o train_gpt2cu"
\t@echo 'train_gpt2.cu(1234): error: identifier "cudaDeviceProp_clockRate" is undefined'
\t@exit 1
"""


# links only without cuDNN, as where torch's wheels bring libcudnn.so.9 but no libcudnn.so to link
NO_CUDNN_LIBRARY_MAKEFILE = """train_gpt2cu:
ifeq ($(USE_CUDNN),1)
\t@echo "/usr/bin/ld: cannot find -lcudnn: No such file or directory"; exit 1
endif
\tcp fake_train_gpt2cu.py train_gpt2cu
\tchmod +x train_gpt2cu
"""


@pytest.fixture(autouse=True)
def no_cudnn_frontend(tmp_path, monkeypatch):
    """The machine's own cuDNN frontend (~/cudnn-frontend, CUDNN_FRONTEND_PATH) stays out of these tests."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CUDNN_FRONTEND_PATH", raising=False)


@pytest.fixture
def token_files(tmp_path):
    tokens = (np.arange(5000) * 7919 % 50257).astype(np.uint16)
    train, val = peers_llmc.split_for_llmc(tokens, 0.1, peers.SMOKE_SIZES.batch_size * peers.SMOKE_SIZES.seq_len + 1)
    paths = tmp_path / "train.bin", tmp_path / "val.bin"
    peers_llmc.write_token_file(paths[0], train)
    peers_llmc.write_token_file(paths[1], val)
    return paths, train, val


def far_deadline():
    return time.monotonic() + 120


# ---- token files ------------------------------------------------------------------------------------

def test_token_file_round_trip_has_llmc_header(tmp_path):
    tokens = np.array([50256, 0, 1, 65535, 464, 3290], dtype=np.uint16)
    path = tmp_path / "t.bin"
    peers_llmc.write_token_file(path, tokens)
    data = path.read_bytes()
    # what llm.c's dev/data/data_common.py write_datafile(filename, toks, "gpt-2") writes, byte for byte
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    assert data == header.tobytes() + tokens.astype(np.uint16).tobytes()
    assert peers_llmc.read_token_file(path).tolist() == tokens.tolist()
    path.write_bytes(data[:-2])
    with pytest.raises(ValueError, match="header says 6"):
        peers_llmc.read_token_file(path)
    path.write_bytes(np.array([20240801, 7], dtype="<i4").tobytes() + data[8:])  # llama-3's magic
    with pytest.raises(ValueError, match="magic 20240801"):
        peers_llmc.read_token_file(path)


def test_split_gives_llmc_enough_validation_tokens():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = peers_llmc.split_for_llmc(tokens, 0.1, 200)  # 10 % = 100 tokens: fewer than B*T+1 = 200
    assert train.tolist() == list(range(900)) and val.tolist() == list(range(800, 1000))
    train, val = peers_llmc.split_for_llmc(tokens, 0.1, 50)
    assert val.tolist() == list(range(900, 1000))
    with pytest.raises(ValueError, match="at least B\\*T\\+1 = 901"):
        peers_llmc.split_for_llmc(tokens, 0.1, 901)


# ---- llm.c's output -----------------------------------------------------------------------------

REAL_LINES = """\
| max_steps             | 20                                                 |
val loss 11.010342
step    1/20 | loss 11.012346 (+nanz)| norm 15.3254 (+nanz)| lr 6.00e-05 | 5321.17 ms | 8.1% bf16 MFU | 98530 tok/s
step    2/20 | loss 10.114502 (+nanz)| norm 11.0841 (+nanz)| lr 1.20e-04 | 1126.40 ms | 38.2% bf16 MFU | 465454 tok/s
step    3/20 | loss -nan (+nanz)| norm 4.0021 (+1.15z)| lr 1.80e-04 | 1120.02 ms | -100.0% bf16 MFU | 465800 tok/s
step 4/20|loss 8.9  (-0.51z) |norm   2.5000 (+0.00z)|lr 2.40e-04|   1118.50 ms|  38.5 % bf16 MFU |   466000 tok/s
total average iteration time: 1121.640000 ms
generating:
"""


def test_parser_reads_real_llmc_step_lines():
    steps = peers_llmc.parse_steps(REAL_LINES)
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and {s["total"] for s in steps} == {20}
    assert [s["ms"] for s in steps] == [5321.17, 1126.40, 1120.02, 1118.50]
    assert steps[0]["loss"] == 11.012346 and math.isnan(steps[2]["loss"]) and steps[3]["loss"] == 8.9
    assert steps[1]["norm"] == 11.0841 and steps[1]["lr"] == 1.2e-4 and steps[1]["mfu"] == pytest.approx(0.382)
    assert steps[3]["tok_s"] == 466000 and steps[2]["mfu"] == -1.0  # an unknown GPU's MFU
    timed = peers_llmc.median_step(steps, 524288, skip=1)
    assert timed["ms_per_step"] == 1120.02 and timed["steps_timed"] == 3  # step 1 left out
    assert timed["tokens_per_sec"] == pytest.approx(524288 / 1.12002)
    assert timed["mfu"] == pytest.approx(0.3835)  # median of 38.2 and 38.5: the -100 % of an unknown GPU is no figure
    assert peers_llmc.median_step(steps, 524288, skip=4) is None


def test_make_command_and_train_args():
    cmd = peers_llmc.make_command((9, 0), None)
    assert cmd[:2] == ["make", "train_gpt2cu"]
    assert {"USE_CUDNN=0", "NO_MULTI_GPU=1", "NO_USE_MPI=1", "GPU_COMPUTE_CAPABILITY=90"} <= set(cmd)
    with_cudnn = peers_llmc.make_command(None, Path("/x/cudnn-frontend/include"))
    assert "USE_CUDNN=1" in with_cudnn and "CUDNN_FRONTEND_PATH=/x/cudnn-frontend/include" in with_cudnn
    assert not any(a.startswith("GPU_COMPUTE") for a in with_cudnn)
    args = peers_llmc.train_args(Path("/d/train.bin"), Path("/d/val.bin"), 64, 1024, 524288, 20)
    flags = dict(zip(args[::2], args[1::2]))
    assert flags == {"-i": "/d/train.bin", "-j": "/d/val.bin", "-e": "d12", "-b": "64", "-t": "1024",
                     "-d": "524288", "-x": "20", "-v": "1020", "-m": "1", "-s": "0", "-n": "0", "-h": "0",
                     "-l": "0.0006", "-u": "10", "-q": "0.1", "-c": "0.1"}


# ---- the llm.c peer, end to end through a stand-in checkout -----------------------------------------

@pytest.mark.slow
def test_llmc_peer_builds_writes_data_runs_and_parses(tmp_path, token_files):
    (train_file, val_file), train, val = token_files
    checkout = make_fake_llmc(tmp_path / "llm.c")
    sizes = peers.SMOKE_SIZES
    row = peers.llmc_peer(checkout, train_file, val_file, sizes, tmp_path, far_deadline(), (9, 0), need_nvcc=False)
    assert row["status"] == "ok", row
    assert row["ms_per_step"] == 100.0 and row["steps_timed"] == sizes.steps - 1
    assert row["tokens_per_sec"] == pytest.approx(sizes.total_batch / 0.1)
    assert "USE_CUDNN=0 NO_MULTI_GPU=1 NO_USE_MPI=1" in (checkout / "make_vars.txt").read_text()
    got = json.loads((checkout / "fake_run.json").read_text())
    expected_args = peers_llmc.train_args(train_file, val_file, sizes.batch_size, sizes.seq_len, sizes.total_batch,
                                          sizes.steps)
    assert got["argv"] == expected_args
    assert got["files"]["-i"] == {"tokens": len(train), "first": train[:5].tolist()}
    assert got["files"]["-j"] == {"tokens": len(val), "first": val[:5].tolist()}


def test_missing_checkout_is_a_skipped_row(tmp_path, token_files):
    (train_file, val_file), _, _ = token_files
    row = peers.llmc_peer(None, train_file, val_file, peers.SMOKE_SIZES, tmp_path, far_deadline())
    assert (row["status"], row["reason"]) == ("skipped", "no llm.c checkout given (--llmc DIR)")
    assert row["ms_per_step"] is None and row["tokens_per_sec"] is None


@pytest.mark.slow
def test_failing_make_is_a_failed_row_with_the_compiler_error(tmp_path, token_files):
    (train_file, val_file), _, _ = token_files
    checkout = make_fake_llmc(tmp_path / "llm.c", FAILING_MAKEFILE)
    row = peers.llmc_peer(checkout, train_file, val_file, peers.SMOKE_SIZES, tmp_path, far_deadline(), need_nvcc=False)
    assert row["status"] == "failed" and row["ms_per_step"] is None
    assert row["reason"] == ('make failed: train_gpt2.cu(1234): error: identifier "cudaDeviceProp_clockRate" '
                             'is undefined')


@pytest.mark.slow
def test_a_failed_cudnn_build_is_built_again_without(tmp_path, token_files):
    (train_file, val_file), _, _ = token_files
    checkout = make_fake_llmc(tmp_path / "llm.c", NO_CUDNN_LIBRARY_MAKEFILE)
    (checkout / "cudnn-frontend" / "include").mkdir(parents=True)
    (checkout / "cudnn-frontend" / "include" / "cudnn_frontend.h").write_text("")
    row = peers.llmc_peer(checkout, train_file, val_file, peers.SMOKE_SIZES, tmp_path, far_deadline(),
                          need_nvcc=False)
    assert row["status"] == "ok" and row["cudnn"] is False and row["ms_per_step"] == 100.0
    assert "cannot find -lcudnn" in (tmp_path / "llmc_build_cudnn.log").read_text()
    assert "USE_CUDNN=0" in (tmp_path / "llmc_build.log").read_text()


@pytest.mark.slow
def test_no_nvcc_and_a_crashing_binary(tmp_path, token_files, monkeypatch):
    (train_file, val_file), _, _ = token_files
    checkout = make_fake_llmc(tmp_path / "llm.c")
    monkeypatch.setattr(peers, "find_nvcc", lambda: None)
    row = peers.llmc_peer(checkout, train_file, val_file, peers.SMOKE_SIZES, tmp_path, far_deadline())
    assert row["status"] == "skipped" and row["reason"].startswith("no nvcc")
    peers_llmc.write_token_file(val_file, np.zeros(3, dtype=np.uint16))  # fewer than B*T+1 tokens
    row = peers.llmc_peer(checkout, train_file, val_file, peers.SMOKE_SIZES, tmp_path, far_deadline(),
                          need_nvcc=False)
    assert row["status"] == "failed" and row["ms_per_step"] is None
    assert row["reason"] == "train_gpt2cu exited 1: fake train_gpt2cu: file size is not as expected"


def test_a_peer_without_time_left_is_skipped_not_started(tmp_path, token_files):
    (train_file, val_file), _, _ = token_files
    checkout = make_fake_llmc(tmp_path / "llm.c")
    soon = time.monotonic() + 3  # under the 5 s a smoke-sized peer needs
    row = peers.llmc_peer(checkout, train_file, val_file, peers.SMOKE_SIZES, tmp_path, soon, need_nvcc=False)
    assert row["status"] == "skipped" and row["reason"].startswith("needs at least 5 s")
    assert not (checkout / "train_gpt2cu").exists()  # make never ran
    row = peers.transformers_peer(train_file, peers.SMOKE_SIZES, tmp_path, soon, smoke=True)
    assert row["status"] == "skipped" and not (tmp_path / "transformers.log").exists()


@pytest.mark.slow
def test_run_logged_stops_a_run_at_its_limit(tmp_path):
    t0 = time.monotonic()
    assert peers.run_logged(["sleep", "30"], tmp_path / "sleep.log", limit_s=1) is None
    assert time.monotonic() - t0 < 1 + peers.KILL_GRACE_S
    assert "stopped at the time limit of 1 s" in (tmp_path / "sleep.log").read_text()


def test_llmc_dir_is_checked_before_anything_runs(tmp_path):
    assert peers.check_llmc_dir(None) is None
    with pytest.raises(UsageError, match="--llmc .*: no such folder"):
        peers.check_llmc_dir(str(tmp_path / "nope"))
    (tmp_path / "Makefile").write_text("")
    with pytest.raises(UsageError, match="no train_gpt2.cu in it"):
        peers.check_llmc_dir(str(tmp_path))
    assert peers.check_llmc_dir(str(make_fake_llmc(tmp_path / "llm.c"))) == (tmp_path / "llm.c").resolve()


# ---- transformers --------------------------------------------------------------------------------

def test_transformers_peer_on_a_tiny_config():
    tokens = (np.arange(4000) * 31 % 50257).astype(np.uint16)
    result = peers_hf.measure(tokens, batch_size=4, seq_len=8, total_batch=64, steps=3, skip=1, device="cpu",
                              compile=False, tiny=True, log=lambda s: None)
    assert result["grad_accum"] == 2 and result["attn_implementation"] == "sdpa" and result["steps_timed"] == 2
    assert len(result["step_ms"]) == 3 and 0 < result["ms_per_step"] < 60_000
    assert result["tokens_per_sec"] == pytest.approx(64 / (result["ms_per_step"] / 1000))
    assert result["finite"] and abs(result["loss_first"] - math.log(50257)) < 1.0  # random init: ~ln(vocab)
    assert result["loss_last"] <= result["loss_first"] + 0.05


def test_transformers_loss_scores_the_same_next_tokens_as_ours():
    import torch

    from gpt2.data.batches import TokenLoader

    model = peers_hf.build_model(tiny=True, device=torch.device("cpu"))
    x, y = TokenLoader((np.arange(100) * 31 % 50257).astype(np.uint16), 2, 8).next_batch()
    logits = model(input_ids=x).logits
    expected = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))  # all T positions
    assert model(input_ids=x, **peers_hf.loss_kwargs(y)).loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gpt3_optim_settings_come_from_the_stage():
    cfg = peers_hf.gpt3_optim_config()
    assert (cfg.lr, list(cfg.betas), cfg.weight_decay, cfg.decay_2d_only, cfg.fused, cfg.grad_clip) == \
        (6e-4, [0.9, 0.95], 0.1, True, True, 1.0)


# ---- the result -----------------------------------------------------------------------------------

SWEEP_RUNS = [{"stage": "compile", "status": "ok", "batch_size": 16, "seq_len": 1024, "tokens_per_step": 524288,
               "ms_per_step": 1104.8, "tokens_per_sec": 474558.0},
              {"stage": "big-batch", "status": "ok", "batch_size": 64, "seq_len": 1024, "tokens_per_step": 524288,
               "ms_per_step": 1014.8, "tokens_per_sec": 516654.0},
              {"stage": "broken", "status": "failed", "tokens_per_sec": None}]


def test_ours_is_the_fastest_stage_and_the_ratio_divides_tok_s():
    ours = peers_table.fastest_run(SWEEP_RUNS)
    assert ours["peer"] == "ours (big-batch)" and ours["tokens_per_sec"] == 516654.0
    peer = {"status": "ok", "tokens_per_sec": 258327.0}
    assert peers_table.ours_over_peer(ours, peer) == pytest.approx(2.0)
    assert peers_table.ours_over_peer(ours, {"status": "failed", "tokens_per_sec": None}) is None
    assert peers_table.ours_over_peer(None, peer) is None
    assert peers_table.fastest_run(SWEEP_RUNS[2:]) is None


def test_markdown_table():
    sizes = peers.GPU_SIZES
    ours = peers_table.fastest_run(SWEEP_RUNS)
    llmc = peers.peer_row("llm.c", "ok", "", sizes, ms_per_step=1121.6, tokens_per_sec=467447.0, commit="f1e2ace65",
                          cudnn=False, ours_over_peer=516654.0 / 467447.0)
    hf = peers.peer_row("transformers", "failed", "exited 1: torch.OutOfMemoryError: CUDA out of memory.", sizes)
    lines = peers_table.peers_markdown({"sizes": peers.asdict(sizes), "smoke": False, "ours": ours,
                                        "peers": [llmc, hf]})
    text = "\n".join(lines)
    assert "| run | status | B | T | tokens/step | ms/step | tok/s | ours/peer | note |" in lines
    assert "## Peers, same card, same call" in text and "524,288 tokens per optimizer step" in text
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith(("| run", "| ---"))]
    assert rows[0] == ("| ours (big-batch) | ok | 64 | 1024 | 524,288 | 1014.8 | 516,654 | 1.00x | "
                       "fastest stage of the sweep |")
    assert rows[1] == ("| llm.c | ok | 64 | 1024 | 524,288 | 1121.6 | 467,447 | 1.11x | "
                       "train_gpt2cu f1e2ace, cuDNN attention off |")
    assert rows[2] == ("| transformers | failed | 64 | 1024 | 524,288 |  |  |  | "
                       "exited 1: torch.OutOfMemoryError: CUDA out of memory. |")
    lines = peers_table.peers_markdown({"sizes": peers.asdict(sizes), "smoke": True, "ours": None, "peers": [hf]})
    assert "no ours/peer" in "\n".join(lines) and "Smoke run" in "\n".join(lines)


# ---- the phase, as the bench runs it --------------------------------------------------------------

@pytest.mark.slow
def test_phase_runs_both_peers_and_writes_peers_json(tmp_path, shakespeare_path):
    from gpt2.bench import Bench

    out = tmp_path / "out"
    out.mkdir()
    bench = Bench(out, 300, str(shakespeare_path), smoke=True)
    ours = peers_table.fastest_run(SWEEP_RUNS)
    result = peers.run_peers(bench, make_fake_llmc(tmp_path / "llm.c"), ours)
    saved = json.loads((out / "peers.json").read_text())
    assert saved == json.loads(json.dumps(result))
    llmc, hf = saved["peers"]
    assert (llmc["peer"], llmc["status"], hf["peer"], hf["status"]) == ("llm.c", "ok", "transformers", "ok"), saved
    assert llmc["ours_over_peer"] == pytest.approx(ours["tokens_per_sec"] / llmc["tokens_per_sec"])
    assert hf["tokens_per_sec"] > 0 and hf["compiled"] is False
    assert bench.phases[-1]["phase"] == "peers" and bench.phases[-1]["status"] == "ok"
    assert "## Peers, same card, same call" in "\n".join(peers_table.peers_table(out))
    assert {p.name for p in (out / "peers").iterdir()} >= {"llmc_build.log", "llmc_train.log", "transformers.log"}
    assert not list(out.rglob("*.bin"))  # the token files stay out of DIR (and of bench.tar.gz)
