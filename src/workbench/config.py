"""The training config: plain YAML read into dataclasses.

Every key has a default, so an empty file (or no file) is the built-in run: the
tiny Llama on the synthetic skills. Unknown keys and wrongly typed values are
errors naming the key, because a misspelt key silently falling back to its
default is the worst kind of config bug. Relative data paths are resolved
against the config file's folder (the file can travel with its data).

    model:        path (a built-in model: "builtin:tiny-llama", the default, or "builtin:small-llama", a
                  ~17M-parameter one for GPU runs, see workbench.default; or a local HF checkpoint folder),
                  dtype, attn_implementation, chat_template
    data:         train ("builtin" or jsonl/parquet file(s)), test, eval_fraction, seed, builtin_rows
    lora:         r, alpha, dropout, target_modules, use_rslora
    quantization: null, or {type: nf4, double_quant, compute_dtype, upcast_frozen}
    training:     max_steps or epochs, batch_size, grad_accum, lr, schedule, warmup_ratio, weight_decay,
                  max_grad_norm, seed, gradient_checkpointing (false, true, or offload: the checkpointed
                  layers' inputs wait in host memory), max_seq_len, packing, logging_steps, method (sft, or
                  dpo / orpo on prompt/chosen/rejected pairs: workbench.preference), beta (DPO's and ORPO's)
    eval:         max_rows, max_new_tokens (greedy generation on the test split, base and adapter)
    kernels:      our Triton kernels: "auto" (on with CUDA, off on the CPU), true, false, or
                  {switch: bool} per kernel (workbench.patch: rms_norm, rope, mlp, loss, lora, nf4
                  on unless false; fuse_add_norm, adapter_as_autocast off unless true). (The
                  benchmarks' comparison stacks, other projects' kernels, are no config of the
                  product: workbench.bench.stacks.)
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from workbench.default import BUILTIN_MODEL, BUILTIN_MODELS
from workbench.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULES = ("constant", "linear", "cosine", "constant_with_warmup")
#: training.method: supervised fine-tuning on prompt/completion rows, or preference training on
#: prompt/chosen/rejected pairs (workbench.preference: TRL's DPO and ORPO trainers).
METHODS = ("sft", "dpo", "orpo")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelConfig:
    path: str = BUILTIN_MODEL
    dtype: str = "auto"  # auto: bfloat16 on a CUDA device that supports it, else float32
    attn_implementation: str = "sdpa"
    # Only for checkpoints whose tokenizer has none: "chatml" (ours) or a Jinja string.
    chat_template: typing.Optional[str] = None


@dataclass
class DataConfig:
    train: typing.Union[str, list] = "builtin"
    test: typing.Optional[typing.Union[str, list]] = None
    eval_fraction: float = 0.1  # split off train when data.test is not given (user data only)
    seed: int = 0
    builtin_rows: int = 3000


@dataclass
class LoraSection:
    r: int = 16
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    use_rslora: bool = False


@dataclass
class QuantizationConfig:
    type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto: the model dtype
    # true: PEFT's prepare_model_for_kbit_training upcasts the norms, embeddings and lm_head
    # to fp32, so under autocast the residual stream runs in fp32 (PEFT's QLoRA recipe).
    # false keeps them in the compute dtype, as a 16-bit LoRA base runs: bf16 numerics, about
    # half the activation memory (workbench.models.load_model).
    upcast_frozen: bool = True


@dataclass
class TrainingConfig:
    max_steps: typing.Optional[int] = 800
    epochs: typing.Optional[float] = None  # used only when max_steps is null
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # true: recompute each layer in the backward; "offload": and keep the layers' inputs in
    # host memory meanwhile (workbench.offload).
    gradient_checkpointing: typing.Union[bool, str] = False
    max_seq_len: int = 256
    # false: one row per sequence (padded per batch). "wrapped": rows concatenated and cut
    # into sequences of exactly max_seq_len (full-length batches for speed and memory
    # benchmarks; attention crosses row boundaries). "bfd": best-fit packing without
    # crossing rows (padding-free; block-diagonal attention from position_ids); true = "bfd".
    packing: typing.Union[bool, str] = False
    logging_steps: int = 25
    # sft, dpo or orpo. dpo and orpo train on preference pairs (data rows with prompt, chosen
    # and rejected), with the loss in our fused kernel when the loss kernel is on.
    method: str = "sft"
    # DPO: how far the policy may move from the reference (the base, the adapter disabled);
    # ORPO: the odds-ratio term's weight (its lambda). Unused by sft.
    beta: float = 0.1


@dataclass
class EvalConfig:
    max_rows: int = 200
    max_new_tokens: int = 32


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    quantization: typing.Optional[QuantizationConfig] = None
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    kernels: typing.Union[str, bool, dict] = "auto"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def builtin_model(self) -> bool:
        return self.model.path in BUILTIN_MODELS

    @property
    def builtin_data(self) -> bool:
        return self.data.train == "builtin"


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _yaml11_float(value, hint):
    """PyYAML follows YAML 1.1, which reads ``2e-4`` (no dot) as a string; for a
    number key, take such a string as the number it spells."""
    if isinstance(value, str) and _type_ok(1.5, hint) and not _type_ok(value, hint):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return {type(None): "null", str: "a string", int: "an integer", float: "a number", bool: "true/false",
            list: "a list", dict: "a mapping"}.get(hint, getattr(hint, "__name__", str(hint)))


def _build(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise UserError(f"config section {where or 'top level'} must be a mapping, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise UserError(f"unknown config key {key!r}; the keys{' of ' + where if where else ''} are {', '.join(names)}.")
    kwargs = {}
    for name, value in raw.items():
        hint, key = hints[name], f"{where}.{name}" if where else name
        sub = next((h for h in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(h)), None)
        if sub is not None and value is not None:
            kwargs[name] = _build(sub, value, key)
            continue
        value = _yaml11_float(value, hint)
        if not _type_ok(value, hint):
            raise UserError(f"config key {key!r} must be {_type_name(hint)}, got {value!r}.")
        kwargs[name] = value
    return cls(**kwargs)


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"config key {key!r} is {value!r}; use one of {', '.join(map(str, choices))}.")


#: model.path values starting with this name a built-in model (never a folder).
BUILTIN_PREFIX = "builtin:"


def _validate(cfg: Config) -> None:
    if cfg.model.path.startswith(BUILTIN_PREFIX) and cfg.model.path not in BUILTIN_MODELS:
        raise UserError(f"config key 'model.path' is {cfg.model.path!r}, which is not a built-in model; set it to "
                        f"one of {', '.join(BUILTIN_MODELS)}, or to a local Hugging Face checkpoint folder.")
    _check_choice("model.dtype", cfg.model.dtype, DTYPES)
    _check_choice("model.attn_implementation", cfg.model.attn_implementation, ATTN_IMPLEMENTATIONS)
    _check_choice("training.schedule", cfg.training.schedule, SCHEDULES)
    _check_choice("training.method", cfg.training.method, METHODS)
    t = cfg.training
    if t.max_steps is None and t.epochs is None:
        raise UserError("set training.max_steps or training.epochs (both are null).")
    for key, value in (("training.max_steps", t.max_steps), ("training.batch_size", t.batch_size),
                       ("training.grad_accum", t.grad_accum), ("training.max_seq_len", t.max_seq_len),
                       ("training.logging_steps", t.logging_steps), ("lora.r", cfg.lora.r),
                       ("eval.max_new_tokens", cfg.eval.max_new_tokens), ("data.builtin_rows", cfg.data.builtin_rows)):
        if value is not None and value < 1:
            raise UserError(f"config key {key!r} must be at least 1, got {value}.")
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise UserError(f"config key 'training.lr' must be a number above 0, got {t.lr} (0 would train an adapter "
                        "that never changes); e.g. 2e-4.")
    if t.epochs is not None and not (math.isfinite(t.epochs) and t.epochs > 0):
        raise UserError(f"config key 'training.epochs' must be a number above 0, got {t.epochs}.")
    for key, value in (("training.warmup_ratio", t.warmup_ratio), ("training.weight_decay", t.weight_decay),
                       ("training.max_grad_norm", t.max_grad_norm), ("lora.alpha", cfg.lora.alpha)):
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"config key {key!r} must be a finite number of at least 0, got {value}.")
    if t.warmup_ratio >= 1:
        raise UserError(f"config key 'training.warmup_ratio' must be below 1 (a fraction of the steps), got "
                        f"{t.warmup_ratio}.")
    if not 0 <= cfg.lora.dropout < 1:
        raise UserError(f"config key 'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}.")
    if not 0 < cfg.data.eval_fraction < 1:
        raise UserError(f"config key 'data.eval_fraction' must be between 0 and 1, got {cfg.data.eval_fraction}.")
    if cfg.eval.max_rows < 0:
        raise UserError(f"config key 'eval.max_rows' must be 0 (skip the accuracy eval) or more, got {cfg.eval.max_rows}.")
    if not cfg.lora.target_modules or not all(isinstance(m, str) for m in cfg.lora.target_modules):
        raise UserError("config key 'lora.target_modules' must be a non-empty list of module names, e.g. [q_proj, v_proj].")
    if cfg.quantization is not None:
        _check_choice("quantization.type", cfg.quantization.type, ("nf4",))
        _check_choice("quantization.compute_dtype", cfg.quantization.compute_dtype, DTYPES)
        if not isinstance(cfg.quantization.upcast_frozen, bool):
            raise UserError(f"config key 'quantization.upcast_frozen' is {cfg.quantization.upcast_frozen!r}; use true "
                            "(PEFT's fp32 norms, embeddings and head) or false (kept in the compute dtype).")
    if isinstance(cfg.kernels, str) and cfg.kernels != "auto":
        raise UserError(f"config key 'kernels' is {cfg.kernels!r}; use auto, true, false or a mapping of kernel "
                        "switches (e.g. {rope: false}).")
    _check_choice("training.packing", t.packing, (False, True, "wrapped", "bfd"))  # true: TRL's default, bfd
    _check_choice("training.gradient_checkpointing", t.gradient_checkpointing, (False, True, "offload"))
    if not (math.isfinite(t.beta) and t.beta > 0):
        raise UserError(f"config key 'training.beta' must be a number above 0, got {t.beta} (it scales the "
                        "preference term of dpo and orpo); e.g. 0.1.")
    if t.method != "sft":
        # TRL's preference trainers tokenize pairs themselves and pad them; neither packs rows, and
        # offloaded checkpointing hooks only the SFT trainer. They switch dropout off (the policy's
        # and the reference's log-probs must not be noisy), so a LoRA dropout would not apply.
        if cfg.lora.dropout:
            raise UserError(f"config key 'lora.dropout' is {cfg.lora.dropout}, but TRL's {t.method} trainer switches "
                            "dropout off; set lora.dropout: 0.")
        if t.packing:
            raise UserError(f"config key 'training.packing' is {t.packing!r}, but training.method {t.method} trains "
                            "on preference pairs, which are not packed; set training.packing: false.")
        if t.gradient_checkpointing == "offload":
            raise UserError(f"training.gradient_checkpointing: offload is for training.method sft; with "
                            f"{t.method} use true (checkpointing without the offload) or false.")


def _resolve_paths(value, base: Path):
    if value is None or value == "builtin":
        return value
    if isinstance(value, list):
        return [_resolve_paths(v, base) for v in value]
    if not isinstance(value, str):
        raise UserError(f"a data path must be a string, got {value!r}.")
    return str((base / os.path.expanduser(value)).resolve())


def from_dict(raw: dict | None, base_dir: str | os.PathLike = ".") -> Config:
    """A validated Config from parsed YAML; relative paths resolve against ``base_dir``."""
    cfg = _build(Config, raw or {}, "")
    _validate(cfg)
    base = Path(base_dir)
    if not cfg.builtin_model:
        cfg.model.path = str((base / os.path.expanduser(cfg.model.path)).resolve())
    if cfg.data.train == "builtin" and cfg.data.test is not None:
        raise UserError("data.test is only for your own data; the built-in data has its own held-out test split.")
    cfg.data.train = _resolve_paths(cfg.data.train, base)
    cfg.data.test = _resolve_paths(cfg.data.test, base)
    return cfg


def read_yaml_file(path: str | os.PathLike, what: str, hint: str):
    """The parsed contents of a user's YAML file, or a UserError naming ``what`` the
    file is meant to be and, in ``hint``, what to pass instead."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read {what} {path} ({str(err).splitlines()[0]}); {hint}") from None


def parse_override(text: str) -> tuple[list[str], object]:
    """``section.key=value`` (value parsed as YAML) from the command line."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set needs KEY=VALUE (e.g. training.max_steps=50), got {text!r}.")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise UserError(f"--set {key}: the value {value!r} is not valid YAML.") from None
    return key.strip().split("."), parsed


def load(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read the YAML file at ``path`` (None: the built-in defaults), apply
    ``section.key=value`` overrides, and validate."""
    import yaml

    raw: dict = {}
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; pass the path of a YAML file (or omit --config "
                            "for the built-in default).")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {path} is not valid YAML{where}; fix the syntax.") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must hold a mapping of sections (model:, data:, ...).")
        base_dir = path.resolve().parent
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return from_dict(raw, base_dir)


def dump(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def of_run(run: str | os.PathLike) -> Config:
    """The config a run was trained with (its config.yaml), else the built-in default."""
    path = Path(run) / "config.yaml"
    return load(path) if path.is_file() else load(None)
