"""Many processes on the CPU (gloo), real torchrun agents: two processes train as one does (the same
weights to float tolerance), their test metrics are exactly one process's on the same weights, rank 0
alone writes, an error on rank 1 is one line, Ctrl-C stops every rank with a checkpoint, a run resumes
on another number of processes, and two "nodes" meet through a rendezvous on 127.0.0.1."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

MLP = ["digits-mlp", "--epochs", "1", "--no-report", "--quiet"]


def dlkit(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlkit", *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}))


def torchrun(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}), **kwargs)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("dist")
    one, two = folder / "one", folder / "two"
    for out, extra in ((one, []), (two, ["--nproc", "2"])):
        done = dlkit("run", *MLP, "--out", str(out), *extra)
        assert done.returncode == 0, done.stderr
    return one, two


def test_two_processes_train_as_one(one_and_two):
    one, two = one_and_two
    a, b = weights(one), weights(two)
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    m1, m2 = (json.loads((r / "metrics.jsonl").read_text()) for r in (one, two))
    assert m1["train_accuracy"] == m2["train_accuracy"] and m1["train_loss"] == pytest.approx(m2["train_loss"], 1e-6)
    assert m1["val_accuracy"] == m2["val_accuracy"] and m1["val_loss"] == pytest.approx(m2["val_loss"], 1e-6)
    assert json.loads((two / "summary.json").read_text())["notes"][0] == (
        "trained on 2 processes (torchrun); batch_size 20 is the global batch")


def test_sharded_test_metrics_are_exactly_one_process_on_the_same_weights(one_and_two):
    _, two = one_and_two
    summary = json.loads((two / "summary.json").read_text())
    done = dlkit("evaluate", str(two))  # one process, the saved weights
    assert done.returncode == 0, done.stderr
    again = json.loads(done.stdout)
    for key in ("test_accuracy", "test_loss", "test_f1", "test_roc_auc", "test_ece"):
        assert summary[key] == again[key], key


def test_rank_zero_alone_writes(one_and_two):
    one, two = one_and_two
    assert sorted(p.name for p in two.parent.iterdir()) == ["one", "two"]  # no runs/ of another rank
    assert sorted(p.relative_to(two).as_posix() for p in two.rglob("*")) == sorted(
        p.relative_to(one).as_posix() for p in one.rglob("*"))


FAIL_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import dlkit.engine.loop as loop
    from dlkit.errors import DataError
    original = loop.train_one_epoch
    def failing(*args, **kwargs):
        raise DataError("the shard on this node is unreadable")
    loop.train_one_epoch = failing
"""


def test_an_error_on_rank_1_stops_every_rank_with_one_line(tmp_path):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    done = dlkit("run", *MLP, "--out", str(tmp_path / "run"), "--nproc", "2",
                 env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 2
    assert done.stderr == "error: the shard on this node is unreadable (rank 1)\n"
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


def test_sync_batchnorm_on_the_cpu_is_one_line(tmp_path):
    done = dlkit("run", *MLP, "--set", "train.sync_batchnorm=true", "--nproc", "2", "--out", str(tmp_path / "r"))
    assert done.returncode == 2
    assert done.stderr == ("error: train.sync_batchnorm needs CUDA: PyTorch's SyncBatchNorm does not run on the CPU; "
                           "set train.sync_batchnorm: false (each rank then keeps its own batch statistics)\n")


def test_ctrl_c_stops_every_rank_with_a_checkpoint_and_the_run_resumes_on_two_or_one(one_and_two, tmp_path):
    one, two = one_and_two
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "dlkit", "run", *MLP, "--out", str(out), "--nproc", "2",
                             "--set", "train.checkpoint_every=10"], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ | {"DLKIT_HOLD_AFTER_STEP": "25",
                                                                      "OMP_NUM_THREADS": "1"})
    assert proc.stderr.readline() == "holding after step 25\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted"
    assert err.splitlines() == ["Ctrl-C: stopping after this step to write a checkpoint (Ctrl-C again stops at once)",
                                f"interrupted: {status['message']}", f"resume with: dlkit resume {out}"]
    assert status["message"] == "stopped in epoch 1 of 1 (step 26); kept checkpoints/state-000000026.safetensors"
    shutil.copytree(out, tmp_path / "again")
    # on 2 processes again: the uninterrupted 2-process run's weights, bit for bit
    done = dlkit("resume", str(tmp_path / "again"), "--quiet", "--nproc", "2")
    assert done.returncode == 0, done.stderr
    a, b = weights(two), weights(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)
    done = dlkit("resume", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    notes = json.loads((out / "summary.json").read_text())["notes"]
    assert "resumed on 1 process(es); the checkpoint was written by 2 (the batches are the same; augmentation and " \
           "dropout draw differently)" in notes
    a, b = weights(one), weights(out)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_meet_through_a_rendezvous_on_loopback(one_and_two, tmp_path):
    one, _ = one_and_two
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank), "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", endpoint, "--rdzv-id", "dlkit-test", "-m", "dlkit", "run", *MLP,
                      "--out", str(tmp_path / "run"))
             for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err
    a, b = weights(one), weights(tmp_path / "run")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


READ_FOLDER = """
import sys
import torch.distributed as tdist
from dlkit.config import DataCfg
from dlkit.data import load_data
from dlkit.errors import DataError
tdist.init_process_group("gloo")
try:
    line = load_data(DataCfg(name="image_folder", path=sys.argv[1], image_size=16, bad_files=sys.argv[3]),
                     0).fingerprint()
except DataError as exc:
    line = f"error: {exc}"
open(f"{sys.argv[2]}/rank-{tdist.get_rank()}.txt", "w").write(line)
tdist.destroy_process_group()
"""


def test_an_image_folder_is_decoded_in_blocks_across_ranks(tmp_path):
    import numpy as np
    from PIL import Image

    from dlkit.config import DataCfg
    from dlkit.data import load_data
    from dlkit.errors import DataError

    rng = np.random.default_rng(0)
    for label in ("ant", "bee"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(9):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "photos" / label / f"{i}.png")
    (tmp_path / "script.py").write_text(READ_FOLDER)

    def both_ranks(bad_files: str) -> list[str]:
        proc = torchrun("--standalone", "--nproc-per-node", "2", str(tmp_path / "script.py"), str(tmp_path / "photos"),
                        str(tmp_path), bad_files)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        return [(tmp_path / f"rank-{r}.txt").read_text() for r in (0, 1)]

    def one(bad_files: str) -> str:
        return load_data(DataCfg(name="image_folder", path=str(tmp_path / "photos"), image_size=16,
                                 bad_files=bad_files), 0).fingerprint()

    assert both_ranks("fail") == [one("fail")] * 2  # every rank holds every image, decoded once across them
    (tmp_path / "photos" / "ant" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # in rank 0's block
    assert both_ranks("skip") == [one("skip")] * 2
    with pytest.raises(DataError) as single:
        one("fail")
    assert both_ranks("fail") == [f"error: {single.value}"] * 2  # the same line on each rank
