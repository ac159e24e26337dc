"""The RMSNorm and RoPE kernels under autocast: they run where HF's code computes
what they compute, and only there.

The finding (H200, Llama-3.2-1B shape, QLoRA through PEFT's
``prepare_model_for_kbit_training`` and TRL's SFTTrainer with ``bf16=True``): of our
kernels only lora_o, nf4_dequant and the fused loss ran. prepare_model_for_kbit_training
casts every parameter that is not 4-bit to fp32, so the residual stream (and RoPE's
cos/sin tables, built in its dtype) is fp32 under bf16 autocast, and the per-call
check refused every tensor not in autocast's dtype: rms_norm and rope never ran.
An fp32 model under bf16 autocast did the same.

Why they may run (workbench/patch.py: ``_norm_dtypes``, ``_rope_dtype``): autocast
changes nothing in HF's code for these modules. RMSNorm upcasts its input to fp32
before its only autocast-listed ops (pow, rsqrt: CUDA's fp32 list, a no-op on fp32);
its mean/add/mul/casts and RoPE's mul/add/neg/cat are on no autocast list (CPU or
CUDA). What is left is PyTorch's type promotion between the input and the weight
(norm) or the tables (RoPE), which the patch reproduces where a kernel call can:

* RMSNorm, input and weight of one dtype: the kernel as without autocast.
* Gemma's RMSNorm (fp32 math whatever the weight's dtype, one rounding to the input's):
  the kernel on the fp32 upcasts, rounded to the input's dtype (Gemma-2's post-norms
  on autocast's bf16 outputs with fp32 weights).
* Llama's RMSNorm (``w * x_hat.to(x.dtype)``): only where x's dtype is the promoted
  one. A bf16 x with an fp32 weight -- Qwen3's q_norm/k_norm on autocast's bf16 q/k --
  gives fp32 products of bf16-rounded x_hat, which no kernel call gives: HF's code runs.
* RoPE: q in promote(q, cos, sin), k in promote(k, cos, sin); where those agree the
  kernel runs on the exact upcasts (fp32 tables and bf16 q/k: HF and the kernel
  rotate in fp32 and return fp32); where they differ (q and k of two dtypes with
  bf16 tables) HF returns two dtypes and its code runs.

Judged by the tolerance doctrine (kernels/_tolerance.py, parity/README.md): every
compared tensor against the fp64 truth, with HF's own error in the same setting as the
yardstick (FACTOR 4 plus 2 roundoffs of the compared tensor's dtype, plus 16 fp32 ones).
Whole models are judged at bf16's roundoff, the precision autocast computes in (as
tests/test_model_parity.py's autocast test); the modules alone at the dtype of each
returned tensor, so an fp32 result from bf16 inputs is held to fp32's roundoff.
"""
import contextlib
import importlib
import itertools
import logging

import pytest
import torch

from workbench.offline import enforce_offline

enforce_offline()

import peft  # noqa: E402
import transformers  # noqa: E402

from test_model_parity import (B_STD, DEVICE, INIT_STD, VOCAB, _lora_config,  # noqa: E402
                               _randomise_b, build, judge, make_batch, three_way)
from workbench import patch as patch_module  # noqa: E402
from workbench.families import FAMILIES, family, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
from workbench.kernels._harness import compare_delta  # noqa: E402
from workbench.kernels._tolerance import compare  # noqa: E402
from workbench.kernels.rms_norm import rms_norm  # noqa: E402
from workbench.patch import kernel_calls, patch_model, unpatch_model  # noqa: E402

AUTOCAST = torch.bfloat16
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
#: Norms that stay HF's in an fp32 (or QLoRA) model under bf16 autocast: Qwen3's q/k
#: norms take autocast's bf16 q/k projections with fp32 weights (Llama casting).
HF_NORMS = {"qwen3": ("q_norm", "k_norm")}


def autocast():
    return torch.autocast(DEVICE.type, dtype=AUTOCAST)


def _norms(hf_model, family_name: str) -> tuple[list[str], list[str]]:
    """(every RMSNorm module's name, those expected to stay HF's under autocast)."""
    cls = family(family_name).norm
    names = [n for n, m in hf_model.named_modules() if type(m).__name__ == cls]
    kept = [n for n in names if n.rsplit(".", 1)[-1] in HF_NORMS.get(family_name, ())]
    return names, kept


