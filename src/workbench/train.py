"""The train stage: LoRA / QLoRA fine-tuning through TRL's SFTTrainer.

``run_train(config, run_dir)`` checks everything it can before writing anything
(model folder, safetensors, architecture, tokenizer against the embedding, target
modules, data files, columns and lengths), then builds in RUN/.train.partial and
renames into the run directory only when training and saving succeeded:

    config.yaml          the resolved config
    base/                the generated base (built-in default only)
    tokenizer/           the tokenizer the model was trained with
    data/train.jsonl     the training rows, normalised to chat prompt/completion
    data/test.jsonl      the held-out rows (what later stages evaluate on)
    train/loss.jsonl     one line per logging step: step, loss, lr, grad_norm, tokens, elapsed
    train/eval.json      greedy-generation accuracy on the test split, base and adapter
    adapter/             the PEFT adapter

and records the "train" stage in the manifest. A retrain that is refused, fails or is
killed leaves the previous complete train (record and files) as it was; the try is
noted under the manifest's "attempts". Training is completion-only: the
loss covers the assistant's answer and its closing EOS, never the prompt.

Failures say what to change: a non-finite loss stops training and keeps the last
adapter whose loss was finite in ``train/last_good_adapter/`` (not ``adapter/``,
which only a finished run writes); running out of GPU memory names the knobs that
reduce memory. Either way the try is recorded as "failed" (the train record of a first
train, else its attempt beside the kept record)."""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import math
import os
import random
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

from workbench import atomic, console, manifest, synthetic
from workbench.config import Config
from workbench.errors import UserError, reason


#: False in the non-main processes of a distributed launch (accelerate launch,
#: torchrun): only the main process prints and writes the run directory.
_MAIN = True


def _log(message: str, detail: bool = False) -> None:
    """``detail``: an inner step that `workbench run` keeps in its log (console.progress)."""
    if _MAIN:
        console.progress(f"train: {message}", detail=detail)


def _distributed_state():
    """accelerate's PartialState under a distributed launch (WORLD_SIZE > 1), else
    None. The Trainer then trains with DDP/FSDP as accelerate sets it up; we only
    keep the run directory single-writer."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    # cpu=True as TrainingArguments(use_cpu=True) asks (gloo); without it accelerate
    # sees no distributed setup on a machine without CUDA.
    return PartialState(cpu=not torch.cuda.is_available())


def _wait_for_everyone(state) -> None:
    if state is not None:
        state.wait_for_everyone()


# --------------------------------------------------------------------------- model checks
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


# --------------------------------------------------------------------------- data
PROMPT_COMPLETION = ("prompt", "completion")
#: Message roles a row may use (the chat templates and the held-out eval know these).
ROLES = ("system", "user", "assistant")
MESSAGES = ("messages",)


def _read_file(path: str) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"dataset file {p} is a folder; set data.train / data.test to .jsonl or .parquet files.")
    if not p.is_file():
        raise UserError(f"dataset file {p} does not exist; check data.train / data.test in the config.")
    if p.suffix == ".jsonl":
        rows = []
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            line = p.read_bytes()[:err.start].count(b"\n") + 1
            raise UserError(f"{p} is not UTF-8 text (byte 0x{err.object[err.start]:02x} on line {line}); save it as "
                            "UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{p} line {n} is not valid JSON ({err.msg}); each line must be one JSON object.") from None
            if not isinstance(rows[-1], dict):
                raise UserError(f"{p} line {n} is not a JSON object; each line must be one row like "
                                '{"prompt": ..., "completion": ...}.')
    elif p.suffix == ".parquet":
        import pandas as pd

        try:
            rows = pd.read_parquet(p).to_dict(orient="records")
        except Exception as err:   # pyarrow raises its own kinds (ArrowInvalid, ...) for a file that is no parquet
            raise UserError(f"{p} is not a readable parquet file ({reason(err)}); write it with pandas' to_parquet, "
                            "or give a .jsonl file.") from None
    else:
        raise UserError(f"dataset file {p} is neither .jsonl nor .parquet; convert it to one of those.")
    if not rows:
        raise UserError(f"dataset file {p} has no rows.")
    return rows


def _messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    value = list(value) if hasattr(value, "__len__") and not isinstance(value, dict) else value
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        raise UserError(f"{where} must be a string or a non-empty list of {{role, content}} messages.")
    unknown = [m["role"] for m in value if m["role"] not in ROLES]
    if unknown:
        raise UserError(f"{where} has a message with role {unknown[0]!r}; the roles are {', '.join(ROLES)} (rename "
                        "it, e.g. human to user).")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def normalize_rows(rows: list[dict], path: str) -> list[dict]:
    """Rows in messages or prompt/completion format -> chat prompt/completion rows
    with "answer" (the assistant's reply, the exact-match target) and "skill"."""
    columns = set().union(*(r.keys() for r in rows))
    if set(PROMPT_COMPLETION) <= columns:
        fmt = "prompt/completion"
    elif set(MESSAGES) <= columns:
        fmt = "messages"
    else:
        raise UserError(f"dataset {path} has columns {', '.join(sorted(map(str, columns)))}; expected 'messages' "
                        "(a chat ending with the assistant's reply) or 'prompt' and 'completion'.")
    out = []
    for i, row in enumerate(rows):
        where = f"{path} row {i + 1}"
        if fmt == "messages":
            msgs = _messages(row.get("messages"), f"{where} 'messages'")
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise UserError(f"{where}: a 'messages' chat must have a prompt and end with an assistant message "
                                "(the reply that is trained).")
            prompt, completion = msgs[:-1], msgs[-1:]
        else:
            prompt = _messages(row.get("prompt"), f"{where} 'prompt'")
            completion = row.get("completion")
            completion = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                          else _messages(completion, f"{where} 'completion'"))
        if not any(m["role"] == "user" for m in prompt):
            raise UserError(f"{where}: the prompt has no user message (the held-out eval asks each row's last user "
                            "message); give every prompt one.")
        answer = row.get("answer")
        answer = answer if isinstance(answer, str) else "".join(m["content"] for m in completion)
        out.append({"prompt": prompt, "completion": completion, "skill": str(row.get("skill") or "all"),
                    "answer": answer})
    return out


