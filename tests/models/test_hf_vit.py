"""hf_vit: Hugging Face ViT checkpoints as a transfer base, on a tiny random ViT saved locally as Google's
ImageNet-21k ViT-B/16 is (an encoder without a head, with its preprocessor_config.json): the base and its
normalisation loaded, a zero head, other image sizes, and the catsdogs-vit recipe's frozen and staged
training on a photo folder, reloaded from its bundle and explained by attention rollout."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_sample_images

from dlkit import run
from dlkit.errors import ConfigError
from dlkit.evaluate.retest import evaluate_run
from dlkit.models import build, with_model_defaults
from dlkit.predict import Predictor
from dlkit.recipes import load_recipe

TINY = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
        "intermediate_size": 64}
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]  # not Google's 0.5: proves the file is read


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    """A folder as save_pretrained writes google/vit-base-patch16-224-in21k: ViTModel weights (pooler
    included), config.json with architectures ["ViTModel"], and the image processor's settings."""
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(**TINY)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_resize": True, "image_mean": MEAN, "image_std": STD,
        "image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32}}))
    return folder


def layer_prefixes(state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """The first and last encoder layer's key prefixes (layers.0. / layers.2.), whatever transformers calls the list."""
    found = {(m.group(1), int(m.group(2))) for k in state if (m := re.match(r"^(.*?)\.(\d+)\.", k))}
    (stack,) = {name for name, _ in found}
    last = max(i for _, i in found)
    return f"{stack}.0.", f"{stack}.{last}."


def test_the_base_loads_with_its_normalisation_under_a_zero_head(tiny_vit) -> None:
    from transformers import ViTModel

    model = build("hf_vit", num_classes=3, input_shape=(3, 32, 32), weights=str(tiny_vit)).eval()
    reference = ViTModel.from_pretrained(tiny_vit, add_pooling_layer=False).eval()
    x = torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor(MEAN).reshape(1, 3, 1, 1), torch.tensor(STD).reshape(1, 3, 1, 1)
    with torch.no_grad():
        ours = model.features(pixel_values=(x - mean) / std).last_hidden_state
        theirs = reference(pixel_values=(x - mean) / std).last_hidden_state
        logits = model(x)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.equal(logits, torch.zeros(4, 3))  # the ViT paper's zero-initialised head
    total = len(model.model.state_dict())
    assert model.load_report == (f"hf_vit: {total - 2} of {total} tensors from {tiny_vit}; "
                                 "new (trained from scratch): classifier.bias, classifier.weight")
    assert model.bundle_args()["mean"] == pytest.approx(MEAN) and model.attention_grid == (4, 4)
    # blocks: the embeddings, each layer (the last with the final norm), the head; every weight once
    vit = model.model.vit
    assert model.blocks[0] is vit.embeddings and model.blocks[-1] is model.head
    assert list(model.blocks[-2])[-1] is vit.layernorm and len(model.blocks) == 1 + 3 + 1


def test_other_image_sizes_interpolate_the_positions_and_mistakes_are_one_line(tiny_vit) -> None:
    model = build("hf_vit", num_classes=2, input_shape=(3, 48, 40), weights=str(tiny_vit))
    assert model.attention_grid == (6, 5) and model(torch.rand(2, 3, 48, 40)).shape == (2, 2)
    logits, maps = model.attention_maps(torch.rand(2, 3, 48, 40))
    assert len(maps) == 3 and maps[0].shape == (2, 2, 31, 31)
    assert model.model.config._attn_implementation != "eager"  # the fused kernel is back for training
    with pytest.raises(ConfigError, match=r"does not split into the checkpoint's 8x8 patches; set data.image_size"):
        build("hf_vit", num_classes=2, input_shape=(3, 36, 36), weights=str(tiny_vit))
    with pytest.raises(ConfigError, match=r"hf_vit reads RGB images, got 1 channel\(s\); set data.channels: 3"):
        build("hf_vit", num_classes=2, input_shape=(1, 32, 32), weights=str(tiny_vit))


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    """Two classes of 48x48 crops of sklearn's two sample photos (the temple, the flower)."""
    root = tmp_path_factory.mktemp("pets")
    rng = np.random.default_rng(0)
    for name, photo in zip(("cat", "dog"), load_sample_images().images):
        (root / name).mkdir()
        for i in range(20):
            top, left = rng.integers(0, photo.shape[0] - 96), rng.integers(0, photo.shape[1] - 96)
            Image.fromarray(photo[top:top + 96, left:left + 96]).resize((48, 48)).save(root / name / f"{i:02d}.png")
    return root


@pytest.mark.slow
def test_catsdogs_vit_freezes_then_stages_the_base_and_reloads(tiny_vit, pets, tmp_path) -> None:
    overrides = [f"model.weights={tiny_vit}", f"data.path={pets}", "data.image_size=32", "train.batch_size=8",
                 "train.stages.0.epochs=3", "train.stages.1.epochs=2", "train.stages.1.optimizer.lr=1e-3"]
    recipe = with_model_defaults(load_recipe("catsdogs-vit", overrides))
    assert (recipe.data.channels, recipe.data.normalize, recipe.data.text.tokenizer) == (3, "scale", None)
    result = run("catsdogs-vit", out=tmp_path / "run", overrides=overrides, report=True)
    s = result.summary
    assert s["notes"][0].startswith("hf_vit: ") and "new (trained from scratch): classifier.bias" in s["notes"][0]
    layer = sum(p.numel() for p in build("hf_vit", num_classes=1, input_shape=(3, 32, 32),
                                         config=TINY).blocks[1].parameters())  # one encoder layer
    head = 32 + 1  # one logit on the class token
    assert [(st["name"], st["trainable_params"]) for st in s["stages"]] == [
        ("head", head), ("fine-tune", head + 2 * layer + 2 * 32)]  # the last 2 layers and the final norm
    from transformers import ViTModel

    trained = load_file(result.run_dir / "model.safetensors")
    # the checkpoint under the names transformers gives its modules today (its file keeps the old ones)
    original = ViTModel.from_pretrained(tiny_vit, add_pooling_layer=False).state_dict()
    first, last = layer_prefixes(original)
    frozen = [k for k in original if k.startswith(("embeddings.", first))]
    opened = [k for k in original if k.startswith((last, "layernorm."))]
    assert frozen and all(torch.equal(trained[f"model.vit.{k}"], original[k]) for k in frozen)
    assert opened and all(not torch.equal(trained[f"model.vit.{k}"], original[k]) for k in opened)
    assert {p.name for p in (result.run_dir / "plots").iterdir()} >= {"attention_rollout.png"}
    # the bundle alone rebuilds the model, its normalisation included, and tests as the run did
    assert Predictor.from_run(result.run_dir).model.mean.flatten().tolist() == pytest.approx(MEAN)
    again = evaluate_run(result.run_dir)
    assert again["test_accuracy"] == s["test_accuracy"]
    assert again["test_loss"] == pytest.approx(s["test_loss"], rel=1e-5)
