"""End-to-end training runs: the same LoRA / QLoRA config with and without our kernels.

Each (mode, stack) pair trains through the product's training recipe (workbench.train: TRL's
SFTTrainer + PEFT, bitsandbytes NF4 for QLoRA) with the model built by the stack's strategy
(bench/stacks.py), in its OWN process (``python -m workbench.bench.train_child``), so one
stack's allocator state, compiled kernels or patches cannot leak into another's numbers.
The base is a checkpoint built from a real model's config with random weights
(shapes decide speed and memory) and our offline tokenizer; all runs share it, the
data (the built-in synthetic skills) and the seed.

Stacks:
  ``hf``    transformers + PEFT as they come, ``attn_implementation="sdpa"``. On a CUDA
            bf16 model, SDPA dispatches to PyTorch's FlashAttention-2 kernel (the flash
            backend); flash-attn itself is not installed. Reports say "HF + SDPA".
  ``ours``  the same, with ``workbench.patch`` applied after the adapter is attached.
  ``hf-gc``, ``ours-gc``  each of the above with gradient checkpointing.
  ``ours-offload``  ours with offloaded checkpointing (``gradient_checkpointing: offload``,
            workbench.offload: the layers' inputs wait in pinned host memory).
  ``ours-bf16``  ours in the base's 16-bit dtype where PEFT's defaults keep fp32: the
            adapter computed in bf16 outside autocast too, as autocast computes it
            (``adapter_as_autocast``, workbench.patch), and for QLoRA the norms, embeddings
            and head left in bf16 (``quantization.upcast_frozen: false``), so the residual
            stream is bf16 as on a 16-bit base. Both explicit switches, judged by the loss band.
  ``liger`` HF + SDPA with Liger-Kernel's RMSNorm, RoPE and SwiGLU, applied the way a TRL
            user gets them (``use_liger_kernel``); TRL 1.16 keeps its own chunked LM-head
            loss and refuses Liger's fused linear cross-entropy. Under ``--method dpo|orpo``
            the same kernels, and the loss Liger's LigerFusedLinearDPOLoss /
            LigerFusedLinearORPOLoss (set to TRL's semantics) in the fused trainer ours runs
            in (bench/stacks.LigerPreferenceLoss): no TRL 1.16 trainer reaches them. Runs when
            liger-kernel is installed.
  ``unsloth``, ``unsloth-gc``  Unsloth's FastLanguageModel (its patched Llama, LoRA kernels
            and loss; ``-gc``: its offloaded checkpointing), trained by the same TRL loop.
            Unsloth pins trl <= 1.15 and datasets < 5, so it usually lives in a site of its
            own (scripts/unsloth-host-packages.txt): set WORKBENCH_UNSLOTH_SITE to that
            folder and only these stacks' processes get it first on PYTHONPATH.

Reported per run: the per-step loss curve, tokens/s, step time, peak allocated
memory; per mode and stack: the loss agreement with hf (max |difference| over the
logged steps, relative to the loss; flagged outside LOSS_BAND) and the speed and
memory ratios, same run.
Nothing here asserts a speed: the numbers go to the suite's report.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from workbench.bench import child, loop_profile
from workbench.data import FINGERPRINT_BATCHES
from workbench.markdown import table

#: Real configs (random weights), Llama unless ``model_type`` says otherwise. The tiny ones keep the
#: CPU smoke tests fast.
SHAPES = {
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                        max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                        max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5),
    # Qwen3-1.7B's config.json: another family (q/k norms per head, 151936-token vocab, tied head).
    "qwen3-1.7b": dict(model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True,
                       rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=0, rope_theta=10000.0,
                 max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "tiny-qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=0, rope_theta=10000.0,
                       max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-6),
}
MODES = ("lora", "qlora")
STACKS = {"hf": "HF + SDPA (transformers + PEFT)", "hf-gc": "HF + SDPA + gradient checkpointing",
          "ours": "ours (workbench.patch)", "ours-gc": "ours + gradient checkpointing",
          "ours-offload": "ours + offloaded checkpointing",
          "ours-bf16": "ours, bf16 where PEFT keeps fp32 (adapter_as_autocast; QLoRA: upcast_frozen false)",
          "liger": "Liger-Kernel via TRL (layer kernels)", "unsloth": "Unsloth (FastLanguageModel via TRL)",
          "unsloth-gc": "Unsloth + its offloaded checkpointing"}
#: The stacks of a preference-training suite (``--method dpo|orpo``): TRL's trainer as it comes,
#: ours (the fused preference loss), and liger (Liger's layer kernels and its fused linear
#: preference loss in the same trainer: bench/stacks.Liger). Unsloth's trainer is not wired into
#: the recipe for preference training, and offloaded checkpointing is SFT's.
PREFERENCE_STACKS = ("hf", "hf-gc", "ours", "ours-gc", "ours-bf16", "liger")
#: Liger's loss in the liger stack of a preference suite (bench/stacks.LigerPreferenceLoss), per method.
LIGER_LOSSES = {"dpo": "LigerFusedLinearDPOLoss (sigmoid, summed completion log-probs)",
                "orpo": "LigerFusedLinearORPOLoss (averaged completion log-probs, NLL over prompt and completion)"}
#: Stacks that run only where their package is installed (skipped, and said so, elsewhere).
OPTIONAL = {"liger": "liger-kernel", "unsloth": "unsloth", "unsloth-gc": "unsloth"}
#: A site folder holding Unsloth and its own trl/datasets, put first on PYTHONPATH in the
#: Unsloth stacks' processes only (scripts/build_wheelhouse.sh .site-unsloth
#: scripts/unsloth-host-packages.txt builds one).
UNSLOTH_SITE = "WORKBENCH_UNSLOTH_SITE"


def unsloth_site() -> Path | None:
    """The folder named by WORKBENCH_UNSLOTH_SITE, when it holds the unsloth package."""
    value = os.environ.get(UNSLOTH_SITE)
    if value and (Path(value) / "unsloth" / "__init__.py").is_file():
        return Path(value).resolve()
    return None


def stack_env(stack: str) -> dict | None:
    """The environment of one stack's process: Unsloth's site first on PYTHONPATH for the
    Unsloth stacks when one is set, else the suite's own environment (None)."""
    site = unsloth_site() if stack.startswith("unsloth") else None
    if site is None:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return env


