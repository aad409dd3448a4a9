"""Recipes: YAML validated by pydantic, with `a.b=c` overrides and one-line errors."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dlkit.errors import ConfigError, did_you_mean
from dlkit.space import Distribution, parse_distribution, shown
from dlkit.yamlfile import load_yaml_value


class Strict(BaseModel):
    """A config section: unknown fields are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentCfg(Strict):
    """Random training-time augmentation, applied batched on tensors; everything off by default."""

    crop_padding: int = Field(0, ge=0)  # random crop back to size after zero-padding each side
    hflip: bool = False
    vflip: bool = False
    rotation: float = Field(0.0, ge=0.0, le=180.0)  # degrees, uniform in [-r, r]
    shift: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of width/height, uniform in [-s, s]
    zoom: float = Field(0.0, ge=0.0, lt=1.0)  # scale uniform in [1 - z, 1 + z]
    shear: float = Field(0.0, ge=0.0, lt=90.0)  # degrees, uniform in [-s, s]
    brightness: float = Field(0.0, ge=0.0, lt=1.0)  # colour jitter factors, uniform in [1 - b, 1 + b]
    contrast: float = Field(0.0, ge=0.0, lt=1.0)
    saturation: float = Field(0.0, ge=0.0, lt=1.0)

    def enabled(self) -> bool:
        """True when any augmentation is switched on."""
        return any(v not in (0, 0.0, False) for v in self.model_dump().values())


class TextSample(Strict):
    """One labelled example written into the recipe itself (S3.B's ten sentences)."""

    text: str = Field(min_length=1)
    label: str = Field(min_length=1)
    split: Literal["train", "val", "test"] = "train"


class TextCfg(Strict):
    """How text becomes token ids: dlkit's word vocabulary (the LSTM recipes) or a Hugging Face tokenizer."""

    # "words", or a Hugging Face tokenizer (hub id or folder); unset: the model's own for a hub model, else words
    tokenizer: str | None = None
    max_words: int = Field(10_000, ge=3)  # word vocabulary size, counting PAD (id 0) and OOV (id 1)
    min_count: int = Field(1, ge=1)  # a word seen fewer times in the training split is OOV
    lowercase: bool = True
    max_len: int = Field(200, ge=1)  # tokens kept per text
    padding: Literal["pre", "post"] = "pre"  # where PAD goes (Keras' pad_sequences default: pre)
    truncating: Literal["pre", "post"] = "pre"  # which end a long text loses
    text_column: str = "text"  # text_csv's columns
    label_column: str = "label"
    samples: list[TextSample] = []  # the `sentences` data set: examples written into the recipe


class DataCfg(Strict):
    name: str
    path: str | None = None  # the user's own folder or file (--data)
    data_dir: str | None = None  # a folder holding the data set's official files (--data-dir)
    val_split: float = Field(0.1, ge=0.0, lt=1.0)
    test_split: float = Field(0.2, ge=0.0, lt=1.0)  # used only where there is no official test split
    image_size: int | None = Field(None, ge=1)  # square resize for image data
    # scale: [0, 1]; standard: train-split mean/std; imagenet: ImageNet's mean/std (the default with model.weights)
    normalize: Literal["none", "scale", "standard", "imagenet"] = "scale"
    subset: int | None = Field(None, ge=1)  # keep this many training examples (stratified)
    channels: int | None = Field(None, ge=1, le=3)  # convert images to 1 (grey) or 3 (RGB) channels
    verify: bool = True  # sha256-check official files before parsing them
    # seeds the train / val / test split (and data.subset) instead of the recipe's seed: seeds that share
    # it test on the same examples, as the members of an ensemble must (`run --seeds N --ensemble` sets it)
    split_seed: int | None = None
    bad_files: Literal["skip", "fail"] = "skip"  # unreadable images in a folder: skip with a count, or stop
    augment: AugmentCfg = AugmentCfg()
    # the class count the recipe is written for, so `dlkit describe` can build the model without the
    # user's folder; the data's own classes win when the data are there
    num_classes: int | None = Field(None, ge=2)
    text: TextCfg = TextCfg()


