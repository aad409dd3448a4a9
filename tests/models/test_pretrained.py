"""pretrained.py against small stand-in checkpoints in torchvision's exact format (`name-<sha256 prefix>.pth`):
torch.hub's cache, a loopback mirror, corrupt and tampered files, the offline message, local files and
loading into models whose head differs from the checkpoint's. Nothing here touches the network."""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import urllib.error
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dlkit.errors import ConfigError, DataError
from dlkit.models import MODELS, build, pretrained
from dlkit.models.pretrained import (
    IMAGENET,
    HubFile,
    LoadReport,
    checkpoint_dir,
    imagenet_state,
    load_into,
    load_state,
    local_state,
    source_name,
    weights_url,
)

HEAD = ["classifier.1.weight", "classifier.1.bias"]  # MobileNetV2's head tensors
UNPICKLED: list[str] = []  # filled if a refused pickle ever ran code


def _record() -> str:
    UNPICKLED.append("ran")
    return "ran"


class _Payload:
    """An object whose unpickling would run `_record`: weights-only loading must refuse it."""

    def __reduce__(self):
        return (_record, ())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mobilenet(num_classes: int = 1000, width_mult: float = 0.25, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build("mobilenet_v2", num_classes=num_classes, input_shape=(3, 32, 32), width_mult=width_mult)


def _trained_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state with every tensor moved off its initial value, as a trained checkpoint's would be."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in model.state_dict().items():
        if t.is_floating_point():
            state[key] = (t + torch.randn(t.shape, generator=g)).clone()
        else:
            state[key] = torch.full_like(t, 7)  # num_batches_tracked
    return state


def _publish(folder: Path, state: dict[str, torch.Tensor], stem: str = "mnv2tiny") -> tuple[HubFile, bytes]:
    """Save `state` as torchvision does: `<stem>-<first 8 hex of its sha256>.pth`, next to nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f"{stem}.staging"
    torch.save(state, staging)
    data = staging.read_bytes()
    file = f"{stem}-{_sha(data)[:8]}.pth"
    staging.rename(folder / file)
    return HubFile(file, f"https://download.pytorch.org/models/{file}"), data


@pytest.fixture(autouse=True)
def _private_hub(tmp_path, monkeypatch):
    # torch.hub's folder inside the test; no mirror or proxy from the environment
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DLKIT_WEIGHTS_URL", raising=False)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture()
def published(tmp_path, monkeypatch):
    """A 1000-class MobileNetV2 (width 0.25) checkpoint registered as mobilenet_v2's ImageNet file, not yet cached."""
    state = _trained_state(_mobilenet(), seed=1)
    hub, data = _publish(tmp_path / "published", state)
    monkeypatch.setitem(IMAGENET, "mobilenet_v2", hub)
    return hub, data, state


@pytest.fixture()
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.hub was asked to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


class _Handler(BaseHTTPRequestHandler):
    """GET /<file>: the bytes in server.files, or 404."""

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        body = self.server.files.get(self.path.strip("/"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def mirror(monkeypatch) -> Iterator[ThreadingHTTPServer]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.hits = {}, []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(30.0, srv.shutdown)  # bounded even if a test hangs
    watchdog.daemon = True
    watchdog.start()
    monkeypatch.setenv("DLKIT_WEIGHTS_URL", f"http://127.0.0.1:{srv.server_address[1]}/")
    yield srv
    watchdog.cancel()
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], ordered: bool = True) -> None:
    assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
    for key, value in a.items():
        assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key


# ---- the table and the folders ---------------------------------------------------------------


def test_imagenet_table_holds_torchvisions_default_checkpoints():
    # torchvision/models/*.py: <Model>_Weights.DEFAULT of each (mobilenet_v2 and resnet50: IMAGENET1K_V2)
    files = {
        "alexnet": "alexnet-owt-7be5be79.pth",
        "mobilenet_v2": "mobilenet_v2-7ebf99e0.pth",
        "resnet18": "resnet18-f37072fd.pth",
        "resnet50": "resnet50-11ad3fa6.pth",
        "vgg11": "vgg11-8a719046.pth",
        "vgg16": "vgg16-397923af.pth",
        "vgg16_bn": "vgg16_bn-6c64b313.pth",
    }
    assert {name: hub.file for name, hub in IMAGENET.items()} == files
    for name, hub in IMAGENET.items():
        assert hub.url == f"https://download.pytorch.org/models/{hub.file}"
        assert len(hub.sha256_prefix) == 8 and int(hub.sha256_prefix, 16) >= 0
        assert name in MODELS  # every entry names a registered model


def test_checkpoint_dir_is_torch_hubs_and_the_mirror_takes_the_file_name(tmp_path, monkeypatch):
    assert checkpoint_dir() == tmp_path / "torch" / "hub" / "checkpoints"
    hub = IMAGENET["resnet18"]
    assert weights_url(hub) == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    monkeypatch.setenv("DLKIT_WEIGHTS_URL", "http://mirror.local/weights/")
    assert weights_url(hub) == "http://mirror.local/weights/resnet18-f37072fd.pth"
    monkeypatch.setenv("DLKIT_WEIGHTS_URL", "")
    assert weights_url(hub) == hub.url


def test_unknown_model_is_a_config_error_listing_the_models():
    with pytest.raises(ConfigError) as err:
        imagenet_state("seed_cnn")
    assert str(err.value) == (
        "model 'seed_cnn' has no ImageNet checkpoint; models with one: "
        "alexnet, mobilenet_v2, resnet18, resnet50, vgg11, vgg16, vgg16_bn"
    )


# ---- ImageNet checkpoints: cache, download, tampering, offline ---------------------------------


def test_a_cached_checkpoint_is_served_from_disk_into_a_smaller_head(published, no_download):
    hub, data, state = published
    checkpoint_dir().mkdir(parents=True)
    (checkpoint_dir() / hub.file).write_bytes(data)

    loaded = imagenet_state("mobilenet_v2")
    _assert_same(loaded, state)
    assert load_state("imagenet", "mobilenet_v2").keys() == state.keys()

    model = _mobilenet(num_classes=10, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    report = load_into(model, loaded, source_name("imagenet", "mobilenet_v2"))

    after = model.state_dict(keep_vars=True)
    trunk = [k for k in after if k not in HEAD]
    assert len(trunk) == len(state) - 2
    for key in trunk:  # every trunk tensor is the checkpoint's, bit for bit, in the very same tensor object
        assert torch.equal(after[key], state[key]) and not torch.equal(before[key], state[key]), key
        assert id(after[key]) == ids[key]
    for key in HEAD:  # the 10-class head keeps its initialisation
        assert torch.equal(after[key], before[key])
    assert report == LoadReport(
        source=f"imagenet ({hub.file})", loaded=len(trunk), fresh=HEAD, ignored=HEAD
    )
    assert report.line() == f"loaded {len(trunk)} tensors from imagenet ({hub.file}); new: {', '.join(HEAD)}"


def test_a_model_with_the_checkpoints_head_takes_every_tensor(published, no_download):
    hub, data, state = published
    checkpoint_dir().mkdir(parents=True)
    (checkpoint_dir() / hub.file).write_bytes(data)
    model = _mobilenet(num_classes=1000, seed=3)
    report = load_into(model, imagenet_state("mobilenet_v2"), "x")
    assert (report.loaded, report.fresh, report.ignored) == (len(state), [], [])
    _assert_same(model.state_dict(), state)


def test_a_checkpoint_is_downloaded_from_the_mirror_once(published, mirror):
    hub, data, state = published
    mirror.files[hub.file] = data
    _assert_same(imagenet_state("mobilenet_v2"), state)
    assert (checkpoint_dir() / hub.file).read_bytes() == data
    assert sorted(os.listdir(checkpoint_dir())) == [hub.file]  # no .partial left beside it
    _assert_same(imagenet_state("mobilenet_v2"), state)
    assert mirror.hits == [f"/{hub.file}"]  # the second call read the cache


def test_a_download_with_other_bytes_is_refused_and_leaves_nothing(published, mirror, tmp_path):
    hub, _, _ = published
    _, other = _publish(tmp_path / "other", _trained_state(_mobilenet(), seed=9))
    mirror.files[hub.file] = other
    url = f"http://127.0.0.1:{mirror.server_address[1]}/{hub.file}"
    with pytest.raises(DataError) as err:
        imagenet_state("mobilenet_v2")
    assert str(err.value) == (
        f"downloaded {hub.file} from {url} but its sha256 does not match (the download was cut short, or the "
        f"server or a proxy altered it): try again or download {hub.url} by hand into {checkpoint_dir()}"
    )
    assert mirror.hits == [f"/{hub.file}"]
    assert os.listdir(checkpoint_dir()) == []  # neither the file nor a partial one


def test_a_corrupt_cached_file_is_refused_before_it_is_parsed(published, no_download, monkeypatch):
    hub, data, _ = published
    path = checkpoint_dir() / hub.file
    path.parent.mkdir(parents=True)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))

    def parse(*args, **kwargs):
        raise AssertionError("a corrupt file was parsed")

    monkeypatch.setattr(torch, "load", parse)
    with pytest.raises(DataError) as err:
        imagenet_state("mobilenet_v2")
    assert str(err.value) == (
        f"{path} is corrupt (sha256 {_sha(bytes(flipped))[:8]} does not start with {hub.sha256_prefix}): "
        "delete it and run again"
    )


