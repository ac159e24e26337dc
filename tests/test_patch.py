"""The patcher's mechanics (workbench/patch.py): exact undo, the report, idempotence,
errors, the fused loss's memory claim and clean fallbacks. The numbers of a patched
model against HF's are tests/test_model_parity.py's business."""
import contextlib
import copy
import importlib
import json
from collections import Counter

import pytest
import torch

from workbench.offline import enforce_offline

enforce_offline()

import peft  # noqa: E402
import transformers  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import workbench  # noqa: E402
from workbench.errors import UserError  # noqa: E402
from workbench.families import FAMILIES, GLU_ACTIVATIONS, family, tiny_config  # noqa: E402
from workbench.kernels import fused_linear_cross_entropy as flce  # noqa: E402
from workbench.patch import (OPTIONS, PatchReport, kernel_calls, options_from_config,  # noqa: E402
                             patch_model, unpatch_model)

#: Where the kernels run: the GPU when there is one, else the CPU under the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ALL_PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 320
ONLY_LORA = dict(rms_norm=False, rope=False, mlp=False, loss=False)


@pytest.fixture(autouse=True)
def _no_dead_patched_models():
    """A patched model that an earlier test in this worker dropped without unpatching
    (e.g. the model-parity loss curve) sits in a reference cycle (its bound forwards)
    until the cyclic GC runs; collecting now runs its finalizer, which gives the RoPE
    global back, so each test starts from the original module functions."""
    import gc

    gc.collect()
    yield


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def plain(name="llama", seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(name, vocab_size=VOCAB, initializer_range=0.1, **overrides)
    return getattr(transformers, family(name).causal_lm)(config).to(DEVICE)


def with_lora(name="llama", targets=ALL_PROJS, seed=0, **lora_kw):
    model = peft.get_peft_model(plain(name, seed), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                                   **lora_kw))
    with torch.no_grad():  # a trained adapter: PEFT's zero B would make LoRA a no-op
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def batch(seq=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE)}, labels.to(DEVICE)