class HeadCfg(Strict):
    """A new classifier on a pretrained trunk: pool, hidden dense layers (activation + dropout each), output."""

    pool: Literal["avg", "max", "flatten"] = "avg"  # global average / max pooling, or flatten the feature map
    hidden: list[int] = []  # widths of the hidden dense layers, e.g. [128]
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # after each hidden layer (before the output without any)


class ModelCfg(BaseModel):
    """The model's registered name, its pretrained weights and head; every other key is a builder argument."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str
    weights: str | None = None  # "imagenet" (torchvision's published checkpoint) or a .pth / .safetensors path
    head: HeadCfg | None = None  # replace the model's classifier (ImageNet-layout models)

    def args(self) -> dict[str, Any]:
        """The builder arguments given in the recipe."""
        return dict(self.model_extra or {})


class OptimizerCfg(Strict):
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-7, gt=0.0)  # Keras' default, which the seeds used
    alpha: float = Field(0.9, gt=0.0, lt=1.0)  # RMSprop's decay (Keras' rho)
    # the pretrained base's own learning rate and weight decay (the head keeps lr / weight_decay)
    base_lr: float | None = Field(None, gt=0.0)
    base_weight_decay: float | None = Field(None, ge=0.0)


class ScheduleCfg(Strict):
    name: Literal["constant", "step", "multistep", "cosine", "linear", "onecycle", "plateau"] = "constant"
    step_size: int = Field(10, ge=1)  # epochs between decays (step)
    gamma: float = Field(0.1, gt=0.0)  # decay factor (step, multistep)
    milestones: list[int] = []  # epochs at which to decay (multistep)
    warmup_epochs: float = Field(0.0, ge=0.0)  # linear warm-up before cosine / linear decay (0.1 = a tenth of an epoch)
    min_lr: float = Field(0.0, ge=0.0)  # floor of cosine / plateau
    max_lr: float | None = Field(None, gt=0.0)  # onecycle peak; the optimizer's lr if unset
    factor: float = Field(0.1, gt=0.0, lt=1.0)  # plateau decay
    patience: int = Field(5, ge=0)  # plateau patience in epochs
    monitor: str = "val_loss"  # plateau's metric


class EarlyStoppingCfg(Strict):
    monitor: str = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"
    patience: int = Field(5, ge=0)
    min_delta: float = Field(0.0, ge=0.0)
    restore_best: bool = True


class CheckpointCfg(Strict):
    best: bool = True
    last: bool = True
    monitor: str = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"


class UnfreezeCfg(Strict):
    """The top of a frozen base that trains after all: its last blocks, or its last layers counted as
    Keras counts them (conv, batch norm, pooling and dense layers; activations are part of their layer)."""

    last_blocks: int | None = Field(None, ge=1)
    last_layers: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one(self) -> UnfreezeCfg:
        if (self.last_blocks is None) == (self.last_layers is None):
            raise ValueError("give exactly one of last_blocks or last_layers")
        return self


Freeze = Literal["none", "base"]  # base: everything but the head is frozen (no gradients, BatchNorm in eval mode)


class StageCfg(Strict):
    """One training stage; unset fields fall back to the `train` section's values."""

    name: str | None = None
    epochs: int | None = Field(None, ge=0)
    optimizer: OptimizerCfg | None = None
    schedule: ScheduleCfg | None = None
    freeze: Freeze | None = None
    unfreeze: UnfreezeCfg | None = None


class TrainCfg(Strict):
    epochs: int = Field(10, ge=0)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    loss: Literal["auto", "cross_entropy", "bce", "mse"] = "auto"
    # cross-entropy against (1 - s) on the true class and s / classes on each (Szegedy et al. 2016), in training
    # only: validation and test losses stay the plain cross-entropy, comparable across recipes
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    optimizer: OptimizerCfg = OptimizerCfg()
    schedule: ScheduleCfg = ScheduleCfg()
    stages: list[StageCfg] = []
    early_stopping: EarlyStoppingCfg | None = None
    checkpoint: CheckpointCfg = CheckpointCfg()
    grad_clip: float | None = Field(None, gt=0.0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True  # for models with conv layers
    # many processes: batch norm statistics over the whole global batch (CUDA only); off, each rank's own
    sync_batchnorm: bool = False
    freeze: Freeze = "none"
    unfreeze: UnfreezeCfg | None = None
    # auto: with a frozen base and no augmentation, compute the base's features once and train the head on them
    cache_features: Literal["auto", "off"] = "auto"
    # numpy: dlkit.scratch trains the model (an mlp) by hand-written backpropagation, no autograd
    engine: Literal["torch", "numpy"] = "torch"
    # a resumable checkpoint is written after every epoch and, inside an epoch, every this many optimizer
    # steps (an int) or this much training time ("30s", "10m", "1h"): at most that much work is lost
    checkpoint_every: int | str = "10m"
    checkpoint_keep: int = Field(2, ge=1)  # resumable checkpoints kept (the newest)

    @field_validator("checkpoint_every")
    @classmethod
    def _every(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"must be a number of steps >= 1 or a duration like 10m, got {value}")
            return value
        parse_duration(value)
        return value


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h)\s*")