def available_stacks(stacks=tuple(STACKS)) -> tuple[list[str], dict[str, str]]:
    """(stacks that can run here, {optional stack skipped: why})."""
    import importlib.util

    import torch

    run, skipped = [], {}
    for stack in stacks:
        package = OPTIONAL.get(stack)
        if package == "unsloth" and unsloth_site() is None and importlib.util.find_spec("unsloth") is None:
            skipped[stack] = (f"unsloth is not installed here and {UNSLOTH_SITE} names no site with it "
                              "(scripts/unsloth-host-packages.txt)")
        elif package and package != "unsloth" and importlib.util.find_spec(package.replace("-", "_")) is None:
            skipped[stack] = f"{package} is not installed"
        elif package and not torch.cuda.is_available():
            skipped[stack] = f"{package} needs a CUDA device"
        else:
            run.append(stack)
    return run, skipped


#: A stack whose logged losses differ from hf's by more than this (relative, at any
#: logged step) is flagged, whatever its speed. bf16's unit roundoff is 2^-8 (3.9e-3);
#: seeded runs of one config differ between hf and ours by reordering within about
#: that (the train reports' comparison tables); 1e-2 admits it with room and still
#: catches a changed loss or gradient.
LOSS_BAND = 1e-2
#: At step 1 every stack evaluates the same base model (LoRA's B starts at zero) on its
#: first batch, so only the forward's rounding separates the losses (the train reports'
#: step-1 column: far below bf16's roundoff for stacks fed the same data). A step-1 difference
#: above bf16's unit roundoff, 2^-8, is not rounding: the stack fed other data (see the
#: fingerprints) or computes another loss. It explains a flag; it does not raise one.
FIRST_STEP_BAND = 2.0 ** -8
#: The first steps of a run carry one-time costs: Triton compiling our kernels, cuBLAS
#: choosing its algorithms, TRL building its LM head, the caching allocator growing.
#: In a short run they are a large share of the whole and can swap the order of the
#: stacks (a train report's notes show it), so speed is measured after them: from
#: the logged step ``max(1, steps * WARMUP_FRACTION)`` to the last one.
WARMUP_FRACTION = 0.2


def steady_rate(losses: list[dict], steps: int, tokens_per_step: int | None = None) -> dict:
    """Step time and tokens/s between the end of the warm-up and the last logged step,
    from loss.jsonl's per-step ``elapsed`` (seconds since training began) and cumulative
    ``tokens``. Empty when fewer than two logged steps follow the warm-up.
    ``tokens_per_step``: the count to use where the log has none (Unsloth's trainer logs
    no token count; with wrapped packing every sequence is full, so a step holds exactly batch
    x seq tokens)."""
    warm = max(1, int(steps * WARMUP_FRACTION))
    rows = [r for r in losses if isinstance(r.get("elapsed"), (int, float)) and (r.get("step") or 0) >= warm]
    if len(rows) < 2 or rows[-1]["step"] <= rows[0]["step"] or rows[-1]["elapsed"] <= rows[0]["elapsed"]:
        return {}
    first, last = rows[0], rows[-1]
    seconds = last["elapsed"] - first["elapsed"]
    out = {"steady_from_step": first["step"], "steady_step_s": round(seconds / (last["step"] - first["step"]), 5)}
    if isinstance(first.get("tokens"), (int, float)) and isinstance(last.get("tokens"), (int, float)) \
            and last["tokens"] > first["tokens"]:
        out["steady_tokens_per_s"] = round((last["tokens"] - first["tokens"]) / seconds, 1)
    elif tokens_per_step:
        out["steady_tokens_per_s"] = round((last["step"] - first["step"]) * tokens_per_step / seconds, 1)
        out["tokens_counted"] = "batch x seq"
    return out