def outputs(model, inputs, labels):
    """(loss, logits without labels, LoRA grads): what must be bit-identical after unpatching."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        logits = model(**inputs).logits
    return out.loss.detach(), logits, grads


def assert_same_outputs(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][n], b[2][n]) for n in a[2])


def snapshot(model):
    """Everything patching may touch: each module's own attributes (incl. an instance
    forward) and every parameter's identity, storage and value."""
    modules = {path: (id(m), type(m), dict(m.__dict__)) for path, m in model.named_modules()}
    params = {n: (id(p), p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    return modules, params, list(model.state_dict())


def hooks(model):
    """Every module's forward hooks (the patch adds a pair to the transformers model)."""
    return [(path, list(m._forward_pre_hooks.values()), list(m._forward_hooks.values()),
             dict(m._forward_hooks_always_called)) for path, m in model.named_modules()]


def assert_same_snapshot(a, b):
    assert a[0].keys() == b[0].keys()
    for path in a[0]:
        (ida, ta, da), (idb, tb, db) = a[0][path], b[0][path]
        assert ida == idb and ta is tb, path
        assert da.keys() == db.keys(), (path, set(da) ^ set(db))
        assert all(da[k] is db[k] for k in da), path  # same objects: forwards, submodule dicts, configs
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        assert a[1][n][:2] == b[1][n][:2] and torch.equal(a[1][n][2], b[1][n][2]), n
    assert a[2] == b[2]


# --------------------------------------------------------------------------- exact undo
def test_unpatch_restores_the_model_exactly():
    model = with_lora()
    mlp = model.get_base_model().model.layers[0].mlp
    # A forward that another library installed on an instance earlier must come back as is.
    foreign = type(mlp).forward.__get__(mlp)
    mlp.forward = foreign
    rope_module = importlib.import_module(family("llama").module)
    rope_fn = rope_module.apply_rotary_pos_emb
    inputs, labels = batch()
    before_snapshot, before_hooks = snapshot(model), hooks(model)
    before = outputs(model, inputs, labels)

    calls = kernel_calls()
    patch_model(model, fuse_add_norm=True)  # every swap there is, the decoder layers' too
    # While patched: the same Parameter objects, the same state_dict, and the kernels live.
    assert [id(p) for p in model.parameters()] == [v[0] for v in before_snapshot[1].values()]
    assert list(model.state_dict()) == before_snapshot[2]
    assert rope_module.apply_rotary_pos_emb is not rope_fn
    patched = outputs(model, inputs, labels)
    assert kernel_calls().get("lora_mlp", 0) > calls.get("lora_mlp", 0)
    assert kernel_calls().get("add_rms_norm", 0) > calls.get("add_rms_norm", 0)
    assert patched[0].isfinite()
    assert hooks(model) != before_hooks

    assert unpatch_model(model) is True
    assert hooks(model) == before_hooks
    assert mlp.__dict__["forward"] is foreign
    assert rope_module.apply_rotary_pos_emb is rope_fn
    assert_same_snapshot(before_snapshot, snapshot(model))
    assert_same_outputs(before, outputs(model, inputs, labels))
    assert unpatch_model(model) is False  # nothing left to undo


def test_unpatch_refuses_when_a_forward_was_wrapped_after_patching():
    model = plain()
    patch_model(model)
    norm = model.model.norm
    patched_forward = norm.forward
    norm.forward = lambda x: patched_forward(x)  # e.g. a hook library wrapping the patched forward
    with pytest.raises(UserError, match="replaced after patching"):
        unpatch_model(model)
    # Nothing was undone half-way: every other swap is still installed.
    assert "forward" in model.model.layers[0].input_layernorm.__dict__
    norm.forward = patched_forward  # the wrapper removed: now it unpatches
    assert unpatch_model(model) is True
    assert "forward" not in model.model.layers[0].input_layernorm.__dict__


# --------------------------------------------------------------------------- the report
def expected_swaps(name: str, lora: bool, fuse_add_norm: bool = False) -> dict:
    """What a full patch swaps in a tiny ``name`` model, from its config and the family table."""
    fam, config = family(name), tiny_config(name)
    layers = config.num_hidden_layers
    swaps = {"rms_norm": {fam.norm: layers * fam.norms_per_layer + 1},  # + the final norm
             "rope": {fam.attention: layers},
             "fused_linear_cross_entropy": {fam.causal_lm: 1}}
    if fam.decoder_layer and fuse_add_norm:  # the residual add and post_attention_layernorm fused
        swaps["add_rms_norm"] = {fam.decoder_layer: layers}
    if lora:
        swaps.update({"lora_qkv": {fam.attention: layers}, "lora_mlp": {fam.mlp: layers},
                      "lora_o": {fam.o_proj: layers}})
    else:
        swaps[GLU_ACTIVATIONS[getattr(config, fam.activation_key)][0]] = {fam.mlp: layers}
    return swaps


@pytest.mark.parametrize("name", list(FAMILIES))
def test_report_lists_every_swap_by_module_type(name):
    model = plain(name)
    report = patch_model(model)
    try:
        assert isinstance(report, PatchReport) and report.family == name
        assert report.swapped == expected_swaps(name, lora=False)
        assert report.fallbacks == []
        json.dumps(report.to_dict())  # goes into the run manifest as is
    finally:
        unpatch_model(model)
    report = patch_model(model, fuse_add_norm=True)
    try:
        assert report.swapped == expected_swaps(name, lora=False, fuse_add_norm=True)
        assert report.fallbacks == [] and report.to_dict()["options"]["fuse_add_norm"] is True
    finally:
        unpatch_model(model)


def test_report_of_a_peft_model_and_of_switched_off_kernels():
    model = with_lora()
    report = patch_model(model)
    assert report.swapped == expected_swaps("llama", lora=True) and report.fallbacks == []
    assert report.count("lora_o") == 2 and "swiglu" not in report.swapped  # inside lora_mlp
    assert str(report).splitlines()[0] == "kernels patched into a llama model:"
    unpatch_model(model)

    report = patch_model(model, rms_norm=False, loss=False, lora=False)
    assert set(report.swapped) == {"rope", "swiglu"}
    unpatch_model(model)
    assert patch_model(model, **dict.fromkeys(OPTIONS, False)).swapped == {}
    unpatch_model(model)


def test_partial_lora_fallback_is_reported():
    """PEFT's default llama targets and a half-adapted MLP: the groups fall back, with
    the reason, and the adapted projections run alone through lora_o."""
    model = with_lora(targets=["q_proj", "v_proj", "o_proj", "gate_proj"])
    report = patch_model(model)
    try:
        layers = model.get_base_model().config.num_hidden_layers
        assert report.swapped["lora_o"] == {"q_proj": layers, "v_proj": layers, "o_proj": layers,
                                            "gate_proj": layers}
        assert "lora_qkv" not in report.swapped and "lora_mlp" not in report.swapped
        assert report.swapped["swiglu"] == {"LlamaMLP": layers}
        reasons = {(f.kernel, f.reason) for f in report.fallbacks}
        assert reasons == {("lora_qkv", "k_proj has no LoRA adapter"),
                           ("lora_mlp", "up_proj, down_proj have no LoRA adapter")}
        assert len(report.fallbacks) == 2 * layers
        assert all(str(f).startswith("model.layers.") for f in report.fallbacks)  # paths in the HF model
    finally:
        unpatch_model(model)


def test_unsupported_peft_features_fall_back_cleanly():
    """DoRA: reported, nothing LoRA-related swapped, and PEFT's own code runs (bit-identical)."""
    model = with_lora(use_dora=True)
    inputs, labels = batch()
    reference = outputs(model, inputs, labels)
    report = patch_model(model, **ONLY_LORA)
    try:
        assert report.swapped == {}
        # (lora_mlp needs the MLP switch: with mlp=False the MLP's projections go alone, as lora_o.)
        assert {f.kernel for f in report.fallbacks} == {"lora_qkv", "lora_o"}
        assert all("DoRA" in f.reason for f in report.fallbacks)
        assert_same_outputs(reference, outputs(model, inputs, labels))
    finally:
        unpatch_model(model)


def test_disabled_adapter_takes_peft_path():
    model = with_lora()
    inputs, labels = batch()

    def base_outputs():  # without the adapter nothing trains: loss and logits only
        with model.disable_adapter(), torch.no_grad():
            return model(**inputs, labels=labels).loss, model(**inputs).logits

    reference = base_outputs()
    patch_model(model, **ONLY_LORA)
    try:
        before = kernel_calls()
        got = base_outputs()
        assert kernel_calls() == before  # no LoRA kernel ran for the disabled adapter
        assert torch.equal(reference[0], got[0]) and torch.equal(reference[1], got[1])
        model(**inputs)  # enabled again: the kernels run
        assert kernel_calls().get("lora_qkv", 0) > before.get("lora_qkv", 0)
    finally:
        unpatch_model(model)


def test_nf4_switch_off_is_reported(tmp_path):
    """(A report only, nothing runs: the 4-bit model stays on the CPU.)"""
    plain().save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float32)
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32,
                                                         device_map={"": "cpu"})
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"]))
    report = patch_model(model, nf4=False)
    try:
        assert "lora_o" not in report.swapped and "nf4_dequant" not in report.swapped
        assert [f.reason for f in report.fallbacks] == ["the base is 4-bit and nf4=False"] * 2
    finally:
        unpatch_model(model)
    report = patch_model(model)
    assert report.swapped["nf4_dequant"] == {"Linear4bit": 2} and report.fallbacks == []
    unpatch_model(model)