def test_a_cached_file_that_matches_its_name_but_is_not_a_checkpoint_is_refused(tmp_path, monkeypatch, no_download):
    junk = b"not a checkpoint at all"
    hub = HubFile(f"junk-{_sha(junk)[:8]}.pth", "https://download.pytorch.org/models/junk.pth")
    monkeypatch.setitem(IMAGENET, "mobilenet_v2", hub)
    path = checkpoint_dir() / hub.file
    path.parent.mkdir(parents=True)
    path.write_bytes(junk)
    with pytest.raises(DataError, match=r"is not a weights-only PyTorch checkpoint \(.*\): delete it and run again$"):
        imagenet_state("mobilenet_v2")


def test_offline_names_the_file_both_urls_and_the_folder(published, monkeypatch):
    hub, _, _ = published
    dead = _closed_port_url()
    monkeypatch.setenv("DLKIT_WEIGHTS_URL", dead)
    with pytest.raises(DataError) as err:
        imagenet_state("mobilenet_v2")
    msg = str(err.value)
    assert msg == (
        f"ImageNet weights for mobilenet_v2 are not on this machine and cannot be downloaded from {dead}/{hub.file} "
        f"(Connection refused): download {hub.url} into {checkpoint_dir()} (set TORCH_HOME to use another "
        "folder), or set model.weights to a local .pth or .safetensors file"
    )
    assert "\n" not in msg and os.listdir(checkpoint_dir()) == []