def _load_paths(paths) -> list[dict]:
    rows = []
    for p in [paths] if isinstance(paths, str) else paths:
        rows += normalize_rows(_read_file(p), p)
    return rows


def load_data(cfg: Config) -> dict:
    """{"train": rows, "test": rows, "info": {...}}. User data without a test file
    is split with ``data.eval_fraction`` (seeded); train rows whose prompt is also a
    test prompt are dropped so the test stays held out."""
    d = cfg.data
    if cfg.builtin_data:
        split = synthetic.build(seed=d.seed, train_rows=d.builtin_rows)
        return {**split, "info": {"source": "builtin", "seed": d.seed, "format": "prompt/completion"}}
    train = _load_paths(d.train)
    if d.test is not None:
        test = _load_paths(d.test)
    else:
        order = list(range(len(train)))
        random.Random(d.seed).shuffle(order)
        n_test = max(1, round(len(train) * d.eval_fraction))
        if n_test >= len(train):
            raise UserError(f"data.train has {len(train)} row(s), too few to split off a test set; add rows or "
                            "give data.test.")
        test = [train[i] for i in order[:n_test]]
        train = [train[i] for i in sorted(order[n_test:])]
    held = {json.dumps(r["prompt"], sort_keys=True) for r in test}
    kept = [r for r in train if json.dumps(r["prompt"], sort_keys=True) not in held]
    if not kept:
        raise UserError("every training prompt also occurs in the test data; give data.test rows that are held out.")
    info = {"source": d.train, "test_source": d.test, "seed": d.seed,
            "dropped_train_rows_in_test": len(train) - len(kept)}
    return {"train": kept, "test": test, "info": info}


# --------------------------------------------------------------------------- model loading
def _dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def quantization_record(cfg: Config) -> dict | None:
    q = cfg.quantization
    if q is None:
        return None
    compute = _dtype(cfg.model.dtype if q.compute_dtype == "auto" else q.compute_dtype)
    return {"type": q.type, "double_quant": q.double_quant, "compute_dtype": str(compute).removeprefix("torch.")}


def keep_portable_4bit_layout(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first
    no-grad forward (an accuracy eval) into its own CPU layout, whose kernel computes
    in bf16 whatever the compute dtype, cannot take in_features that are not a
    multiple of the blocksize, and which our NF4 kernels do not read. Keep the
    dequantize-then-matmul path, the same on every CPU."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model(cfg: Config, base: str):
    """The base causal LM, quantized to NF4 when configured (QLoRA), ready for PEFT."""
    import torch

    if cfg.kernels == "unsloth":
        return _unsloth_load(cfg, base)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # On the GPU from the start, so that the base's accuracy eval runs there too.
    kwargs = dict(dtype=_dtype(cfg.model.dtype), attn_implementation=cfg.model.attn_implementation,
                  use_safetensors=True, trust_remote_code=False,
                  device_map={"": 0 if torch.cuda.is_available() else "cpu"})
    q = quantization_record(cfg)
    if q is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=q["double_quant"],
            bnb_4bit_compute_dtype=getattr(torch, q["compute_dtype"]))
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if q is not None:
        keep_portable_4bit_layout(model)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(cfg.training.gradient_checkpointing))
    return model


def load_tokenizer(cfg: Config, base: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a tokenizer from {base} ({str(err).splitlines()[0]}); the checkpoint "
                        "folder needs its tokenizer files (tokenizer.json, tokenizer_config.json).") from None
    if cfg.model.chat_template:
        tok.chat_template = cfg.model.chat_template
    if not tok.chat_template:
        raise UserError(f"the tokenizer in {base} has no chat template; set model.chat_template to a Jinja chat "
                        "template whose assistant turn ends with the EOS token.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def attach_lora(cfg: Config, model):
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    check_target_modules(cfg, model)
    if cfg.kernels == "unsloth":
        return _unsloth_attach(cfg, model)
    config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                        use_rslora=lc.use_rslora, task_type="CAUSAL_LM", bias="none")
    with _old_checkpointing_name():
        return get_peft_model(model, config)