def write_checkpoint(shape: str, out: Path, seed: int = 0, positions: int | None = None) -> Path:
    """A checkpoint of ``shape`` (its family's architecture) with random weights (bf16 on CUDA, else fp32)
    and our offline tokenizer, as safetensors; written once and reused. ``positions``
    raises the config's ``max_position_embeddings`` to at least that many (the context
    search beyond the shape's limit; the weights and the RoPE frequencies are the same)."""
    import torch

    if (out / "config.json").exists():
        return out
    if torch.cuda.is_available():
        # In a process of its own: building it here would leave this process, which only
        # launches the runs, holding the model's memory in its caching allocator (the 8B is
        # built in fp32, ~30 GiB, then cast) and a CUDA context, taken from every run's device
        # for the whole suite.
        out.parent.mkdir(parents=True, exist_ok=True)
        code = ("import sys; from pathlib import Path; from workbench.bench.train import write_checkpoint_here; "
                "write_checkpoint_here(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) or None)")
        proc = subprocess.run([sys.executable, "-c", code, shape, str(out), str(seed), str(positions or 0)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"writing the {shape} checkpoint failed: "
                               f"{(proc.stderr.strip().splitlines() or ['(no output)'])[-1]}")
        return out
    return write_checkpoint_here(shape, out, seed, positions)


def write_checkpoint_here(shape: str, out: Path, seed: int = 0, positions: int | None = None) -> Path:
    """:func:`write_checkpoint`'s work, in this process."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from workbench import atomic
    from workbench.tokenizer import default_tokenizer

    tok = default_tokenizer()
    dims = dict(SHAPES[shape])
    model_type = dims.pop("model_type", "llama")
    dims["vocab_size"] = max(dims["vocab_size"], len(tok))
    dims["max_position_embeddings"] = max(dims["max_position_embeddings"], positions or 0)
    config = AutoConfig.for_model(model_type, **dims, bos_token_id=None, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    with atomic.directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


#: Tokens per built-in row, at least (the shortest skill's rows, with the chat template).
_MIN_ROW_TOKENS = 12   # measured: 24 to 30 (mean 26.6) with our tokenizer


def config_for(checkpoint: Path, mode: str, stack: str, steps: int, batch: int, seed: int, seq: int | None,
               method: str = "sft") -> dict:
    """One stack's training config. ``seq``: sequences of that many tokens (the built-in rows
    wrapped-packed, every sequence full, enough rows generated for every step), else one short
    built-in row per sequence. ``method``: sft, or dpo / orpo on the built-in preference pairs
    (``batch`` pairs a step; the loss ours with our kernels, else TRL's). Our kernels are on for
    the ``ours`` stacks only; the others' are the stack's to apply (workbench.bench.stacks)."""
    training = {"max_steps": steps, "batch_size": batch, "lr": 2e-4, "seed": seed, "logging_steps": 1,
                "warmup_ratio": 0.0, "schedule": "constant", "method": method,
                "gradient_checkpointing": "offload" if stack.endswith("-offload") else stack.endswith("-gc")}
    data = {}
    if seq:
        training.update(packing="wrapped", max_seq_len=seq)
        data["builtin_rows"] = max(3000, -(-2 * steps * batch * seq // _MIN_ROW_TOKENS))
    return {
        "model": {"path": str(checkpoint), "dtype": "auto"},
        "data": data,
        "lora": {"r": 16, "alpha": 16, "dropout": 0.0},
        "quantization": {"type": "nf4", "double_quant": True, "upcast_frozen": stack != "ours-bf16"}
                        if mode == "qlora" else None,
        "training": training,
        "eval": {"max_rows": 0},
        "kernels": {"adapter_as_autocast": True} if stack == "ours-bf16" else stack.split("-")[0] == "ours",
    }


def run(shape: str = "llama3.2-1b", steps: int = 30, batch: int = 8, out: str | os.PathLike = "runs/bench-train",
        modes=MODES, stacks=tuple(STACKS), seed: int = 0, seq: int | None = None, method: str = "sft",
        progress: Callable[[str], None] = print, partial: Callable[[dict], None] | None = None,
        plain_steps: int = 0, plain_warmup: int = 3, profile_dir: Path | None = None) -> dict:
    """Every (mode, stack) run, one process each, training with ``method`` (config_for).
    ``partial`` gets the result so far after each run, marked ``incomplete`` (runs done and
    planned), so a command stopped midway leaves a report of what it measured.
    ``plain_steps`` > 0 (SFT with ``seq``): after each run, the step suite's plain loop on the
    same checkpoint and batch shape (:func:`plain_loop`), against which the TRL loop is timed.
    ``profile_dir``: after each run, the same run again, short, with its loop profiled by phase
    (:func:`profile_loop`), its summary and trace there."""
    import yaml

    out = Path(out).resolve()
    stacks, skipped = available_stacks(stacks)
    for stack, why in skipped.items():
        progress(f"[bench train] {stack}: skipped ({why})")
    checkpoint = write_checkpoint(shape, out / f"base-{shape}", seed)
    results = []
    for mode in modes:
        for stack in stacks:
            run_dir = out / f"{mode}-{stack}"
            cfg_path = out / f"{mode}-{stack}.yaml"
            cfg_path.write_text(yaml.safe_dump(config_for(checkpoint, mode, stack, steps, batch, seed, seq, method)))
            progress(f"[bench train] {shape} {mode} {stack}{'' if method == 'sft' else ' ' + method}: {steps} steps, "
                     f"batch {batch}" + (f" x {seq} tokens" if seq else ""))
            trained = child.train(cfg_path, run_dir, stack, env=stack_env(stack))
            row = {"mode": mode, "stack": stack, "label": STACKS[stack], "wall_s": trained.wall_s,
                   "exit_code": trained.exit_code}
            if trained.error:
                row["error"] = trained.error
                progress(f"[bench train]   failed: {row['error']}")
            else:
                record, losses = trained.record, trained.losses
                row.update(tokens_per_s=record.get("tokens_per_s"), peak_memory_gib=record.get("peak_memory_gib"),
                           peak_reserved_gib=record.get("peak_reserved_gib"),
                           train_s=record["timings"].get("train_s"), steps=record.get("steps"),
                           final_loss=record.get("final_loss"), kernels=record.get("kernels"),
                           data_fingerprint=record.get("data_fingerprint"),
                           trl=(record.get("versions") or {}).get("trl"),
                           loss_curve=[(r["step"], r["loss"]) for r in losses if r.get("loss") is not None])
                row["step_s"] = round(row["train_s"] / row["steps"], 4) if row["steps"] else None
                per_step = batch * seq if seq else None  # wrapped packing: (nearly) every sequence is full
                if not row["tokens_per_s"] and per_step and row["steps"] and row["train_s"]:
                    row["tokens_per_s"] = round(row["steps"] * per_step / row["train_s"], 1)
                row.update(steady_rate(losses, steps, per_step))
                if plain_steps and seq and method == "sft":
                    progress(f"[bench train]   the plain loop: {plain_warmup} + {plain_steps} steps")
                    row["plain_loop"] = plain_loop(checkpoint, shape, mode, stack, batch, seq, plain_steps,
                                                   plain_warmup, seed, out / "plain-loop")
                    row.update(loop_overhead(row))
                if profile_dir is not None:
                    progress(f"[bench train]   the loop profile: steps {PROFILE_AFTER + 1} to "
                             f"{PROFILE_AFTER + loop_profile.STEPS} of a short run")
                    row["loop_profile"] = profile_loop(cfg_path, out / f"{mode}-{stack}-profiled", stack, profile_dir,
                                                       f"{mode}-{stack}")
            results.append(row)
            if partial is not None and len(results) < len(modes) * len(stacks):
                partial({**_result(shape, steps, batch, seed, seq, method, modes, results, skipped),
                         "incomplete": {"done": len(results), "planned": len(modes) * len(stacks)}})
    return _result(shape, steps, batch, seed, seq, method, modes, results, skipped)


def plain_loop(checkpoint: Path, shape: str, mode: str, stack: str, batch: int, seq: int, steps: int, warmup: int,
               seed: int, out: Path) -> dict:
    """The step suite's plain loop (bench/step.py: forward, backward, AdamW, no Trainer) for one
    stack, in its own process, on the checkpoint and batch shape a train run used; under autocast
    where the Trainer trains under it (``bf16=True``: a CUDA device). Its step time, or its error."""
    import torch

    from workbench.bench import step as sbench

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((checkpoint / "config.json").read_text())
    spec = {"checkpoint": str(checkpoint), "vocab_size": config["vocab_size"], "shape": shape, "mode": mode,
            "autocast": "on" if torch.cuda.is_available() else "off", "stack": stack, "batch": batch, "seq": seq,
            "steps": steps, "warmup": warmup, "seed": seed, "lr": sbench.LR, "profile_steps": 0, "cuda_graph": False}
    lora_r = config_for(checkpoint, mode, stack, steps, batch, seed, seq)["lora"]["r"]  # the FLOPs' rank
    row = sbench.measure(spec, config, out, None, lora_r)
    if "error" in row:
        return {"error": row["error"], "autocast": spec["autocast"]}
    return {"step_s": row["step_s"], "host_issue_s": row.get("host_issue_s"), "peak_alloc_gib": row.get("peak_alloc_gib"),
            "autocast": spec["autocast"], "steps": steps, "warmup": warmup}


#: Steps a profiled run takes before its profiled ones (compilation and autotuning are done by then).
PROFILE_AFTER = 5


def profile_loop(cfg_path: Path, run_dir: Path, stack: str, profile_dir: Path, name: str) -> dict:
    """The run of ``cfg_path`` again, in its own process, for PROFILE_AFTER + loop_profile.STEPS
    (+ 1) steps, the STEPS after PROFILE_AFTER under the profiler by phase of the Trainer's loop
    (workbench.bench.loop_profile): the summary, with its trace's path relative to the report's
    folder, or the error. A run of its own, so the timed run's steps carry no profiler."""
    import yaml

    cfg = yaml.safe_load(cfg_path.read_text())
    # One step past the window: the profiler stops at that step's batch fetch, so each phase
    # of the profiled steps is in it once (the end of training logs once more).
    cfg["training"]["max_steps"] = PROFILE_AFTER + loop_profile.STEPS + 1
    short = cfg_path.with_name(f"{cfg_path.stem}-profiled.yaml")
    short.write_text(yaml.safe_dump(cfg))
    dest = profile_dir / name
    trained = child.train(short, run_dir, stack, env=stack_env(stack),
                          options=["--profile-loop", str(dest), "--profile-after", str(PROFILE_AFTER),
                                   "--profile-steps", str(loop_profile.STEPS)])
    summary = dest.with_name(dest.name + ".json")
    if trained.error or not summary.is_file():
        return {"error": trained.error or "the profiled run wrote no profile"}
    out = json.loads(summary.read_text())
    out["trace"] = f"{profile_dir.name}/{out['trace']}"
    out["summary"] = f"{profile_dir.name}/{summary.name}"
    return out


def loop_overhead(row: dict) -> dict:
    """How much longer the TRL loop's steady step is than the plain loop's (a fraction; None
    without both)."""
    trl, plain = row.get("steady_step_s"), (row.get("plain_loop") or {}).get("step_s")
    return {"loop_overhead": trl / plain - 1 if trl and plain else None}


def _result(shape, steps, batch, seed, seq, method, modes, results, skipped) -> dict:
    # "method" only for preference training: an SFT report stays what reports were before the
    # option (their setups compare equal, bench/compare.SETUP).
    return {"shape": shape, "shape_dims": SHAPES[shape], "steps": steps, "batch": batch, "seed": seed, "seq": seq,
            **({} if method == "sft" else {"method": method}),
            "modes": list(modes), "runs": list(results), "comparisons": compare(results), "skipped_stacks": skipped}


def incomplete_line(result: dict, what: str) -> list[str]:
    """The banner of a report written before its command finished (``result["incomplete"]``)."""
    todo = result.get("incomplete")
    if not todo:
        return []
    return [f"> **Incomplete:** written after {todo['done']} of {todo['planned']} {what}; the command had not "
            "finished (it was stopped, or is still running). The rows below are final; the missing ones were "
            "not measured.", ""]


def compare(results: list[dict]) -> list[dict]:
    """Per mode, every other stack against hf, same run. A stack whose loss leaves
    LOSS_BAND is flagged (``loss_differs``), however fast it is. ``same_data``: whether
    its first micro-batches' fingerprints (workbench.data.batch_fingerprint) equal hf's
    (None where a run has none); ``first_rel_loss_diff``: the difference at step 1, where
    the weights are still the same in every stack (FIRST_STEP_BAND)."""
    out = []
    by = {(r["mode"], r["stack"]): r for r in results}
    for mode in sorted({r["mode"] for r in results}):
        hf = by.get((mode, "hf"))
        if not hf or "loss_curve" not in hf:
            continue
        for stack in [s for s in STACKS if s != "hf"]:
            other = by.get((mode, stack))
            if not other or "loss_curve" not in other:
                continue
            out.append({
                "mode": mode,
                "stack": stack,
                **loss_agreement(hf["loss_curve"], other["loss_curve"]),
                "same_data": (hf["data_fingerprint"] == other["data_fingerprint"])
                if hf.get("data_fingerprint") and other.get("data_fingerprint") else None,
                "speedup": _ratio(hf, other, "steady_step_s") or _ratio(hf, other, "step_s"),
                "speed_measure": "steady" if _ratio(hf, other, "steady_step_s") else "whole run",
                "memory_ratio": (other["peak_memory_gib"] / hf["peak_memory_gib"])
                if hf.get("peak_memory_gib") and other.get("peak_memory_gib") else None,
            })
    return out


def loss_agreement(hf_curve, other_curve) -> dict:
    """Two loss curves ([(step, loss)]) at their common steps: the relative differences to hf's
    (the largest, the last, and the one at step 1) and whether any leaves LOSS_BAND (a
    non-finite loss in either curve does)."""
    a, b = dict(hf_curve), dict(other_curve)
    common = sorted(set(a) & set(b))
    diffs = [abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in common]
    return {"steps_compared": len(common),
            "max_rel_loss_diff": max(diffs) if diffs else None,
            "final_rel_loss_diff": diffs[-1] if diffs else None,
            "first_rel_loss_diff": diffs[0] if common and common[0] == 1 else None,
            "loss_differs": bool(diffs) and not all(d <= LOSS_BAND for d in diffs)}


def verdict(c: dict) -> str:
    """The loss column: agrees, or DIFFERS with what the run shows about why."""
    if not c["loss_differs"]:
        return "agrees"
    if c.get("same_data") is False:
        return "**DIFFERS**: other data (its first batches' tokens or targets are not hf's)"
    first = c.get("first_rel_loss_diff")
    if first is not None and first > FIRST_STEP_BAND:
        return ("**DIFFERS**: already at step 1, same weights" + (" and same data" if c.get("same_data") else "")
                + ": another forward or loss")
    return "**DIFFERS**"


def _ratio(hf: dict, other: dict, key: str) -> float | None:
    """hf's value over the other stack's (a speedup, for times), when both have one."""
    return hf[key] / other[key] if hf.get(key) and other.get(key) else None


STYLES = {"hf": "-", "hf-gc": "-.", "ours": "--", "ours-gc": ":", "ours-offload": (0, (1, 3))}


def plot(result: dict, path: Path) -> Path:
    """Loss curves, one panel per mode (top); tokens/s and peak memory per mode and stack,
    with the ratio to hf on each bar, and failed runs marked where their bar would be (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    modes = sorted({r["mode"] for r in runs})
    stacks = list(dict.fromkeys(r["stack"] for r in runs))
    colours = {s: f"C{i}" for i, s in enumerate(stacks)}
    labels = {r["stack"]: r.get("label") or r["stack"] for r in runs}
    by = {(r["mode"], r["stack"]): r for r in runs}
    fig = plt.figure(figsize=(6 * max(len(modes), 2), 9))
    grid = fig.add_gridspec(2, 2 * len(modes), height_ratios=[1, 1.1])
    for i, mode in enumerate(modes):
        ax = fig.add_subplot(grid[0, 2 * i:2 * i + 2])
        for stack in stacks:
            r = by.get((mode, stack))
            if r is None:
                continue
            style = {"color": colours[stack], "linestyle": STYLES.get(stack, ":")}
            if r.get("loss_curve"):
                steps, losses = zip(*r["loss_curve"])
                ax.plot(steps, losses, label=labels[stack], **style)
            else:
                ax.plot([], [], label=f"{labels[stack]}: failed" if r.get("exit_code") else
                        f"{labels[stack]}: no loss logged", **style)
        ax.set_title(f"{result['shape']} {mode.upper()}: training loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    speed = "steady_tokens_per_s" if all(r.get("steady_tokens_per_s") for r in runs if not r.get("exit_code")) \
        else "tokens_per_s"
    panels = ((speed, f"tokens/s{' after the warm-up' if speed.startswith('steady') else ''} (higher is faster; "
               "ratio to hf on the bars)", "{:.0f}", "{:.2f}x"),
              ("peak_memory_gib", "peak memory GiB (ratio stack/hf on the bars)", "{:.2f}", "{:.2f}"))
    width = 0.8 / len(stacks)
    for p, (metric, title, value_fmt, ratio_fmt) in enumerate(panels):
        ax = fig.add_subplot(grid[1, p * len(modes):(p + 1) * len(modes)])
        top = max([r[metric] for r in runs if r.get(metric)] or [1.0])
        for m, mode in enumerate(modes):
            hf = (by.get((mode, "hf")) or {}).get(metric)
            for s, stack in enumerate(stacks):
                r = by.get((mode, stack))
                if r is None:
                    continue
                x, value = m + (s - (len(stacks) - 1) / 2) * width, r.get(metric)
                if r.get("exit_code") or not value:
                    ax.text(x, 0.02, "failed" if r.get("exit_code") else "n/a", transform=ax.get_xaxis_transform(),
                            rotation=90, ha="center", va="bottom", fontsize=8, color="tab:red")
                    continue
                ax.bar(x, value, width, color=colours[stack], label=labels[stack] if m == 0 else None)
                text = value_fmt.format(value)
                if hf and stack != "hf":
                    text += "\n" + ratio_fmt.format(value / hf)
                ax.text(x, value + top * 0.01, text, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(modes)), [m.upper() for m in modes])
        ax.set_xlim(-0.5, len(modes) - 0.5)
        ax.set_ylim(0, top * 1.45)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        if p == 0:
            ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

def markdown(result: dict, env: dict, command: str, png_name: str) -> str:
    def f(v, spec=".3f"):
        return "—" if v is None else format(v, spec)

    method = f" ({result['method'].upper()})" if result.get("method") else ""
    liger_loss = (f"the loss is Liger's own {LIGER_LOSSES[result['method']]} from `liger_kernel.chunked_loss`, set to "
                  "TRL's semantics, in the same TRL trainer subclass as ours, on the same hidden states, targets and "
                  "reference" if result.get("method") else "TRL keeps its chunked LM-head loss")
    lines = [
        f"# Training runs{method} — {env['device']} — {env['date']}",
        "",
        *incomplete_line(result, "runs"),
        f"- **Command:** `{command}`",
        f"- **Model:** `{result['shape']}` with random weights {result['shape_dims']} (vocab raised to the "
        "tokenizer's when smaller), LoRA r16 alpha 16 on all seven projections; QLoRA: bitsandbytes NF4, "
        "double quant.",
        f"- **Data:** the built-in synthetic skills, batch {result['batch']}"
        + (f" x {result['seq']} tokens (rows wrapped-packed into full sequences)" if result.get("seq")
           else f" preference pairs ({result['method'].upper()}, beta 0.1; `ours` computes its loss in "
                "fused_linear_preference, `liger` in Liger's fused linear loss, the others TRL's)"
           if result.get("method")
           else " (one short row per sequence)")
        + f", {result['steps']} steps, seed {result['seed']}, lr 2e-4 constant; every run in its own process, "
        "same run of this command.",
        f"- **Versions:** torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, transformers "
        f"{env['transformers']}, peft {env['peft']}, trl {env.get('trl')}, bitsandbytes {env.get('bitsandbytes')}",
        "- **Stacks:** `hf` is transformers + PEFT with `attn_implementation=\"sdpa\"` (PyTorch's flash "
        "backend on CUDA bf16, the \"HF + FA2\" baseline; flash-attn is not installed); `ours` adds "
        "`workbench.patch`; `-gc` turns on gradient checkpointing, `-offload` checkpointing with the layers' inputs "
        "in pinned host memory (`workbench.offload`); `liger` is HF + SDPA with Liger-Kernel's "
        f"RMSNorm/RoPE/SwiGLU applied by TRL's `use_liger_kernel` ({liger_loss}); "
        "`unsloth` is Unsloth's FastLanguageModel (its model, LoRA kernels and loss) in the same TRL loop, "
        "`unsloth-gc` with its offloaded checkpointing. With packing, Unsloth concatenates each batch into one "
        "padding-free row; by its source (2026.10.9), under wrapped packing each sequence keeps its own causal "
        "attention there, as in the other stacks.",
        "- **Same data:** every run records sums over the token ids and loss targets of its first "
        f"{FINGERPRINT_BATCHES} micro-batches (independent of how rows are laid out); `same data` says whether a "
        "stack's equal hf's.",
        *(["- **Not run:** " + "; ".join(f"`{k}` ({v})" for k, v in result["skipped_stacks"].items()) + "."]
          if result.get("skipped_stacks") else []),
        "",
        f"- **Speed:** `steady` columns time the steps after the warm-up (from step max(1, "
        f"{WARMUP_FRACTION:g} x steps), from the per-step log); `whole run` divides the training time, first steps "
        "included, by the steps. Ratios below use the steady numbers where both runs have them.",
        "",
        "- **Memory:** peak allocated by tensors (`torch.cuda.max_memory_allocated`) and peak reserved by the "
        "caching allocator (`max_memory_reserved`, what the device must have) over the whole training.",
        "",
    ]
    rows = []
    for r in result["runs"]:
        k = r.get("kernels") or {}
        ran = k.get("calls_in_training")
        if ran is not None:  # what ran during training; a patched module can still fall back per call
            swapped = ", ".join(f"{name} ×{n}" for name, n in ran.items()) or "none ran (every call fell back)"
        else:
            swapped = ", ".join(f"{name} ×{sum(per.values())} patched" for name, per in (k.get("swapped") or {}).items())
        if k.get("engine"):  # a peer's: what it is, and whose preference loss ran (bench/stacks.Liger)
            swapped = f"{k['engine']} {k.get('version', '')}".strip() + (f" (trl {r['trl']})" if r.get("trl") else "") \
                + (f", loss {k['loss'].rsplit('.', 1)[-1]}" if k.get("loss") else "")
        rows.append([r["mode"], r["label"], str(r["exit_code"]), str(r.get("steps", "—")),
                     f(r.get("steady_step_s"), ".4f"), f(r.get("steady_tokens_per_s"), ".0f"), f(r.get("step_s"), ".4f"),
                     f(r.get("peak_memory_gib"), ".2f"), f(r.get("peak_reserved_gib"), ".2f"),
                     f(r.get("final_loss"), ".4f"), swapped or r.get("error", "")])
    lines += table(["mode", "stack", "exit", "steps", "steady step s", "steady tokens/s", "whole-run step s",
                    "peak alloc. GiB", "peak reserved GiB", "final loss", "kernel calls in training"], rows,
                   align="llrrrrrrrrl")
    lines += ["", f"Each stack against `hf` (losses must agree within {LOSS_BAND:g} relative at every logged step; "
              "a stack outside that band is flagged, not celebrated). At step 1 the weights are the same in every "
              f"stack, so a step-1 difference above {FIRST_STEP_BAND:.2g} (bf16's unit roundoff) is not rounding:", ""]
    rows = []
    for c in result["comparisons"]:
        measure = "" if c.get("speed_measure", "steady") == "steady" else f" ({c['speed_measure']})"
        rows.append([c["mode"], c["stack"], str(c["steps_compared"]), f(c.get("first_rel_loss_diff"), ".2e"),
                     f(c["max_rel_loss_diff"], ".2e"), f(c["final_rel_loss_diff"], ".2e"),
                     {True: "yes", False: "**no**", None: "—"}[c.get("same_data")],
                     f"{f(c['speedup'], '.2f')}x{measure}", f(c["memory_ratio"], ".2f"), verdict(c)])
    lines += table(["mode", "stack", "steps compared", "step-1 rel. loss diff", "max rel. loss diff",
                    "final rel. loss diff", "same data", "speed (hf/stack step time)", "peak memory (stack/hf)", "loss"],
                   rows, align="llrrrrlrrl")
    lines += _loop_section(result)
    lines += _loop_profile_section(result)
    lines += ["", f"![loss curves]({png_name})", ""]
    return "\n".join(lines)


def _loop_section(result: dict) -> list[str]:
    """The TRL loop against the plain loop, per run that measured both (``--plain-loop``)."""
    runs = [r for r in result["runs"] if "plain_loop" in r]
    if not runs:
        return []
    p = runs[0]["plain_loop"]
    lines = ["", "### The TRL loop against the plain loop", "",
             "After each run, the step suite's plain loop (`workbench bench step`: `model(input_ids, labels)`, "
             "backward, AdamW step, `zero_grad`; no Trainer, no data loader) ran in its own process on the same "
             f"checkpoint and batch shape, autocast {p.get('autocast')} as the Trainer's precision; its s/step is "
             f"the median of {p.get('steps', '?')} steps after {p.get('warmup', '?')} of warm-up. Overhead = the TRL "
             "run's steady step time / the plain loop's − 1: what the Trainer adds per step (gradient clipping at "
             "max_grad_norm 1.0, a log every step that reads the loss and gradient norm, the LR schedule, the data "
             "loader and collator, the product's callbacks: the adapter snapshot and the loss log). The plain loop "
             "trains every token on random ids; the TRL run the completions of the built-in rows: the same "
             "matmuls.", ""]
    rows = []
    for r in runs:
        pl = r["plain_loop"]
        over = r.get("loop_overhead")
        rows.append([r["mode"], r["stack"], "—" if r.get("steady_step_s") is None else f"{r['steady_step_s']:.4f}",
                     pl.get("error", "").replace("|", "/") or f"{pl['step_s']:.4f}",
                     "—" if over is None else f"{100 * over:+.1f} %"])
    return lines + table(["mode", "stack", "TRL loop steady s/step", "plain loop s/step", "TRL loop overhead"], rows,
                         align="llrrr")


def _loop_profile_section(result: dict) -> list[str]:
    """Where the TRL loop's step goes, by phase, per run profiled (``--profile``)."""
    runs = [r for r in result["runs"] if "loop_profile" in r]
    if not runs:
        return []
    lines = ["", "### Where the TRL loop's step goes", "",
             f"After each run, the same run again in its own process, short, its steps {PROFILE_AFTER + 1} to "
             f"{PROFILE_AFTER + loop_profile.STEPS} under torch.profiler with each phase of the "
             "Trainer's loop in a named range (`workbench.bench.loop_profile`): per step, the host's time inside the "
             "phase and the GPU time of the kernels it launched. The forward, loss and backward are one phase; the "
             "rest is what the Trainer adds. The profiler lengthens a step, so compare phases with each other, and "
             "the steps with the timed ones above only roughly. GPU idle = the share of the profiled wall time no "
             "kernel ran; host outside phases = the loop's own bookkeeping. A phase that reads a value from the GPU "
             "(the log reads the loss and the gradient norm) waits there for the step's kernels: its host time holds "
             "that wait.", ""]
    done = [r for r in runs if "error" not in r["loop_profile"]]
    for r in runs:
        p = r["loop_profile"]
        if "error" in p:
            lines.append(f"- `{r['mode']}` / `{r['stack']}`: no profile ({p['error'].strip().splitlines()[-1][:200]})")
            continue
        gpu = "" if p.get("gpu_busy_ms_per_step") is None else \
            f", GPU busy {p['gpu_busy_ms_per_step']:.2f} ms (idle {100 * p['gpu_idle_share']:.1f} %)"
        lines.append(f"- `{r['mode']}` / `{r['stack']}`: {p['wall_ms_per_step']:.2f} ms a profiled step{gpu}, "
                     f"host outside phases {p['outside_phases_ms_per_step']:.2f} ms; trace "
                     f"[{p['trace']}]({p['trace']}), summary [{p['summary']}]({p['summary']})")
    if not done:
        return lines
    order = list(dict.fromkeys(phase for phase, _ in loop_profile.PHASES))
    seen = {ph["phase"] for r in done for ph in r["loop_profile"]["phases"]}
    order += sorted(seen - set(order))
    cuda = any(r["loop_profile"].get("gpu_busy_ms_per_step") is not None for r in done)
    head = ["phase"]
    for r in done:
        head += [f"{r['mode']} {r['stack']}: host ms"] + ([f"{r['mode']} {r['stack']}: GPU ms"] if cuda else [])
    rows = []
    for phase in (ph for ph in order if ph in seen):
        row = [phase]
        for r in done:
            got = next((ph for ph in r["loop_profile"]["phases"] if ph["phase"] == phase), None)
            row.append("—" if got is None else f"{got['host_ms_per_step']:.2f}")
            if cuda:
                row.append("—" if got is None or got["gpu_ms_per_step"] is None else f"{got['gpu_ms_per_step']:.2f}")
        rows.append(row)
    return lines + [""] + table(head, rows, align="l" + "r" * (len(head) - 1))

