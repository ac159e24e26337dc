"""The catalogue of bad inputs and faults (issue 21): each case states its input, the
exit code, that stderr is one sentence with no traceback, and that every file that
existed before (the run directory, the user's folders) is byte-identical after.

Cases run the CLI in this process. Most are refusals before any training; those on a
finished run work on a copy of one tiny run built once per session (conftest). A case
that fails after a stage started (a non-finite loss, Ctrl-C, out of memory) may add
files (train/last_good_adapter) and note its try in the manifest's "attempts", but the
stage records stay as they were. ``before`` says what the CLI did before the fix, as the
issue found it (or, for cases of our own, as we found it on the unfixed checkout).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from reliability_support import SMALL, invoke, one_sentence, snapshot, write_checkpoint

Q = ["--set", "training.max_steps=3", "--set", "eval.max_rows=0", "--set", "data.builtin_rows=64",
     "--set", "training.logging_steps=1"]


@dataclass
class Ctx:
    tmp: Path
    run: Path
    models: object = None
    finished: object = None
    pid: int | None = None
    request: object = None

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        return path

    def config(self, text: str) -> Path:
        return self.file("c.yaml", text)

    def copy_model(self, name: str = "base4") -> Path:
        return Path(shutil.copytree(getattr(self.models, name), self.tmp / f"my-{name}"))


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list]
    says: tuple = ()
    code: int = 2
    run: str = "fresh"          # fresh: RUN does not exist yet; finished: a copy of the finished run; dir: empty
    setup: Callable[[Ctx], None] | None = None
    patch: Callable[[Ctx, pytest.MonkeyPatch], None] | None = None
    quiet: bool = True          # stderr holds the error line only
    adds: bool = False          # may add files (never change one)
    attempt: str | None = None  # the try noted in the manifest's attempts (stage records unchanged)
    then: Callable[[Ctx], None] | None = None
    needs: tuple = ()           # fixtures: "models", "lock"
    before: str = ""


def _train(*extra):
    return lambda c: ["train", "--run", c.run, *Q, *extra]


def _cfg_train(text: str, *extra):
    def argv(c):
        return ["train", "--config", c.config(text), "--run", c.run, *Q, *extra]
    return argv


def _user_model(setup_model: Callable[[Path], None] | None = None, name: str = "base4"):
    def setup(c):
        folder = c.copy_model(name)
        if setup_model:
            setup_model(folder)
        c.model = folder
    return setup


def _with_model(*extra):
    return lambda c: ["train", "--run", c.run, *Q, "--set", f"model.path={c.model}", *extra]


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _truncate(path: Path, size: int | None = None):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 if size is None else size])


def _data(name: str, lines: list, raw: bytes | None = None, extra: tuple = ()):
    def argv(c):
        path = c.file(name, raw if raw is not None else "".join(json.dumps(x) + "\n" for x in lines))
        return ["train", "--run", c.run, *Q, "--set", f"data.train={path}", *extra]
    return argv


ROW = {"prompt": "What is 1 plus 2?", "completion": "3"}


def _rows(n=20):
    return [{"prompt": f"What is {i} plus 2?", "completion": str(i + 2)} for i in range(n)]


def _all_skipped(c):
    code, out, err, tb = invoke(["run", "--run", c.run], c.request.getfixturevalue("capfd"))
    assert tb is None and code == 0, (tb, err[-2000:])
    assert out.count("skipped: up to date") == 5, out


def _manifest(text: str | bytes):
    def setup(c):
        (c.run / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def _raise(exc):
    def fn(*args, **kwargs):
        raise exc
    return fn


def _patch_train(exc):
    def patch(c, mp):
        from trl import SFTTrainer

        mp.setattr(SFTTrainer, "train", _raise(exc))
    return patch


def _oom():
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _patch_read_only(c, mp):
    """A read-only run directory. As root (CI containers) chmod does not stop writes, so the
    file system's refusal is simulated where the first write happens (the lock file)."""
    from workbench import manifest

    if os.geteuid() != 0:
        for path in [c.run, *c.run.rglob("*")]:
            if path.is_dir():
                path.chmod(0o555)
        c.request.addfinalizer(lambda: [p.chmod(0o755) for p in [c.run, *c.run.rglob("*")] if p.is_dir()])
        return
    real = os.open

    def refuse(path, flags, *args, **kwargs):
        if str(path).endswith(manifest.LOCK) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, *args, **kwargs)

    mp.setattr(manifest.os, "open", refuse)


def _gguf_short_write(c, mp):
    """numpy's short write on a full disk: an OSError without errno."""
    import gguf

    mp.setattr(gguf.GGUFWriter, "write_tensors_to_file",
               _raise(OSError("1048576 requested and 81920 written")))


