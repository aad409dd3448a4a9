"""A run you can trust: one atomic writer, digests checked before use, every corrupt or hand-edited
file one error line naming it, Ctrl-C / SIGTERM / full disks ending cleanly with nothing lost."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dlkit
from dlkit.config import parse_recipe
from dlkit.engine.checkpoint import load_weights, read_meta
from dlkit.engine.resume import read_position, state_files
from dlkit.errors import RunDirError
from dlkit.files import write_atomic, write_json
from dlkit.models import build
from dlkit.recipes import load_recipe
from dlkit.runner import execute


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished digits-mlp run (a few seconds); tests copy it before breaking anything."""
    return dlkit.run("digits-mlp", epochs=1, out=tmp_path_factory.mktemp("integrity") / "run").run_dir


@pytest.fixture
def run(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "copy"))


# ---- one atomic writer ---------------------------------------------------------------------------

def test_every_file_of_a_run_has_the_same_mode_and_no_temporary_is_left(finished):
    files = [p for p in finished.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "bundle.json", "summary.json", "recipe.yaml",
                                       "metrics.jsonl", "status.json", "last.safetensors", "best.safetensors"}
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert not [p for p in finished.rglob("*.tmp")]


def test_a_failing_or_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_json(tmp_path / "a.json", {"v": 1})
    for error in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()):
        def fail(f, error=error):
            f.write(b'{"v": 2, "half')
            raise error

        with pytest.raises(type(error)):
            write_atomic(target, fail)
        assert json.loads(target.read_text()) == {"v": 1}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


# ---- integrity: digests and checked files ---------------------------------------------------------

def test_bundle_records_the_weights_sha256(finished):
    bundle = json.loads((finished / "bundle.json").read_text())

    assert bundle["format"] == "dlkit-bundle/2"
    assert bundle["files"] == {"model.safetensors": hashlib.sha256((finished / "model.safetensors").read_bytes()).hexdigest()}


def test_one_flipped_bit_in_the_weights_is_refused_before_predicting(run, run_cli):
    raw = bytearray((run / "model.safetensors").read_bytes())
    raw[-3] ^= 0x01  # a bit of the last tensor's data: safetensors itself still parses it
    (run / "model.safetensors").write_bytes(bytes(raw))
    code, out, err = run_cli("predict", run, "1,2,3")
    assert (code, out) == (2, "")
    assert one_error_line(err) == (f"error: {run / 'model.safetensors'} does not match the sha256 in bundle.json "
                                   "(changed or corrupt); restore it or re-run the recipe")
    for command in ("evaluate", "report"):
        code, _, err = run_cli(command, run)
        assert code == 2 and "does not match the sha256 in bundle.json" in one_error_line(err)


def _edit_json(name: str, change):
    def edit(run: Path) -> None:
        data = json.loads((run / name).read_text())
        change(data)
        (run / name).write_text(json.dumps(data))
    return edit


def _write(name: str, data: bytes):
    return lambda run: (run / name).write_bytes(data)


def _truncate_metrics(run: Path) -> None:
    (run / "metrics.jsonl").write_text('{"epoch": 1, "stage": 0, "train_loss": 0.5}\n{"epoch": 2, "sta')


def _wider_input(run: Path) -> None:
    bundle = json.loads((run / "bundle.json").read_text())
    bundle["model"]["args"]["input_shape"] = [1, 9, 9]
    bundle["input_shape"] = [1, 9, 9]
    (run / "bundle.json").write_text(json.dumps(bundle))