def test_a_server_that_never_answers_times_out_instead_of_hanging(published, monkeypatch):
    hub, _, _ = published
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never sends a byte
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    monkeypatch.setenv("DLKIT_WEIGHTS_URL", url)
    monkeypatch.setattr(pretrained, "DOWNLOAD_TIMEOUT_S", 0.5)
    before = socket.getdefaulttimeout()
    try:
        with pytest.raises(DataError) as err:
            imagenet_state("mobilenet_v2")
    finally:
        silent.close()
    assert str(err.value).startswith(f"ImageNet weights for mobilenet_v2 are not on this machine and cannot be "
                                      f"downloaded from {url}/{hub.file} (timed out): download {hub.url}")
    assert socket.getdefaulttimeout() == before  # the process-wide default is restored
    assert os.listdir(checkpoint_dir()) == []


@pytest.mark.parametrize(
    "failure, reason",
    [
        (urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution")),
         "Temporary failure in name resolution"),
        (urllib.error.HTTPError("u", 403, "Forbidden", {}, None), "HTTP 403"),
        (TimeoutError("timed out"), "timed out"),
    ],
)
def test_offline_from_the_official_url_names_it_once(published, monkeypatch, failure, reason):
    hub, _, _ = published

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    with pytest.raises(DataError) as err:
        imagenet_state("mobilenet_v2")
    assert str(err.value) == (
        f"ImageNet weights for mobilenet_v2 are not on this machine and cannot be downloaded ({reason}): "
        f"download {hub.url} into {checkpoint_dir()} (set TORCH_HOME to use another folder), "
        "or set model.weights to a local .pth or .safetensors file"
    )


def test_a_failure_of_another_kind_is_not_disguised(published, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    with pytest.raises(KeyError, match="bug"):
        imagenet_state("mobilenet_v2")


# ---- local files ----------------------------------------------------------------------------------


@pytest.fixture()
def state() -> dict[str, torch.Tensor]:
    return _trained_state(_mobilenet(num_classes=10), seed=4)


def test_safetensors_round_trip(tmp_path, state):
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    _assert_same(local_state(path), state, ordered=False)  # safetensors stores keys sorted
    _assert_same(load_state(str(path), "mobilenet_v2"), state, ordered=False)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt", ".PTH"])
def test_pytorch_round_trip(tmp_path, state, suffix):
    path = tmp_path / f"w{suffix}"
    torch.save(state, path)
    _assert_same(local_state(str(path)), state)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrappers_and_ddp_prefixes_are_taken_off(tmp_path, state, wrapper):
    path = tmp_path / "w.ckpt"
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9).state_dict()
    wrapped = {wrapper: {f"module.{k}": v for k, v in state.items()}, "epoch": 3, "optimizer": optimizer}
    torch.save(wrapped, path)
    _assert_same(local_state(path), state)


