"""One typed, validated description of a quantize job: YAML <-> ``JobSpec`` <-> CLI flags.

Validation happens here, once, before any model work: unknown keys (with the nearest valid key),
impossible bit widths, option combinations that make no sense. Checks that need the model's
``config.json`` (architecture, group-size divisibility) live in ``check_job`` in
``pipeline.distributed.job`` so this module stays importable without torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import VlmqError, nearest

WBITS = (2, 3, 4, 8)
ABITS = (16, 8, 6, 4)  # 8: real W4A8; 6 and 4: fake-quant evaluation only (Q-VLM settings)
GROUP_SIZES = (32, 64, 128)
PER_CHANNEL_WORDS = ("channel", "none", "0", "-1")  # --group-size / --lm-head-group-size spellings of per-channel
METHODS = ("rtn", "awq", "mbq", "smoothquant", "qvlm", "qvlm+mbq")


@dataclass
class CalibSpec:
    """Where calibration samples come from."""

    source: str = "builtin"  # builtin | file.parquet | file.jsonl | datasets folder
    num_samples: int = 128  # MBQ's paper: 128 image-caption pairs
    seed: int = 42
    mode: str = "auto"  # builtin source only: caption | qa | mixed | auto (qa for the built-in model, else caption)
    image_dir: str | None = None  # JSONL: folder images are relative to (default: the JSONL's folder)
    holdout: int = 8  # extra held-out samples for fidelity (KL, top-1) and validation
    max_length: int | None = None  # skip longer samples (tokens): a cut would lose the answer
    split: str | None = None  # datasets DatasetDict folders: which split (default train)


@dataclass
class QuantRecipe:
    """What to compute. Method-specific options are ignored by methods that don't use them."""

    method: str = "rtn"
    wbits: int = 4
    abits: int = 16
    group_size: int | None = 128  # None: per output channel
    sym: bool = False
    # Pack the lm_head too (RTN, the same bits / group size / symmetry as the decoder Linears).
    # Off by default, as in MBQ/AWQ: the head is usually the most accuracy-sensitive Linear, but
    # at W4 its fp16 matrix is ~17% of a 7B decode step. Tied embeddings are untied on write.
    quantize_lm_head: bool = False
    # The head's own precision (either one implies quantize_lm_head). None: the recipe's wbits /
    # group_size; lm_head_group_size 0: per output channel. Symmetry follows the recipe. Why: the
    # head is the most sensitive Linear, so "W3 layers + W4 head" keeps most of the decode gain.
    lm_head_bits: int | None = None
    lm_head_group_size: int | None = None
    # AWQ / MBQ
    clip: bool = True
    loss: str = "mae"  # mbq: mae | mse
    sensitivity_floor: str = "median"  # mbq: median | none
    mbq_clip_weighting: bool = True  # mbq: modality weights inside the clip search too (our extension)
    grid: int = 20
    # Q-VLM
    partition: str = "entropy"  # entropy | dependency | fixed
    p: float = 0.5
    max_block_layers: int = 3
    iters: int = 200
    lr: float = 1e-2  # 1e-3 (AdaRound's) at 200 iterations can end worse than RTN end to end
    batch_size: int = 4
    veo: bool = False  # Q-VLM visual-encoder optimization (off: the ablation shows no held-out gain)
    veo_steps: int = 50
    veo_eta: float = 0.001
    veo_samples: int = 16

    @property
    def head_bits(self) -> int:
        """Bits of the packed lm_head: its own, else the decoder Linears'."""
        return self.wbits if self.lm_head_bits is None else self.lm_head_bits

    @property
    def head_group_size(self) -> int | None:
        """Group size of the packed lm_head (None: per channel): its own, else the recipe's."""
        if self.lm_head_group_size is None:
            return self.group_size
        return None if self.lm_head_group_size <= 0 else self.lm_head_group_size

    @property
    def head_differs(self) -> bool:
        """Whether the packed head's scheme is not the decoder Linears' (two schemes in the checkpoint)."""
        return (self.head_bits, self.head_group_size) != (self.wbits, self.group_size)

    @property
    def label(self) -> str:
        a = f"A{self.abits}" if self.abits < 16 else ""
        head = ""
        if self.quantize_lm_head:
            head = f" +head W{self.head_bits} {_g(self.head_group_size)}" if self.head_differs else " +head"
        return f"{self.method} W{self.wbits}{a} {_g(self.group_size)}{' sym' if self.sym else ''}{head}"


def _g(group_size: int | None) -> str:
    return "ch" if group_size is None else f"g{group_size}"