def test_lora_dropout_reaches_the_kernels_in_training_only(monkeypatch):
    """PEFT's lora_dropout p goes to the kernels (which draw the masks) in train mode,
    and 0 in eval mode, as nn.Dropout does."""
    import workbench.patch as patch_module

    seen = []
    for name in ("lora_qkv", "lora_o", "lora_mlp"):
        kernel = getattr(patch_module, name)
        monkeypatch.setattr(patch_module, name,
                            lambda *a, _k=kernel, _n=name, **kw: seen.append((_n, kw["dropout"])) or _k(*a, **kw))
    model = with_lora(lora_dropout=0.25)
    inputs, _ = batch()
    patch_model(model, rms_norm=False, rope=False, loss=False)
    try:
        model.train()
        with torch.no_grad():
            model(**inputs)
        assert {n for n, _ in seen} == {"lora_qkv", "lora_o", "lora_mlp"} and {p for _, p in seen} == {0.25}
        seen.clear()
        model.eval()
        with torch.no_grad():
            model(**inputs)
        assert seen and {p for _, p in seen} == {0.0}
    finally:
        unpatch_model(model)


def test_generation_runs_through_the_patched_model():
    """generate() (KV cache, logits_to_keep=1, no labels): same greedy tokens as HF's code."""
    model = with_lora()
    model.eval()
    inputs, _ = batch()
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    reference = model.generate(**inputs, **kwargs)
    before = kernel_calls()
    patch_model(model, fuse_add_norm=True)
    try:
        assert torch.equal(model.generate(**inputs, **kwargs), reference)
        assert kernel_calls().get("rope", 0) > before.get("rope", 0)
        assert kernel_calls().get("add_rms_norm", 0) > before.get("add_rms_norm", 0)  # the cache goes through it
    finally:
        unpatch_model(model)


# --------------------------------------------------------------------------- the fused decoder layer
def _ran_since(before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in kernel_calls().items() if v > before.get(k, 0)}


def test_fused_layer_keeps_hfs_recorded_outputs():
    """output_attentions / output_hidden_states: transformers records them with hooks on the
    attention and the layer, which the fused layer's module calls keep (same shapes, values
    within fp32 roundoff of HF's: the add and the norm are one kernel, not bit-identical)."""
    model = plain("llama")
    model.eval()
    inputs, _ = batch()
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True, output_hidden_states=True)
        patch_model(model, rope=False, mlp=False, loss=False, lora=False, fuse_add_norm=True)
        try:
            before = kernel_calls()
            got = model(**inputs, output_attentions=True, output_hidden_states=True)
            assert _ran_since(before).get("add_rms_norm") == model.config.num_hidden_layers
        finally:
            unpatch_model(model)
    for name in ("attentions", "hidden_states"):
        ref, out = getattr(reference, name), getattr(got, name)
        assert ref is not None and len(out) == len(ref), name
        for a, b in zip(ref, out):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert torch.allclose(reference.logits, got.logits, rtol=1e-5, atol=1e-5)