def parse_duration(text: str) -> float:
    """Seconds in `30s`, `10m`, `1.5h`; a ValueError naming the expected form otherwise."""
    match = _DURATION.fullmatch(str(text))
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"'{text}' is not a duration; use a positive number with s, m or h, e.g. 10m")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


class ExpectCfg(Strict):
    """What the seed write-up claims, shown beside what we achieve."""

    source: str | None = None  # the write-up id, e.g. "S0.1"
    claims: dict[str, float] = {}  # metric name -> claimed value, e.g. test_accuracy: 0.99
    note: str = ""
    # the training-set size the claim was measured with (S0.1: MNIST's 60,000), when the write-up says
    # it; the summary and report set the run's n_train beside it
    n_train: int | None = Field(None, ge=1)


# a searched field's distribution, written and read back as its text, e.g. loguniform(0.0001, 0.01)
SearchDist = Annotated[Distribution, PlainValidator(parse_distribution), PlainSerializer(str, return_type=str)]
NOT_SEARCHED = ("name", "description", "seed", "expect", "tune")  # they describe a run, or pick its luck
class TrackCfg(Strict):
    """Experiment tracking: each run is also logged to MLflow (the run directory stays the source of
    truth; `dlkit track sync RUN` sends what a tracking server did not take). Leave `track` out for none."""

    backend: Literal["mlflow"] = "mlflow"
    # a tracking URI (http://host:5000, sqlite:///path.db); unset: $MLFLOW_TRACKING_URI, else
    # sqlite:///<runs folder>/mlflow.db with the artifacts in mlartifacts/ beside it
    uri: str | None = Field(None, min_length=1)
    experiment: str | None = Field(None, min_length=1)  # unset: the recipe's name
    registered_model: str | None = Field(None, min_length=1)  # register the logged model under this name
    group: str | None = Field(None, min_length=1)  # tags runs made together (`--seeds N` sets it)
    log_model: bool = True  # the bundle as an MLflow pyfunc model (models from code, no pickle)


class Recipe(Strict):
    name: str
    description: str = ""
    seed: int = 0
    data: DataCfg
    model: ModelCfg
    train: TrainCfg = TrainCfg()
    expect: ExpectCfg = ExpectCfg()
    # `dlkit tune`'s search space: a dotted field -> a distribution (dlkit.space); `dlkit run` ignores it
    tune: dict[str, SearchDist] | None = None

    @field_validator("tune")
    @classmethod
    def _space(cls, space: dict[str, Distribution] | None, info: ValidationInfo) -> dict[str, Distribution] | None:
        """Every searched field exists and accepts what its distribution can draw (checked on the
        recipe as given; a model's own arguments are checked against its builder by `dlkit tune`)."""
        if space is None:
            return None
        if not space:
            raise ValueError("the search space is empty; give FIELD: DISTRIBUTION lines or leave tune out")
        for key in space:
            _check_searched_field(key)
        if all(name in info.data for name in ("data", "model", "train")):  # else an earlier field's error comes first
            base = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in info.data.items()}
            for key, dist in space.items():
                for value in dist.probes():
                    _check_searched_value(base, key, dist, value)
        return space
    track: TrackCfg | None = None  # unset (the default): no tracking, and recipe.yaml has no track section

    @model_validator(mode="after")
    def _no_weights(self) -> Recipe:
        """`model.weights: none` (any case, or YAML null) is random initialisation: no weights. What
        pretrained weights bring (their preprocessing, a hub model's tokenizer) depends on the model
        family and is filled in by `dlkit.models.with_model_defaults`."""
        if isinstance(self.model.weights, str) and self.model.weights.strip().lower() == "none":
            self.model.weights = None
        return self