@contextlib.contextmanager
def _old_checkpointing_name():
    """transformers 5.23 renames gradient_checkpointing to activation_checkpointing and
    warns when PEFT, TRL or we use the old name; the GPU image's 5.17 knows only the
    old name, so we keep it and hide that notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


def kernels_enabled(cfg: Config) -> dict | None:
    """patch_model switches, or None for no kernels. "auto" means on with CUDA and
    off on the CPU, where Triton only runs in its (slow) interpreter."""
    import torch

    value = cfg.kernels
    if value == "auto":
        value = torch.cuda.is_available()
    if value is False:
        return None
    if value == "liger":
        liger_check()
        return None
    if value == "unsloth":
        unsloth_check()
        return None
    try:
        patch = importlib.import_module("workbench.patch")
    except ImportError as err:
        raise UserError(f"kernels are unavailable in this install ({err}); set kernels: false.") from None
    return patch.options_from_config(value)


def liger_check() -> str:
    """``kernels: liger`` (a comparison stack): TRL applies Liger-Kernel's RMSNorm, RoPE
    and SwiGLU in place of HF's; TRL 1.16 keeps its own chunked LM-head loss (it refuses
    Liger's fused linear cross-entropy). Returns Liger's version."""
    import torch

    try:
        version = importlib.metadata.version("liger-kernel")
        importlib.import_module("liger_kernel.transformers")
    except (ImportError, importlib.metadata.PackageNotFoundError) as err:
        raise UserError(f"kernels: liger needs the liger-kernel package ({err}); pip install liger-kernel, or set "
                        "kernels: true for ours.") from None
    if not torch.cuda.is_available():
        raise UserError("kernels: liger needs a CUDA device (Liger-Kernel has no CPU path); use kernels: false here.")
    return version


def unsloth_check() -> str:
    """``kernels: unsloth`` (a comparison stack): Unsloth's FastLanguageModel loads the
    base (NF4 with double quant for QLoRA, as ours) and attaches the LoRA, with its own
    patched model, LoRA kernels and loss; the same TRL loop trains it. Unsloth wants to
    be imported before transformers, TRL and PEFT, so the check imports it (run_train
    calls it first). Returns Unsloth's version."""
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        raise UserError("kernels: unsloth needs the unsloth package, which pins trl <= 1.15 and datasets < 5 (ours: "
                        "trl 1.16, datasets 5): install it in its own environment, or build its site with "
                        "scripts/build_wheelhouse.sh .site-unsloth scripts/unsloth-host-packages.txt; or set "
                        "kernels: true for ours.")
    try:
        import torch
        if not torch.cuda.is_available():
            raise UserError("kernels: unsloth needs a CUDA device (Unsloth has no CPU path); use kernels: false here.")
        importlib.import_module("unsloth")
        return importlib.metadata.version("unsloth")
    except UserError:
        raise
    except Exception as err:  # Unsloth checks its environment at import and raises many kinds
        raise UserError(f"kernels: unsloth could not be imported ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); check its versions against "
                        "scripts/unsloth-host-packages.txt, or set kernels: true for ours.") from None


def _unsloth_common(cfg: Config) -> dict:
    """Arguments Unsloth's load and attach both take: its checkpointing, switched per run
    (off, or its offloaded "unsloth" mode), the sequence length and the seed."""
    return {"use_gradient_checkpointing": "unsloth" if cfg.training.gradient_checkpointing else False,
            "max_seq_length": cfg.training.max_seq_len or 2048, "random_state": cfg.training.seed}


def _unsloth_load(cfg: Config, base: str):
    """The base through Unsloth: bf16 for LoRA, bitsandbytes NF4 (double quant) for QLoRA."""
    from unsloth import FastLanguageModel

    q = quantization_record(cfg)
    model, _tok = FastLanguageModel.from_pretrained(
        model_name=base, dtype=_dtype(cfg.model.dtype), load_in_4bit=q is not None, load_in_16bit=q is None,
        full_finetuning=False, trust_remote_code=False, **_unsloth_common(cfg))
    return model


def _unsloth_attach(cfg: Config, model):
    from unsloth import FastLanguageModel

    lc = cfg.lora
    return FastLanguageModel.get_peft_model(
        model, r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
        bias="none", use_rslora=lc.use_rslora, **_unsloth_common(cfg))


def apply_kernels(model, options: dict) -> dict:
    report = importlib.import_module("workbench.patch").patch_model(model, **options)
    _log(str(report).replace("\n", "\n       "), detail=True)
    return report.to_dict()


# --------------------------------------------------------------------------- evaluation
def generate_answers(model, tok, rows: list[dict], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completions of each row's prompt (chat template + generation prompt)."""
    import torch

    was_training, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"
    device = next(model.parameters()).device
    # Stop at the tokenizer's EOS and at whatever the checkpoint's generation config
    # already stops at (e.g. an end-of-turn token distinct from EOS).
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos += [tok.eos_token_id] if tok.eos_token_id not in eos else []
    out = []
    try:
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=eos)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
        model.train(was_training)
    return out


def accuracy(model, tok, rows: list[dict], max_new_tokens: int) -> dict:
    """Exact-match accuracy overall and per skill, with a few examples."""
    preds = generate_answers(model, tok, rows, max_new_tokens)
    hits = [synthetic.score(p, r["answer"]) for p, r in zip(preds, rows)]
    by_skill: dict[str, list[bool]] = {}
    for r, h in zip(rows, hits):
        by_skill.setdefault(r["skill"], []).append(h)
    return {
        "accuracy": sum(hits) / len(hits),
        "by_skill": {k: sum(v) / len(v) for k, v in sorted(by_skill.items())},
        "rows": len(rows),
        "examples": [{"question": synthetic.question(r), "answer": r["answer"], "prediction": p}
                     for r, p in list(zip(rows, preds))[:5]],
    }


# --------------------------------------------------------------------------- trainer
class NonFiniteLoss(Exception):
    """Raised from the training step, before the optimizer could apply the step's
    non-finite gradients; run_train turns it into a UserError."""

    def __init__(self, step: int, value: float):
        super().__init__(f"loss {value} at step {step}")
        self.step, self.value = step, value