def _quantize_fails(full_disk: bool):
    def patch(c, mp):
        import collections

        import llama_cpp

        from workbench.export import quantize

        mp.setattr(llama_cpp, "llama_model_quantize", lambda *a, **k: 1)
        if full_disk:
            usage = collections.namedtuple("usage", "total used free")
            mp.setattr(quantize.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 0))
    return patch


def _merge_disk_full(c, mp):
    from transformers import PreTrainedModel

    mp.setattr(PreTrainedModel, "save_pretrained", _raise(OSError(errno.ENOSPC, "No space left on device")))


def _brought(c):
    from workbench import manifest

    manifest.record_stage(c.run, "train", {"user_provided": True, "inputs": {"adapter": "/elsewhere"}})


def _gates(text):
    return lambda c: ["qualify", "--run", c.run, "--gates", c.file("gates.yaml", text)]


def _baseline_with(**train):
    def argv(c):
        doc = json.loads((c.run / "manifest.json").read_text())
        doc["stages"]["train"].update(train)
        return ["qualify", "--run", c.run, "--baseline", c.file("baseline.json", json.dumps(doc))]
    return argv


def _locked(argv):
    def setup(c):
        c.pid = c.request.getfixturevalue("lock_holder")(c.run)
    return dict(argv=argv, setup=setup, says=(lambda c: f"in use by another workbench command (pid {c.pid})",),
                needs=("lock",))