# --------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_fp32_model_under_bf16_autocast_runs_norm_and_rope(family_name):
    """An fp32 model with an fp32 LoRA adapter, trained under bf16 autocast: every
    norm (but Qwen3's q/k norms) and every RoPE goes through the kernels, and the
    loss, logits and LoRA gradients keep to the doctrine at bf16."""
    model = build(family_name, seed=20).to(torch.float32)
    hf_model = model.get_base_model()
    norms, kept = _norms(hf_model, family_name)
    inputs, labels = make_batch(20)
    kernel, baseline, exact, ran = three_way(model, inputs, labels, autocast)

    # run() makes two forwards (labelled + backward, then logits): each norm and RoPE once in each.
    assert ran.get("rms_norm") == 2 * (len(norms) - len(kept)), ran
    assert ran.get("rope") == 2 * hf_model.config.num_hidden_layers, ran
    assert ran.get("fused_linear_cross_entropy") == 1, ran
    assert baseline["logits"].dtype == kernel["logits"].dtype == AUTOCAST
    bad = judge(f"fp32 {family_name} under bf16 autocast", kernel, baseline, exact, AUTOCAST)
    assert not bad, "\n".join(bad)


def _qlora_trainer_pair(tmp_path, seed: int = 30, family_name: str = "llama"):
    """QLoRA as workbench.train builds it for TRL's SFTTrainer: a bf16 checkpoint loaded as
    bitsandbytes NF4 (double quantization, bf16 compute), prepare_model_for_kbit_training
    (every other parameter to fp32), an fp32 LoRA adapter (PEFT's default); and the fp64
    dense model holding exactly its values (the 4-bit weights dequantized)."""
    import bitsandbytes.functional as bnbf

    from workbench.models import keep_portable_4bit_layout

    torch.manual_seed(seed)
    # intermediate 192: bitsandbytes' CPU dequantize_4bit needs in_features % 64 == 0
    # (tests/test_model_parity.py::_qlora_pair).
    config = tiny_config(family_name, vocab_size=VOCAB, initializer_range=INIT_STD, intermediate_size=192)
    cls = getattr(transformers, family(family_name).causal_lm)
    dense = cls(config)
    dense.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=AUTOCAST)
    qmodel = cls.from_pretrained(
        tmp_path / "base", quantization_config=quant, dtype=AUTOCAST,
        device_map={"": DEVICE.index or 0} if DEVICE.type == "cuda" else {"": "cpu"})
    keep_portable_4bit_layout(qmodel)
    qmodel = peft.prepare_model_for_kbit_training(qmodel, use_gradient_checkpointing=False)
    qmodel = peft.get_peft_model(qmodel, _lora_config())
    _randomise_b(qmodel, seed + 1)
    dtypes = {p.dtype for p in qmodel.parameters() if not hasattr(p, "quant_state")}
    assert dtypes == {torch.float32}, dtypes  # what the Trainer's autocast then meets

    exact = peft.get_peft_model(dense, _lora_config()).to(DEVICE)
    qparams = dict(qmodel.named_parameters())
    with torch.no_grad():
        for name, p in exact.named_parameters():
            q = qparams[name]
            if hasattr(q, "quant_state"):
                p.data = bnbf.dequantize_4bit(q.data, q.quant_state).to(p.device, torch.float32)
            else:
                p.data = q.data.to(torch.float32)
    return qmodel, exact.double()