CORRUPTIONS = {
    # id: (how to break the run, the command that reads it, what its one line says)
    "bundle-bad-utf8": (_write("bundle.json", b'{"format": "\xff\xfe"}'), "predict", "bundle.json is not UTF-8 text"),
    "bundle-not-json": (_write("bundle.json", b'{"format": '), "predict", "bundle.json is not valid JSON (line 1"),
    "bundle-missing-key": (_edit_json("bundle.json", lambda b: b.pop("classes")), "predict",
                           "bundle.json: field 'classes' is missing; re-run the recipe"),
    "bundle-wrong-type": (_edit_json("bundle.json", lambda b: b.update(classes="0123456789")), "predict",
                          "bundle.json: field 'classes': input should be a valid list"),
    "bundle-empty-classes": (_edit_json("bundle.json", lambda b: b.update(classes=[])), "predict",
                             "bundle.json: a multiclass model needs at least two class names, got 0"),
    "bundle-classes-dont-fit": (_edit_json("bundle.json", lambda b: b.update(classes=["a", "b", "c"])), "predict",
                                "model.args.num_classes is 10 but 3 classes need 3"),
    "bundle-zero-shape": (_edit_json("bundle.json", lambda b: b.update(input_shape=[0, 8, 8])), "predict",
                          "field 'input_shape': every dimension must be at least 1, got [0, 8, 8]"),
    "bundle-shape-doesnt-fit-weights": (_wider_input, "predict", "does not fit the model (shapes differ: "),
    "bundle-no-digest": (_edit_json("bundle.json", lambda b: b.update(files={})), "predict",
                         "field 'files': dictionary should have at least 1 item"),
    "recipe-python-tag": (_write("recipe.yaml", b"name: !!python/object/apply:os.system ['echo hi']\n"), "evaluate",
                          "recipe.yaml"),
    "recipe-bad-utf8": (_write("recipe.yaml", b"name: \xff\xfe\n"), "evaluate", "recipe.yaml"),
    "recipe-missing-data": (_write("recipe.yaml", b"name: x\nmodel: {name: mlp}\n"), "evaluate",
                            "field 'data' is required"),
    "summary-wrong-type": (_edit_json("summary.json", lambda s: s.update(test_accuracy="high")), "compare",
                           "summary.json: 'test_accuracy' must be a number, got 'high'; re-run the recipe"),
    "summary-not-an-object": (_write("summary.json", b"[1, 2]"), "compare", "summary.json must hold a JSON object"),
    "status-corrupt": (_write("status.json", b'{"state": "done?"}'), "predict", "status.json holds no valid state"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupt_or_hand_edited_file_is_one_error_line_naming_it(run, run_cli, case):
    breaks, command, message = CORRUPTIONS[case]
    breaks(run)
    args = (command, run, "1,2,3") if command == "predict" else (command, run)
    code, out, err = run_cli(*args)
    assert (code, out) == (2, ""), err
    line = one_error_line(err)
    assert message in line, line
    name = message.split(":")[0].split(" ")[0] if ".json" in message or ".yaml" in message else None
    assert name is None or name in line


def test_a_truncated_metrics_line_names_the_file_and_line(run):
    _truncate_metrics(run)
    from dlkit.rundir import RunDir

    with pytest.raises(RunDirError) as info:
        RunDir.open(run).history()
    assert str(info.value) == f"{run / 'metrics.jsonl'}: line 2 is not valid JSON (truncated?); it is corrupt"


# ---- checkpoints: one atomic unit ---------------------------------------------------------------

def test_a_checkpoint_holds_its_weights_and_metadata_together(finished):
    last = finished / "checkpoints" / "last.safetensors"
    meta = read_meta(last)
    assert meta["epoch"] == 1 and meta["stage"] == 0 and set(meta["metrics"]) >= {"train_loss", "val_loss"}
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.safetensors", "last.safetensors"]
    bundle = json.loads((finished / "bundle.json").read_text())
    model = build("mlp", **{**bundle["model"]["args"], "input_shape": tuple(bundle["input_shape"])})
    load_weights(model, last)  # the metadata travels in the header: the file is still plain safetensors


# ---- a library call does not change its argument; recipe.yaml is the recipe as given -------------

def test_execute_leaves_the_callers_recipe_as_it_was(tmp_path):
    recipe = load_recipe("digits-mlp", ["data.val_split=0", "train.checkpoint.monitor=val_accuracy"], epochs=1)
    before = recipe.model_dump()
    result = execute(recipe, out=tmp_path / "r")
    assert recipe.model_dump() == before
    written = parse_recipe(yaml.safe_load((tmp_path / "r" / "recipe.yaml").read_text()))
    assert written.train.checkpoint.monitor == "val_accuracy"
    assert result.summary["notes"][0] == ("best checkpoint monitors train_loss (val_accuracy is not measured in "
                                          "this run)")
    assert read_meta(tmp_path / "r" / "checkpoints" / "best.safetensors")["monitor"] == "train_loss"


# ---- disks and paths: one line, said before the data are loaded ---------------------------------

def test_out_under_a_file_is_refused_before_loading_data(tmp_path, run_cli, monkeypatch):
    (tmp_path / "file").write_text("x")
    import dlkit.runner as runner

    monkeypatch.setattr(runner, "load_data", lambda *a: pytest.fail("data loaded before the check"))
    code, out, err = run_cli("run", "digits-mlp", "--out", tmp_path / "file" / "run")
    assert code == 2
    assert one_error_line(err) == (f"error: --out {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, "
                                   "not a folder; choose another path")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_refused(tmp_path, run_cli):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code, _, err = run_cli("run", "digits-mlp", "--out", locked / "run")
    assert code == 2 and "no permission to write in" in one_error_line(err)


def test_a_full_disk_while_saving_is_one_line_and_marks_the_run_failed(tmp_path, run_cli, monkeypatch):
    import dlkit.engine.checkpoint as checkpoint

    def full(state, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(checkpoint, "save_file", full)
    out_dir = tmp_path / "r"
    code, out, err = run_cli("run", "digits-mlp", "--epochs", "1", "--quiet", "--out", out_dir)
    assert code == 2
    line = one_error_line(err)
    assert line.startswith("error: No space left on device: ") and line.endswith(".tmp")
    status = json.loads((out_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["message"].startswith("No space left on device")
    assert not (out_dir / "model.safetensors").exists() and not list(out_dir.rglob("*.tmp"))
    code, _, err = run_cli("predict", out_dir, "1,2")
    assert code == 2 and one_error_line(err).startswith(f"error: {out_dir} is not a finished run (it is failed: No space")


def test_explain_output_that_is_a_folder_or_under_a_file(run, tmp_path, run_cli):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("explain", run, "digit.png", "-o", tmp_path / "folder")
    assert code == 2 and one_error_line(err) == (f"error: -o {tmp_path / 'folder'} is a folder; give a file name "
                                                 f"such as {tmp_path / 'folder' / 'out.png'}")
    code, _, err = run_cli("explain", run, "digit.png", "-o", tmp_path / "file" / "x.png")
    assert code == 2 and one_error_line(err) == (f"error: -o {tmp_path / 'file' / 'x.png'}: {tmp_path / 'file'} "
                                                 "is a file, not a folder")


def test_plots_being_a_file_is_one_line(run, run_cli):
    (run / "plots").write_text("not a folder")
    code, _, err = run_cli("report", run)
    assert code == 2
    assert one_error_line(err) == (f"error: {run / 'plots'} is a file, not a folder; move it away: the report "
                                   "writes its plots there")


# ---- interrupts: exit 130 / 143, one line, the run marked, the last checkpoint intact -------------

def _interrupt(tmp_path: Path, sig: int) -> tuple[subprocess.CompletedProcess, Path]:
    """Start `dlkit run` on digits-cnn for many epochs and send `sig` once two epochs are done."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dlkit", "run", "digits-cnn", "--epochs", "300", "--out", str(out),
                             "--no-report"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NO_COLOR": "1"})
    lines = []
    for line in proc.stdout:  # plain progress: one line per epoch
        lines.append(line)
        if line.startswith("epoch 2/300"):
            proc.send_signal(sig)
            break
    rest, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + rest, err), out


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_run_exits_with_its_code_and_keeps_its_checkpoint(tmp_path, run_cli, sig, code):
    done, out = _interrupt(tmp_path, sig)
    assert done.returncode == code, done.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted"
    states = state_files(out / "checkpoints")
    position = read_position(states[-1])
    epochs_done = position["epoch"] - (position["step"] is not None)
    assert epochs_done >= 2
    what = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert done.stderr.splitlines() == [
        f"{what}: stopping after this step to write a checkpoint (Ctrl-C again stops at once)",
        f"interrupted: {status['message']}", f"resume with: dlkit resume {out}"]
    step = "" if position["step"] is None else f" (step {position['step']})"
    assert status["message"].startswith("stopped ") and status["message"].endswith(
        f"of 300{step}; kept checkpoints/{states[-1].name}")
    assert not (out / "model.safetensors").exists() and not list(out.rglob("*.tmp"))
    # the metrics of every finished epoch are whole lines
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, epochs_done + 1))
    # nothing takes it for a finished run
    for args in (("predict", out, "x.png"), ("evaluate", out), ("report", out), ("compare", out)):
        rc, _, err = run_cli(*args)
        assert rc == 2 and one_error_line(err).startswith(f"error: {out} is not a finished run (it is interrupted: "
                                                          "stopped ")