def head_plan(r: QuantRecipe) -> str:
    """One line saying how the lm_head will be stored (``--dry-run`` prints it)."""
    if not r.quantize_lm_head:
        return "lm_head: fp16 (--quantize-lm-head or --lm-head-bits packs it)"
    sym = " sym" if r.sym else ""
    layers = f"W{r.wbits} {_g(r.group_size)}{sym}"
    if not r.head_differs:
        return f"lm_head: packed like the decoder Linears, {layers} (RTN)"
    return f"lm_head: packed W{r.head_bits} {_g(r.head_group_size)}{sym} (RTN); decoder Linears {layers}"


@dataclass
class Resources:
    """Where it runs. Defaults: a local Ray instance using every visible CPU/GPU."""

    address: str | None = None  # Ray cluster address; None: RAY_ADDRESS or a local instance
    num_gpus: int | None = None  # None: all visible
    num_cpus: int | None = None
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float16 | bfloat16 | float32 (compute dtype of the fp model)
    store: str | None = None  # activation store root (dir or pyarrow URI); default <work_dir>/acts
    store_max_gb: float | None = None  # backpressure budget for the store


@dataclass
class JobSpec:
    model: str  # a model folder, "builtin", or "synthetic:NAME"
    out: str
    calib: CalibSpec = field(default_factory=CalibSpec)
    recipe: QuantRecipe = field(default_factory=QuantRecipe)
    resources: Resources = field(default_factory=Resources)
    overwrite: bool = False
    resume: bool = False
    work_dir: str | None = None  # default: <out>.work beside the output
    keep_work: bool = False
    allow_pickle: bool = False  # load .bin/.pt weights (pickles); off by default

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(str(Path(self.out)) + ".work")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# dict -> dataclass with exact errors


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "channel")
                             and type(None) in typing.get_args(tp)):
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise VlmqError(f"'{where}' must be a mapping, got {type(value).__name__}",
                            f"write '{where}:' followed by indented keys")
        return _from_dict(tp, value, where + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise VlmqError(f"'{where}' must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise VlmqError(f"'{where}' must be a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise VlmqError(f"'{where}' must be a number, got {value!r}") from None
        if tp is int and float(value) != out:
            raise VlmqError(f"'{where}' must be a whole number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise VlmqError(f"'{where}' must be a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            guess = nearest(str(key), names)
            hint = f"did you mean '{prefix}{guess}'?" if guess else f"valid keys: {', '.join(names)}"
            raise VlmqError(f"unknown key '{prefix}{key}' in the job spec", hint)
        if prefix + key == "recipe.lm_head_group_size" and isinstance(value, str) \
                and value.lower() in PER_CHANNEL_WORDS:
            value = 0  # per-channel; None (YAML null) is "the recipe's group size"
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in kwargs]
    if missing:
        raise VlmqError(f"the job spec has no '{prefix}{missing[0]}'",
                        f"add '{prefix}{missing[0]}: ...' to the YAML or pass --{missing[0].replace('_', '-')}")
    return cls(**kwargs)


def spec_from_dict(data: dict[str, Any]) -> JobSpec:
    """Build and validate a JobSpec from a nested dict (parsed YAML plus CLI overrides)."""
    spec = _from_dict(JobSpec, data)
    validate_spec(spec, explicit=data)
    return spec


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise VlmqError(f"job file {p} does not exist", "check the path, or pass flags instead of a YAML file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise VlmqError(f"job file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise VlmqError(f"job file {p} must be a mapping of keys (model:, out:, recipe:, ...)")
    return data


def dump_yaml(spec: JobSpec) -> str:
    import yaml

    return yaml.safe_dump(spec.to_dict(), sort_keys=False)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` (CLI flags) into ``base`` (YAML)."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _choice(value: Any, choices: tuple, what: str, fix: str | None = None) -> None:
    if value not in choices:
        raise VlmqError(f"{what} {value!r} is not supported (choose from {', '.join(map(str, choices))})", fix)


def _head_flags(r: QuantRecipe) -> str:
    """The head-precision flags a recipe sets, as the user would have typed them."""
    flags = []
    if r.lm_head_bits is not None:
        flags.append(f"--lm-head-bits {r.lm_head_bits}")
    if r.lm_head_group_size is not None:
        flags.append(f"--lm-head-group-size {r.lm_head_group_size or 'channel'}")
    return " ".join(flags)


def _validate_head(r: QuantRecipe, given: dict[str, Any]) -> None:
    """``--lm-head-bits`` / ``--lm-head-group-size`` imply ``--quantize-lm-head`` (they are
    meaningless for an fp16 head); an explicit ``--no-quantize-lm-head`` beside them is a
    contradiction and is refused rather than guessed at."""
    flags = _head_flags(r)
    if flags:
        if "quantize_lm_head" in given and not r.quantize_lm_head:
            raise VlmqError(f"{flags} sets the packed lm_head's precision, but --no-quantize-lm-head "
                            "(recipe.quantize_lm_head: false) keeps the lm_head fp16",
                            f"drop --no-quantize-lm-head to pack the head, or drop {flags} to keep it fp16")
        r.quantize_lm_head = True
    if r.lm_head_bits is not None:
        _choice(r.lm_head_bits, WBITS, "--lm-head-bits",
                "use one of 2, 3, 4, 8 (e.g. --wbits 3 --lm-head-bits 4: the head is the most sensitive "
                "Linear), or drop it to pack the head with --wbits")
    if r.lm_head_group_size is not None and r.lm_head_group_size != 0 and r.lm_head_group_size not in GROUP_SIZES:
        raise VlmqError(f"--lm-head-group-size {r.lm_head_group_size!r} is not supported (choose from 32, 64, 128, "
                        "channel)", "use 32, 64, 128 or 'channel', or drop it to use --group-size")
    if r.quantize_lm_head and r.abits < 16:
        what = flags or "--quantize-lm-head"
        raise VlmqError(f"{what} is weight-only; it does not combine with --abits {r.abits} "
                        "(the head's input would need int8 activations too, which no reference path checks)",
                        f"drop {what} (the lm_head stays fp16), or use weight-only --abits 16")


def validate_spec(spec: JobSpec, explicit: dict[str, Any] | None = None) -> None:
    """Model-independent checks. ``explicit`` is the raw input, to tell defaults from choices."""
    r = spec.recipe
    given = (explicit or {}).get("recipe", {}) or {}
    _choice(r.method, METHODS, "method")
    _choice(r.wbits, WBITS, "--wbits", "use one of 2, 3, 4, 8")
    _choice(r.abits, ABITS, "--abits", "use 16 (weight-only) or 8 (W4A8)")
    if r.group_size is not None:
        _choice(r.group_size, GROUP_SIZES, "--group-size", "use 32, 64, 128 or 'channel'")
    if r.abits < 16:
        if r.abits in (6, 4) and not r.method.startswith("qvlm"):
            raise VlmqError(f"--abits {r.abits} is a fake-quant evaluation setting of Q-VLM only",
                            "use --abits 8 (W4A8) or --method qvlm")
        if r.abits == 8 and r.wbits != 4:
            raise VlmqError(f"--abits 8 needs --wbits 4 (W4A8), got --wbits {r.wbits}", "pass --wbits 4")
        # W4A8 weights are per-channel symmetric int4 (METHODS.md §4).
        if "group_size" in given and given["group_size"] not in (None, "channel", "none"):
            raise VlmqError("W4A8 quantizes weights per output channel; --group-size does not apply",
                            "drop --group-size (or pass --group-size channel)")
        if "sym" in given and not r.sym:
            raise VlmqError("W4A8 weights are symmetric int4; --no-sym does not apply", "drop --no-sym")
        r.group_size = None
        r.sym = True
    _validate_head(r, given)
    if r.method == "smoothquant" and r.abits != 8:
        raise VlmqError("smoothquant is the W4A8 baseline", "pass --wbits 4 --abits 8")
    _choice(r.loss, ("mae", "mse"), "--loss")
    _choice(r.sensitivity_floor, ("median", "none"), "--sensitivity-floor")
    _choice(r.partition, ("entropy", "dependency", "fixed"), "--partition")
    if not 0.0 <= r.p <= 1.0:
        raise VlmqError(f"--p must be a quantile in [0, 1], got {r.p}")
    if r.veo and not r.method.startswith("qvlm"):
        raise VlmqError("--veo is part of Q-VLM", "use --method qvlm or qvlm+mbq, or drop --veo")
    for name in ("max_block_layers", "iters", "batch_size", "grid", "veo_steps", "veo_samples"):
        if getattr(r, name) < 1:
            raise VlmqError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(r, name)}")
    if r.lr <= 0:
        raise VlmqError(f"--lr must be positive, got {r.lr}")
    c = spec.calib
    if c.num_samples < 1:
        raise VlmqError(f"--num-samples must be >= 1, got {c.num_samples}")
    if c.holdout < 0:
        raise VlmqError(f"--holdout must be >= 0, got {c.holdout}")
    _choice(c.mode, ("auto", "caption", "qa", "mixed"), "calib.mode")
    res = spec.resources
    _choice(res.device, ("auto", "cpu", "cuda"), "--device")
    _choice(res.dtype, ("auto", "float16", "bfloat16", "float32"), "--dtype")
    if not spec.out:
        raise VlmqError("no output directory given", "pass --out DIR")