def test_a_module_prefix_on_only_some_keys_stays(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"module.a": torch.zeros(1), "b": torch.ones(1)}, path)
    assert list(local_state(path)) == ["module.a", "b"]


def test_a_pickle_with_python_objects_is_refused_without_running_it(tmp_path, state):
    path = tmp_path / "w.pth"
    torch.save({**state, "extra": _Payload()}, path)
    with pytest.raises(DataError) as err:
        local_state(path)
    msg = str(err.value)
    assert msg.startswith(f"{path} is not a weights-only PyTorch checkpoint (it pickles ")
    assert "_record, which weights-only loading refuses to run): save a plain state dict" in msg
    assert "\n" not in msg and UNPICKLED == []


@pytest.mark.parametrize(
    "content, detail",
    [
        ("truncated", "(PytorchStreamReader failed reading zip archive: failed finding central directory)"),
        (b"", "(it ends too early: empty or truncated)"),
        (b"hello, not a checkpoint", "(unreadable: "),
    ],
)
def test_a_corrupt_pytorch_file_is_one_line(tmp_path, state, content, detail):
    path = tmp_path / "w.pth"
    if content == "truncated":
        torch.save(state, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        local_state(path)
    msg = str(err.value)
    assert msg.startswith(f"{path} is not a weights-only PyTorch checkpoint {detail}")
    assert msg.endswith("it is truncated, corrupt or not a PyTorch file; save or copy it again") and "\n" not in msg


def test_a_corrupt_safetensors_file_is_one_line(tmp_path, state):
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match=r"^.*w\.safetensors is not a readable safetensors file \(") as err:
        local_state(path)
    assert "\n" not in str(err.value)


def test_missing_file_folder_and_unknown_suffix(tmp_path):
    accepted = ".pth, .pt, .bin, .ckpt (PyTorch, weights only) or .safetensors"
    with pytest.raises(DataError) as err:
        local_state(tmp_path / "nope.pth")
    assert str(err.value) == (
        f"{tmp_path / 'nope.pth'}: weights file not found; set model.weights to a {accepted} file, to 'imagenet', "
        "or to 'none' for random initial weights"
    )
    with pytest.raises(DataError, match="is not a file"):
        local_state(tmp_path)
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(DataError) as err:
        local_state(tmp_path / "w.npz")
    assert str(err.value) == f"{tmp_path / 'w.npz'}: unknown weights format '.npz'; accepted: {accepted}"


@pytest.mark.parametrize(
    "content, message",
    [
        ({"w": torch.zeros(1), "epoch": 3}, "'epoch' is not a tensor but int; a weights file maps names to tensors"),
        ({"model": {"w": torch.zeros(1)}, "ema": {"w": torch.zeros(1)}}, "holds several state dicts ('model', 'ema')"),
        ({"state_dict": {"w": torch.zeros(1), "step": 5}}, "'step' is not a tensor but int"),
        (torch.zeros(3), "holds a Tensor, not a state dict of named tensors"),
        ({}, "holds no tensors"),
        ({1: torch.zeros(1)}, "key 1 is not a parameter name"),
    ],
)
def test_files_that_are_not_state_dicts(tmp_path, content, message):
    path = tmp_path / "w.pt"
    torch.save(content, path)
    with pytest.raises(DataError) as err:
        local_state(path)
    assert message in str(err.value) and str(err.value).startswith(str(path))


# ---- load_into ------------------------------------------------------------------------------------


