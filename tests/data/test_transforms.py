import pytest
import torch

from dlkit.config import AugmentCfg
from dlkit.data.preprocess import ImagePrep
from dlkit.data.transforms import (
    affine_theta,
    colour_jitter,
    hflip,
    make_augment,
    resize,
    to_channels,
    translate_flip,
    warp,
)
from dlkit.errors import ConfigError

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
PREP = ImagePrep(3, (16, 16), MEAN, STD).to_dict()
RAW_PREP = ImagePrep(3, (16, 16)).to_dict()
FILL = -torch.tensor(MEAN) / torch.tensor(STD)  # raw 0, normalised


def batch(n: int = 8, seed: int = 0, size: int = 16) -> torch.Tensor:
    raw = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return ImagePrep(3, (size, size), MEAN, STD).normalise(raw)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def theta(n, angle=0.0, scale=1.0, shear=0.0, shift=(0.0, 0.0), flip=(1.0, 1.0), size=(16, 16)):
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return affine_theta(full(angle), full(scale), full(shear), torch.tensor([shift] * n), torch.tensor([flip] * n), size)


def test_nothing_enabled_is_none_and_tables_are_refused():
    assert make_augment(AugmentCfg(crop_padding=0), PREP) is None
    assert make_augment(AugmentCfg(), {"kind": "table"}) is None
    with pytest.raises(ConfigError, match="data.augment applies to images"):
        make_augment(AugmentCfg(hflip=True), {"kind": "table", "feature_names": ["a"]})


def test_functional_ops():
    x = batch(2)
    assert torch.equal(hflip(hflip(x)), x) and torch.equal(hflip(x)[..., 0], x[..., -1])
    assert resize(x, 8).shape == (2, 3, 8, 8) and resize(x, (4, 6)).shape == (2, 3, 4, 6)
    flat = torch.full((1, 3, 4, 4), 0.25)
    assert torch.allclose(resize(flat, 9), torch.full((1, 3, 9, 9), 0.25))
    grey = to_channels(torch.rand(2, 3, 5, 5), 1)
    assert grey.shape == (2, 1, 5, 5)
    assert torch.equal(to_channels(grey, 3), grey.expand(-1, 3, -1, -1))


def test_identity_affine_is_identity():
    x = batch(4)
    assert torch.allclose(warp(x, theta(4), FILL.view(1, 3, 1, 1)), x, atol=1e-5)
    # a 16x12 image too: pixel <-> unit conversions must cancel
    y = torch.rand(2, 1, 16, 12)
    assert torch.allclose(warp(y, theta(2, size=(16, 12))), y, atol=1e-5)


def test_rotation_by_90_degrees_is_rot90_counter_clockwise():
    x = torch.rand(3, 3, 16, 16)
    out = warp(x, theta(3, angle=90.0))
    expected = torch.rot90(x, 1, dims=(-2, -1))
    assert torch.allclose(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-5)


@pytest.mark.parametrize("dx,dy", [(3, 0), (0, -2), (2, 5)])
def test_shift_moves_a_bright_pixel_by_whole_pixels(dx, dy):
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 6, 7] = 1.0
    by_warp = warp(x, theta(1, shift=(dx / 16, dy / 16)))
    by_gather = translate_flip(x, torch.tensor([[dx, dy]]), torch.zeros(1, 2, dtype=torch.bool), pad=5)
    for out in (by_warp, by_gather):
        assert out.argmax().item() == (6 + dy) * 16 + (7 + dx)
        assert torch.allclose(out.sum(), torch.tensor(1.0), atol=1e-5) and out.max().item() > 1 - 1e-5


def test_flip_gather_matches_torch_flip():
    x = torch.rand(2, 3, 6, 5)
    flip = torch.tensor([[True, False], [True, True]])
    out = translate_flip(x, torch.zeros(2, 2, dtype=torch.long), flip, pad=0)
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1].flip(-1, -2))