CASES = [
    # ------------------------------------------------------------------ training config
    Case("lr-negative", _train("--set", "training.lr=-1"), ("'training.lr' must be a number above 0",),
         before="ValueError traceback from the optimizer (Invalid learning rate: -1)"),
    Case("lr-zero", _train("--set", "training.lr=0"), ("'training.lr' must be a number above 0",),
         before="trained a no-op adapter without a word, exit 0"),
    Case("lr-nan", _train("--set", "training.lr=.nan"), ("'training.lr' must be a number above 0",),
         before="ValueError traceback from the optimizer, after config.yaml and the record were written"),
    Case("lr-string", _train("--set", "training.lr=fast"), ("'training.lr' must be a number",),
         before="one sentence (already)"),
    Case("unknown-key", _train("--set", "training.lrr=1"), ("unknown config key 'training.lrr'",),
         before="one sentence (already)"),
    Case("set-without-value", _train("--set", "training.lr"), ("--set needs KEY=VALUE",),
         before="one sentence (already)"),
    Case("config-missing", lambda c: ["train", "--config", c.tmp / "nope.yaml", "--run", c.run],
         ("does not exist",), before="one sentence (already)"),
    Case("config-bad-yaml", _cfg_train("model: {path: x\n"), ("not valid YAML",), before="one sentence (already)"),
    Case("config-a-list", _cfg_train("- a\n- b\n"), ("must hold a mapping",), before="one sentence (already)"),
    Case("max-steps-zero", _train("--set", "training.max_steps=0"), ("must be at least 1",),
         before="one sentence (already)"),
    Case("warmup-ratio-above-1", _train("--set", "training.warmup_ratio=1.5"), ("'training.warmup_ratio' must be below 1",),
         before="accepted and trained, exit 0 (ours)"),
    Case("weight-decay-negative", _train("--set", "training.weight_decay=-0.1"),
         ("'training.weight_decay' must be a finite number of at least 0",),
         before="accepted and trained, exit 0 (ours)"),
    Case("dropout-one", _train("--set", "lora.dropout=1"), ("'lora.dropout' must be in [0, 1)",),
         before="one sentence (already)"),
    Case("eval-fraction-above-1", lambda c: ["train", "--config", c.config("data: {train: d.jsonl, eval_fraction: 1.5}\n"),
                                             "--run", c.run], ("between 0 and 1",), before="one sentence (already)"),
    Case("dtype-unknown", _train("--set", "model.dtype=float8"), ("'model.dtype' is 'float8'",),
         before="one sentence (already)"),
    Case("quantization-unknown", _train("--set", "quantization.type=int3"), ("'quantization.type' is 'int3'",),
         before="one sentence (already)"),
    Case("target-modules-empty", _train("--set", "lora.target_modules=[]"), ("non-empty list of module names",),
         before="one sentence (already)"),
    Case("target-module-typo", _train("--set", "lora.target_modules=[q_proj, vproj]"),
         ("lora.target_modules names vproj",),
         before="one sentence, but only after config.yaml, base/, data/ were written and the record set to running"),
    Case("kernels-liger", _train("--set", "kernels=liger"), ("config key 'kernels' is 'liger'",),
         before="one sentence (already; kernels: means our kernels only, the peers are bench stacks)"),
    Case("builtin-model-unknown", _train("--set", "model.path=builtin:huge"), ("is not a built-in model",),
         before="one sentence (already)"),
    Case("test-data-with-builtin", _train("--set", "data.test=t.jsonl"), ("data.test is only for your own data",),
         before="one sentence (already)"),
    Case("all-rows-too-long", _train("--set", "training.max_seq_len=4"), ("leaves no answer token in any training row",),
         before="one sentence, after the run was written and its record left \"running\""),
    Case("method-unknown", _train("--set", "training.method=ppo"),
         ("'training.method' is 'ppo'; use one of sft, dpo, orpo",), before="no training.method key yet (issue 23): unknown config key"),
    Case("beta-negative", _train("--set", "training.method=dpo", "--set", "training.beta=-0.1"),
         ("'training.beta' must be a number above 0",),
         before="no training.beta key yet (issue 23): unknown config key"),
    Case("beta-nan", _train("--set", "training.method=orpo", "--set", "training.beta=.nan"),
         ("'training.beta' must be a number above 0",), before="no training.beta key yet (issue 23)"),
    Case("dpo-with-packing", _train("--set", "training.method=dpo", "--set", "training.packing=true"),
         ("preference pairs, which are not packed",), before="no training.method key yet (issue 23)"),
    Case("dpo-with-lora-dropout", _train("--set", "training.method=dpo", "--set", "lora.dropout=0.1"),
         ("switches dropout off; set lora.dropout: 0",), before="no training.method key yet (issue 23)"),
    Case("dpo-all-prompts-too-long", _train("--set", "training.method=dpo", "--set", "training.max_seq_len=4"),
         ("leaves no chosen or rejected token in any training pair",),
         before="no training.method key yet (issue 23)"),
    # ------------------------------------------------------------------ the base model
    Case("model-missing", _train("--set", "model.path=nowhere/model"), ("does not exist",),
         before="one sentence (already)"),
    Case("model-no-config", _with_model(), ("no config.json",), setup=_user_model(lambda f: (f / "config.json").unlink()),
         needs=("models",), before="one sentence (already)"),
    Case("model-config-not-json", _with_model(), ("is not valid JSON",), needs=("models",),
         setup=_user_model(lambda f: (f / "config.json").write_text("{oops")), before="one sentence (already)"),
    Case("model-pickle-only", _with_model(), ("no *.safetensors weights",), needs=("models",),
         setup=_user_model(lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin")),
         before="one sentence (already)"),
    Case("model-safetensors-empty", _with_model(), ("is not a safetensors file (0 bytes, empty)",), needs=("models",),
         setup=_user_model(lambda f: _truncate(f / "model.safetensors", 0)),
         before="traceback from safetensors (HeaderTooSmall) after the run was written"),
    Case("model-safetensors-truncated", _with_model(), ("is truncated",), needs=("models",),
         setup=_user_model(lambda f: _truncate(f / "model.safetensors")),
         before="traceback from safetensors (MetadataIncompleteBuffer), record left \"running\""),
    Case("model-safetensors-bad-header", _with_model(), ("is not a safetensors file",), needs=("models",),
         setup=_user_model(lambda f: (f / "model.safetensors").write_bytes((40).to_bytes(8, "little") + b"x" * 60)),
         before="traceback from safetensors (InvalidHeaderDeserialization)"),
    Case("model-auto-map", _with_model(), ("declares custom code (auto_map in config.json)",), needs=("models",),
         setup=_user_model(lambda f: (_edit_json(f / "config.json", auto_map={"AutoModelForCausalLM": "modeling_x.M"}),
                                      (f / "modeling_x.py").write_text("import os\n")) and None),
         before="trained, merged and exported without a word"),
    Case("model-trust-remote-code", _with_model(), ("declares custom code (trust_remote_code in config.json)",),
         needs=("models",), setup=_user_model(lambda f: _edit_json(f / "config.json", trust_remote_code=True)),
         before="accepted without a word"),
    Case("tokenizer-auto-map", _with_model(), ("auto_map in tokenizer_config.json",), needs=("models",),
         setup=_user_model(lambda f: _edit_json(f / "tokenizer_config.json", auto_map={"AutoTokenizer": ["x.T", None]})),
         before="accepted (ours): transformers ignored it with trust_remote_code off"),
    Case("model-unsupported-family", _with_model(), ("'gpt2' is not supported",), needs=("models",),
         setup=_user_model(lambda f: _edit_json(f / "config.json", model_type="gpt2")),
         before="one sentence (already)"),
    Case("tokenizer-more-ids-than-embedding", _with_model(), ("ids but the model's embedding has",), needs=("models",),
         setup=lambda c: setattr(c, "model", write_checkpoint(c.tmp / "small-vocab", layers=1, vocab=100)),
         before="IndexError traceback (index out of range) from the embedding during training"),
    # ------------------------------------------------------------------ data
    Case("data-not-utf8", _data("d.jsonl", [], raw=b'{"prompt": "caf\xe9", "completion": "x"}\n'), ("is not UTF-8 text",),
         before="UnicodeDecodeError traceback"),
    Case("data-text-named-parquet", _data("d.parquet", [], raw=b"prompt,completion\na,b\n"),
         ("is not a readable parquet file",), before="pyarrow ArrowInvalid traceback"),
    Case("data-csv", _data("d.csv", [], raw=b"prompt,completion\na,b\n"), ("neither .jsonl nor .parquet",),
         before="one sentence (already)"),
    Case("data-missing", lambda c: ["train", "--run", c.run, *Q, "--set", f"data.train={c.tmp / 'none.jsonl'}"],
         ("does not exist",), before="one sentence (already)"),
    Case("data-a-folder", lambda c: ["train", "--run", c.run, *Q, "--set", f"data.train={c.tmp}"], ("is a folder",),
         before="\"does not exist\" about an existing folder (ours)"),
    Case("data-empty", _data("d.jsonl", [], raw=b""), ("has no rows",), before="one sentence (already)"),
    Case("data-bad-json-line", _data("d.jsonl", [], raw=b'{"prompt": "a", "completion": "b"}\n{oops\n'),
         ("line 2 is not valid JSON",), before="one sentence (already)"),
    Case("data-line-not-object", _data("d.jsonl", [[1, 2]]), ("is not a JSON object",), before="one sentence (already)"),
    Case("data-wrong-columns", _data("d.jsonl", [{"question": "q", "reply": "a"}]), ("has columns question, reply",),
         before="one sentence (already)"),
    Case("data-unknown-role", _data("d.jsonl", [{"messages": [{"role": "human", "content": f"hi {i}"},
                                                             {"role": "assistant", "content": "yo"}]} for i in range(20)]),
         ("role 'human'",), before="trained, exit 0; the held-out eval then raised IndexError (traceback)"),
    Case("data-no-user-message", _data("d.jsonl", [{"prompt": [{"role": "system", "content": f"be brief {i}"}],
                                                    "completion": "ok"} for i in range(20)]),
         ("the prompt has no user message",),
         before="trained, exit 0; the held-out eval then raised IndexError (ours)"),
    Case("data-chat-not-ending-assistant", _data("d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 20),
         ("end with an assistant message",), before="one sentence (already)"),
    Case("data-too-few-rows-to-split", _data("d.jsonl", [ROW]), ("too few to split off a test set",),
         before="one sentence (already)"),
    Case("preference-data-without-rejected",
         _data("d.jsonl", [{"prompt": f"What is {i} plus 2?", "chosen": str(i + 2)} for i in range(20)],
               extra=("--set", "training.method=dpo")),
         ("has no 'rejected' column (it has chosen, prompt)",), before="no training.method key yet (issue 23)"),
    Case("preference-data-of-sft-rows", _data("d.jsonl", _rows(), extra=("--set", "training.method=orpo")),
         ("has no 'chosen' column",), before="no training.method key yet (issue 23)"),
    Case("preference-reply-a-chat",
         _data("d.jsonl", [{"prompt": f"q{i}", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}
                           for i in range(20)], extra=("--set", "training.method=dpo")),
         ("'chosen' must be the assistant's reply",), before="no training.method key yet (issue 23)"),
    # ------------------------------------------------------------------ run directories
    Case("train-run-is-a-file", lambda c: ["train", "--run", c.file("runfile", "x"), *Q], ("is a file",),
         before="FileExistsError traceback"),
    Case("train-run-under-a-file", lambda c: ["train", "--run", c.file("f", "x") / "sub", *Q], ("is a file",),
         before="NotADirectoryError traceback (ours)"),
    Case("train-into-a-brought-run", _train(), ("stage you brought (user-provided)",), run="dir", setup=_brought,
         before="one sentence (already)"),
    Case("run-is-a-file", lambda c: ["run", "--run", c.file("runfile", "x")], ("is a file",),
         before="one sentence (already)"),
    Case("merge-run-is-a-file", lambda c: ["merge", "--run", c.file("runfile", "x")], ("is a file",),
         before="\"does not exist\" about an existing file"),
    Case("export-run-is-a-file", lambda c: ["export", "--run", c.file("runfile", "x")], ("is a file",),
         before="\"does not exist\" about an existing file"),
    Case("eval-run-is-a-file", lambda c: ["eval", "--run", c.file("runfile", "x")], ("is a file",),
         before="\"does not exist\" about an existing file"),
    Case("report-run-is-a-file", lambda c: ["report", "--run", c.file("runfile", "x")], ("is a file",),
         before="one sentence (already)"),
    Case("qualify-run-is-a-file", lambda c: ["qualify", "--run", c.file("runfile", "x")], ("is a file",),
         before="\"does not exist\" about an existing file"),
    Case("merge-run-missing", lambda c: ["merge", "--run", c.run], ("does not exist",), before="one sentence (already)"),
    Case("report-no-manifest", lambda c: ["report", "--run", c.run], ("has no manifest.json",), run="dir",
         before="one sentence (already)"),
    Case("read-only-run", lambda c: ["report", "--run", c.run], ("is not writable",), run="finished",
         patch=_patch_read_only, before="three chained tracebacks, as the issue found (as root, the refusal of "
                                        "the first write is simulated)"),
    # ------------------------------------------------------------------ manifests of the wrong shape
    Case("manifest-a-list", lambda c: ["run", "--run", c.run], ("is not a workbench manifest",), run="finished",
         setup=_manifest("[1, 2]"), before="AttributeError traceback ('list' object has no attribute 'get')"),
    Case("manifest-stages-a-list", lambda c: ["report", "--run", c.run], ("is not a workbench manifest",),
         run="finished", setup=_manifest('{"stages": []}'), before="AttributeError traceback"),
    Case("manifest-record-a-string", lambda c: ["merge", "--run", c.run], ("is not a workbench manifest",),
         run="finished", setup=_manifest('{"stages": {"train": "done"}}'), before="AttributeError traceback"),
    Case("manifest-not-json", lambda c: ["run", "--run", c.run], ("is not valid JSON",), run="finished",
         setup=_manifest("{oops"), before="one sentence (already)"),
    Case("manifest-not-utf8", lambda c: ["qualify", "--run", c.run], ("cannot be read",), run="finished",
         setup=_manifest(b'{"stages": "\xff"}'), before="UnicodeDecodeError traceback (ours)"),
    # ------------------------------------------------------------------ retraining a finished run
    Case("retrain-bad-target-keeps-the-run",
         lambda c: ["run", "--run", c.run, *SMALL, "--set", "lora.target_modules=[q_proj, vproj]"],
         ("lora.target_modules names vproj",), run="finished", then=_all_skipped,
         before="refused, but config.yaml was overwritten and the record set to running: the qualified run failed"),
    Case("retrain-negative-lr-keeps-the-run", _train("--set", "training.lr=-1"), ("must be a number above 0",),
         run="finished", before="traceback after config.yaml and the record were overwritten"),
    Case("retrain-rows-too-long-keeps-the-run",
         lambda c: ["run", "--run", c.run, *SMALL, "--set", "training.max_seq_len=4"],
         ("leaves no answer token",), run="finished", then=_all_skipped,
         before="refused after the record was set to running; the next run called it killed"),
    Case("retrain-nan-keeps-the-run",
         lambda c: ["run", "--run", c.run, *SMALL, "--set", "training.lr=1e30", "--set", "training.warmup_ratio=0"],
         ("the loss became",), run="finished", quiet=False, adds=True, attempt="failed", then=_all_skipped,
         before="one sentence, but train/loss.jsonl and the record were overwritten"),
    Case("retrain-dpo-nan-keeps-the-run",
         lambda c: ["run", "--run", c.run, *SMALL, "--set", "training.method=dpo", "--set", "training.lr=1e30",
                    "--set", "training.warmup_ratio=0"],
         ("the loss became",), run="finished", quiet=False, adds=True, attempt="failed", then=_all_skipped,
         before="no training.method key yet (issue 23); TRL's preference trainers have no non-finite-loss guard"),
    Case("retrain-ctrl-c-keeps-the-run", _train("--set", "training.lr=1e-3"), ("interrupted",), code=130,
         run="finished", quiet=False, attempt="interrupted", patch=_patch_train(KeyboardInterrupt()),
         before="KeyboardInterrupt traceback (the state left was right)"),
    Case("retrain-out-of-memory-keeps-the-run", _train("--set", "training.lr=1e-3"), ("ran out of GPU memory",),
         run="finished", quiet=False, attempt="failed", patch=lambda c, mp: _patch_train(_oom())(c, mp),
         before="one sentence, but config.yaml and the finished train record were replaced (ours)"),
    Case("ctrl-c-in-a-first-train", _train(), ("interrupted",), code=130, quiet=False, adds=True,
         patch=_patch_train(KeyboardInterrupt()), before="KeyboardInterrupt traceback"),
    # ------------------------------------------------------------------ merge and bring-your-own adapters
    Case("merge-adapter-misses-layers",
         lambda c: ["merge", "--run", c.run, "--adapter", c.models.adapter2, "--base", c.models.base4],
         ("does not cover the base", "model.layers.2."), needs=("models",),
         before="exit 0: PEFT warned, layers 2-3 kept random LoRA weights, the merge check passed"),
    Case("merge-adapter-extra-layers",
         lambda c: ["merge", "--run", c.run, "--adapter", c.models.adapter4, "--base", c.models.base2],
         ("name no layer of the base", "model.layers.2."), needs=("models",), before="PEFT warning, exit 0 (ours)"),
    Case("merge-adapter-other-widths",
         lambda c: ["merge", "--run", c.run, "--adapter", c.models.adapter_narrow, "--base", c.models.base4],
         ("the wrong shape",), needs=("models",),
         before="PEFT's size-mismatch sentence, after the adapter was copied into the run and merging began (ours)"),
    Case("merge-adapter-pickle-only", lambda c: ["merge", "--run", c.run, "--adapter", c.tmp / "a", "--base",
                                                 c.models.base4],
         ("only pickle weights",), needs=("models",),
         setup=lambda c: (c.file("a/adapter_config.json", "{}"), c.file("a/adapter_model.bin", b"x")) and None,
         before="one sentence (already)"),
    Case("merge-adapter-no-config", lambda c: ["merge", "--run", c.run, "--adapter", c.tmp], ("no adapter_config.json",),
         before="one sentence (already)"),
    Case("merge-adapter-config-not-json",
         lambda c: ["merge", "--run", c.run, "--adapter", c.tmp / "a", "--base", c.models.base4],
         ("is not valid JSON",), needs=("models",),
         setup=lambda c: (c.file("a/adapter_config.json", "{"), c.file("a/adapter_model.safetensors", b"x")) and None,
         before="one sentence (already)"),
    Case("merge-adapter-config-a-list",
         lambda c: ["merge", "--run", c.run, "--adapter", c.tmp / "a", "--base", c.models.base4],
         ("is not a JSON object",), needs=("models",),
         setup=lambda c: (c.file("a/adapter_config.json", "[]"), c.file("a/adapter_model.safetensors", b"x")) and None,
         before="AttributeError traceback (ours)"),
    Case("merge-adapter-not-lora",
         lambda c: ["merge", "--run", c.run, "--adapter", c.tmp / "a", "--base", c.models.base4],
         ("is a IA3 adapter",), needs=("models",),
         setup=lambda c: (shutil.copytree(c.models.adapter4, c.tmp / "a"),
                          _edit_json(c.tmp / "a" / "adapter_config.json", peft_type="IA3")) and None,
         before="one sentence (already)"),
    Case("merge-adapter-truncated",
         lambda c: ["merge", "--run", c.run, "--adapter", c.tmp / "a", "--base", c.models.base4],
         ("is truncated",), needs=("models",),
         setup=lambda c: (shutil.copytree(c.models.adapter4, c.tmp / "a"),
                          _truncate(c.tmp / "a" / "adapter_model.safetensors")) and None,
         before="safetensors traceback after the adapter was copied into the run (ours)"),
    Case("merge-base-custom-code",
         lambda c: ["merge", "--run", c.run, "--adapter", c.models.adapter4, "--base", c.model],
         ("declares custom code",), needs=("models",),
         setup=_user_model(lambda f: _edit_json(f / "config.json", auto_map={"AutoModelForCausalLM": "m.M"})),
         before="accepted without a word"),
    Case("merge-adapter-into-a-pipeline-run",
         lambda c: ["merge", "--run", c.run, "--adapter", c.models.adapter4, "--base", c.models.base4],
         ("already holds a train stage made by the pipeline",), run="finished", needs=("models",),
         before="one sentence (already)"),
    Case("merge-base-without-adapter", lambda c: ["merge", "--run", c.run, "--base", c.tmp],
         ("--base and --tokenizer go with --adapter",), before="one sentence (already)"),
    Case("merge-no-train-stage", lambda c: ["merge", "--run", c.run], ("has no completed train stage",), run="dir",
         before="one sentence (already)"),
    Case("merge-run-base-truncated", lambda c: ["merge", "--run", c.run], ("is truncated",), run="finished",
         setup=lambda c: _truncate(c.run / "base" / "model.safetensors"),
         before="exit 0: merged into a half-truncated base without a word (ours)"),
    Case("merge-disk-full", lambda c: ["merge", "--run", c.run], ("no space left on the device while writing",),
         run="finished", quiet=False, patch=_merge_disk_full, before="one sentence (already), now also EDQUOT"),
    # ------------------------------------------------------------------ export and bring-your-own merged models
    Case("export-quant-unknown", lambda c: ["export", "--run", c.run, "--quant", "q5"], ("unknown --quant value(s) q5",),
         before="one sentence (already)"),
    Case("export-merged-custom-code", lambda c: ["export", "--run", c.run, "--merged", c.model, "--quant", "f16"],
         ("declares custom code",), needs=("models",),
         setup=_user_model(lambda f: (_edit_json(f / "config.json", auto_map={"AutoModelForCausalLM": "modeling_x.M"}),
                                      (f / "modeling_x.py").write_text("import os\n")) and None),
         before="exported, and modeling_x.py was copied into merge/merged/"),
    Case("export-no-merge-stage", lambda c: ["export", "--run", c.run], ("has no completed merge stage",), run="dir",
         before="one sentence (already)"),
    Case("export-merge-files-changed", lambda c: ["export", "--run", c.run, "--quant", "f16"],
         ("the merge stage's files changed since it ran",), run="finished",
         setup=lambda c: _edit_json(c.run / "merge" / "merged" / "config.json", note="edited"),
         before="one sentence (already)"),
    Case("export-thresholds-missing", lambda c: ["export", "--run", c.run, "--thresholds", c.tmp / "t.yaml"],
         ("cannot read thresholds file",), run="finished", before="one sentence (already)"),
    Case("export-thresholds-not-a-number", lambda c: ["export", "--run", c.run, "--thresholds",
                                                      c.file("t.yaml", "f16: {kl_mean: small}\n")],
         ("f16.kl_mean must be a finite number",), run="finished", before="ValueError traceback (ours)"),
    Case("export-thresholds-top1-above-1", lambda c: ["export", "--run", c.run, "--thresholds",
                                                      c.file("t.yaml", "f16: {top1_agreement: 1.5}\n")],
         ("at most 1",), run="finished", before="accepted; every file then failed verification (ours)"),
    Case("export-gguf-disk-full", lambda c: ["export", "--run", c.run, "--quant", "f16"],
         ("no space left on the device while writing model-f16.gguf",), run="finished", quiet=False,
         patch=_gguf_short_write, before="OSError traceback: numpy's short write has no errno"),
    Case("export-quantize-disk-full", lambda c: ["export", "--run", c.run, "--quant", "f16,q8_0"],
         ("no space left on the device while quantizing",), run="finished", quiet=False,
         patch=_quantize_fails(True), before="\"its log is above\", but no log was shown"),
    Case("export-quantize-fails", lambda c: ["export", "--run", c.run, "--quant", "f16,q8_0"],
         ("llama.cpp could not quantize model-f16.gguf to q8_0", "llama.cpp logged no reason", "is intact"),
         run="finished", quiet=False,
         patch=_quantize_fails(False), before="\"its log is above\", but no log was shown"),
    # ------------------------------------------------------------------ eval, report, qualify
    Case("eval-limit-zero", lambda c: ["eval", "--run", c.run, "--limit", "0"], ("--limit must be at least 1",),
         run="finished", before="one sentence (already)"),
    Case("eval-models-unknown", lambda c: ["eval", "--run", c.run, "--models", "gpt5"], ("unknown --models value(s)",),
         run="finished", before="one sentence (already)"),
    Case("eval-model-not-made", lambda c: ["eval", "--run", c.run, "--models", "bf16"], ("no bf16 GGUF yet",),
         run="finished", before="one sentence (already)"),
    Case("eval-tolerance-nan", lambda c: ["eval", "--run", c.run, "--tolerances",
                                          c.file("t.yaml", "merged: {score: .nan}\n")],
         ("merged.score must be a finite number",), run="finished", before="accepted; no change was ever flagged (ours)"),
    Case("gates-top1-above-1", _gates("merge: {float32: {top1_agreement: 1.5}}\n"), ("between 0 and 1",), run="finished",
         before="accepted, then the merge gate failed with a misleading reason"),
    Case("gates-score-nan", _gates("eval: {tolerances: {merged: {score: .nan}}}\n"), ("must be a finite number",),
         run="finished", before="accepted, then the eval gate failed with a misleading reason"),
    Case("gates-negative", _gates("tokenizer: {max_mismatches: -1}\n"), (">= 0, got -1",),
         run="finished", before="one sentence (already)"),
    Case("gates-unknown-key", _gates("merge: {float32: {kl_maen: 1.0}}\n"), ("unknown key 'merge.float32.kl_maen'",),
         run="finished", before="one sentence (already)"),
    Case("gates-not-yaml", _gates("merge: {\n"), ("cannot read gates file",), run="finished",
         before="one sentence (already)"),
    Case("baseline-string-number", _baseline_with(tokens_per_s="fast"), ("tokens_per_s is 'fast', where a number",),
         run="finished", before="qualify ran every gate; the performance gate failed with a TypeError (exit 1)"),
    Case("baseline-string-memory", _baseline_with(peak_rss_mib="lots"), ("peak_rss_mib is 'lots'",),
         run="finished", before="qualify ran every gate; the performance gate failed with a TypeError (exit 1, ours)"),
    Case("baseline-missing", lambda c: ["qualify", "--run", c.run, "--baseline", c.tmp / "none.json"],
         ("is not a readable JSON file",), run="finished", before="one sentence (already)"),
    Case("parity-report-not-json", lambda c: ["qualify", "--run", c.run, "--parity-report", c.file("p.json", "{")],
         ("is not a readable JSON file",), run="finished", before="one sentence (already)"),
    # ------------------------------------------------------------------ the pipeline's own options
    Case("run-eval-limit-negative", lambda c: ["run", "--run", c.run, "--eval-limit", "-1"],
         ("--eval-limit must be 0",), run="finished", before="one sentence (already)"),
    Case("run-quant-unknown", lambda c: ["run", "--run", c.run, "--quant", "q5"], ("unknown --quant value(s) q5",),
         run="finished", before="one sentence (already)"),
    Case("run-config-on-a-brought-run", lambda c: ["run", "--run", c.run, *Q], ("was brought by you",), run="dir",
         setup=_brought, before="one sentence (already)"),
    Case("parity-params-without-kernel", lambda c: ["parity", "--params", "{}"], ("need --kernel",),
         before="one sentence (already)"),
    Case("parity-params-not-json", lambda c: ["parity", "--kernel", "rms_norm", "--params", "{"], ("not valid JSON",),
         before="one sentence (already)"),
    # ------------------------------------------------------------------ the lock
    Case("locked-train", **_locked(_train()), before="both trained; config and adapter from different runs"),
    Case("locked-run", run="finished", **_locked(lambda c: ["run", "--run", c.run]),
         before="ran alongside the other command"),
    Case("locked-merge", run="finished", **_locked(lambda c: ["merge", "--run", c.run]),
         before="ran alongside the other command"),
    Case("locked-export", run="finished", **_locked(lambda c: ["export", "--run", c.run]),
         before="ran alongside; equal temp names crashed the second"),
    Case("locked-eval", run="finished", **_locked(lambda c: ["eval", "--run", c.run]),
         before="ran alongside the other command"),
    Case("locked-report", run="finished", **_locked(lambda c: ["report", "--run", c.run]),
         before="ran alongside the other command"),
    Case("locked-qualify", run="finished", **_locked(lambda c: ["qualify", "--run", c.run]),
         before="ran alongside the other command"),
    Case("stale-lock-does-not-block", lambda c: ["run", "--run", c.run], (), code=0, run="finished",
         setup=lambda c: (c.run / ".lock").write_text("999999\n"), before="(no lock)"),
]


def test_the_catalogue_is_large_and_named_uniquely():
    assert len(CASES) >= 70
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, tmp_path, capfd, monkeypatch, request):
    from workbench import manifest

    ctx = Ctx(tmp_path, tmp_path / "run", request=request)
    if "models" in case.needs:
        ctx.models = request.getfixturevalue("models")
    if case.run == "finished":
        request.getfixturevalue("finished").copy(ctx.run)
    elif case.run == "dir":
        ctx.run.mkdir()
    if case.setup:
        case.setup(ctx)
    argv = case.argv(ctx)
    watched = [tmp_path] + ([ctx.models.root] if ctx.models else [])
    before = snapshot(*watched)
    records = manifest.read(ctx.run)["stages"] if (ctx.run / "manifest.json").is_file() and case.attempt else None
    existed = ctx.run.exists()
    if case.patch:
        case.patch(ctx, monkeypatch)

    code, out, err, tb = invoke(argv, capfd)
    monkeypatch.undo()

    assert tb is None, f"a traceback escaped:\n{tb}"
    assert code == case.code, f"exit {code}, expected {case.code}; stderr: {err[-2000:]}"
    if case.code:
        line = one_sentence(err, quiet=case.quiet)
        for said in case.says:
            said = said(ctx) if callable(said) else said
            assert said in line, f"{said!r} not in {line!r}"
    after = snapshot(*watched)
    manifest_file = str(ctx.run / "manifest.json")
    changed = [p for p, h in before.items() if after.get(p) != h and not (case.attempt and p == manifest_file)]
    assert not changed, f"changed or removed: {changed}"
    if not case.adds:
        assert sorted(set(after) - set(before)) == [], "files were added"
        if not existed and case.code:
            assert not ctx.run.exists(), "a refused command created the run directory"
    if case.attempt:
        assert manifest.read(ctx.run)["stages"] == records, "a stage record changed"
        assert (manifest.attempt(ctx.run, "train") or {}).get("status") == case.attempt
    if case.then:
        case.then(ctx)