def _callbacks():
    """Trainer callbacks, built lazily (transformers is heavy to import)."""
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        """Writes train/loss.jsonl (rewritten atomically at each logging step) and prints a
        progress line at the first logging step and then about every fifth of the run
        (the file has every logging step; the screen needs only the trend)."""

        def __init__(self, path: Path, total_steps: int):
            self.path, self.total, self.rows, self.start = path, total_steps, [], time.perf_counter()
            self.shown_fifth = -1

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            row = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                   "grad_norm": logs.get("grad_norm"), "tokens": logs.get("num_tokens"),
                   "elapsed": round(time.perf_counter() - self.start, 3)}
            self.rows.append(row)
            atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
            fifth = 5 * row["step"] // max(self.total, 1)
            if fifth == self.shown_fifth:
                return
            self.shown_fifth = fifth
            rate = (row["tokens"] or 0) / max(row["elapsed"], 1e-9)
            _log(f"step {row['step']}/{self.total} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                 f"grad_norm {float(row['grad_norm'] or 0):.3f} tokens {int(row['tokens'] or 0)} "
                 f"({rate:.0f} tok/s) {row['elapsed']:.1f}s")

    class Snapshots(TrainerCallback):
        """Keeps a copy of the trainable (adapter) weights as they were at the start
        of the last step whose loss was finite: the last good adapter."""

        def __init__(self, model):
            self.params = [p for p in model.parameters() if p.requires_grad]
            self.pending = self.good = None
            self.good_step = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.pending = [p.detach().clone() for p in self.params]

        def on_step_end(self, args, state, control, **kwargs):
            self.good, self.good_step = self.pending, state.global_step - 1

        def restore(self) -> bool:
            if self.good is None:
                return False
            for p, saved in zip(self.params, self.good):
                p.data.copy_(saved)
            return True

    return LossLog, Snapshots


def sft_config(cfg: Config, output_dir: str):
    """TRL's SFTConfig for this run: completion-only loss, no hub, no checkpoints. The
    data comes tokenized and packed (:func:`training_dataset`), so TRL (and Unsloth in its
    place) leaves it as it is; ``packing`` still picks the collator (padding-free for bfd)."""
    import torch
    from trl import SFTConfig

    t = cfg.training
    cuda = torch.cuda.is_available()
    dtype = _dtype(cfg.model.dtype)
    return SFTConfig(
        output_dir=output_dir,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        num_train_epochs=t.epochs if t.epochs is not None else 1.0,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.schedule,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        # Unsloth switches its own (offloaded) checkpointing on in get_peft_model; TRL's would replace it.
        gradient_checkpointing=bool(t.gradient_checkpointing) and cfg.kernels != "unsloth",
        # offload moves what reentrant checkpointing saves (workbench.offload); otherwise the default
        gradient_checkpointing_kwargs={"use_reentrant": True} if _offloads(cfg) else None,
        # DDP's unused-parameter search marks the checkpointed layers' parameters (out of sight in
        # a reentrant forward) ready, and their gradients in the recompute mark them again; every
        # LoRA parameter takes part in every step, so the search is off there.
        ddp_find_unused_parameters=False if _offloads(cfg) else None,
        max_length=t.max_seq_len,
        packing=bool(t.packing),
        packing_strategy=_packing_strategy(t.packing),
        dataset_kwargs={"skip_prepare_dataset": True},  # training_dataset prepared it
        logging_steps=t.logging_steps,
        logging_first_step=True,
        completion_only_loss=True,
        use_cpu=not cuda,
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        report_to="none",
        save_strategy="no",
        push_to_hub=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_liger_kernel=cfg.kernels == "liger",
    )


#: Micro-batches fingerprinted at the start of training (see :func:`batch_fingerprint`). Each
#: costs one host sync. In train-suite runs of 15 steps or more, all three fall in the warm-up
#: that the suite leaves out of its steady speed. In shorter runs (the 8B rows' 10 steps: warm-up
#: to step 2) the third falls in a timed step, at the cost of one sync per run.
FINGERPRINT_BATCHES = 3


