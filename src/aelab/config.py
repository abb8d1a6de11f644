"""params.yaml, validated once into frozen dataclasses.

Every key is checked: unknown keys, unknown architectures and out-of-range values raise
`ConfigError` with a message naming the key, before any training and before any output is
written (the stage scripts load the config first).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

DATASETS = ("cifar10", "cifar100", "shapes", "imagefolder")
MODES = ("scratch", "mlp_finetune", "mlp_probe", "linear_finetune", "linear_probe")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
CROPS = ("none", "pad", "resized")
INITS = ("scratch", "pretrained")  # the two classify stages of a variant: random or pretrained init


class ConfigError(ValueError):
    """A bad params.yaml; str(e) is one line naming the key."""


@dataclass(frozen=True)
class ModeSpec:
    """What a classifier mode means: which head, pretrained or not, frozen or not."""

    head: str  # "mlp" | "linear"
    pretrained: bool
    frozen: bool


MODE_SPECS = {
    "scratch": ModeSpec("mlp", pretrained=False, frozen=False),
    "mlp_finetune": ModeSpec("mlp", pretrained=True, frozen=False),
    "mlp_probe": ModeSpec("mlp", pretrained=True, frozen=True),
    "linear_finetune": ModeSpec("linear", pretrained=True, frozen=False),
    "linear_probe": ModeSpec("linear", pretrained=True, frozen=True),
}


def modes_of(init: str, modes) -> tuple[str, ...]:
    """The modes among `modes` that one classify stage trains: random init or pretrained."""
    if init not in INITS:
        raise ConfigError(f"unknown init '{init}'; expected one of {', '.join(INITS)}")
    return tuple(m for m in modes if MODE_SPECS[m].pretrained == (init == "pretrained"))


@dataclass(frozen=True)
class AugmentConfig:
    """Batched augmentation of training images (see aelab.augment); off by default."""

    crop: str = "none"  # none | pad (reflect-pad, random crop) | resized (random-resized crop)
    pad: int = 4  # pixels, crop: pad
    scale: tuple[float, float] = (0.2, 1.0)  # area fraction, crop: resized
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio, crop: resized
    flip: bool = False  # horizontal flip with probability 1/2

    @property
    def active(self) -> bool:
        return self.crop != "none" or self.flip


@dataclass(frozen=True)
class TrainConfig:
    """One training run's optimisation settings (pretraining or classification)."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # sgd only
    schedule: str = "constant"  # lr schedule after warmup, stepped every iteration
    warmup_epochs: float = 0.0
    min_lr: float = 0.0  # cosine floor
    grad_clip: float = 0.0  # max grad norm; 0 = off
    label_smoothing: float = 0.0  # classifiers only
    augment: AugmentConfig = AugmentConfig()
    accumulate: int = 1  # batches per optimiser step: effective batch = batch_size * accumulate


@dataclass(frozen=True)
class DataConfig:
    """How the prepare stage builds the dataset."""

    val_fraction: float = 0.1
    train_limit: int = 0
    test_limit: int = 0
    verify_checksum: bool = True
    shapes_train: int = 12000
    shapes_test: int = 2000
    imagefolder: str = "data/external/images"


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluate stage: test accuracy of every classifier, kNN of every encoder."""

    knn_k: int = 20
    batch_size: int = 256


@dataclass(frozen=True)
class VariantConfig:
    """One autoencoder to compare: its architecture, pretraining and classifier settings."""

    name: str
    arch: str
    reads: str
    model: Mapping[str, Any]
    pretrain: TrainConfig
    classify: TrainConfig  # scratch and fine-tuning modes
    probe: TrainConfig  # frozen-encoder modes (cached features, so no augmentation)
    head_hidden: int
    dropout: float


@dataclass(frozen=True)
class RuntimeConfig:
    """How stages run, not what they compute: changing it reruns nothing (dvc.yaml does not
    list it). `devices` and `seed_workers` change how many threads each process has, and so the
    order of floating-point sums: numbers differ in their last digits, which training can grow
    into differences within the seeds' spread (README "Seed workers")."""

    checkpoint_every: int = 5  # epochs between resume checkpoints (0: none); README "Resume"
    devices: int = 1  # >1: the stage runs under torchrun with DDP, one process per device
    seed_workers: int = 1  # >1 on a CPU: that many seeds train at once, in forked processes
    compile: bool = False  # training steps run through torch.compile (for GPUs; README)