def test_fused_layer_leaves_hooked_norms_and_checkpointed_calls_to_hf():
    model = plain("llama")
    inputs, labels = batch()
    patch_model(model, rope=False, mlp=False, loss=False, lora=False, fuse_add_norm=True)
    layers = model.config.num_hidden_layers
    try:
        # A hook on a post_attention_layernorm would be skipped by the fused call: that layer runs HF's forward.
        seen = []
        handle = model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda *a: seen.append(1))
        before = kernel_calls()
        with torch.no_grad():
            model(**inputs)
        handle.remove()
        assert seen == [1] and _ran_since(before).get("add_rms_norm") == layers - 1
        # Gradient checkpointing lives in the layer class's forward wrapper: checkpointed calls run HF's forward
        # (the norms still through rms_norm), and the recompute happens.
        model.gradient_checkpointing_enable()
        model.train()
        before = kernel_calls()
        model(**inputs, labels=labels).loss.backward()
        ran = _ran_since(before)
        # every norm once, and the layers' two again in the recompute
        assert "add_rms_norm" not in ran and ran.get("rms_norm") == (2 * layers + 1) + 2 * layers, ran
        with torch.no_grad():  # no backward to replay: HF does not checkpoint, the fused layer runs
            before = kernel_calls()
            model(**inputs)
            assert _ran_since(before).get("add_rms_norm") == layers
    finally:
        unpatch_model(model)


def test_a_layer_forward_other_than_llamas_is_reported_and_left_alone():
    """The fused layer reproduces Llama's layer forward; a layer whose installed forward is
    anything else (another transformers version, a subclass) keeps it."""
    class ScaledLayer(transformers.models.llama.modeling_llama.LlamaDecoderLayer):
        def forward(self, hidden_states, **kwargs):
            return 0.5 * super().forward(hidden_states, **kwargs)

    model = plain("llama")
    config = model.config
    model.model.layers[1] = ScaledLayer(config, 1).to(DEVICE)
    report = patch_model(model, rope=False, mlp=False, loss=False, lora=False, fuse_add_norm=True)
    try:
        assert report.swapped["add_rms_norm"] == {"LlamaDecoderLayer": 1}
        assert [(f.module, f.kernel) for f in report.fallbacks] == [("model.layers.1", "add_rms_norm")]
        assert "not Llama's" in report.fallbacks[0].reason
        assert "forward" not in model.model.layers[1].__dict__
    finally:
        unpatch_model(model)
    # Off (the default), the layers are not even looked at: no swap, and no fallback to report.
    report = patch_model(model, rope=False, mlp=False, loss=False, lora=False)
    try:
        assert "add_rms_norm" not in report.swapped and report.fallbacks == []
    finally:
        unpatch_model(model)


def test_default_patch_leaves_the_decoder_layer_forward_to_hf():
    """fuse_add_norm is off by default (it measured no faster step at the 1B LoRA shape): each
    decoder layer keeps HF's forward, and its post_attention_layernorm runs alone through rms_norm."""
    model = plain("llama")
    layers = model.config.num_hidden_layers
    inputs, labels = batch()
    report = patch_model(model)
    try:
        assert report.options["fuse_add_norm"] is False and report.to_dict()["options"]["fuse_add_norm"] is False
        assert "add_rms_norm" not in report.swapped
        assert not any(f.kernel == "add_rms_norm" for f in report.fallbacks)
        for layer in model.model.layers:
            assert "forward" not in layer.__dict__ and layer.forward.__func__ is type(layer).forward
        before = kernel_calls()
        model(**inputs, labels=labels).loss.backward()
        ran = _ran_since(before)
        assert "add_rms_norm" not in ran and ran.get("rms_norm") == 2 * layers + 1, ran  # every norm, once
    finally:
        unpatch_model(model)


# --------------------------------------------------------------------------- errors and idempotence
def test_unsupported_architecture_names_the_supported_ones():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UserError) as err:
        patch_model(model)
    message = str(err.value)
    assert "'gpt2'" in message and all(name in message for name in FAMILIES)
    assert not any("forward" in m.__dict__ for m in model.modules())  # untouched


def test_patching_twice_is_a_no_op_and_other_options_are_refused():
    model = with_lora()
    first = patch_model(model)
    forwards = {p: m.__dict__.get("forward") for p, m in model.named_modules()}
    assert patch_model(model) is first
    assert patch_model(model.get_base_model()) is first  # the same model under its PEFT wrapper
    assert {p: m.__dict__.get("forward") for p, m in model.named_modules()} == forwards
    with pytest.raises(UserError, match="already patched"):
        patch_model(model, loss=False)
    with pytest.raises(UserError, match="already patched"):
        patch_model(model, fuse_add_norm=True)
    unpatch_model(model)


def test_bad_options_are_user_errors():
    model = plain()
    with pytest.raises(UserError, match="rms_norm must be true or false"):
        patch_model(model, rms_norm="yes")
    with pytest.raises(UserError, match="fuse_add_norm must be true or false"):
        patch_model(model, fuse_add_norm=1)
    with pytest.raises(UserError, match="needs a torch model"):
        patch_model("llama")


def test_fuse_add_norm_without_rms_norm_is_refused():
    """The fused add runs inside the swapped post_attention_layernorm: without rms_norm there is
    none, so the pair is refused in one sentence, and nothing is patched."""
    model = plain()
    with pytest.raises(UserError) as err:
        patch_model(model, rms_norm=False, fuse_add_norm=True)
    message = str(err.value)
    assert "fuse_add_norm=True needs rms_norm=True" in message and message.count(". ") == 0
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert unpatch_model(model) is False


