"""Preference training: our fused DPO / ORPO loss against TRL's own, on a tiny Llama.

Model level (the tolerance doctrine of kernels/_tolerance.py, applied to a whole model as in
test_model_parity.py), for one batch of the built-in preference data:

  exact     TRL's loss in float64: the same weights upcast, the logits materialised, TRL's
            own code where it runs in fp64 (ORPO's concatenated_forward, selective_log_softmax)
            and TRL's formula written out from its source where TRL's code leaves fp64 (its
            chunked log-prob head and ORPO's odds_ratio_loss compute in fp32);
  baseline  TRL's trainer computing its loss in fp32 (DPOTrainer._compute_loss through TRL's
            fused head; ORPOTrainer.get_batch_loss_metrics through HF's logits): "PyTorch's
            own error";
  kernel    fused_linear_preference on the model's last hidden state and lm_head, in fp32.

Compared: the loss, dW of the lm_head, and the gradient of the last hidden state (the final
norm's output). Nothing is widened: FACTOR x the baseline's error plus the fp32 floor.

Trainer level: make_preference_trainer's fused DPO / ORPO trainers train (the loss falls), and
their per-step losses follow TRL's unmodified trainers on the same model, seed and data.

Recipe level: `workbench train` with training.method dpo / orpo on the built-in default, with
our kernels (the backbone's and the fused loss) and without (TRL's own loss), follows the same
per-step losses, writes the adapter, the loss log and the preference rows.
Everything runs on the CPU in fp32, the kernel in Triton's interpreter.
"""
import copy
import json
import math

import pytest
import torch

from workbench.offline import enforce_offline

enforce_offline()

import peft  # noqa: E402
import transformers  # noqa: E402
from trl import DPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import log1mexp  # noqa: E402
from trl.trainer.utils import selective_log_softmax  # noqa: E402

from workbench import preference, synthetic  # noqa: E402
from workbench import tokenizer as wtok  # noqa: E402
from workbench.families import tiny_config  # noqa: E402
from workbench.kernels._tolerance import compare  # noqa: E402
from workbench.kernels.fused_linear_preference import (  # noqa: E402
    fused_linear_preference,
    fused_linear_sequence_logps,
)

BETA = 0.5
PAIRS = 4
#: Weight std: HF's default (0.02) gives near-uniform softmaxes on a 64-wide model (see test_model_parity).
INIT_STD = 0.1
#: The policy moved away from the reference whose log-probs were precomputed, so that the DPO
#: log-ratios (0 at the first step) and the sigmoid's gradient are not trivial.
POLICY_NOISE = 0.02


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tok():
    return wtok.default_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return synthetic.build_preference(train_rows=PAIRS)["train"]


def _llama(tok, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=len(tok), initializer_range=INIT_STD))


def _lora(model):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))


class _LastHidden:
    """Keeps the final norm's output (the last hidden state) of each forward, with its gradient."""

    def __init__(self, model):
        self.seen = []
        model.model.norm.register_forward_hook(self._keep)

    def _keep(self, module, args, out):
        if out.requires_grad:
            out.retain_grad()
        self.seen.append(out)

    def grad(self):
        (out,) = self.seen  # exactly one forward per version
        return out.grad


def _run(model, loss_of):
    """(loss, dW of the lm_head, d last hidden state) of ``loss_of(model)`` on a fresh pass."""
    hook = _LastHidden(model)
    model.zero_grad(set_to_none=True)
    loss = loss_of(model)
    loss.backward()
    return loss.detach(), model.lm_head.weight.grad.detach().clone(), hook.grad().detach().clone()


def _judge(kernel, baseline, exact):
    failures = []
    for name, k, b, e in zip(("loss", "grad:lm_head", "grad:last_hidden"), kernel, baseline, exact):
        c = compare(name, k, b, e, torch.float32)
        # TRL's fp32 loss is its fp64 twin up to fp32 roundoff: the exact pass computes what TRL
        # computes (a formula that drifted from TRL's would show here, not as a loose bound).
        assert c.baseline_rel < 1e-5, f"the exact pass does not compute TRL's {name}: {c.line()}"
        if not c.ok:
            failures.append(c.line())
    assert not failures, "\n".join(failures)