@dataclass(frozen=True)
class Config:
    """The whole of params.yaml."""

    dataset: str
    seed: int  # the data: split and generated images
    seeds: tuple[int, ...]  # training repeats: init, shuffling, masking
    mask_ratio: float
    label_fraction: float  # share of the training labels the classifiers see
    data: DataConfig
    variants: Mapping[str, VariantConfig]
    modes: tuple[str, ...]
    evaluate: EvaluateConfig
    runtime: RuntimeConfig = RuntimeConfig()
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def variant(self, name: str) -> VariantConfig:
        """The variant called `name`, or a ConfigError listing the known ones."""
        if name not in self.variants:
            known = ", ".join(self.variants)
            raise ConfigError(f"unknown variant '{name}'; params.yaml defines: {known}")
        return self.variants[name]


# --- checking helpers -------------------------------------------------------------------

def _require_mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"params.yaml: '{key}' must be a mapping, got {type(value).__name__}")
    return value


def _optional_mapping(value: Any, key: str) -> Mapping[str, Any]:
    """A mapping that may be left empty (`key:` with nothing after it is None)."""
    return {} if value is None else _require_mapping(value, key)


def _reject_unknown(section: Mapping[str, Any], allowed, key: str) -> None:
    for name in section:
        if name not in allowed:
            choices = ", ".join(sorted(allowed))
            where = f"{key}.{name}" if key else str(name)
            raise ConfigError(f"params.yaml: unknown key '{where}' (allowed here: {choices})")