def batch_fingerprint(inputs) -> dict:
    """What one training micro-batch holds, as four integers that do not depend on how its
    rows are laid out (B padded rows, or one padding-free row of B concatenated sequences):
    the real input tokens and the sum of their ids, and the loss targets (labels after the
    one-token shift that are not -100) and the sum of their ids. Two stacks fed the same
    tokens with the same labels give equal fingerprints; unequal ones prove they were not
    (other tokens, another label mask), whatever the stacks compute with them. Sums, not
    hashes, so that a row order or a packing layout does not matter; equal sums are strong
    evidence of equal data, not a proof."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    real = mask.bool() if mask is not None else ids.new_ones(ids.shape, dtype=bool)
    out = {"tokens": int(real.sum()), "token_sum": int(ids[real].sum())}
    labels = inputs.get("labels")
    if labels is not None:
        targets = labels[..., 1:]
        kept = targets != -100
        out.update(targets=int(kept.sum()), target_sum=int(targets[kept].sum()))
    return out


def _offloads(cfg: Config) -> bool:
    """Offloaded checkpointing by workbench.offload (Unsloth brings its own)."""
    return cfg.training.gradient_checkpointing == "offload" and cfg.kernels != "unsloth"


def _packing_strategy(packing) -> str:
    return packing if isinstance(packing, str) else "bfd"  # true: TRL's default


def training_dataset(cfg: Config, tok, rows: list[dict], stats: dict | None = None):
    """The training rows as TRL's SFTTrainer prepares them, prepared here once for every
    stack: ``input_ids`` and ``labels`` (-100 but on the answer and its EOS), packed as
    ``training.packing`` says (bfd adds ``seq_lengths``). sft_config tells TRL to take them
    as they are, and with them Unsloth: its trainer replaces TRL's preparation with its own
    (unsloth_zoo's ``sft_prepare_dataset``), which tokenizes alike but packs in worker
    processes (``dataset_num_proc``, 8 on a 16-core host), each wrapping its share of the rows
    on its own, so its sequences are cut elsewhere and the seeded shuffle draws other batches.

    Step for step as TRL 1.15 and 1.16 (``SFTTrainer._prepare_dataset``), so the stacks get
    exactly what TRL made of the same rows: the prompt (with the generation prompt) and the
    whole chat tokenized by the chat template; the answer starts where the two first differ;
    unpacked rows cut to max_seq_len (keeping the start) and dropped when no target is left;
    packing by TRL's ``pack_dataset`` in this process.

    One deliberate difference, for ``wrapped`` (the benchmarks' packing, whose promise is
    sequences of exactly max_seq_len): TRL wraps each 1000-row map batch on its own, leaving a
    shorter sequence where each batch ends, and at a max_seq_len beyond 1000 rows' tokens
    (~27K built-in tokens) every sequence is such a remainder. Here the rows are wrapped in one
    batch and the one remainder at the end is dropped when a full sequence exists.

    Rows longer than max_seq_len are said, with how many: unpacked, they are cut (and left out
    when no answer token is left); bfd packing cuts them too. ``stats`` (a dict) gets the counts."""
    import datasets
    from trl import pack_dataset

    t = cfg.training
    ids_rows, label_rows, renders_apart, too_long, dropped = [], [], 0, 0, 0
    for row in rows:
        prompt = tok.apply_chat_template(row["prompt"], tokenize=True, return_dict=True,
                                         add_generation_prompt=True)["input_ids"]
        ids = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True,
                                      return_dict=True)["input_ids"]
        start = 0
        while start < min(len(prompt), len(ids)) and prompt[start] == ids[start]:
            start += 1
        renders_apart += start < len(prompt)
        labels = [-100] * start + ids[start:]
        too_long += len(ids) > t.max_seq_len
        if not t.packing:  # packing cuts at max_seq_len itself
            ids, labels = ids[:t.max_seq_len], labels[:t.max_seq_len]
            if all(label == -100 for label in labels):
                dropped += 1
                continue
        ids_rows.append(ids)
        label_rows.append(labels)
    if renders_apart:
        _log(f"note: in {renders_apart} row(s) the chat template renders the prompt alone otherwise than before "
             "its answer; there the targets start where the two first differ (as in TRL)")
    if stats is not None:
        stats.update(rows=len(rows), longer_than_max_seq_len=too_long, dropped_no_answer_token=dropped)
    if not ids_rows:
        raise UserError(f"training.max_seq_len ({t.max_seq_len} tokens) leaves no answer token in any training row "
                        "(the prompts fill it); raise training.max_seq_len.")
    if too_long and t.packing != "wrapped":
        _log(f"note: {too_long} of {len(rows)} training row(s) are longer than training.max_seq_len "
             f"({t.max_seq_len} tokens) and were cut to it"
             + (f"; {dropped} of them kept no answer token and are left out" if dropped else "")
             + "; raise training.max_seq_len to train on them whole")
    datasets.disable_progress_bars()
    data = datasets.Dataset.from_dict({"input_ids": ids_rows, "labels": label_rows})
    if not t.packing:
        return data
    if t.packing != "wrapped":
        return pack_dataset(data, t.max_seq_len, _packing_strategy(t.packing))
    packed = pack_dataset(data, t.max_seq_len, "wrapped", map_kwargs={"batch_size": len(data)})
    if len(packed) > 1 and len(packed[len(packed) - 1]["input_ids"]) < t.max_seq_len:
        packed = packed.select(range(len(packed) - 1))
    return packed


def make_trainer(cfg: Config, model, tok, train_rows: list[dict], output_dir: str, callbacks=(), dataset=None):
    """An SFTTrainer over ``train_rows`` (or the ``dataset`` training_dataset made of
    them) whose training step raises NonFiniteLoss before a non-finite loss can reach
    the optimizer."""
    import torch
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    class GuardedSFTTrainer(SFTTrainer):
        def _our_loss_applies(self) -> bool:
            """TRL computes its plain NLL loss through its own chunked LM head
            (``fused_lm_head=True``), which bypasses our fused linear cross-entropy.
            When our loss is patched in and TRL would take that plain path, take
            ours instead; every other TRL loss (custom compute_loss_func, label
            smoothing, DFT, MoE aux loss, sequence parallelism) stays TRL's."""
            patch = sys.modules.get("workbench.patch")
            sp = getattr(self.accelerator, "parallelism_config", None)
            return (patch is not None and patch.fused_loss_patched(self.model)
                    and self.compute_loss_func is None and self.label_smoother is None
                    and self.args.loss_type == "nll" and not self.aux_loss_enabled
                    and not (sp is not None and getattr(sp, "sp_enabled", False)))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self._our_loss_applies():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # Same reduction as TRL's plain path: summed token NLL / num_items_in_batch
            # (all ranks' tokens under gradient accumulation), else the mean over
            # this batch's labelled tokens. TRL's entropy/token-accuracy metrics need
            # the logits this path never forms, so they are not logged.
            outputs = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch)
            loss = outputs.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            mode = "train" if self.model.training else "eval"
            if mode == "train" and "attention_mask" in inputs:
                seen = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += seen // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            prints = self.__dict__.setdefault("batch_fingerprints", [])
            if len(prints) < FINGERPRINT_BATCHES and "input_ids" in inputs:
                prints.append(batch_fingerprint(inputs))
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                raise NonFiniteLoss(self.state.global_step + 1, float(loss))
            return loss

    data = dataset if dataset is not None else training_dataset(cfg, tok, train_rows)
    callbacks = list(callbacks)
    offload = None
    if _offloads(cfg):
        from workbench import offload as offload_mod

        offload = offload_mod.ActivationOffload()
        callbacks.append(offload_mod.trainer_callback(offload))
    with _old_checkpointing_name():
        trainer = GuardedSFTTrainer(model=model, args=sft_config(cfg, output_dir), train_dataset=data,
                                    processing_class=tok, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # our LossLog prints one line per logging step instead
    trainer.activation_offload = offload
    return trainer


def total_steps(cfg: Config, n_rows: int) -> int:
    t = cfg.training
    if t.max_steps is not None:
        return t.max_steps
    return math.ceil(math.ceil(n_rows / t.batch_size) / t.grad_accum * t.epochs)


# --------------------------------------------------------------------------- the stage
def _oom_message(cfg: Config) -> str:
    t = cfg.training
    hints = [f"training.batch_size (now {t.batch_size}; raise training.grad_accum to keep the effective batch)",
             f"training.max_seq_len (now {t.max_seq_len})"]
    if not t.gradient_checkpointing:
        hints.append("set training.gradient_checkpointing: true (or offload)")
    elif t.gradient_checkpointing is True and cfg.kernels != "unsloth":
        hints.append("set training.gradient_checkpointing: offload (the layers' inputs wait in host memory)")
    if cfg.quantization is None:
        hints.append("load the base in 4 bits with quantization: {type: nf4} (QLoRA)")
    return "ran out of GPU memory while training; reduce " + ", or ".join(hints) + "."


def _prepare(cfg: Config) -> tuple[dict | None, dict]:
    """Every check that needs no training: model folder and family, data files and
    columns, kernel availability. Runs before anything is written."""
    unsloth_first = cfg.kernels == "unsloth"  # its import must come before transformers, TRL and PEFT
    if unsloth_first:
        kernels_enabled(cfg)
    model_info = None if cfg.builtin_model else check_model_folder(cfg.model.path)
    data = load_data(cfg)
    if not unsloth_first:
        kernels_enabled(cfg)
    return model_info, data


def _check_model_fits(cfg: Config, tok, model_info: dict | None) -> None:
    """What the model and the config must agree on, checked on the model's config alone
    (an empty model on the meta device, no weights loaded): the tokenizer's ids have
    embedding rows, and every lora.target_modules name is a module of the model."""
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
    if cfg.kernels == "unsloth":
        return   # Unsloth builds its own model; its get_peft_model names what it cannot target
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


#: Where a train stage builds its outputs until they are complete (one at a time: RUN/.lock).
STAGING = ".train.partial"


def _move_in(staging: Path, run: Path, rels: list[str]) -> None:
    """Rename each staged output into the run (a folder replaces the old folder whole)."""
    for rel in rels:
        if (staging / rel).exists():
            atomic.replace(staging / rel, run / rel)


def run_train(cfg: Config, run_dir: str | os.PathLike) -> dict:
    """Train a LoRA adapter as configured, write it and its records into
    ``run_dir``, and return the manifest's train record.

    Everything that can be checked without training is checked before the run directory
    is touched. The outputs are then built in RUN/.train.partial and renamed into place
    only when training and saving succeeded, so a refused, failed or killed retrain
    leaves the run's previous complete train record and its files as they were (the try
    is noted under the manifest's ``attempts``)."""
    from workbench.offline import enforce_offline

    enforce_offline()
    global _MAIN
    state = _distributed_state()
    main = _MAIN = state is None or state.is_main_process
    run = Path(run_dir).resolve()
    if run.exists() and not run.is_dir():
        raise UserError(f"--run {run} is a file, not a run directory; pass a directory (a new one, or one that "
                        "`workbench train` made).")
    _refuse_brought(run)
    model_info, data = _prepare(cfg)

    import transformers
    from workbench import tokenizer as wtok

    transformers.logging.set_verbosity_error()
    if cfg.builtin_model:
        tok = wtok.default_tokenizer()
        family = "llama"
    else:
        tok, family = load_tokenizer(cfg, cfg.model.path), model_info["family"]
    _check_model_fits(cfg, tok, model_info)
    stats: dict = {}
    dataset = training_dataset(cfg, tok, data["train"], stats)

    with manifest.lock(run) if main else contextlib.nullcontext():
        _refuse_brought(run)   # again, now that no other process can change the run
        staging = run / STAGING
        if main:
            manifest.clean_leftovers(run)   # a killed train's staging folder (.train.partial) among them
            staging.mkdir(parents=True)
            manifest.note_attempt(run, "train", "running", pid=os.getpid())
        kept = manifest.has_complete(run, "train")
        try:
            return _train(cfg, run, staging, state, main, tok, family, data, dataset, stats)
        except BaseException as err:
            if main:
                _after_failure(run, staging, kept, err)
            raise


def _refuse_brought(run: Path) -> None:
    brought = [name for name, rec in manifest.read(run).get("stages", {}).items()
               if rec.get("user_provided")] if run.is_dir() else []
    if brought:
        raise UserError(f"{run} holds a {' and a '.join(brought)} stage you brought (user-provided), so training "
                        "there would mix a new adapter with it; use a new --run directory for a training run.")


def _after_failure(run: Path, staging: Path, kept: bool, err: BaseException) -> None:
    """A train that stopped: note how (unless it noted it itself, as a non-finite loss or
    running out of memory do). With a previous complete train kept, its files stay and the
    staged ones go; a first train's staged files are moved in (there is nothing to keep),
    so its tokenizer, data and base sit next to train/last_good_adapter."""
    try:
        now = manifest.attempt(run, "train") if kept else manifest.stage(run, "train")
        if (now or {}).get("status") == "running":
            if isinstance(err, UserError):
                status, error = "refused", str(err)
            elif isinstance(err, KeyboardInterrupt):
                status, error = "interrupted", "interrupted (Ctrl-C)"
            else:
                status, error = "failed", f"{type(err).__name__}: {err}"
            manifest.note_attempt(run, "train", status, error=error[:500])
        if not kept:
            _move_in(staging, run, [*_staged_outputs(), "train/loss.jsonl"])
        elif (staging / "train" / "loss.jsonl").is_file():
            atomic.replace(staging / "train" / "loss.jsonl", run / "train" / "failed_loss.jsonl")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _staged_outputs() -> list[str]:
    """What a failed first train moves in: everything but the adapter (only a finished
    train writes adapter/) and the loss log (the caller decides)."""
    return ["config.yaml", "base", "tokenizer", "data"]


def _train(cfg: Config, run: Path, staging: Path, state, main: bool, tok, family: str, data: dict, dataset,
           stats: dict) -> dict:
    import torch
    import transformers
    from workbench import config as config_mod, default, tokenizer as wtok

    start = time.perf_counter()
    timings = {}
    _log("preparing tokenizer, base model and data", detail=True)
    if main:
        atomic.write_text(staging / "config.yaml", config_mod.dump(cfg))
    if cfg.builtin_model:
        base = str(default.write_base(tok, staging / "base", cfg.model.path) if main else staging / "base")
        base_record = "base"   # inside the run: recorded relative to it, so the run can move
    else:
        base = base_record = cfg.model.path
    if main:
        wtok.save_tokenizer(tok, staging / "tokenizer")
        synthetic.write_jsonl(data["train"], staging / "data" / "train.jsonl")
        synthetic.write_jsonl(data["test"], staging / "data" / "test.jsonl")
    _wait_for_everyone(state)  # the other processes load the base the main one wrote
    test_rows = data["test"][:cfg.eval.max_rows] if main else []

    transformers.set_seed(cfg.training.seed)
    t0 = time.perf_counter()
    model = load_model(cfg, base)
    timings["load_s"] = round(time.perf_counter() - t0, 3)
    _log(f"loaded {family} base {cfg.model.path if cfg.builtin_model else base} "
         f"({sum(p.numel() for p in model.parameters()):,} parameters{', NF4' if cfg.quantization else ''})")

    evals = {}
    if test_rows:
        t0 = time.perf_counter()
        evals["base"] = accuracy(model, tok, test_rows, cfg.eval.max_new_tokens)
        timings["eval_base_s"] = round(time.perf_counter() - t0, 3)
        _log(f"base accuracy on {len(test_rows)} held-out rows: {evals['base']['accuracy']:.3f}")

    transformers.set_seed(cfg.training.seed)  # the LoRA init draws from the global RNG
    model = attach_lora(cfg, model)
    options = kernels_enabled(cfg)
    kernel_report = apply_kernels(model, options) if options else None
    if cfg.kernels == "liger":
        kernel_report = {"engine": "liger-kernel", "version": liger_check(),
                         "applied_by": "TRL SFTTrainer use_liger_kernel (layer kernels; TRL's chunked LM-head loss)"}
    if cfg.kernels == "unsloth":
        kernel_report = {"engine": "unsloth", "version": unsloth_check(),
                         "applied_by": "Unsloth FastLanguageModel.from_pretrained + get_peft_model (its model, LoRA "
                                       "kernels and loss)" + (", its offloaded gradient checkpointing"
                                                             if cfg.training.gradient_checkpointing else "")}

    steps = total_steps(cfg, len(data["train"]))
    LossLog, Snapshots = _callbacks()
    loss_log, snapshots = LossLog(staging / "train" / "loss.jsonl", steps), Snapshots(model)
    (staging / "train").mkdir(exist_ok=True)
    scratch = staging / "trainer"   # nothing is saved there (save_strategy "no"); removed with the staging folder
    trainer = make_trainer(cfg, model, tok, data["train"], str(scratch), [loss_log, snapshots], dataset=dataset)
    _log(f"training {steps} steps on {len(data['train'])} rows (batch {cfg.training.batch_size} x "
         f"accumulation {cfg.training.grad_accum})")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    calls_before = importlib.import_module("workbench.patch").kernel_calls() if options else {}
    t0 = time.perf_counter()
    try:
        result = trainer.train()
    except NonFiniteLoss as err:
        _fail_non_finite(cfg, run, model, snapshots, err)
    except torch.OutOfMemoryError:
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _fail(run, "out of memory", {})
        raise UserError(_oom_message(cfg)) from None
    timings["train_s"] = round(time.perf_counter() - t0, 3)
    if options:  # what actually ran during training (a patched module can still fall back per call)
        calls = importlib.import_module("workbench.patch").kernel_calls()
        kernel_report["calls_in_training"] = {k: n - calls_before.get(k, 0) for k, n in sorted(calls.items())
                                              if n > calls_before.get(k, 0)}
        _log(f"kernel calls in training: {kernel_report['calls_in_training'] or 'none (every call fell back)'}",
             detail=True)
    moved = _offload_record(trainer)
    if moved and moved["first_step"]:
        _log(f"offloaded checkpointing: {moved['first_step']['tensors']} layer inputs, "
             f"{moved['first_step']['gib']:.3f} GiB a step, waited in host memory")
    if not main:
        _wait_for_everyone(state)  # until the main process has written the adapter and the record
        return manifest.stage(run, "train")
    tokens = int(loss_log.rows[-1]["tokens"] or 0) if loss_log.rows else 0

    adapter_tmp = staging / "adapter"
    model.save_pretrained(adapter_tmp, safe_serialization=True)
    # PEFT names the folder the base was loaded from (here the staging folder): name where it will be.
    adapter_config = adapter_tmp / "adapter_config.json"
    acfg = json.loads(adapter_config.read_text())
    acfg["base_model_name_or_path"] = str(run / "base") if cfg.builtin_model else base
    adapter_config.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    if test_rows:
        t0 = time.perf_counter()
        evals["adapter"] = accuracy(model, tok, test_rows, cfg.eval.max_new_tokens)
        timings["eval_adapter_s"] = round(time.perf_counter() - t0, 3)
        _log(f"adapter accuracy on {len(test_rows)} held-out rows: {evals['adapter']['accuracy']:.3f} "
             f"(base {evals['base']['accuracy']:.3f})")
    atomic.write_json(staging / "train" / "eval.json", evals or {"skipped": "eval.max_rows is 0"})

    # Complete: the staged outputs replace the old ones, the adapter last but one and the
    # config last (a kill in between leaves the old record, whose output hashes no longer
    # match, so the next run trains again).
    shutil.rmtree(scratch, ignore_errors=True)
    _move_in(staging, run, ["base", "tokenizer", "data", "train/loss.jsonl", "train/eval.json", "adapter",
                            "config.yaml"])
    shutil.rmtree(run / "train" / "last_good_adapter", ignore_errors=True)  # from an earlier failed run
    (run / "train" / "failed_loss.jsonl").unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    timings["total_s"] = round(time.perf_counter() - start, 3)

    record = {
        "inputs": {"config": "config.yaml", "base_model": base_record, "dataset": data["info"]},
        "input_hashes": {
            "config": manifest.sha256_file(run / "config.yaml"),
            "base_model": manifest.hash_tree(manifest.resolve(run, base_record)),
            "train_data": manifest.sha256_file(run / "data" / "train.jsonl"),
            "test_data": manifest.sha256_file(run / "data" / "test.jsonl"),
        },
        "base_model": base_record,
        "family": family,
        "quantization": quantization_record(cfg),
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                 "target_modules": list(cfg.lora.target_modules), "use_rslora": cfg.lora.use_rslora},
        "dataset": {**data["info"], "train_rows": len(data["train"]), "test_rows": len(data["test"]),
                    "train": "data/train.jsonl", "test": "data/test.jsonl",
                    "rows_longer_than_max_seq_len": stats.get("longer_than_max_seq_len", 0),
                    "rows_left_out_no_answer_token": stats.get("dropped_no_answer_token", 0)},
        "kernels": kernel_report,
        "processes": state.num_processes if state is not None else 1,  # data-parallel ranks
        "steps": result.global_step,
        "final_loss": loss_log.rows[-1]["loss"] if loss_log.rows else None,
        "data_fingerprint": getattr(trainer, "batch_fingerprints", None),  # this process's first micro-batches
        "offload": _offload_record(trainer),  # offloaded checkpointing: what it moved to host memory
        "train_loss": result.training_loss,
        "eval": {k: v["accuracy"] for k, v in evals.items()},
        "tokens": tokens,
        "tokens_per_s": round(tokens / timings["train_s"], 1) if timings.get("train_s") else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if torch.cuda.is_available() else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
        "timings": timings,
        "versions": _versions(),
        "outputs": manifest.outputs_record(run, [run / p for p in _outputs(cfg)]),
    }
    record = manifest.record_stage(run, "train", record)
    _log(f"done in {timings['total_s']:.1f}s; adapter in {run / 'adapter'}", detail=True)
    _wait_for_everyone(state)
    return record