def test_kernels_config_switch():
    assert options_from_config(None) is None and options_from_config(False) is None
    # numerics as PEFT's, and the decoder layer HF's, unless asked
    every = {**dict.fromkeys(OPTIONS, True), "fuse_add_norm": False, "adapter_as_autocast": False}
    assert options_from_config(True) == every
    assert options_from_config({"loss": False}) == {**every, "loss": False}
    assert options_from_config({"adapter_as_autocast": True}) == {**every, "adapter_as_autocast": True}
    assert options_from_config({"fuse_add_norm": True}) == {**every, "fuse_add_norm": True}
    assert options_from_config({"rms_norm": False, "fuse_add_norm": False}) == {**every, "rms_norm": False}
    with pytest.raises(UserError, match="adapter_as_autocast must be true or false"):
        options_from_config({"adapter_as_autocast": "bf16"})
    with pytest.raises(UserError, match="fuse_add_norm must be true or false"):
        options_from_config({"fuse_add_norm": "yes"})
    with pytest.raises(UserError, match="kernels: fuse_add_norm needs rms_norm"):
        options_from_config({"rms_norm": False, "fuse_add_norm": True})
    with pytest.raises(UserError, match="unknown switch.*fuse_add_norm"):  # the message names the switches
        options_from_config({"flash": True})
    with pytest.raises(UserError, match="must be true or false"):
        options_from_config({"rope": "on"})
    with pytest.raises(UserError, match="must be true, false or a mapping"):
        options_from_config("all")


def test_fuse_add_norm_through_a_run_config():
    """A run's ``kernels:`` mapping reaches patch_model (workbench.models, as workbench train
    applies it): off unless the config turns it on, and refused without rms_norm."""
    from workbench import config, models

    default = models.kernels_enabled(config.load(None, ["kernels=true"]))
    asked = models.kernels_enabled(config.load(None, ["kernels={fuse_add_norm: true}"]))
    assert default["fuse_add_norm"] is False and asked == {**default, "fuse_add_norm": True}
    model = plain()
    report = models.apply_kernels(model, default)
    assert "add_rms_norm" not in report["swapped"] and report["options"]["fuse_add_norm"] is False
    unpatch_model(model)
    report = models.apply_kernels(model, asked)
    try:
        assert report["swapped"]["add_rms_norm"] == {"LlamaDecoderLayer": model.config.num_hidden_layers}
        assert report["options"]["fuse_add_norm"] is True
    finally:
        unpatch_model(model)
    with pytest.raises(UserError, match="kernels: fuse_add_norm needs rms_norm"):
        models.kernels_enabled(config.load(None, ["kernels={rms_norm: false, fuse_add_norm: true}"]))


def test_package_level_entry_points():
    model = plain()
    report = workbench.patch(model)
    assert isinstance(report, PatchReport)
    assert workbench.unpatch(model) is True


# --------------------------------------------------------------------------- sharing and copies
def test_other_models_keep_hf_code_and_the_rope_global_goes_back_last():
    rope_module = importlib.import_module(family("llama").module)
    original = rope_module.apply_rotary_pos_emb
    a, b = plain(seed=1), plain(seed=2)
    inputs, labels = batch()
    b_before = outputs(b, inputs, labels)
    patch_model(a)
    assert_same_outputs(b_before, outputs(b, inputs, labels))  # b runs HF's code, bit for bit
    patch_model(b)
    unpatch_model(a)
    assert rope_module.apply_rotary_pos_emb is not original  # b still needs the dispatcher
    unpatch_model(b)
    assert rope_module.apply_rotary_pos_emb is original


def test_a_patched_model_that_dies_unpatched_gives_the_rope_global_back():
    import gc

    rope_module = importlib.import_module(family("llama").module)
    original = rope_module.apply_rotary_pos_emb
    keep, drop = plain(seed=1), plain(seed=2)
    patch_model(keep)
    patch_model(drop)
    del drop
    gc.collect()
    assert rope_module.apply_rotary_pos_emb is not original  # `keep` is alive and patched
    del keep
    gc.collect()
    assert rope_module.apply_rotary_pos_emb is original


def test_deepcopy_of_a_patched_model_patches_the_copy():
    model = with_lora()
    patch_model(model)
    twin = copy.deepcopy(model)
    pairs = list(zip(model.modules(), twin.modules()))
    swapped = [(m, t) for m, t in pairs if "forward" in m.__dict__]
    assert swapped and all(t.forward.__self__ is t for _, t in swapped)
    # the copy's adapters are cast in blocks of its own layers, and unpatching it leaves the original's hooks
    blocks = twin.get_base_model().__dict__["_workbench_patched"].blocks
    assert blocks and {id(m) for b in blocks for m in b} <= {id(t) for t in twin.modules()}
    original_hooks = hooks(model)
    assert unpatch_model(twin) is True
    assert hooks(model) == original_hooks and hooks(twin) != original_hooks
    assert all("forward" in m.__dict__ for m, _ in swapped)  # the original is still patched
    unpatch_model(model)


