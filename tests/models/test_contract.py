"""One contract every registered model meets, plus the registry's errors and seed_cnn's layer order."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from dlkit.errors import ConfigError, RegistryError
from dlkit.models import MODELS, build, family
from dlkit.models.surface import DlkitModel, ModelSurface


@dataclass
class Case:
    """How to build one model, what to feed it and what its parameter count must be."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 10
    params: int | None = None
    conv: bool = False
    batch: int = 4
    backward: bool = True  # off only for the >100M-parameter VGGs: their 0.5 GB of gradients cost seconds
    grid: tuple[int, int] | None = None  # the patch grid an image transformer's attention maps cover


def imagenet(params: int, **kwargs: Any) -> Case:
    """A torchvision-layout model at 1000 classes fed 32x32 images (its adaptive pool allows it), two at a time."""
    settings: dict[str, Any] = {"input_shape": (3, 32, 32), "num_classes": 1000, "conv": True, "batch": 2}
    return Case(params=params, **{**settings, **kwargs})


CASES: dict[str, list[Case]] = {
    "mlp": [Case(params=109_386)],  # S2.3: 784*128+128 + 128*64+64 + 64*10+10
    # S0.1: conv 320 + conv 18,496 + dense 1600*128+128 = 204,928 + 1,290
    "seed_cnn": [
        Case(params=225_034, conv=True),
        Case(input_shape=(3, 32, 32), params=315_722, conv=True),  # flatten 6*6*64 = 2304
        Case(kwargs={"batch_norm": True, "dropout": 0.5}, params=225_034 + 2 * (32 + 64), conv=True),
    ],
    "seed_cnn3": [Case(params=93_322, conv=True)],  # S3.A, as the write-up states
    "lstm": [
        # tabular: 4 * (64 * 1 + 64 * 64 + 2 * 64) + 65 (PyTorch keeps two bias vectors per gate)
        Case(input_shape=(30,), num_classes=1, params=17_217),
        # token ids: embedding 50*8 + 4 * (16*8 + 16*16 + 2*16) + 17
        Case(kwargs={"vocab_size": 50, "embed_dim": 8, "hidden": 16}, input_shape=(12,), num_classes=1, params=2_081),
        Case(kwargs={"vocab_size": 50, "embed_dim": 8, "stacked": (8, 4), "bidirectional": True, "cell": "gru"},
             input_shape=(12,), num_classes=3),
    ],
    # S1.3: convs 6*25+6 = 156, 16*6*25+16 = 2,416, 120*16*25+120 = 48,120; dense 120*84+84, 84*10+10
    "lenet": [
        Case(params=61_706, conv=True),
        Case(input_shape=(3, 32, 32), params=92_246, conv=True),  # conv1 456; C5 leaves 2x2: 480*84+84
    ],
    # S1.4: convs 1,792 + 307,392 + 663,936 + 884,992 + 590,080; dense 4096*4096+4096 twice, 40,970
    "alexnet32": [
        Case(input_shape=(3, 32, 32), params=36_051_786, conv=True),
        # conv1 640; 28 -> 14 -> 7 -> 3, so 2304*256+256 + 256*256+256 + 2,570
        Case(kwargs={"dense": 256}, params=3_105_482, conv=True),
    ],
    # S1.5: convs 14,208 + 614,656 + 885,120 + 1,327,488 + 884,992; the same dense layers as alexnet32
    "zfnet": [Case(input_shape=(3, 32, 32), params=37_330_058, conv=True)],
    # S1.7, He et al. 2016: stem 464; per stage 16/32/64: 4,672 / 18,560 / 73,984 a block (first blocks
    # 13,952 and 55,552 with 16->32, 32->64 convs); fc 650. Option B adds 1x1 convs + BN: 576 + 2,176
    "resnet20": [
        Case(input_shape=(3, 32, 32), params=269_722, conv=True),
        Case(kwargs={"shortcut": "B"}, input_shape=(3, 32, 32), params=272_474, conv=True),
    ],
    "resnet56": [Case(input_shape=(3, 32, 32), params=853_018, conv=True)],
    # torchvision layout at 1000 classes (adaptive pools make 32x32 inputs give the ImageNet counts)
    "alexnet": [imagenet(61_100_840, input_shape=(3, 64, 64))],  # its three 3x3/2 pools need 63x63
    "vgg11": [imagenet(132_863_336, backward=False)],
    "vgg16": [imagenet(138_357_544, backward=False)],
    "vgg16_bn": [imagenet(138_365_992, backward=False)],
    "resnet18": [
        imagenet(11_689_512),
        # fc 5,130 instead of 513,000; conv1 64*1*49 instead of 64*3*49 (-6,272)
        Case(input_shape=(1, 28, 28), params=11_175_370, conv=True),
    ],
    "resnet50": [imagenet(25_557_032)],
    # distilbert-base-uncased + pre_classifier 590,592 + classifier 1,538: the published 66,955,010
    "distilbert": [
        Case(input_shape=(16,), num_classes=2, params=66_955_010, backward=False),
        Case(kwargs={"config": {"vocab_size": 50, "dim": 16, "n_layers": 1, "n_heads": 2, "hidden_dim": 32,
                                "max_position_embeddings": 32}}, input_shape=(16,), num_classes=1),
    ],
    # the tiny shape: 128 wide, 6 blocks of 4 heads, MLP 256. Patch conv 3*16*128+128 = 6,272 (MNIST: 1*49*128+128
    # = 6,400), class token 128, positions 65*128 = 8,320 (17*128 = 2,176); a block: two norms 512, qkv
    # 128*384+384 = 49,536, proj 16,512, MLP 33,024 + 32,896: 132,480, x6 = 794,880; final norm 256; head 1,290
    "vit_tiny_patch4": [Case(input_shape=(3, 32, 32), params=811_146, grid=(8, 8))],
    "vit_tiny_patch7": [
        Case(params=805_130, grid=(4, 4)),
        Case(kwargs={"pool": "mean"}, params=805_130 - 128 - 128, grid=(4, 4)),  # no class token, 16 positions
    ],
    # 16x12 in 4x4 patches: a 4x3 grid. Patch conv 16*32+32 = 544, class token 32, positions 13*32 = 416; a
    # block: norms 128, qkv 3,168, proj 1,056, MLP 4,224 + 4,128: 12,704, x2; final norm 64; head 32*3+3 = 99
    "vit": [Case(kwargs={"patch": 4, "dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 4}, input_shape=(1, 16, 12),
                 num_classes=3, params=26_563, grid=(4, 3))],
    # bert-base-uncased (BertModel, pooler included: the published 109,482,240) + classifier 768*2+2 = 1,538
    "hf_text": [
        Case(input_shape=(16,), num_classes=2, params=109_483_778, backward=False),
        Case(kwargs={"config": {"model_type": "roberta", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 34,
                                "pad_token_id": 1, "type_vocab_size": 1}}, input_shape=(16,), num_classes=3),
        Case(kwargs={"config": {"model_type": "albert", "vocab_size": 50, "embedding_size": 8, "hidden_size": 16,
                                "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 32,
                                "max_position_embeddings": 32}}, input_shape=(16,), num_classes=1),
    ],
    # ViT-B/16 (google/vit-base-patch16-224's published 86,567,656 with its 1000-class head, no pooler), fed
    # 32x32 images through its interpolated positions (a 2x2 grid): the count is the 224 model's
    "hf_vit": [
        Case(input_shape=(3, 32, 32), num_classes=1000, params=86_567_656, grid=(2, 2), batch=2, backward=False),
        # 32x32 in 8x8 patches: class token 32, positions 17*32 = 544, patch conv 3*64*32+32 = 6,176; a layer:
        # norms 128, q/k/v 3,168, output 1,056, MLP 2,112 + 2,080 = 8,544, x2; final norm 64; head 32*3+3 = 99
        Case(kwargs={"config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "intermediate_size": 64}},
             input_shape=(3, 32, 32), num_classes=3, params=24_003, grid=(4, 4)),
    ],
    "mobilenet_v2": [
        imagenet(3_504_872),
        # fc 1280*10+10 instead of 1,281,000; first conv 32*1*9 instead of 32*3*9
        Case(input_shape=(1, 32, 32), params=3_504_872 - 1_281_000 + 12_810 - 576, conv=True),
        # widths 16, 8, 16, 16, 32, 48, 80, 160 after rounding to multiples of 8; the last conv stays 1280
        Case(kwargs={"width_mult": 0.5}, input_shape=(3, 32, 32), params=700_490, conv=True),
    ],
}


# an ensemble's members, built for its classes and inputs: mlp 784*8+8 + 8*k+k, seed_cnn 223,744 + 128*k+k
ENSEMBLE_MEMBERS = [{"name": "mlp", "args": {"hidden": [8]}}, {"name": "seed_cnn", "args": {}}]
CASES["ensemble"] = [
    Case(kwargs={"members": ENSEMBLE_MEMBERS}, params=6_370 + 225_034),
    Case(kwargs={"members": ENSEMBLE_MEMBERS, "task": "binary", "method": "vote", "member_weights": [1, 3]},
         num_classes=1, params=6_289 + 223_873),
]


def default_case(name: str) -> Case:
    """A model nobody has tabled yet still gets every check but the parameter count."""
    params = inspect.signature(MODELS.get(name)).parameters
    return Case(input_shape=tuple(params["input_shape"].default), num_classes=params["num_classes"].default)


CONTRACT = [
    pytest.param(name, case, id=f"{name}-{i}")
    for name in MODELS.names()
    for i, case in enumerate(CASES.get(name) or [default_case(name)])
]


def dummy_batch(model: nn.Module, input_shape: tuple[int, ...], n: int = 4) -> torch.Tensor:
    """Random floats, or non-pad token ids (1..4) for models that read ids."""
    dtype = model.input_dtype
    if dtype.is_floating_point:
        return torch.randn(n, *input_shape, dtype=dtype)
    return torch.randint(1, 5, (n, *input_shape), dtype=dtype)


@pytest.mark.parametrize(("name", "case"), CONTRACT)
def test_model_contract(name: str, case: Case) -> None:
    torch.manual_seed(0)
    model = build(name, num_classes=case.num_classes, input_shape=case.input_shape, **case.kwargs)

    x = dummy_batch(model, case.input_shape, case.batch)
    out = model(x)
    assert out.shape == (case.batch, case.num_classes)
    assert torch.isfinite(out).all()

    if case.backward:
        out.square().mean().backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"

    if case.params is not None:
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == case.params

    # the surface is declared (a Protocol every model meets), never probed
    assert isinstance(model, DlkitModel) and isinstance(model, ModelSurface)
    assert isinstance(model.bundle_args(), dict)
    assert model.load_report is None and model.label_names is None  # nothing pretrained was loaded
    assert (model.pad_id is not None) == (model.input_dtype == torch.long and family(name).hub_default is not None)
    assert isinstance(model.features, nn.Module) and isinstance(model.head, nn.Module)
    assert model.blocks and model.blocks[-1] is model.head
    assert sum(p.numel() for b in model.blocks for p in b.parameters()) == sum(p.numel() for p in model.parameters())
    assert model.attention_grid == case.grid
    if case.grid is not None:  # the maps are the attention the forward pass used, over the class token and grid
        model.eval()  # no stochastic depth: both passes compute the same thing
        logits, maps = model.attention_maps(x)
        tokens = maps[0].shape[-1]
        assert torch.allclose(logits, model(x), atol=1e-5)
        assert tokens - case.grid[0] * case.grid[1] in (0, 1)  # the patch tokens, after a class token if any
        assert len(maps) == len(model.blocks) - 2  # one per encoder block (the embedding and the head hold none)
        assert all(m.shape[0] == case.batch and m.shape[2:] == (tokens, tokens) for m in maps)
        assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in maps)
    if case.conv:
        assert isinstance(model.cam_layer, nn.Module)
        assert any(isinstance(m, nn.Conv2d) for m in model.cam_layer.modules())
    else:
        assert model.cam_layer is None


def test_cam_layer_is_the_last_conv_block_and_not_a_second_copy_of_its_weights() -> None:
    model = build("seed_cnn3")
    assert model.cam_layer is model.features[2]
    assert not any(key.startswith("cam") for key in model.state_dict())


@pytest.mark.parametrize("input_shape", [(1, 28, 28), (3, 32, 32)])
def test_seed_cnn_pool_before_relu_matches_keras_order(input_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build("seed_cnn", input_shape=input_shape)
    one, two = model.features
    keras = nn.Sequential(one.conv, nn.ReLU(), nn.MaxPool2d(2), two.conv, nn.ReLU(), nn.MaxPool2d(2), model.head)
    x = torch.randn(8, *input_shape, requires_grad=True)

    ours, theirs = model(x), keras(x)
    assert torch.allclose(ours, theirs, atol=1e-6)
    (grad_ours,) = torch.autograd.grad(ours.sum(), x)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), x)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-6)


def test_batch_norm_blocks_keep_keras_order() -> None:
    block = build("seed_cnn", batch_norm=True).features[0]
    assert [name for name, _ in block.named_children()] == ["conv", "bn", "relu", "pool"]


def test_unknown_model_suggests_a_close_name() -> None:
    with pytest.raises(RegistryError, match="unknown model 'nope'"):
        build("nope")
    with pytest.raises(RegistryError, match="did you mean 'seed_cnn'"):
        build("seed_cn")


def test_unknown_model_argument_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"'model\.hiddn'.*did you mean 'hidden'"):
        build("mlp", hiddn=3)


def test_bad_activation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.activation.*relu.*did you mean 'relu'"):
        build("mlp", activation="rleu")


def test_too_small_image_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="too small"):
        build("seed_cnn3", input_shape=(1, 12, 12))