def _offload_record(trainer) -> dict | None:
    offload = getattr(trainer, "activation_offload", None)
    if offload is None:
        return None
    from workbench.offload import record

    return record(offload)


def _outputs(cfg: Config) -> list[str]:
    return ["config.yaml", *(["base"] if cfg.builtin_model else []), "tokenizer", "data", "adapter",
            "train/loss.jsonl", "train/eval.json"]


def _versions() -> dict:
    from workbench.envinfo import _version

    return {name: _version(name) for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets",
                                              "tokenizers", "bitsandbytes", "unsloth", "parity-workbench")}


def _fail(run: Path, reason: str, extra: dict) -> None:
    if _MAIN:
        manifest.note_attempt(run, "train", "failed", error=reason, **extra)


def _fail_non_finite(cfg: Config, run: Path, model, snapshots, err: NonFiniteLoss):
    """Save the last adapter whose loss was finite (if any) and stop with a UserError."""
    extra = {"failed_step": err.step}
    where = "no step had a finite loss, so there is no adapter to keep"
    if snapshots.restore() and _MAIN:
        with atomic.directory(run / "train" / "last_good_adapter") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            acfg = json.loads((tmp / "adapter_config.json").read_text())
            acfg["base_model_name_or_path"] = str(run / "base") if cfg.builtin_model else cfg.model.path
            (tmp / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
        extra.update(last_good_adapter="train/last_good_adapter", last_good_step=snapshots.good_step)
        where = (f"the adapter after {snapshots.good_step} step(s), the last with a finite loss, is in "
                 f"{run / 'train' / 'last_good_adapter'}")
    _fail(run, f"non-finite loss at step {err.step}", extra)
    raise UserError(f"training stopped: the loss became {err.value} at step {err.step}; {where}; lower "
                    f"training.lr (now {cfg.training.lr:g}) or check the data for broken rows.") from None