# --------------------------------------------------------------------------- the fused loss
class _LargestVocabTensor(TorchDispatchMode):
    """Records the largest tensor with a vocab-sized last dim that any op allocates
    (outputs sharing an input's storage -- views such as the lm_head weight's
    transpose, in-place and out= results -- are not allocations)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab
                    and t.untyped_storage().data_ptr() not in inputs):
                self.largest = max(self.largest, t.numel())
        return out


def test_fused_loss_never_materialises_the_logits(monkeypatch):
    """With labels, no tensor of the full [tokens, vocab] logits' size exists, forward
    or backward: the loss runs in chunks of rows. The kernel's default chunk has at
    least MIN_CHUNK_ROWS rows (2048), more than the interpreter can afford here, so
    the test lowers it; the same probe sees HF's full logits in the unpatched model."""
    monkeypatch.setattr(flce, "MIN_CHUNK_ROWS", 8)
    model = with_lora()
    inputs, labels = batch(seq=24)
    tokens = inputs["input_ids"].numel()
    chunk = flce.default_chunk_size(tokens, model.config.hidden_size, VOCAB, 4)
    assert chunk < tokens
    head_calls = []
    model.get_base_model().lm_head.register_forward_hook(lambda *a: head_calls.append(1))

    with _LargestVocabTensor(VOCAB) as probe:
        model(**inputs, labels=labels).loss.backward()
    assert probe.largest >= tokens * VOCAB and head_calls  # the probe sees full logits

    patch_model(model, rms_norm=False, rope=False, mlp=False, lora=False)
    try:
        head_calls.clear()
        with _LargestVocabTensor(VOCAB) as probe:
            out = model(**inputs, labels=labels)
            out.loss.backward()
        assert out.logits is None and not head_calls
        assert 0 < probe.largest <= chunk * VOCAB
    finally:
        unpatch_model(model)


def test_fused_loss_of_an_all_ignored_batch_is_zero_not_nan():
    """The one documented difference from HF's loss: 0 where HF divides 0 by 0."""
    model = with_lora()
    inputs, labels = batch()
    ignored = torch.full_like(labels, -100)
    with torch.no_grad():
        assert model(**inputs, labels=ignored).loss.isnan()
        patch_model(model, rms_norm=False, rope=False, mlp=False, lora=False)
        try:
            assert model(**inputs, labels=ignored).loss.item() == 0.0
        finally:
            unpatch_model(model)


def test_fused_loss_sends_only_the_counted_rows_through_the_head(monkeypatch):
    """A completion-only batch: the kernel gets the rows whose target counts, nothing else,
    and the loss and every gradient are those of the kernel over all rows (an ignored row adds
    nothing); a batch where every row counts, or none does, goes through as it is."""
    import workbench.patch as P

    model = with_lora()
    inputs, labels = batch(seq=16)
    labels[0, :9] = -100  # row 0's prompt; row 1 ignores its 3 pads already
    seen = []
    kernel = P.fused_linear_cross_entropy

    def spy(h, *a, **k):  # the rows the kernel gets
        seen.append(h.numel() // h.shape[-1])
        return kernel(h, *a, **k)

    monkeypatch.setattr(P, "fused_linear_cross_entropy", spy)
    patch_model(model, rms_norm=False, rope=False, mlp=False, lora=False)
    try:
        counted = int((torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:] != -100).sum())
        assert 0 < counted < labels.numel()
        cut = outputs(model, inputs, labels)
        assert seen == [counted]
        monkeypatch.setattr(P._CountedRows, "select", lambda self, h, t: (h, t))
        whole = outputs(model, inputs, labels)
        assert seen[-1] == labels.numel()
        # The same fp32 math on the same rows; only the rows' grouping into chunks (and so the
        # order of fp32 sums) differs: a few of fp32's roundoffs (2^-24 = 6e-8) apart for the
        # loss; the gradients take that through two layers' backward matmuls, hence 10x more.
        torch.testing.assert_close(cut[0], whole[0], rtol=1e-6, atol=1e-7)
        assert cut[2].keys() == whole[2].keys()
        for n in cut[2]:
            torch.testing.assert_close(cut[2][n], whole[2][n], rtol=1e-5, atol=1e-7, msg=n)
        monkeypatch.undo()
        monkeypatch.setattr(P, "fused_linear_cross_entropy", spy)
        seen.clear()
        with torch.no_grad():
            assert model(**inputs, labels=torch.full_like(labels, -100)).loss.item() == 0.0
        assert seen == [labels.numel()]
    finally:
        unpatch_model(model)


