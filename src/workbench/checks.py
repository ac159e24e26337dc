"""What a checkpoint folder and a training config must be before anything is loaded.

Each check raises a UserError that names the file and what to do: a folder without
safetensors (pickles can run code, so they are never loaded), custom code declared by a
checkpoint, a truncated safetensors file, a family we do not support, a tokenizer whose ids
the embedding does not cover, LoRA target modules the model does not have.
"""
from __future__ import annotations

import json
from pathlib import Path

from workbench.config import Config
from workbench.errors import UserError

#: Weight files that are Python pickles (loading one can run code): never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def check_model_folder(path, name: str = "model path",
                       hint: str = "set model.path to a local Hugging Face checkpoint folder (config.json + "
                                   "*.safetensors) or to a built-in model (builtin:tiny-llama or "
                                   "builtin:small-llama)") -> dict:
    """The checkpoint's config.json (plus its "family"), after checking that the folder
    is a loadable safetensors checkpoint of a supported family (UserError otherwise).
    ``name`` and ``hint`` word the errors for where the path came from."""
    from types import SimpleNamespace

    from workbench.families import family_of

    folder = Path(path)
    if not folder.exists():
        raise UserError(f"{name} {folder} does not exist; {hint}.")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise UserError(f"{name} {folder} is not a checkpoint folder (no config.json in it); pass the folder that "
                        "holds config.json and the *.safetensors weights.")
    if not list(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"only pickle weights ({', '.join(pickles[:3])})" if pickles else "no weight files"
        raise UserError(f"{name} {folder} has no *.safetensors weights, {found}; only safetensors are loaded "
                        "(pickles can run code), so convert the checkpoint to safetensors first "
                        "(save_pretrained(..., safe_serialization=True)).")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{folder / 'config.json'} is not valid JSON ({getattr(err, 'msg', err)}); fix or replace "
                        "it.") from None
    if not isinstance(config, dict):
        raise UserError(f"{folder / 'config.json'} is not a JSON object; fix or replace it with the checkpoint's "
                        "config.json.")
    refuse_custom_code(folder, name)
    config["family"] = family_of(SimpleNamespace(model_type=config.get("model_type")))
    for f in sorted(folder.glob("*.safetensors")):
        check_safetensors(f)
    return config


def refuse_custom_code(folder: Path, name: str) -> None:
    """A checkpoint whose config.json or tokenizer_config.json declares its own Python
    code (``auto_map``, ``trust_remote_code``) is refused: workbench never runs code
    that came with a checkpoint, nor copies it into a run (README, "What happens when
    things go wrong")."""
    for file in ("config.json", "tokenizer_config.json"):
        path = folder / file
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            continue   # config.json is checked on its own; a broken tokenizer config fails its loader
        if isinstance(data, dict) and (data.get("auto_map") or data.get("trust_remote_code")):
            key = "auto_map" if data.get("auto_map") else "trust_remote_code"
            raise UserError(f"{name} {folder} declares custom code ({key} in {file}), which workbench never runs or "
                            "copies; use a checkpoint of a supported architecture without auto_map (re-save it with "
                            "save_pretrained after loading it as that architecture).")


def check_safetensors(path: Path) -> None:
    """A UserError unless ``path`` is a whole safetensors file: an 8-byte header length, a
    JSON header, and the data its tensors' offsets reach (a truncated download fails
    here, before anything is written, rather than deep inside a loader)."""
    hint = "re-download or re-save it (save_pretrained(..., safe_serialization=True))"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise UserError(f"{path} is not a safetensors file ({size} bytes, "
                                f"{'empty' if size == 0 else 'no readable header'}); {hint}.")
            header = json.loads(fh.read(n).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not a safetensors file (its header is not JSON); {hint}.") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (its header is not a JSON object); {hint}.")
    try:
        end = max([int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"], default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise UserError(f"{path} is not a safetensors file (a tensor entry of its header has no data_offsets); "
                        f"{hint}.") from None
    if 8 + n + end > size:
        raise UserError(f"{path} is truncated ({size} bytes, its header describes {8 + n + end}); {hint}.")




def check_model_fits(cfg: Config, tok, build: bool = True) -> None:
    """What the model and the config must agree on, checked on the model's config alone
    (an empty model on the meta device, no weights loaded): the tokenizer's ids have
    embedding rows, and (``build``) every lora.target_modules name is a module of the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from workbench import default

    if cfg.builtin_model:
        config = default.model_config(tok, cfg.model.path)
    else:
        try:
            config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"the config.json of {cfg.model.path} cannot be read as a model config "
                            f"({str(err).splitlines()[0][:200]}); use a checkpoint of a supported architecture."
                            ) from None
    rows = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    if rows and len(tok) > rows:
        raise UserError(f"the tokenizer of {cfg.model.path} has {len(tok)} ids but the model's embedding has "
                        f"{rows} rows, so some ids have no embedding; use the tokenizer the checkpoint was saved "
                        "with.")
    if not build:
        return
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{cfg.model.path} cannot be built as a causal language model "
                        f"({str(err).splitlines()[0][:200]}); use a checkpoint of a supported architecture.") from None
    check_target_modules(cfg, model)


def check_target_modules(cfg: Config, model) -> None:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.lora.target_modules if m not in present]
    if missing:
        raise UserError(f"lora.target_modules names {', '.join(missing)}, which this model does not have; "
                        "use module names of its linear layers (e.g. q_proj, v_proj).")