@pytest.mark.parametrize("family_name", ["llama", "qwen2"], ids=["llama", "qwen2-qkv-bias"])
def test_qlora_under_bf16_autocast_runs_every_kernel(tmp_path, monkeypatch, caplog, family_name):
    """The H200 finding's setup, mirrored on the CPU: every norm and every RoPE runs
    through the kernels (the fp32 residual stream; q/k are fp32 too, as bitsandbytes
    returns its input's dtype), and so do the fused LoRA QKV and MLP groups on the fp32
    norm outputs (the kernels' mixed mode, workbench.patch._mixed_dtype: GEMMs in bf16,
    the base and LoRA terms summed in fp32 and returned in fp32, as bitsandbytes and
    PEFT do). The step keeps to the doctrine at bf16 against the fp64 dense model, and
    nothing is bypassed."""
    pytest.importorskip("bitsandbytes")
    qmodel, exact_model = _qlora_trainer_pair(tmp_path, family_name=family_name)
    hf_model = qmodel.get_base_model()
    norms, _ = _norms(hf_model, family_name)
    layers = hf_model.config.num_hidden_layers
    if family_name == "qwen2":  # its q/k/v carry a bias, which bitsandbytes adds in its compute dtype
        assert hf_model.model.layers[0].self_attn.q_proj.bias is not None
    inputs, labels = make_batch(30)
    monkeypatch.setattr(patch_module, "_WARNED", set())  # warnings go once per process: afresh for this test
    with caplog.at_level(logging.WARNING, logger="workbench.patch"):
        kernel, baseline, exact, ran = three_way(qmodel, inputs, labels, autocast, exact_model=exact_model)

    assert ran.get("rms_norm") == 2 * len(norms), ran
    assert ran.get("rope") == 2 * layers, ran
    assert ran.get("lora_qkv") == ran.get("lora_mlp") == ran.get("lora_o") == 2 * layers, ran
    assert ran.get("nf4_dequant") == 2 * 7 * layers and ran.get("fused_linear_cross_entropy") == 1, ran
    bad = judge("qlora under bf16 autocast", kernel, baseline, exact, AUTOCAST)
    assert not bad, "\n".join(bad)
    bypass = [r.getMessage() for r in caplog.records if "bypassed" in r.getMessage()]
    assert not bypass, bypass


#: The LoRA term of a first-step-sized adapter against the trained-size one of
#: _randomise_b: B after its first optimizer steps (PEFT inits it at 0, Adam's first
#: update moves it by about lr). The term then sits below half a bf16 ulp of the base
#: output, where a bf16 sum loses it and PEFT's fp32 sum keeps it.
FIRST_STEP_B = 2.0**-10