def test_counted_rows_cut_only_where_a_share_of_rows_is_ignored():
    """The cut (_CountedRows.select) keeps the counted rows in order; it leaves a batch alone
    where fewer than _CUT_SHARE of the rows are ignored (a plain loop's one row per sequence)."""
    import workbench.patch as P

    hidden = torch.randn(2, 64, 3, device=DEVICE)
    target = torch.arange(128, device=DEVICE).view(2, 64)
    few = target.clone()
    few[0, -1] = -100  # 1 of 128: below 1/64
    assert P._CountedRows(few, -100).select(hidden, few)[0] is hidden
    some = target.clone()
    some[:, :5] = -100
    rows, kept = P._CountedRows(some, -100).select(hidden, some)
    assert torch.equal(kept, some[:, 5:].reshape(-1)) and torch.equal(rows, hidden[:, 5:].reshape(-1, 3))


def test_trl_fused_lm_head_takes_over_its_own_calls():
    """TRL's SFTTrainer wraps the causal LM's forward with its own fused LM head and
    calls it with fused_lm_head=True: those calls run TRL's head (over our patched
    backbone); plain labelled calls still reach our fused loss."""
    from trl.trainer.utils import add_fused_lm_head

    model = with_lora()
    inputs, labels = batch()
    patch_model(model)
    hf = model.get_base_model()
    ours = hf.forward
    add_fused_lm_head(hf)
    try:
        before = kernel_calls()
        trl_out = model(**inputs, labels=labels, fused_lm_head=True)
        assert hasattr(trl_out, "log_probs") and trl_out.loss.isfinite()
        ran = {k for k, v in kernel_calls().items() if v > before.get(k, 0)}
        assert "rms_norm" in ran and "fused_linear_cross_entropy" not in ran
        assert model(**inputs, labels=labels).logits is None  # ours, through TRL's pass-through
        with pytest.raises(UserError, match="replaced after patching"):
            unpatch_model(model)
    finally:
        hf.forward = ours
        unpatch_model(model)


def test_a_hub_kernelized_model_keeps_our_kernels_through_train():
    # transformers >= 5.25 with the `kernels` package marks a loaded model use_kernels and
    # re-kernelizes it at every model.train(), which pops each layer's instance forward: the
    # Trainer's first train() silently dropped our norms. patch_model turns that off first.
    pytest.importorskip("kernels")
    model = plain("llama")
    model._use_kernels = True   # as from_pretrained leaves it when USE_HUB_KERNELS is not off
    patch_model(model, rope=False, mlp=False, loss=False, lora=False)
    assert not model.use_kernels
    model.train()
    before = kernel_calls().get("rms_norm", 0)
    ids = torch.randint(0, VOCAB, (1, 8), device=DEVICE)
    model(input_ids=ids)
    assert kernel_calls().get("rms_norm", 0) > before
    unpatch_model(model)


def test_offline_turns_hub_kernels_off():
    import os

    assert os.environ.get("USE_HUB_KERNELS") == "0"   # enforce_offline() at import, above