def test_crop_copies_pixels_exactly_and_pads_with_raw_black():
    x = batch(16)
    out = make_augment(AugmentCfg(crop_padding=4, hflip=True), PREP)(x, gen())
    assert out.shape == x.shape
    padded = 0
    for i in range(16):
        for c in range(3):
            allowed = torch.cat([x[i, c].flatten(), FILL[c : c + 1]])
            assert torch.isin(out[i, c], allowed).all()
            padded += int((out[i, c] == FILL[c]).sum())
    assert padded > 0  # some crops reached into the padding
    # a translation by (dx, dy): each sample's pixels form one shifted (maybe mirrored) window
    i = 0
    matches = [
        (dx, dy, f) for dx in range(-4, 5) for dy in range(-4, 5) for f in (False, True)
        if torch.equal(out[i : i + 1], translate_flip(x[i : i + 1], torch.tensor([[dx, dy]]),
                                                        torch.tensor([[f, False]]), 4, FILL.view(1, 3, 1, 1)))
    ]
    assert len(matches) == 1


def test_affine_pads_with_raw_black():
    x = batch(2)
    out = warp(x, theta(2, angle=45.0), FILL.view(1, 3, 1, 1))
    assert torch.allclose(out[:, :, 0, 0], FILL.expand(2, 3), atol=1e-5)
    aug = make_augment(AugmentCfg(rotation=45, zoom=0.3), PREP)
    raw = aug(x, gen()) * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5


def test_colour_jitter_stays_in_raw_range_and_is_re_normalised():
    x = batch(32)
    cfg = AugmentCfg(brightness=0.9, contrast=0.9, saturation=0.9)
    out = make_augment(cfg, PREP)(x, gen())
    raw = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert not torch.allclose(out, x)
    # unit factors change nothing; zero saturation gives grey
    r = torch.rand(2, 3, 4, 4)
    ones = torch.ones(2)
    assert torch.allclose(colour_jitter(r.clone(), ones, ones, ones), r, atol=1e-6)
    grey = colour_jitter(r.clone(), saturation=torch.zeros(2))
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    # raw data (no mean/std) is jittered without touching the caller's batch
    before = r.clone()
    make_augment(AugmentCfg(brightness=0.5), RAW_PREP)(r, gen())
    assert torch.equal(r, before)


@pytest.mark.parametrize("cfg", [AugmentCfg(crop_padding=4, hflip=True),
                                 AugmentCfg(rotation=30, shift=0.1, zoom=0.2, shear=10, vflip=True),
                                 AugmentCfg(brightness=0.5, contrast=0.5, saturation=0.5)])
def test_parameters_differ_per_sample_and_follow_the_generator(cfg):
    x = batch(1).expand(32, -1, -1, -1).contiguous()
    aug = make_augment(cfg, PREP)
    out = aug(x, gen(1))
    distinct = {tuple(o.flatten()[:64].tolist()) for o in out}
    assert len(distinct) > 4
    assert torch.equal(aug(x, gen(1)), out)
    assert not torch.equal(aug(x, gen(2)), out)
    g = gen(1)
    first, second = aug(x, g), aug(x, g)
    assert torch.equal(first, out) and not torch.equal(second, out)


@pytest.mark.parametrize("cfg", [AugmentCfg(crop_padding=2, hflip=True, vflip=True),
                                 AugmentCfg(rotation=20, crop_padding=2, brightness=0.3)])
def test_channels_last_dtype_and_shape_are_kept(cfg):
    x = batch(4)
    aug = make_augment(cfg, PREP)
    plain = aug(x, gen(5))
    cl = aug(x.contiguous(memory_format=torch.channels_last), gen(5))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(cl, plain, atol=1e-6) and plain.is_contiguous()
    for dtype in (torch.float64, torch.bfloat16):
        out = aug(x.to(dtype), gen(5))
        assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    assert aug(x[:0], gen()).shape == (0, 3, 16, 16)