def _set_b(model, on: tuple[str, ...], seed: int) -> None:
    """lora_B of the projections named in ``on``: random at FIRST_STEP_B of the trained
    size (the same values for every call with this seed); every other lora_B: 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                b = torch.randn(p.shape, generator=gen) * (B_STD * FIRST_STEP_B)  # fp32: exact in either model
                p.copy_(b if any(f".{proj}." in name for proj in on) else torch.zeros_like(b))


def _first_layer_outputs(model, inputs, names: tuple[str, ...], who: str) -> dict:
    """Outputs of the first decoder layer's modules ``names`` (e.g. self_attn.q_proj) in
    one forward, in fp64: ``who`` is "kernel" (patched, under autocast), "baseline"
    (HF/PEFT under autocast) or "exact" (the fp64 dense model, no autocast)."""
    layer = model.get_base_model().model.layers[0]
    got = {}

    def keep(name, out):
        assert out.dtype == (torch.float64 if who == "exact" else torch.float32), (name, out.dtype)
        got[name] = out.detach().double()

    hooks = [layer.get_submodule(n).register_forward_hook(lambda _m, _a, out, n=n: keep(n, out)) for n in names]
    if who == "kernel":
        patch_model(model)
    try:
        with torch.no_grad(), (autocast() if who != "exact" else contextlib.nullcontext()):
            model(**inputs)
    finally:
        if who == "kernel":
            unpatch_model(model)
        for h in hooks:
            h.remove()
    return got


@pytest.mark.parametrize(("on", "outputs"), [
    (("q_proj", "k_proj", "v_proj"), ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    (("down_proj",), ("mlp",)),
], ids=["lora_qkv", "lora_mlp-down"])
def test_qlora_keeps_an_adapters_first_update(tmp_path, on, outputs):
    """The regression of d1d0b5d (H200, 2026-11-30): the fused LoRA kernels on QLoRA's
    fp32 norm outputs summed the 4-bit base's product and the LoRA term in bf16, where
    PEFT sums them in fp32, and an adapter's first small updates were rounded away (the
    1B QLoRA loss 1.2e-2 off HF's after one step). The whole-model loss cannot show it
    on a tiny model (HF's own bf16 noise downstream hides it), so this looks where the
    sum happens: the first layer's q/k/v projections (lora_qkv) and MLP output
    (lora_mlp, only down_proj's adapter on, so that its input is the same with and
    without it), whose inputs do not depend on the adapter. The change a first-step-
    sized adapter makes there (its outputs minus those with B = 0) must match the fp64
    dense model's change as closely as PEFT's own does: the doctrine on the change,
    with the outputs' fp32 floor at the outputs' scale (kernels/_harness.py ``_deltas``).
    A bf16 sum loses ~100 % of the change; PEFT's fp32 sum about one bf16 roundoff."""
    pytest.importorskip("bitsandbytes")
    qmodel, exact_model = _qlora_trainer_pair(tmp_path)
    inputs, _ = make_batch(32)
    runs = {}
    for sign in ("on", "off"):
        for m in (qmodel, exact_model):
            _set_b(m, on if sign == "on" else (), seed=33)
        before = kernel_calls()
        runs[sign] = {who: _first_layer_outputs(exact_model if who == "exact" else qmodel, inputs, outputs, who)
                      for who in ("kernel", "baseline", "exact")}
        ran = {k: n - before.get(k, 0) for k, n in kernel_calls().items() if n > before.get(k, 0)}
        assert ran.get("lora_qkv") and ran.get("lora_mlp"), ran  # the fused groups ran, not PEFT's code
    bad = []
    real = inputs["attention_mask"].bool().to(DEVICE)  # pads' attention rows are empty (NaN in the fp64 model)
    for name in outputs:
        full, ablated = ([runs[sign][who][name][real] for who in ("kernel", "baseline", "exact")]
                         for sign in ("on", "off"))
        y, d = full[2], full[2] - ablated[2]
        assert d.norm() < 2.0**-9 * y.norm()  # the change sits below half a bf16 ulp of the output
        # Judged as the parity harness judges its delta: comparisons; the outputs are fp32, as
        # bitsandbytes returns them (and PEFT's sum): their floor is fp32's.
        c = compare_delta(f"delta:{name}", full, ablated, AUTOCAST, torch.float32)
        if not c.ok:
            bad.append(c.line())
    assert not bad, "\n".join(bad)


def test_qlora_with_another_compute_dtype_stays_hf_and_says_why(tmp_path, monkeypatch, caplog):
    """A 4-bit base computing in fp16 under bf16 autocast: bitsandbytes casts x to fp16
    for the base while autocast runs the adapter in bf16, which no kernel call
    computes, so the LoRA groups take PEFT's code, and the warning names the setting
    that would let them run (not "load the model in bf16": a QLoRA user did)."""
    pytest.importorskip("bitsandbytes")
    qmodel, _ = _qlora_trainer_pair(tmp_path)
    for module in qmodel.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "compute_dtype"):
            module.compute_dtype = torch.float16
    inputs, labels = make_batch(31)
    monkeypatch.setattr(patch_module, "_WARNED", set())
    before = kernel_calls()
    patch_model(qmodel)
    try:
        with caplog.at_level(logging.WARNING, logger="workbench.patch"), autocast():
            qmodel(**inputs, labels=labels).loss.backward()
    finally:
        unpatch_model(qmodel)
    ran = {k: n - before.get(k, 0) for k, n in kernel_calls().items() if n > before.get(k, 0)}
    assert "lora_qkv" not in ran and "lora_mlp" not in ran, ran
    bypass = [r.getMessage() for r in caplog.records if "bypassed under torch.autocast" in r.getMessage()]
    assert bypass, "no warning for the LoRA kernels that autocast kept out"
    for message in bypass:
        assert "bnb_4bit_compute_dtype" in message and "load the model in" not in message, message


# --------------------------------------------------------------------------- RMSNorm, every dtype pair
def _norm_runs(casting: str, x_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
    """Where HF's RMSNorm returns what a kernel call returns (workbench.patch._norm_dtypes)."""
    if x_dtype == w_dtype or casting == "gemma":
        return True
    return torch.promote_types(x_dtype, w_dtype) == x_dtype  # llama: x_hat rounds to x's dtype


def _norm_exact(x_dtype: torch.dtype, eps: float, offset: float, casting: str):
    """HF's RMSNorm in fp64 but for the rounding it means: Llama casting rounds x_hat to
    the input's dtype (as the kernel's own reference does, kernels/rms_norm.py)."""
    def forward(x64, w64):
        h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
        if casting == "llama":
            h = h.to(x_dtype).double()
        return (w64 + offset) * h

    return forward


def _norm_step(forward, x, weight, grad_out):
    """Output and gradients (x, weight) of ``forward(x, weight)``, with upstream ``grad_out``."""
    x = x.detach().requires_grad_()
    weight.grad = None
    y = forward(x, weight)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), x.grad, weight.grad.clone()


