"""Typed configuration and the one command-line parser every ehrlong entry point uses.

Three layers, later wins (DESIGN.md §7.1):

1. defaults in the dataclasses below;
2. a named preset, `config=NAME` -> `configs/NAME.yaml`, holding only overrides;
3. `key=value` arguments, dotted for nested groups (`trainer.max_steps=20`).

`config=list` prints the presets, one line each. Unknown keys and values of the wrong type fail with
the valid options listed. Values are parsed as YAML scalars (`true`, `null`, `1e-3`, `[1, 2]`), then
checked against the field's type by OmegaConf. A list field also takes repeated keys
(`run=a run=b`) or commas (`lengths=1024,4096`).
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ehrlong.errors import ConfigError

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "configs"
TOKENIZERS_DIR = REPO_ROOT / "tokenizers"

__all__ = [
    "MISSING",
    "PRESETS_DIR",
    "SyntheticConfig",
    "DataConfig",
    "ModelConfig",
    "MambaConfig",
    "TransformerConfig",
    "RopeConfig",
    "OptimConfig",
    "BatchConfig",
    "TrainerConfig",
    "TrackingConfig",
    "TrainConfig",
    "parse",
    "load_yaml_mapping",
    "list_presets",
    "flat_keys",
    "to_flat_dict",
]


# ---------------------------------------------------------------------------------------------------
# Knobs shared by several commands
# ---------------------------------------------------------------------------------------------------


@dataclass
class SyntheticConfig:
    """The embedded synthetic cohort (ehrlong.data.synthetic). Each dial moves one EHR property."""

    n_subjects: int = 1000
    seed: int = 0
    copy_forward: float = 0.5  # share of a visit's diagnoses re-recorded from earlier visits (repetition)
    irregularity: float = 0.5  # dispersion of inter-visit gaps at a fixed mean gap (irregular time)
    progression: float = 0.5  # growth of events per visit and complication rate over time
    visits: int = 120  # visits per subject, +-1/12 (120: 110-130, ~4k events); fewer = shorter timelines
    rerecord: float = 0.0  # chance that each visit after the prediction time records the early signals again


@dataclass
class DataConfig:
    """Where events come from and how they become tokens."""

    root: str | None = None  # a MEDS root; null = the embedded synthetic cohort (generated on first use)
    tokenizer: str = "cehr"  # a recipe in tokenizers/ (NAME.yaml) or a path to a recipe YAML
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Width and depth; null = taken from the size table of the chosen backbone (`size=`)."""

    d_model: int | None = None
    n_layers: int | None = None
    dropout: float = 0.0
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more time