# --------------------------------------------------------------------------- adapter casts
def bf16_with_fp32_adapter(seed=0):
    """A bf16 base with PEFT's default fp32 adapter (autocast_adapter_dtype), as the Trainer's
    bf16=True trains it: under autocast each A and B is cast to bf16 for its matmuls."""
    torch.manual_seed(seed)
    base = plain(seed=seed).to(torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def adapter_weights(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


class _Casts(TorchDispatchMode):
    """Counts casts by (from, to, elements), casts read straight from an adapter weight, and
    row stacks (cat of several 2-D tensors: lora_qkv's / lora_mlp's A's copied together)."""

    def __init__(self, weights):
        super().__init__()
        self.weights = {w.data_ptr() for w in weights}
        self.casts, self.from_weights, self.stacks = Counter(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].dtype != out.dtype:
            self.casts[(args[0].dtype, out.dtype, args[0].numel())] += 1
            self.from_weights += args[0].data_ptr() in self.weights
        if func is torch.ops.aten.cat.default and len(args[0]) > 1 and all(t.dim() == 2 for t in args[0]):
            self.stacks += 1
        return out


def per_weight_casts(monkeypatch):
    """Patch's adapter casts one weight at a time, as before the block casts: the comparison."""
    import workbench.patch as patch_module

    monkeypatch.setattr(patch_module, "_cast_adapter", lambda layer, a, b, dtype: (a.to(dtype), b.to(dtype)))


def step(model, inputs, labels, counter=None):
    model.zero_grad(set_to_none=True)
    with counter or contextlib.nullcontext(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_decoder_layers_adapters_are_cast_at_once_with_the_same_numbers(monkeypatch):
    """Under autocast an fp32 adapter computes in bf16. The patch casts a decoder layer's 14
    adapter weights in one concatenation and one cast (and their gradients back in one), not in
    a launch and an autograd node per weight; q/k/v's and gate/up's A's then stack as views of
    that buffer. A cast rounds each element alone, so the loss and every gradient are the same
    bits as with a cast per weight."""
    model = bf16_with_fp32_adapter()
    weights = adapter_weights(model)
    layers = model.get_base_model().config.num_hidden_layers
    block = sum(w.numel() for w in weights) // layers
    inputs, labels = batch()
    patch_model(model)
    try:
        before = kernel_calls()
        batched = _Casts(weights)
        got = step(model, inputs, labels, batched)
        ran = _ran_since(before)
        assert ran["lora_qkv"] == ran["lora_mlp"] == ran["lora_o"] == layers
        with monkeypatch.context() as m:
            per_weight_casts(m)
            alone = _Casts(weights)
            want = step(model, inputs, labels, alone)
    finally:
        unpatch_model(model)
    assert torch.equal(got[0], want[0]) and got[1].keys() == want[1].keys() == {
        n for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(got[1][n], want[1][n]) and got[1][n].dtype == torch.float32 for n in got[1])
    f32, bf16 = torch.float32, torch.bfloat16
    # one cast a decoder layer each way, none of a weight alone, and no copy of stacked A's
    assert batched.casts[(f32, bf16, block)] == batched.casts[(bf16, f32, block)] == layers
    assert batched.from_weights == 0 and batched.stacks == 0
    # the comparison would have failed: a cast a weight, and the A's stacked by copying
    assert alone.from_weights == len(weights) and alone.casts[(f32, bf16, block)] == 0
    assert alone.stacks >= 2 * layers


def test_adapter_casts_never_outlive_a_forward():
    """An optimizer may write the fp32 adapter without torch seeing it (bitsandbytes' 8-bit
    optimizers write through a pointer: no version bump), so a cast made in one forward is never
    used in the next; a forward that raises leaves none behind either."""
    import workbench.patch as patch_module

    model = bf16_with_fp32_adapter()
    twin = copy.deepcopy(model)
    inputs, labels = batch()
    patch_model(model)
    patch_model(twin)
    try:
        step(model, inputs, labels)
        assert patch_module._CASTS.get() is None
        with torch.no_grad():
            for w, t in zip(adapter_weights(model), adapter_weights(twin)):
                w.data.add_(0.01)  # through .data: the version counter does not move
                t.add_(0.01)
        assert torch.equal(step(model, inputs, labels)[0], step(twin, inputs, labels)[0])
        with pytest.raises(IndexError), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            model(input_ids=inputs["input_ids"] + VOCAB, labels=labels)  # token ids past the vocab
        assert patch_module._CASTS.get() is None
    finally:
        unpatch_model(model)
        unpatch_model(twin)


@pytest.mark.parametrize("reentrant", [False, True])
def test_adapter_casts_under_gradient_checkpointing_and_accumulation(monkeypatch, reentrant):
    """Checkpointed decoder layers recompute their forward in the backward, outside the model's
    forward: there a weight is cast alone, and the gradients are the same bits; so are two
    accumulated micro-batches'."""
    model = bf16_with_fp32_adapter()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    model.train()
    (a, la), (b, lb) = batch(seed=1), batch(seed=2)

    def two_micro_batches():
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            for inputs, labels in ((a, la), (b, lb)):
                model(**inputs, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    patch_model(model)
    try:
        got = two_micro_batches()
        with monkeypatch.context() as m:
            per_weight_casts(m)
            want = two_micro_batches()
    finally:
        unpatch_model(model)
    assert got.keys() == want.keys() and len(got) == len(adapter_weights(model))
    assert all(torch.equal(got[n], want[n]) for n in got)


_DDP_SCRIPT = r'''
import json, os, sys
import torch, torch.distributed as dist
from workbench.offline import enforce_offline
enforce_offline()
import peft, transformers
from workbench.families import tiny_config
from workbench.patch import kernel_calls, patch_model

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
base = transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=320)).to(torch.bfloat16)
model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=%(projs)r))
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.05)
patch_model(model)
gen = torch.Generator().manual_seed(1)
batches = [torch.randint(3, 320, (1, 12), generator=gen) for _ in range(2)]


def grads(m, ids):
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


alone = [grads(model, ids) for ids in batches]  # each rank's batch, without DDP
ddp = torch.nn.parallel.DistributedDataParallel(model)
got = grads(ddp, batches[rank])
worst = max(float(((got["module." + n] - (alone[0][n] + alone[1][n]) / 2).abs().max())) for n in alone[0])
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"worst": worst, "grads": len(got), "calls": kernel_calls()}, f)
dist.destroy_process_group()
'''


def test_adapter_casts_under_ddp_give_the_mean_of_the_ranks_gradients(tmp_path):
    """DDP reduces each adapter's gradient as AccumulateGrad hands it over, now a decoder layer's
    at once from the block cast: two ranks under torchrun (gloo on the CPU), bf16 autocast, get
    the mean of what each rank's batch gives alone."""
    import os
    import subprocess
    import sys

    script, out = tmp_path / "ddp.py", tmp_path / "out.json"
    script.write_text(_DDP_SCRIPT % {"projs": ALL_PROJS})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["calls"].get("lora_qkv") and doc["calls"].get("lora_mlp")
    assert doc["grads"] == 2 * 7 * tiny_config("llama").num_hidden_layers and doc["worst"] <= 1e-6