@pytest.mark.parametrize("family_name", ["llama", "gemma"], ids=["llama-casting", "gemma-casting"])
def test_norm_runs_exactly_where_hf_computes_the_same(family_name):
    """Every (input, weight) dtype pair of fp32/bf16/fp16, with and without bf16
    autocast: HF's RMSNorm returns the same bits either way (autocast-neutral); where
    the rule says a kernel call returns what HF's code does, the kernel runs and keeps
    to the doctrine at the dtype of each returned tensor (output, dx, dw); elsewhere
    HF's code runs (bit for bit), and the nearest kernel calls would not have matched:
    in x's dtype the wrong dtype, in HF's wider one the error of the x_hat rounding
    it skips, far beyond the doctrine's bound."""
    fam = family(family_name)
    torch.manual_seed(40)
    model = getattr(transformers, fam.causal_lm)(tiny_config(family_name, vocab_size=VOCAB)).to(DEVICE)
    patch_model(model, rope=False, mlp=False, loss=False, lora=False)
    try:
        norm = model.model.norm
        eps, offset = float(getattr(norm, fam.norm_eps_attr)), fam.norm_offset
        gen = torch.Generator().manual_seed(41)
        w_values = torch.randn(norm.weight.shape, generator=gen) * 0.5 + (1.0 - offset)
        x_values = torch.randn((2, 5, norm.weight.shape[0]), generator=gen) * 3.0
        g_values = torch.randn(x_values.shape, generator=gen).to(DEVICE)
        checked = {True: 0, False: 0}

        def hf(x, w):
            return type(norm).forward(norm, x)

        def patched(x, w):
            return norm(x)

        for x_dtype, w_dtype in itertools.product((FP32, BF16, FP16), repeat=2):
            with torch.no_grad():
                norm.weight.data = w_values.to(DEVICE, w_dtype)
            x = x_values.to(DEVICE, x_dtype)
            reference = _norm_step(hf, x, norm.weight, g_values)
            out_dtype = reference[0].dtype
            grad_out = g_values.to(out_dtype)
            exact = _norm_step(_norm_exact(x_dtype, eps, offset, fam.norm_casting), x.double(),
                               norm.weight.detach().double().requires_grad_(), grad_out.double())
            expect = _norm_runs(fam.norm_casting, x_dtype, w_dtype)
            for autocast_on in (False, True):
                tag = f"{family_name} x {x_dtype} w {w_dtype}{' autocast' if autocast_on else ''}"
                with torch.autocast(DEVICE.type, dtype=AUTOCAST, enabled=autocast_on):
                    baseline = _norm_step(hf, x, norm.weight, grad_out)
                    before = kernel_calls().get("rms_norm", 0)
                    ours = _norm_step(patched, x, norm.weight, grad_out)
                    ran = kernel_calls().get("rms_norm", 0) - before
                # HF's RMSNorm is autocast-neutral: the same bits with autocast on as off.
                assert all(torch.equal(a, b) for a, b in zip(baseline, reference)), tag
                assert ran == int(expect), f"{tag}: the kernel {'did not run' if expect else 'ran'}"
                assert [t.dtype for t in ours] == [t.dtype for t in baseline], tag
                if expect:
                    results = [compare(f"{tag} {name}", o, b, e, o.dtype)
                               for name, o, b, e in zip(("y", "dx", "dw"), ours, baseline, exact)]
                    bad = [r.line() for r in results if not r.ok]
                    assert not bad, "\n".join(bad)
                else:
                    assert all(torch.equal(a, b) for a, b in zip(ours, baseline)), f"{tag}: not HF's code"
                checked[expect] += 1
            if not expect:
                # HF: fp32 (the promoted dtype) products of x_hat rounded to x's dtype.
                w = norm.weight.detach()
                narrow = rms_norm(x, w.to(x_dtype), eps=eps, offset=offset, casting=fam.norm_casting)
                assert narrow.dtype != out_dtype, tag
                wide = rms_norm(x.to(out_dtype), w.to(out_dtype), eps=eps, offset=offset, casting=fam.norm_casting)
                verdict = compare("wide", wide, reference[0], exact[0], out_dtype)
                assert not verdict.ok, f"{tag}: {verdict.line()}"
        # llama casting: the 3 one-dtype pairs and the 2 with an fp32 input run; gemma: all 9.
        assert checked == ({True: 10, False: 8} if family_name == "llama" else {True: 18, False: 0}), checked
    finally:
        unpatch_model(model)