@dataclass
class MambaConfig:
    """Mamba-1 block knobs (Gu & Dao 2023; mamba-130m is d_model 768, 24 layers, d_state 16)."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # null = ceil(d_model / 16), as in mamba_ssm
    kernels: str = "auto"  # auto (mamba-ssm on CUDA when importable) | torch (the chunked CPU scan always)
    scan_chunk: int = 16  # chunked CPU scan: tokens per local scan (research/proto_mamba_scan.md sweep)
    scan_segment: int = 128  # tokens (summed over the batch) whose states are recomputed together in backward


@dataclass
class TransformerConfig:
    """Llama-style decoder knobs (transformers' Llama blocks)."""

    n_heads: int | None = None  # null = from the size table
    n_kv_heads: int | None = None  # null = n_heads (no grouped-query attention)
    ffn_dim: int | None = None  # null = 4 * d_model
    attn_implementation: str = "sdpa"  # sdpa | eager (dense); attention.pattern other than dense overrides


@dataclass
class AttentionConfig:
    """Sparse causal attention patterns (ehrlong/backbones/attention.py; DESIGN.md §5)."""

    pattern: str = "dense"  # dense | sliding_window | lambda | longlora_shift
    window: int = 1024  # sliding_window, lambda: keys (t - window, t]
    sinks: int = 64  # lambda: leading keys every query also sees (LM-Infinite's global branch, 10-100)
    group: int = 4096  # longlora_shift: tokens per group (LongLoRA: a quarter of the context)
    block: int | None = None  # sliding_window, lambda: queries per block; null = min(256, window)


@dataclass
class RopeConfig:
    """Rotary positions. `type` is a transformers rope type, passed through `rope_parameters`."""

    type: str = "default"  # default | linear | dynamic | yarn | llama3 (transformers rope types)
    theta: float = 10000.0
    factor: float | None = None  # context extension factor (e.g. 4.0: trained at 4k, run at 16k)
    original_context_length: int | None = None  # trained length, for yarn / llama3 / longrope / dynamic
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    position: str = "index"  # index (token index) | time (event time: events at one time share a position)
    positions_per_day: float = 1.0  # position=time: rotary positions per day since the window's first event


@dataclass
class HMTConfig:
    """Hierarchical Memory Transformer wrapper (He et al. 2024, arXiv:2405.06067; DESIGN.md §5)."""

    backbone: str = "transformer"  # the wrapped backbone: transformer | mamba
    segment_length: int = 1024  # L: tokens per segment (the paper's common setting)
    sensory: int = 32  # k: tokens of the previous segment prepended to each segment (paper's best k)
    memory_window: int = 300  # N: recall attends over the last N memory embeddings (paper: 300)
    recall_dim: int | None = None  # width of the recall query/key projections; null = d_model
    bptt_segments: int = 8  # gradients cross at most this many segment boundaries; 0 = all of them


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay, linear warmup then cosine decay, stepped per optimizer step."""

    lr: float = 1e-3
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine floor as a share of lr
    grad_clip: float = 1.0


@dataclass
class BatchConfig:
    """How windows of the token store become batches."""

    tokens_per_step: int = 16384  # optimizer step budget; micro-batches are accumulated up to it
    tokens_per_micro_batch: int = 16384  # one forward/backward; padding counts against it
    val_windows: str = "last"  # last (the last L tokens of each tuning subject) | stride
    num_workers: int = 0


@dataclass
class TrainerConfig:
    """Lightning Trainer arguments (reachable as trainer.*)."""

    max_steps: int = 200
    max_epochs: int | None = None
    accelerator: str = "auto"
    devices: str = "auto"  # "auto", a count like "2", or a list like "[0,1]"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None  # null = bf16-mixed on CUDA, 32-true on CPU
    val_check_interval: int | None = None  # validate every N optimizer steps; null = at the end only
    log_every_n_steps: int = 5
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class TrackingConfig:
    """MLflow. tracking_uri null = $MLFLOW_TRACKING_URI, else a local sqlite store inside the runs folder."""

    tracking_uri: str | None = None
    experiment: str = "ehrlong"
    enabled: bool = True


@dataclass
class TrainConfig:
    """Everything `python -m ehrlong.train` reads."""

    config_name: str = "default"  # set from config=NAME; names the run directory and the MLflow tag
    backbone: str = "mamba"  # a name in ehrlong.backbones.BACKBONES
    size: str = "tiny"  # tiny (trains on a 2-core CPU) | small | base (Context Clues scale, ~110-130M)
    context_length: int = 1024  # L: tokens per training window
    eval_context_length: int | None = None  # validation window length; null = context_length
    seed: int = 0
    resume: str | None = None  # a run directory to continue at the same step and data position
    checkpoint_every: int = 50  # optimizer steps between checkpoints/last.ckpt (what resume restarts from)
    runs_dir: str | None = None  # null = $EHRLONG_RUNS or ./runs
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    hmt: HMTConfig = field(default_factory=HMTConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ---------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------


def list_presets(presets_dir: Path = PRESETS_DIR) -> list[tuple[str, str]]:
    """(name, one-line description) for every preset; the description is the file's first comment."""
    out = []
    for path in sorted(presets_dir.glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        desc = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        out.append((path.stem, desc))
    return out


def flat_keys(schema: type) -> dict[str, Any]:
    """Dotted key -> type annotation for every leaf field of a dataclass schema."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            for k, v in flat_keys(tp).items():
                out[f"{f.name}.{k}"] = v
        else:
            out[f.name] = tp
    return out


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """A resolved config as {dotted.key: value}: MLflow params, run summaries."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(to_flat_dict(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def _is_list(tp: Any) -> bool:
    if typing.get_origin(tp) in (list, Sequence):
        return True
    return any(_is_list(a) for a in typing.get_args(tp) if a is not type(None))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _unknown_key(key: str, valid: dict[str, Any], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    listing = ", ".join(valid)
    return ConfigError(f"unknown config key {key!r} {where}.{hint} Valid keys: {listing}.")


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _check_keys(tree: dict[str, Any], valid: dict[str, Any], where: str, prefix: str = "") -> None:
    groups = {k.rsplit(".", 1)[0] for k in valid if "." in k}
    for k, v in tree.items():
        key = prefix + k
        if isinstance(v, dict) and key in groups:
            _check_keys(v, valid, where, key + ".")
        elif key not in valid:
            raise _unknown_key(key, valid, where)


def load_yaml_mapping(path: Path, what: str, fix: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a preset, a recipe, a run's config.yaml), or a ConfigError
    naming the file, the line YAML stopped at and `fix`. An empty file is an empty mapping."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path} ({e.strerror or e}). {fix}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file (not UTF-8). {fix}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {problem}. {fix}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{what} {path} must be a YAML mapping of key: value, got a {type(loaded).__name__}. {fix}"
        )
    return loaded


def _parse_value(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw
    # YAML reads 2024-06-01 as a date; ehrlong takes dates as strings and parses them where they are used.
    return raw if isinstance(value, (datetime.date, datetime.datetime)) else value


def parse(
    schema: type[T],
    argv: Sequence[str],
    presets_dir: Path | None = None,
    prog: str = "ehrlong",
    base: tuple[Path, dict] | None = None,
    preset_kind: str = "preset",
) -> T:
    """Parse `config=NAME key=value ...` into a validated instance of `schema`.

    `presets_dir=None` means the command has no presets (`config=` is then an error). `base` is a
    (file, nested mapping) layer applied under the preset and the command line, e.g. a saved run's
    config.yaml when resuming; its keys are checked like a preset's. `preset_kind` names the preset
    file in messages (a tokenizer recipe is parsed as a preset of TokenizerRecipe).
    """
    valid = flat_keys(schema)
    preset: str | None = None
    values: dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help", "help"):
            print(usage(schema, prog, presets_dir))
            sys.exit(0)
        key, sep, raw = arg.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"argument {arg!r} is not of the form key=value. Usage: {prog} "
                f"{'config=NAME ' if presets_dir else ''}key=value ... ({prog} --help lists the keys)."
            )
        if key == "config" and presets_dir is not None and "config" not in valid:
            preset = raw
            continue
        if key not in valid:
            raise _unknown_key(key, valid, f"on the command line of {prog}")
        value = _parse_value(raw)
        if _is_list(valid[key]):
            items = value if isinstance(value, list) else [_parse_value(x) for x in str(raw).split(",")]
            values.setdefault(key, []).extend(items)
        else:
            values[key] = value

    if preset == "list":
        for name, desc in list_presets(presets_dir):
            print(f"{name:28s} {desc}")
        sys.exit(0)

    cfg = OmegaConf.structured(schema)
    try:
        if base is not None:
            path, mapping = base
            if not isinstance(mapping, dict):  # a config.yaml edited into a list or a scalar
                raise ConfigError(
                    f"{path} must be a YAML mapping of key: value, got a {type(mapping).__name__}; "
                    "restore the file ehrlong wrote (a run's config.yaml is its resolved config)."
                )
            _check_keys(mapping, valid, f"in {path}")
            cfg = OmegaConf.merge(cfg, mapping)
        if preset is not None:
            path = presets_dir / f"{preset}.yaml"
            if not path.is_file():
                names = ", ".join(n for n, _ in list_presets(presets_dir)) or "(none)"
                raise ConfigError(
                    f"no preset named {preset!r} (looked for {path}). Valid presets: {names}. "
                    f"`{prog} config=list` describes them."
                )
            loaded = load_yaml_mapping(
                path, preset_kind, f"A {preset_kind} holds only overrides, one `key: value` per line."
            )
            _check_keys(loaded, valid, f"in {preset_kind} {path}")
            cfg = OmegaConf.merge(cfg, loaded)
            if "config_name" in valid:
                cfg = OmegaConf.merge(cfg, {"config_name": preset})
        if values:
            cfg = OmegaConf.merge(cfg, _nest(values))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(
                f"{prog} needs {', '.join(f'{m}=...' for m in missing)}; "
                f"e.g. `{prog} {' '.join(f'{m}=VALUE' for m in missing)}`."
            )
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        tp = valid.get(key)
        expected = f" (expected {_type_name(tp)})" if tp is not None else ""
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"bad value for config key {key!r}{expected}: {first_line}.") from None


def usage(schema: type, prog: str, presets_dir: Path | None = None) -> str:
    defaults = to_flat_dict(schema())
    lines = [f"usage: {prog} {'config=NAME ' if presets_dir else ''}[key=value ...]", "", "keys (default):"]
    for key, tp in flat_keys(schema).items():
        default = defaults.get(key)
        shown = "(required)" if default == MISSING else repr(default)
        lines.append(f"  {key:34s} {_type_name(tp):18s} {shown}")
    if presets_dir is not None:
        lines += ["", f"presets: {prog} config=list"]
    return "\n".join(lines)