def _number(value: Any, key: str, *, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"params.yaml: '{key}' must be {kind}, got {value!r}")
    if integer and not float(value).is_integer():
        raise ConfigError(f"params.yaml: '{key}' must be an integer, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"params.yaml: '{key}' must be finite, got {value!r}")
    return int(value) if integer else float(value)


def _in_range(value: float, key: str, lo=None, hi=None, *, lo_open=False, hi_open=False):
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
        hi is not None and (value > hi or (hi_open and value == hi))
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ConfigError(f"params.yaml: '{key}' = {value!r} is outside {span}")
    return value


def _choice(value: Any, key: str, choices) -> str:
    if value not in choices:
        raise ConfigError(
            f"params.yaml: '{key}' = {value!r} is not one of: {', '.join(choices)}"
        )
    return value


def _dataclass_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _train_config(section: Mapping[str, Any], key: str, base: TrainConfig | None = None):
    """Parse a TrainConfig from `section`, on top of `base` when given (overrides)."""
    fields = _dataclass_fields(TrainConfig)
    _reject_unknown(section, fields, key)
    values = dataclasses.asdict(base) if base is not None else {}
    for name in ("epochs", "batch_size", "lr"):
        if name not in section and name not in values:
            raise ConfigError(f"params.yaml: '{key}.{name}' is required")
    for name, value in section.items():
        k = f"{key}.{name}"
        if name in ("epochs", "batch_size", "accumulate"):
            values[name] = int(_in_range(_number(value, k, integer=True), k, 1))
        elif name in ("lr",):
            values[name] = _in_range(_number(value, k), k, 0, lo_open=True)
        elif name in ("weight_decay", "warmup_epochs", "min_lr", "grad_clip"):
            values[name] = _in_range(_number(value, k), k, 0)
        elif name == "momentum":
            values[name] = _in_range(_number(value, k), k, 0, 1, hi_open=True)
        elif name == "optimizer":
            values[name] = _choice(value, k, OPTIMIZERS)
        elif name == "schedule":
            values[name] = _choice(value, k, SCHEDULES)
        elif name == "label_smoothing":
            values[name] = _in_range(_number(value, k), k, 0, 1, hi_open=True)
        elif name == "betas":
            values[name] = _pair(value, k, 0, 1)
        elif name == "augment":
            values[name] = _augment(value, k, values.get("augment", AugmentConfig()))
        else:  # a TrainConfig field without a rule here must not pass unchecked
            raise ConfigError(f"params.yaml: '{k}' has no validation rule (internal error)")
    if isinstance(values.get("augment"), Mapping):  # asdict() flattened the base's
        values["augment"] = AugmentConfig(**values["augment"])
    cfg = TrainConfig(**values)
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(
            f"params.yaml: '{key}.warmup_epochs' = {cfg.warmup_epochs} exceeds epochs = {cfg.epochs}"
        )
    return cfg


def _pair(value: Any, key: str, lo: float, hi: float) -> tuple[float, float]:
    """Two numbers in [lo, hi), e.g. Adam's betas."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"params.yaml: '{key}' must be a list of two numbers")
    return tuple(_in_range(_number(b, key), key, lo, hi, hi_open=True) for b in value)


def _augment(section: Any, key: str, base: AugmentConfig | Mapping) -> AugmentConfig:
    """An `augment:` mapping on top of `base` (the section it overrides)."""
    section = _require_mapping(section, key)
    fields = _dataclass_fields(AugmentConfig)
    _reject_unknown(section, fields, key)
    values = dict(base) if isinstance(base, Mapping) else dataclasses.asdict(base)
    for name, value in section.items():
        k = f"{key}.{name}"
        if name == "crop":
            values[name] = _choice(value, k, CROPS)
        elif name == "pad":
            values[name] = int(_in_range(_number(value, k, integer=True), k, 0, 16))
        elif name in ("scale", "ratio"):
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ConfigError(f"params.yaml: '{k}' must be a list of two numbers")
            lo, hi = (_in_range(_number(b, k), k, 0, lo_open=True) for b in value)
            if lo > hi or (name == "scale" and hi > 1):
                raise ConfigError(f"params.yaml: '{k}' = {list(value)} must be [low, high] "
                                  f"with low <= high{' <= 1' if name == 'scale' else ''}")
            values[name] = (lo, hi)
        elif name == "flip":
            if not isinstance(value, bool):
                raise ConfigError(f"params.yaml: '{k}' must be true or false, got {value!r}")
            values[name] = value
    return AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _is_like(value: Any, default: Any) -> bool:
    """Whether `value` has the type of a constructor default: a list of like items for a tuple,
    any number (not a bool) for a float; anything where there is no typed default."""
    if isinstance(default, tuple):
        return isinstance(value, list) and (not default
                                            or all(_is_like(v, default[0]) for v in value))
    if type(default) not in _KINDS:
        return True
    if isinstance(value, bool) != isinstance(default, bool):
        return False
    return isinstance(value, (int, float) if isinstance(default, float) else type(default))


def _option_value(value: Any, default: Any, key: str) -> Any:
    """A model option of its default's type (lists become tuples); a ConfigError naming `key`
    otherwise."""
    if not _is_like(value, default):
        kind = f"a list like {list(default)}" if isinstance(default, tuple) else _KINDS[
            type(default)]
        raise ConfigError(f"params.yaml: '{key}' must be {kind}, got {value!r}")
    return tuple(value) if isinstance(value, list) else value


def _model_options(arch: str, options: Mapping[str, Any], key: str, *,
                   build: bool = True) -> dict[str, Any]:
    """Check option names, and types against their defaults, with the architecture's
    constructor signature; with `build`, also the constraints between options (e.g. dim
    divisible by heads) with the architecture's `check_options`, which builds nothing: every
    stage checks every variant, and building even on the meta device imports torch._dynamo
    (about 2 s of start-up)."""
    from aelab.models import architecture  # deferred: keeps `import aelab.config` light

    cls = architecture(arch)
    accepted = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if name != "self"}
    _reject_unknown(options, accepted, key)
    out = {name: _option_value(value, accepted[name], f"{key}.{name}")
           for name, value in options.items()}
    if build:
        try:
            cls.check_options(**out)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"params.yaml: '{key}': {err}") from None
    return out


VARIANT_KEYS = ("arch", "reads", "model", "pretrain", "classify")
CLASSIFY_EXTRA = ("head_hidden", "dropout", "probe")


def _probe_overrides(section: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """A classify section's `probe:` overrides; probes never augment (cached features)."""
    probe = _optional_mapping(section.get("probe"), f"{key}.probe")
    if "augment" in probe:
        raise ConfigError(f"params.yaml: '{key}.probe.augment': frozen probes train on features "
                          "computed once per image, so augmentation does not apply")
    return probe


def _classify_section(section: Mapping[str, Any], key: str, base: TrainConfig | None,
                      head_hidden: int | None, dropout: float | None):
    """Split a classify section into (TrainConfig, head_hidden, dropout)."""
    train = {k: v for k, v in section.items() if k not in CLASSIFY_EXTRA and k != "modes"}
    cfg = _train_config(train, key, base)
    if "head_hidden" in section:
        k = f"{key}.head_hidden"
        head_hidden = int(_in_range(_number(section["head_hidden"], k, integer=True), k, 1))
    if "dropout" in section:
        k = f"{key}.dropout"
        dropout = _in_range(_number(section["dropout"], k), k, 0, 1, hi_open=True)
    return cfg, head_hidden, dropout


def parse_config(raw: Mapping[str, Any], check_models: bool = True) -> Config:
    """Validate the params.yaml mapping `raw` into a Config.

    Every variant's model options are checked by name. With `check_models`, also the
    constraints between them (e.g. dim divisible by heads), by each architecture's
    `check_options`, without building anything. The pretrain and classify stages pass False:
    they build their one variant for real before training (`pretrain.build_from_meta`, the same
    one-line error naming the key).
    """
    raw = _require_mapping(raw, "params.yaml")
    top = ("dataset", "seed", "seeds", "mask_ratio", "label_fraction", "data", "variants",
           "classify", "evaluate")
    _reject_unknown(raw, (*top, "runtime"), "")
    for name in top:
        if name not in raw:
            raise ConfigError(f"params.yaml: top-level key '{name}' is required")

    dataset = _choice(raw["dataset"], "dataset", DATASETS)
    seed = int(_in_range(_number(raw["seed"], "seed", integer=True), "seed", 0))
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError("params.yaml: 'seeds' must be a non-empty list of integers, e.g. [0, 1, 2]")
    seeds = tuple(int(_in_range(_number(x, f"seeds[{i}]", integer=True), f"seeds[{i}]", 0))
                  for i, x in enumerate(seeds))
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"params.yaml: 'seeds' has repeated values: {list(seeds)}")
    mask_ratio = _in_range(
        _number(raw["mask_ratio"], "mask_ratio"), "mask_ratio", 0, 1, lo_open=True, hi_open=True
    )

    label_fraction = _in_range(_number(raw["label_fraction"], "label_fraction"), "label_fraction",
                               0, 1, lo_open=True)

    data_raw = _require_mapping(raw["data"], "data")
    data_fields = _dataclass_fields(DataConfig)
    _reject_unknown(data_raw, data_fields, "data")
    data_values: dict[str, Any] = {}
    for name, value in data_raw.items():
        k = f"data.{name}"
        if name == "val_fraction":
            data_values[name] = _in_range(_number(value, k), k, 0, 1, lo_open=True, hi_open=True)
        elif name in ("train_limit", "test_limit"):
            data_values[name] = int(_in_range(_number(value, k, integer=True), k, 0))
        elif name in ("shapes_train", "shapes_test"):
            data_values[name] = int(_in_range(_number(value, k, integer=True), k, 10))
        elif name == "verify_checksum":
            if not isinstance(value, bool):
                raise ConfigError(f"params.yaml: '{k}' must be true or false, got {value!r}")
            data_values[name] = value
        elif name == "imagefolder":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"params.yaml: '{k}' must be a folder path, got {value!r}")
            data_values[name] = value
    data = DataConfig(**data_values)

    cls_raw = _require_mapping(raw["classify"], "classify")
    modes = cls_raw.get("modes", list(MODES))
    if not isinstance(modes, list) or not modes:
        raise ConfigError("params.yaml: 'classify.modes' must be a non-empty list")
    for i, mode in enumerate(modes):
        _choice(mode, f"classify.modes[{i}]", MODES)
    cls_train, head_hidden, dropout = _classify_section(cls_raw, "classify", None, 192, 0.2)
    probe_base = _probe_overrides(cls_raw, "classify")

    variants_raw = _require_mapping(raw["variants"], "variants")
    if not variants_raw:
        raise ConfigError("params.yaml: 'variants' must name at least one autoencoder")
    from aelab.models import ARCHITECTURES, masks

    variants = {}
    for name, section in variants_raw.items():
        key = f"variants.{name}"
        if not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise ConfigError(f"params.yaml: variant name {name!r} must be letters, digits and _")
        section = _require_mapping(section, key)
        _reject_unknown(section, VARIANT_KEYS, key)
        for required in VARIANT_KEYS:  # all required: dvc.yaml lists each as a params dep
            if required not in section:
                raise ConfigError(f"params.yaml: '{key}.{required}' is required")
        arch = _choice(section["arch"], f"{key}.arch", tuple(ARCHITECTURES))
        reads = section["reads"]
        if reads not in ("seeds", "mask_ratio"):
            raise ConfigError(
                f"params.yaml: '{key}.reads' = {reads!r} must name a top-level key "
                "(seeds or mask_ratio)"
            )
        if masks(arch):
            own = "mask_ratio" in _require_mapping(section["model"], f"{key}.model")
            if not own and reads != "mask_ratio":
                raise ConfigError(
                    f"params.yaml: '{key}.reads' must be 'mask_ratio': arch {arch} reads the "
                    "top-level mask_ratio, and DVC must rerun this variant when it changes")
            if own and reads == "mask_ratio":
                raise ConfigError(
                    f"params.yaml: '{key}.reads' must be 'seeds': the variant sets its own "
                    "model.mask_ratio, so the top-level one does not concern it")
        model = _model_options(arch, _require_mapping(section["model"], f"{key}.model"),
                               f"{key}.model", build=check_models)
        pretrain = _train_config(
            _require_mapping(section["pretrain"], f"{key}.pretrain"), f"{key}.pretrain"
        )
        v_cls = _optional_mapping(section["classify"], f"{key}.classify")
        v_train, v_hidden, v_dropout = _classify_section(
            v_cls, f"{key}.classify", cls_train, head_hidden, dropout
        )
        # Probe settings: the variant's classify settings, then classify.probe, then the
        # variant's own classify.probe; the augmentation is always off (cached features).
        probe = _train_config(probe_base, "classify.probe", v_train)
        probe = _train_config(_probe_overrides(v_cls, f"{key}.classify"),
                              f"{key}.classify.probe", probe)
        probe = dataclasses.replace(probe, augment=AugmentConfig())
        variants[name] = VariantConfig(
            name=name, arch=arch, reads=reads, model=model, pretrain=pretrain,
            classify=v_train, probe=probe, head_hidden=v_hidden, dropout=v_dropout,
        )

    ev_raw = _require_mapping(raw["evaluate"], "evaluate")
    _reject_unknown(ev_raw, _dataclass_fields(EvaluateConfig), "evaluate")
    evaluate = EvaluateConfig(**{
        name: int(_in_range(_number(value, f"evaluate.{name}", integer=True),
                            f"evaluate.{name}", 1))
        for name, value in ev_raw.items()})

    rt_raw = _require_mapping(raw.get("runtime") or {}, "runtime")
    _reject_unknown(rt_raw, _dataclass_fields(RuntimeConfig), "runtime")
    compile_ = rt_raw.get("compile", False)
    if not isinstance(compile_, bool):
        raise ConfigError(f"params.yaml: 'runtime.compile' must be true or false, got {compile_!r}")
    runtime = RuntimeConfig(compile=compile_, **{
        name: int(_in_range(_number(value, f"runtime.{name}", integer=True), f"runtime.{name}",
                            0 if name == "checkpoint_every" else 1))
        for name, value in rt_raw.items() if name != "compile"})
    if runtime.devices > 1 and runtime.seed_workers > 1:
        raise ConfigError("params.yaml: 'runtime.devices' and 'runtime.seed_workers' are both "
                          "above 1; choose one (DDP over devices, or seeds in parallel)")

    return Config(dataset=dataset, seed=seed, seeds=seeds, mask_ratio=mask_ratio,
                  label_fraction=label_fraction, data=data, variants=variants,
                  modes=tuple(modes), evaluate=evaluate, runtime=runtime, raw=raw)


def load_config(path: str | Path = "params.yaml", check_models: bool = True) -> Config:
    """Read and validate params.yaml (`check_models`: see parse_config)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if raw is None:
        raise ConfigError(f"{path} is empty; it must hold the keys of params.yaml")
    return parse_config(raw, check_models)