def _dpo_exact(model64, batch):
    """TRL 1.16 DPOTrainer._compute_loss, loss_type 'sigmoid', in float64 from materialised
    logits (TRL's fused head computes in fp32): summed completion log-probs, minus the
    precomputed reference's, -logsigmoid(beta * (chosen - rejected)), mean over the pairs."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    hidden = model64.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model64.lm_head(hidden[:, :-1])
    mask = labels != -100
    logps = (selective_log_softmax(logits, labels.clamp(min=0)) * mask).sum(1)
    chosen, rejected = logps.chunk(2)
    delta = (chosen - batch["ref_chosen_logps"].double()) - (rejected - batch["ref_rejected_logps"].double())
    return -torch.nn.functional.logsigmoid(BETA * delta).mean()


def test_dpo_loss_and_gradients_match_trl(tok, rows, tmp_path):
    model = _llama(tok)
    # A full fine-tune (the lm_head's gradient is compared), so TRL precomputes the reference
    # log-probs (it would otherwise load a reference model from the hub).
    trl = preference.make_preference_trainer(model, tok, rows, method="dpo", beta=BETA, output_dir=str(tmp_path),
                                             fused=False, precompute_ref_log_probs=True)
    assert type(trl) is DPOTrainer
    batch = trl.data_collator([trl.train_dataset[i] for i in range(PAIRS)])
    assert set(batch) >= {"input_ids", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * POLICY_NOISE)
    model64 = copy.deepcopy(model).double()

    baseline = _run(model, lambda m: trl._compute_loss(m, batch, return_outputs=False))
    exact = _run(model64, lambda m: _dpo_exact(m, batch))

    def ours(m):
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
        hidden = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return fused_linear_preference(hidden[:, :-1], m.lm_head.weight, labels, batch["ref_chosen_logps"],
                                       batch["ref_rejected_logps"], method="dpo", beta=BETA).loss

    kernel = _run(model, ours)
    assert not math.isclose(float(exact[0]), math.log(2.0), rel_tol=1e-3)  # the policy moved: not the first step
    _judge(kernel, baseline, exact)


def _orpo_exact(trl, model64, batch):
    """TRL's ORPOTrainer in float64: its own concatenated_forward (materialised logits, average
    completion log-probs, the chosen NLL over prompt and completion), then odds_ratio_loss's
    formula written out (the method itself casts the log-probs to fp32)."""
    chosen, rejected, _, _, nll = ORPOTrainer.concatenated_forward(trl, model64, batch)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return nll - (BETA * torch.nn.functional.logsigmoid(log_odds)).mean()


def test_orpo_loss_and_gradients_match_trl(tok, rows, tmp_path):
    model = _llama(tok)
    trl = preference.make_preference_trainer(model, tok, rows, method="orpo", beta=BETA, output_dir=str(tmp_path),
                                             fused=False, max_length=64)
    assert type(trl) is ORPOTrainer
    batch = trl.data_collator([trl.train_dataset[i] for i in range(PAIRS)])
    model64 = copy.deepcopy(model).double()

    baseline = _run(model, lambda m: trl.get_batch_loss_metrics(m, batch)[0])
    exact = _run(model64, lambda m: _orpo_exact(trl, m, batch))

    def ours(m):
        cat = trl.concatenated_inputs(batch, padding_value=trl.padding_value)
        ids, mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
        hidden = m.model(input_ids=ids, attention_mask=mask).last_hidden_state
        nll_labels = torch.where(mask == 1, ids, -100)[:, 1:]
        return fused_linear_preference(hidden[:, :-1], m.lm_head.weight, cat["concatenated_labels"][:, 1:],
                                       nll_labels=nll_labels, method="orpo", beta=BETA).loss

    kernel = _run(model, ours)
    _judge(kernel, baseline, exact)


def test_sequence_logps_are_the_dpo_logps():
    # The reference log-probs (fused_linear_sequence_logps) and the policy's (inside the loss)
    # must be one computation: at the first DPO step their ratios are exactly 0.
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 7, 16, generator=gen)
    weight = torch.randn(50, 16, generator=gen) / 4
    labels = torch.randint(0, 50, (4, 7), generator=gen)
    labels[:, :3] = -100
    labels[1] = -100  # one sequence with nothing scored: its sum is 0
    sums = fused_linear_sequence_logps(hidden, weight, labels, chunk_size=3)
    out = fused_linear_preference(hidden, weight, labels, sums[:2], sums[2:], beta=BETA, chunk_size=3)
    assert torch.equal(torch.cat([out.chosen_logps, out.rejected_logps]), sums)
    assert sums[1] == 0 and bool((sums[[0, 2, 3]] < 0).all())
    assert out.loss.item() == pytest.approx(math.log(2.0), rel=1e-7)


# --------------------------------------------------------------------------- trainers
STEPS = 6
#: Per-step agreement of the fused and TRL's losses: ~170 fp32 roundoffs. The two sum the same
#: fp32 terms in other orders, and six SGD steps carry those differences along (SGD, not Adam,
#: whose first steps take lr * sign(g) and would turn a roundoff in a near-zero gradient into a
#: whole step); a lost term (beta, a mask, a sign) moves the loss by far more.
BAND = 1e-5


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_fused_trainer_trains_and_follows_trl(method, tok, rows, tmp_path):
    runs = {}
    for fused in (True, False):
        model = _lora(_llama(tok))
        trainer = preference.make_preference_trainer(
            model, tok, rows, method=method, beta=BETA, output_dir=str(tmp_path / str(fused)), fused=fused,
            max_steps=STEPS, per_device_train_batch_size=PAIRS, learning_rate=0.5, optim="sgd",
            lr_scheduler_type="constant", logging_steps=1, seed=0, **({"max_length": 64} if method == "orpo" else {}))
        if fused:
            assert trainer.fused_loss_problem() is None
        trainer.train()
        runs[fused] = trainer
    ours, theirs = _losses(runs[True]), _losses(runs[False])
    assert len(ours) == len(theirs) == STEPS
    assert all(math.isfinite(v) for v in ours)
    assert ours[-1] < 0.9 * ours[0], ours  # it trains: the same batch every step, the loss falls
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert a == pytest.approx(b, rel=BAND), f"step {step + 1}: fused {a} vs TRL {b}"
    # The fused path ran (it never forms logits, so it logs no logits metrics; TRL's does).
    logs = [h for h in runs[True].state.log_history if "loss" in h]
    trl_logs = [h for h in runs[False].state.log_history if "loss" in h]
    assert all("logits/chosen" not in h for h in logs) and all("logits/chosen" in h for h in trl_logs)
    assert all("rewards/margins" in h for h in logs)
    if method == "dpo":
        assert logs[0]["loss"] == pytest.approx(math.log(2.0), rel=1e-7)  # fresh adapter: policy == reference


def test_unsupported_settings_keep_trls_loss(tok, rows, tmp_path):
    trainer = preference.make_preference_trainer(_lora(_llama(tok)), tok, rows, method="dpo", loss_type=["ipo"],
                                                 output_dir=str(tmp_path), max_steps=1)
    assert "loss_type" in trainer.fused_loss_problem()
    with pytest.raises(ValueError, match="method must be one of"):
        preference.make_preference_trainer(None, tok, rows, method="kto", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="label_smoothing"):
        preference.make_preference_trainer(None, tok, rows, method="orpo", label_smoothing=0.1,
                                           output_dir=str(tmp_path))


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_loss_given_to_the_fused_trainer_replaces_ours(method, tok, rows, tmp_path):
    # The seam (make_preference_trainer's ``loss``): every loss call goes to the given function
    # with the batch ours would get; here a function that runs ours, so the losses are ours exactly.
    seen = []

    def recorded(batch):
        seen.append(batch)
        return preference.fused_preference_loss(batch)

    losses = {}
    for given in (recorded, None):
        trainer = preference.make_preference_trainer(
            _lora(_llama(tok)), tok, rows, method=method, beta=BETA, output_dir=str(tmp_path / str(bool(given))),
            loss=given, max_steps=2, per_device_train_batch_size=PAIRS, learning_rate=0.5, optim="sgd",
            lr_scheduler_type="constant", logging_steps=1, seed=0, **({"max_length": 64} if method == "orpo" else {}))
        assert trainer.preference_loss is (given or preference.fused_preference_loss)
        trainer.train()
        losses[given is None] = _losses(trainer)
    assert losses[False] == losses[True] and len(seen) == 2
    for batch in seen:
        assert batch.method == method and batch.beta == BETA and batch.softcap is None
        assert batch.hidden.shape[:2] == batch.labels.shape and batch.weight.shape[1] == batch.hidden.shape[2]
        assert batch.hidden.shape[0] == 2 * PAIRS and batch.hidden.requires_grad
        if method == "dpo":
            assert batch.nll_labels is None and not batch.reference.precomputed
            hidden, weight = batch.reference.hidden()   # the reference pass: no gradient
            assert hidden.shape == batch.hidden.shape and not hidden.requires_grad and weight is not None
        else:
            assert batch.reference is None and batch.nll_labels.shape == batch.labels.shape
            # ORPO's NLL scores the prompt too: more targets than the log-odds' completions
            assert int((batch.nll_labels != -100).sum()) > int((batch.labels != -100).sum())


def test_a_given_loss_never_falls_back_to_trls(tok, rows, tmp_path):
    # Where the fused path cannot run, ours gives way to TRL's loss; a given loss stops training
    # instead (TRL's loss would run under its name), and needs the fused trainers.
    from workbench.errors import UserError

    def given(batch):
        raise AssertionError("not reached")

    trainer = preference.make_preference_trainer(_lora(_llama(tok)), tok, rows, method="dpo", loss=given,
                                                 loss_type=["ipo"], output_dir=str(tmp_path), max_steps=1)
    with pytest.raises(UserError, match=r"the preference loss given cannot run here \(loss_type \['ipo'\]"):
        trainer.train()
    with pytest.raises(ValueError, match="fused=True"):
        preference.make_preference_trainer(None, tok, rows, method="dpo", loss=given, fused=False,
                                           output_dir=str(tmp_path))


def test_fused_dpo_on_a_model_running_our_kernels(tok, rows, tmp_path):
    # workbench.patch's kernels in the backbone (norms, RoPE, the LoRA projections and MLP),
    # the fused preference loss on top: what `workbench train` runs with kernels on.
    from workbench.patch import kernel_calls, patch_model

    steps = 2
    losses = {}
    for patched in (True, False):
        model = _lora(_llama(tok))
        if patched:
            patch_model(model)
            before = kernel_calls()
        trainer = preference.make_preference_trainer(
            model, tok, rows, method="dpo", beta=BETA, output_dir=str(tmp_path / str(patched)), fused=patched,
            max_steps=steps, per_device_train_batch_size=PAIRS, learning_rate=0.5, optim="sgd",
            lr_scheduler_type="constant", logging_steps=1, seed=0)
        trainer.train()
        losses[patched] = _losses(trainer)
        if patched:
            ran = {k: v - before.get(k, 0) for k, v in kernel_calls().items()}
            assert all(ran.get(k, 0) > 0 for k in ("rms_norm", "rope", "lora_qkv", "lora_o", "lora_mlp")), ran
    for step, (a, b) in enumerate(zip(losses[True], losses[False])):
        assert a == pytest.approx(b, rel=BAND), f"step {step + 1}: patched and fused {a} vs TRL {b}"


def test_fused_precomputed_reference_logps_match_trls(tok, rows, tmp_path, monkeypatch):
    # precompute_ref_log_probs runs compute_ref_log_probs over the dataset in the trainer's
    # __init__: the fused trainer's come from fused_linear_sequence_logps, TRL's from its head.
    # Summed log-probs of a few tokens each: they agree to fp32 roundoff.
    from workbench.kernels import fused_linear_preference as kernel

    calls = []
    forward = kernel._TokenLogps.forward
    monkeypatch.setattr(kernel._TokenLogps, "forward", staticmethod(lambda *a: calls.append(1) or forward(*a)))
    refs = {}
    for fused in (True, False):
        calls.clear()
        trainer = preference.make_preference_trainer(_llama(tok), tok, rows, method="dpo", beta=BETA, fused=fused,
                                                     output_dir=str(tmp_path / str(fused)),
                                                     precompute_ref_log_probs=True)
        assert bool(calls) == fused  # the kernel computed the fused trainer's, and only those
        data = trainer.train_dataset
        refs[fused] = torch.tensor([data["ref_chosen_logps"], data["ref_rejected_logps"]], dtype=torch.float64)
    assert bool((refs[True] < 0).all())
    torch.testing.assert_close(refs[True], refs[False], rtol=BAND, atol=0.0)


# --------------------------------------------------------------------------- `workbench train`
#: The built-in default, shrunk: 3 steps of 2 pairs from 16 built-in rows, in fp32, no warm-up
#: (every step after the first moves the adapter), no held-out generation.
TRAIN = ["training.max_steps=3", "training.batch_size=2", "training.logging_steps=1", "training.warmup_ratio=0",
         "eval.max_rows=0", "data.builtin_rows=16", "model.dtype=float32"]


def _workbench_train(run, *sets) -> list[dict]:
    from workbench.cli import main

    assert main(["train", "--run", str(run), *[a for kv in (*TRAIN, *sets) for a in ("--set", kv)]]) == 0
    return [json.loads(line) for line in (run / "train" / "loss.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_workbench_train_with_our_kernels_follows_trls_own_loss(method, tmp_path):
    # The recipe's optimizer is AdamW, not the SGD of the trainer-level test: its first steps
    # take about lr * sign(g), so a roundoff that flips a near-zero gradient element moves that
    # element by a whole step; but the loss moves by that element's gradient times the step, to
    # first order, so over 3 steps the losses stay within BAND (measured: 3e-7 at most, for both
    # methods). A lost term (beta, a mask, the reference) moves them by percents.
    from workbench import manifest

    runs = {}
    for kernels in ("true", "false"):
        run = tmp_path / kernels
        losses = _workbench_train(run, f"training.method={method}", f"kernels={kernels}")
        rec = manifest.require_stage(run, "train", "")
        assert manifest.verify_outputs(run, "train") == []
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        assert [r["step"] for r in losses] == [1, 2, 3] and rec["steps"] == 3
        assert rec["method"] == method and rec["beta"] == 0.1
        train_rows = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines()]
        test_rows = [json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()]
        assert {"prompt", "chosen", "rejected"} <= train_rows[0].keys()
        assert all(r["completion"] == r["chosen"] and r["chosen"] != r["rejected"] for r in test_rows)
        runs[kernels] = [r["loss"] for r in losses], rec
    (ours, rec), (theirs, trl_rec) = runs["true"], runs["false"]
    # One fused loss a step (no accumulation), and the backbone's kernels ran; TRL's run ran none.
    calls = rec["kernels"]["calls_in_training"]
    assert calls["fused_linear_preference"] == 3 and {"rms_norm", "rope", "lora_qkv", "lora_mlp"} <= calls.keys()
    assert trl_rec["kernels"] is None
    if method == "dpo":
        # A fresh adapter is its own reference (the base, the adapter disabled): log 2 at step 1.
        assert ours[0] == pytest.approx(math.log(2.0), rel=1e-7)
        assert all(abs(v - math.log(2.0)) > 1e-3 for v in ours[1:]), ours  # then the policy moved
    assert len(set(ours)) == 3, ours
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert a == pytest.approx(b, rel=BAND), f"step {step + 1}: ours {a} vs TRL's {b}"


def test_workbench_train_takes_the_users_preference_rows(tmp_path):
    # Plain strings (TRL's standard preference format) become chat messages; with no data.test,
    # a seeded tenth is held out, each held-out row's chosen reply its expected answer.
    rows = [{"prompt": f"What is {i} plus 2?", "chosen": str(i + 2), "rejected": str(i + 3)} for i in range(20)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    losses = _workbench_train(run, "training.method=dpo", "kernels=false", f"data.train={data}")
    assert [r["step"] for r in losses] == [1, 2, 3]
    train_rows = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines()]
    test_rows = [json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()]
    assert len(train_rows) == 18 and len(test_rows) == 2
    row = next(r for r in train_rows if r["prompt"][0]["content"] == "What is 0 plus 2?")
    assert row["chosen"] == [{"role": "assistant", "content": "2"}] and row["rejected"][0]["content"] == "3"
    assert row["prompt"] == [{"role": "user", "content": "What is 0 plus 2?"}] and row["answer"] == "2"
    assert all(r["completion"] == r["chosen"] and r["answer"] == r["chosen"][0]["content"] for r in test_rows)


def test_gradient_checkpointing_in_dpo_recomputes_the_policys_forward_alone(tok, rows, tmp_path, count_forwards):
    # Per step: the policy's forward and the reference's (no_grad, checkpointing off in TRL's
    # reference pass); with checkpointing, the policy's again in the backward. Same losses.
    from workbench import config, default, models, trainer as trainer_mod

    calls, losses = {}, {}
    for on in (False, True):
        cfg = config.load(None, [*TRAIN, "training.method=dpo", "kernels=false",
                                 f"training.gradient_checkpointing={str(on).lower()}"])
        model = default.build_model(tok)
        torch.manual_seed(0)
        model = models.attach_lora(cfg, model)
        mlp = model.base_model.model.model.layers[0].mlp
        count = count_forwards(mlp)
        trainer = trainer_mod.make_trainer(cfg, model, tok, rows, str(tmp_path / str(on)))
        trainer.train()
        calls[on], losses[on] = len(count), _losses(trainer)
    assert calls == {False: 2 * 3, True: 3 * 3}
    assert losses[True] == pytest.approx(losses[False], rel=BAND)