def test_a_missing_trunk_tensor_names_it_and_changes_nothing(state):
    model = _mobilenet(num_classes=10, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    del state["features.0.1.running_mean"]
    with pytest.raises(DataError) as err:
        load_into(model, state, "ckpt.pth")
    assert str(err.value) == (
        "ckpt.pth does not fit MobileNetV2: 'features.0.1.running_mean' is missing from the checkpoint "
        "(its first key is 'features.0.0.weight'); check model.name"
    )
    _assert_same(model.state_dict(), before)


def test_a_trunk_of_another_width_names_the_key_and_both_shapes():
    wide = _mobilenet(num_classes=10, width_mult=0.5).state_dict()
    with pytest.raises(DataError) as err:
        load_into(_mobilenet(num_classes=10, width_mult=0.25), wide, "wide.pth")
    assert str(err.value) == (
        "wide.pth does not fit MobileNetV2: 'features.0.0.weight' has shape (16, 3, 3, 3) in the checkpoint "
        "but (8, 3, 3, 3) in the model; check model.name and model.width_mult"
    )


def test_another_models_checkpoint_does_not_fit():
    resnet = build("resnet18", num_classes=10, input_shape=(3, 32, 32)).state_dict()
    with pytest.raises(DataError, match=r"^r\.pth does not fit MobileNetV2: 'features\.0\.0\.weight' is missing"):
        load_into(_mobilenet(num_classes=10), resnet, "r.pth")


def test_copies_cast_dtypes_in_place_so_optimizers_keep_their_tensors(state):
    model = _mobilenet(num_classes=10, seed=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    doubles = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    extra = {f"aux.{i}": torch.zeros(1) for i in range(8)}
    report = load_into(model, {**doubles, **extra}, "d.pth")
    weight = model.features[0][0].weight
    assert weight.dtype == torch.float32 and torch.equal(weight, state["features.0.0.weight"])
    assert optimizer.param_groups[0]["params"][0] is weight
    assert (report.loaded, report.fresh, report.ignored) == (len(state), [], list(extra))
    assert report.line() == (
        f"loaded {len(state)} tensors from d.pth; not in the model: "
        "aux.0, aux.1, aux.2, aux.3, aux.4, aux.5 and 2 more"
    )


def test_vgg_keeps_its_hidden_layers_and_renews_the_last_one():
    torch.manual_seed(7)
    imagenet = build("vgg11", num_classes=1000, input_shape=(3, 32, 32)).state_dict()
    torch.manual_seed(8)
    model = build("vgg11", num_classes=2, input_shape=(3, 32, 32))
    last = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("classifier.6.")}
    report = load_into(model, imagenet, "vgg11.pth")
    new = ["classifier.6.weight", "classifier.6.bias"]
    assert (report.loaded, report.fresh, report.ignored) == (len(imagenet) - 2, new, new)
    after = model.state_dict()
    for key in after:
        if key.startswith("classifier.6."):
            assert torch.equal(after[key], last[key]) and after[key].shape[0] == 2
        else:  # features.* and the head's classifier.0 / classifier.3, shapes alike
            assert torch.equal(after[key], imagenet[key]), key


def test_the_report_line_lists_new_and_unused_keys():
    report = LoadReport(source="s.pth", loaded=3, fresh=["fc.weight", "fc.bias"], ignored=["fc.weight", "x"])
    assert report.line() == "loaded 3 tensors from s.pth; new: fc.weight, fc.bias; not in the model: x"
    assert LoadReport(source="s.pth", loaded=1, fresh=[], ignored=[]).line() == "loaded 1 tensor from s.pth"
    assert source_name("imagenet", "resnet18") == "imagenet (resnet18-f37072fd.pth)"
    assert source_name("runs/a/w.pth", "resnet18") == "runs/a/w.pth"


def test_pretrained_does_not_need_torchvision():
    assert pretrained.IMAGENET is IMAGENET and "torchvision" not in sys.modules


@pytest.mark.parametrize("overrides", [["model.weights=none"], ["model.weights=NONE"], ["model.weights=None"],
                                       ["model.weights=null"], ["model.weights=~"]])
def test_weights_none_is_random_initialisation_with_no_imagenet_preprocessing(overrides):
    from dlkit.recipes import load_recipe

    pretrained = load_recipe("mnist-mobilenetv2")
    assert (pretrained.model.weights, pretrained.data.normalize, pretrained.data.channels) == ("imagenet", "imagenet", 3)
    random = load_recipe("mnist-mobilenetv2", overrides)
    assert (random.model.weights, random.data.normalize, random.data.channels) == (None, "scale", None)


def test_a_frozen_base_with_random_weights_is_a_warning_not_an_error(capsys):
    from dlkit.recipes import load_recipe
    from dlkit.runner import load_pretrained

    model = build("mlp", num_classes=10, input_shape=(1, 28, 28))
    warning = ("model.weights is none (random initialisation) but train.freeze: base: the head trains on random "
               "features; set model.weights (e.g. imagenet) or train.freeze: none")
    frozen = load_recipe("digits-mlp", ["model.weights=none", "train.freeze=base"])
    assert load_pretrained(frozen, model) == warning
    assert capsys.readouterr().err == f"warning: {warning}\n"
    staged = load_recipe("digits-mlp", ["model.weights=none", "train.stages=[{freeze: base}, {freeze: none}]"])
    assert load_pretrained(staged, model).startswith("model.weights is none (random initialisation) but a stage "
                                                     "freezes the base: ")
    capsys.readouterr()
    for trained in (load_recipe("digits-mlp", ["model.weights=none"]),
                    load_recipe("digits-mlp", ["train.freeze=base", "train.stages=[{freeze: none}]"])):
        assert load_pretrained(trained, model) is None  # the whole model trains: random weights are fine
    assert capsys.readouterr().err == ""