def _check_searched_field(key: str) -> None:
    """A ValueError unless `key` names a field of the recipe schema (list items by index, a model's
    builder arguments freely) that a search may vary."""
    parts = key.split(".")
    if parts[0] in NOT_SEARCHED:
        raise ValueError(f"'{key}' cannot be searched: {', '.join(NOT_SEARCHED)} describe a run or pick its luck")
    current: type[BaseModel] | None = Recipe
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if current is ModelCfg and part not in ModelCfg.model_fields:
            return  # a builder argument of the model
        if current is None:
            raise ValueError(f"'{key}' names no recipe field: '{where}' is a value, not a section")
        if part.isdigit() and i:
            continue  # an item of a list of sections
        field = current.model_fields.get(part)
        if field is None:
            hint = did_you_mean(part, current.model_fields)
            inside = f"in '{where}'" if where else "at the top of a recipe"
            raise ValueError(f"'{key}' names no recipe field: there is no '{part}' {inside}{hint}")
        current = _section_type(field.annotation)


def _check_searched_value(base: dict[str, Any], key: str, dist: Distribution, value: Any) -> None:
    """A ValueError unless the recipe `base` with `key` set to `value` is a valid recipe."""
    raw = _deep_copy(base)
    try:
        set_path(raw, key, value)
    except ConfigError as exc:
        raise ValueError(f"{key}: {str(exc).removeprefix(f'--set {key}: ')}") from None
    try:
        Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{key}: {dist} can draw {shown(value)}, which the recipe refuses "
                         f"({describe_validation_error(exc)})") from None


def parse_recipe(raw: Any, origin: str = "recipe") -> Recipe:
    """Validate a raw mapping into a Recipe, or raise one ConfigError line."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: a recipe must be a YAML mapping with data, model and train")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {describe_validation_error(exc)}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `a.b=c` applied; values are parsed as YAML scalars."""
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects FIELD=VALUE (e.g. train.epochs=5), got '{item}'")
        set_path(out, key.strip(), _parse_value(value))
    return out


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `value` at a dotted path in nested dicts/lists, creating mappings on the way."""
    parts = dotted.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {dotted}: '{part}' is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(parts[:i])}' is a value, not a section")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def set_epochs(raw: dict[str, Any], epochs: int) -> None:
    """`--epochs N`: set the epochs of the train section and of every stage."""
    train = raw.setdefault("train", {})
    train["epochs"] = epochs
    for stage in train.get("stages") or []:
        if isinstance(stage, dict):
            stage["epochs"] = epochs


def _parse_value(text: str) -> Any:
    """A --set value as YAML (bounded like a recipe); text that is not valid YAML stays a string."""
    if not text.strip():
        return ""
    return load_yaml_value(text, f"--set value '{text[:40]}'")


def _deep_copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _deep_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deep_copy(v) for v in node]
    return node


def describe_validation_error(exc: ValidationError) -> str:
    """The first pydantic error as one line: the field, what is wrong, what is allowed."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    field = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(Recipe, loc[:-1])
        hint = did_you_mean(loc[-1], allowed)
        return f"unknown field '{field}'{hint}; allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"field '{field}' is required"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ", ").split(",")]
        hint = did_you_mean(str(err["input"]), choices)
        return f"field '{field}' got '{err['input']}'{hint}; allowed: {', '.join(choices)}"
    if kind == "value_error":
        return f"field '{field}': {err.get('ctx', {}).get('error', err['msg'])}"
    msg = err["msg"][0].lower() + err["msg"][1:]
    return f"field '{field}' got {err['input']!r}: {msg}"


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Names of the fields of the section at `loc` (list indices skipped)."""
    current: Any = model
    for part in loc:
        if part.isdigit():
            continue
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = _section_type(field.annotation)
        if current is None:
            return []
    return list(current.model_fields)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as `X`, `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None
