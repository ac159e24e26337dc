"""Helpers of the reliability suite (issue 21, "Nothing lost, nobody fooled").

* ``invoke``: the CLI in this process, its exit code and captured stdout/stderr; an
  exception escaping ``main`` (what a user sees as a traceback) is reported as such.
* ``one_sentence``: the error line of stderr, checked to be one sentence with no traceback.
* ``snapshot``: every file under some folders with its sha256 (``.lock`` aside: it is
  the lock, rewritten with the holder's pid by every command).
* ``write_checkpoint`` / ``write_adapter``: tiny user checkpoints and LoRA adapters.
* ``workbench_env``: the environment of a `python -m workbench` child process.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import traceback
from pathlib import Path

from workbench.offline import enforce_offline

enforce_offline()

import torch  # noqa: E402

from workbench.cli import main  # noqa: E402

#: The built-in default, shrunk (as tests/test_pipeline.py's SMALL): 3 optimizer steps on 64
#: rows, no accuracy generation, 4 generated tokens.
SMALL = ["--set", "training.max_steps=3", "--set", "training.logging_steps=1", "--set", "eval.max_rows=0",
         "--set", "data.builtin_rows=64", "--set", "eval.max_new_tokens=4"]
STAGES = ("train", "merge", "export", "eval", "report")
SRC = Path(__file__).resolve().parents[2] / "src"


def invoke(argv: list, capfd) -> tuple[int | None, str, str, str | None]:
    """(exit code, stdout, stderr, traceback or None) of `workbench ARGV` run in this process."""
    from workbench import manifest

    capfd.readouterr()
    tb = None
    try:
        code = main([str(a) for a in argv])
    except SystemExit as err:   # argparse
        code = err.code
    except BaseException:       # what the user would see as a traceback
        code, tb = None, traceback.format_exc()
    out, err = capfd.readouterr()
    held = getattr(manifest, "_held", {})
    assert not held, f"a run lock leaked: {held}"
    return code, out, err, tb


def one_sentence(err: str, quiet: bool = True) -> str:
    """The one `workbench: ...` line of ``err``: the last line, one sentence ending in a
    period, no traceback; with ``quiet``, the only line."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("workbench: ")]
    assert len(ours) == 1, err[-3000:]
    assert lines[-1] == ours[0], err[-3000:]
    if quiet:
        assert lines == ours, err[-3000:]
    text = ours[0].split(": ", 1)[1].removeprefix("error: ")
    assert text.endswith("."), text
    assert not re.search(r"[.!?] [A-Z]", text), f"more than one sentence: {text}"
    return ours[0]


def snapshot(*folders: Path) -> dict[str, str]:
    """{path: sha256} of every file under ``folders`` (symlinks and the lock file aside)."""
    out = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink() and path.name != ".lock":
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def write_checkpoint(folder: Path, layers: int = 4, hidden: int = 64, vocab: int | None = None, seed: int = 0) -> Path:
    """A tiny Llama checkpoint (safetensors + the built-in tokenizer) of a user."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from workbench import tokenizer as wtok

    tok = wtok.default_tokenizer()
    vocab = vocab or len(tok)
    inside = lambda i: i if i is not None and i < vocab else None   # noqa: E731
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=inside(tok.pad_token_id),
                         eos_token_id=inside(tok.eos_token_id), bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    folder = Path(folder)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    wtok.save_tokenizer(tok, folder / "tok")
    for f in (folder / "tok").iterdir():
        f.rename(folder / f.name)
    (folder / "tok").rmdir()
    return folder


def write_adapter(folder: Path, base: Path, seed: int = 1) -> Path:
    """A LoRA adapter (r 4, every projection, non-zero B) of ``base``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    folder = Path(folder)
    peft_model.save_pretrained(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def workbench_env() -> dict:
    """The environment for a `python -m workbench` child: this checkout's sources first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TRITON_INTERPRET", "1")
    env["OMP_NUM_THREADS"] = "1"   # 2 shared cores: one thread a child
    return env