# --------------------------------------------------------------------------- RoPE, every dtype triple
def _rope_capture(module):
    """Wrap the modeling module's apply_rotary_pos_emb (the patch's dispatcher) to record
    each call's inputs and outputs: (records, HF's own function, restore)."""
    dispatcher = module.apply_rotary_pos_emb
    records = []

    def recorder(q, k, cos, sin, *args, **kwargs):
        out = dispatcher(q, k, cos, sin, *args, **kwargs)
        records.append(((q, k, cos, sin), out))
        return out

    module.apply_rotary_pos_emb = recorder

    def restore():
        module.apply_rotary_pos_emb = dispatcher

    return records, dispatcher.__wrapped__, restore


def _rope_grads(out, inputs, upstream):
    return torch.autograd.grad(list(out), inputs, [u.to(o.dtype) for o, u in zip(out, upstream)])


def test_rope_runs_exactly_where_hf_computes_the_same():
    """Every (q, k, tables) dtype triple of bf16/fp32 at a patched attention under bf16
    autocast (q and k cast by hooks on their projections): where HF returns q and k in
    one dtype the kernel runs, returns that dtype and keeps to the doctrine at it
    (fp32 tables with autocast's bf16 q/k: judged at fp32's roundoff), for the rotated
    q/k and their gradients; where HF returns two dtypes its code runs, bit for bit."""
    fam = family("llama")
    module = importlib.import_module(fam.module)
    torch.manual_seed(50)
    model = transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=VOCAB, initializer_range=INIT_STD))
    model = model.to(DEVICE)
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(51)
    hidden = torch.randn((2, 6, model.config.hidden_size), generator=gen).to(DEVICE)
    position_ids = torch.arange(6, device=DEVICE).expand(2, 6)
    runs = 0
    patch_model(model, rms_norm=False, mlp=False, loss=False, lora=False)
    records, original, restore = _rope_capture(module)
    try:
        for q_dtype, k_dtype, table_dtype in itertools.product((BF16, FP32), repeat=3):
            tag = f"q {q_dtype} k {k_dtype} tables {table_dtype}"
            hooks = [attn.q_proj.register_forward_hook(lambda m, i, o, d=q_dtype: o.to(d)),
                     attn.k_proj.register_forward_hook(lambda m, i, o, d=k_dtype: o.to(d))]
            cos, sin = model.model.rotary_emb(hidden.to(table_dtype), position_ids)
            records.clear()
            before = kernel_calls().get("rope", 0)
            try:
                with autocast():
                    attn(hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=None)
            finally:
                for h in hooks:
                    h.remove()
            ran = kernel_calls().get("rope", 0) - before
            (q, k, c, s), ours = records[-1]
            assert (q.dtype, k.dtype, c.dtype) == (q_dtype, k_dtype, table_dtype), tag
            with autocast():
                baseline = original(q, k, c, s)
            # Upstream gradients in the dtype of HF's outputs, the same values for all three.
            upstream = [torch.randn(t.shape, generator=gen).to(DEVICE, t.dtype) for t in baseline]
            q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
            exact = original(q64, k64, c.double(), s.double())
            expect = baseline[0].dtype == baseline[1].dtype
            assert ran == int(expect), f"{tag}: the kernel {'did not run' if expect else 'ran'}"
            assert [t.dtype for t in ours] == [t.dtype for t in baseline], tag
            ours_g = _rope_grads(ours, (q, k), upstream)
            base_g = _rope_grads(baseline, (q, k), upstream)
            exact_g = _rope_grads(exact, (q64, k64), upstream)
            if expect:
                runs += 1
                pairs = zip(("q_out", "k_out", "dq", "dk"), (*ours, *ours_g), (*baseline, *base_g),
                            (*exact, *exact_g))
                results = [compare(f"{tag} {name}", o, b, e, o.dtype) for name, o, b, e in pairs]
                bad = [r.line() for r in results if not r.ok]
                assert not bad, "\n".join(bad)
            else:
                assert all(torch.equal(a, b) for a, b in zip((*ours, *ours_g), (*baseline, *base_g))), tag
        # HF returns two dtypes only for q and k of two dtypes with bf16 tables.
        assert runs == 6, runs
    finally:
        restore()
        unpatch_model(model)

