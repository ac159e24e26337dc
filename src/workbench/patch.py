"""Run a transformers causal LM (plain, PEFT-LoRA, or QLoRA) through our Triton kernels.

``patch_model(model)`` swaps the math of module *instances* and hands back a
:class:`PatchReport` of what was swapped and what was left alone, and why;
``unpatch_model(model)`` undoes it exactly. ``workbench.patch(model)`` and
``workbench.unpatch(model)`` are the same two calls.

How, and why this way:

* Instances, not classes. Each swapped module gets its own ``forward`` (a bound
  method of a function of this file) and a small state object; nothing is
  replaced, so parameters stay the very same ``Parameter`` objects, the
  ``state_dict`` is untouched, DDP/FSDP wrap the model as usual, ``copy.deepcopy``
  rebinds the methods to the copy, and other models of the same class in the
  process keep running HF's code. Undoing is deleting those two attributes (and,
  with LoRA, the pair of forward hooks on the transformers model that bound the
  adapter casts' life to one forward, :class:`_AdapterCasts`).
* RoPE is applied inside HF's attention ``forward`` through the modeling module's
  global ``apply_rotary_pos_emb``. Rather than copying HF's attention code, we
  replace that global with a dispatcher that runs our kernel only while a patched
  attention instance is running (a context variable says so) and HF's function
  otherwise; the global is restored when the last model using it is unpatched.
* Every swapped forward checks, per call, that the kernel computes exactly what
  the HF/PEFT code would (dtypes agree or promote as HF's do, adapters active and
  unmerged, a device the kernels run on, no autocast that would run HF's code in
  another dtype, no extra arguments); if not, it runs the original code.
  :func:`kernel_calls` counts what actually ran.

What is swapped (per family: workbench/families.py):

* ``rms_norm``: every RMSNorm (Llama casting, or Gemma's fp32 ``(1 + w)``), Qwen3's
  q/k norms included. Under autocast too: autocast changes nothing in HF's RMSNorm,
  so the kernel runs wherever its input and weight dtypes give what HF's gives
  (:func:`_norm_dtypes`; e.g. the fp32 residual stream of an fp32 model or of QLoRA
  after prepare_model_for_kbit_training; not Qwen3's q/k norms there);
* ``add_rms_norm``, only with ``fuse_add_norm=True`` (which needs ``rms_norm``). Off by default:
  a 1B LoRA training step measured no faster with it, the saving it can make being a fraction of a
  percent of the step (reports/step/2026-12-07-nvidia-h200-1b-lora-autocast-on-addnorm.notes.md).
  With it, the decoder layer of a family whose layer forward is Llama's (Llama, Mistral,
  Qwen2, Qwen3, Gemma; checked against the installed source, :func:`_layer_pattern`) runs
  HF's steps itself, with ``residual + attn_out`` and ``post_attention_layernorm`` as one
  kernel (s and the norm of s in one pass). Per call it fuses where the add is one dtype
  (no promotion) and the swapped norm would run its kernel in that dtype, with no hooks on
  the norm; elsewhere it adds and calls the norm as HF does. Arguments, the attention's
  call and output, caches and the return value are HF's: the forward binds the call to
  HF's signature and passes every argument on;
* ``rope``: ``apply_rotary_pos_emb`` of every attention module. Under autocast too,
  with HF's type promotion (:func:`_rope_dtype`): the fp32 tables of an fp32 model
  or of QLoRA and autocast's bf16 q/k rotate in fp32 and come out fp32, as in HF;
* ``swiglu`` / ``geglu``: the gated MLP's ``act(gate) * up``;
* ``fused_linear_cross_entropy``: the causal LM's ``lm_head`` + loss when labels
  are given (HF's label shift, ``ignore_index``, ``num_items_in_batch``,
  Gemma-2's final soft cap); the output then carries ``logits=None``. Under
  autocast it runs on autocast's casts of the hidden states and the head, as HF's
  ``lm_head`` does (QLoRA's fp32 head and hidden states under the Trainer's bf16
  autocast: bf16 logits, fp32 loss), so the [tokens, vocab] logits are never formed;
* with a PEFT LoRA adapter: ``lora_qkv`` when q, k and v all carry a compatible
  adapter, ``lora_mlp`` when gate, up and down do (it includes the activation),
  and ``lora_o`` for any other compatible LoRA linear (o_proj, or the members of
  an incomplete group); on a bitsandbytes 4-bit base, the LoRA kernels read the
  frozen weight as an ``NF4Weight`` (``nf4_dequant``). An fp32 adapter on a 16-bit
  base (PEFT's default) is fused under autocast to that dtype, as the Trainer's
  ``bf16=True`` runs it, its A and B cast with the rest of its decoder layer's
  adapters in one go (:class:`_AdapterCasts`; the same bits as a cast each). QLoRA's
  fp32 activations (the norms' outputs after prepare_model_for_kbit_training) under
  autocast go through the kernels' mixed mode where every 4-bit base of the group
  computes in autocast's dtype
  (:func:`_mixed_dtype`): the GEMMs in that dtype, and the base product and the
  LoRA term summed in fp32 and returned in fp32, as bitsandbytes and PEFT do. (A
  sum in the compute dtype rounds away an adapter's first, small updates, which a
  train-suite run on a GPU showed as a loss off HF's after the first step; the parity
  suite's ``delta:`` comparisons check that the LoRA term survives.)

Not swapped: attention itself (HF's eager/SDPA/flash path), embeddings, the residual
adds and the decoder layer's forward unless ``fuse_add_norm`` (with it, still not an add
that promotes dtypes, e.g. an fp32 stream under bf16 autocast, nor checkpointed
decoder-layer calls: HF's layer, our norms), LoRA layers with DoRA or another PEFT
variant, lora_bias, several active adapters, a trainable or non-Linear base (8-bit, ...),
and lora_o/lora_mlp on a base with a bias (Qwen2's q/k/v run fused only as a lora_qkv
group). The fused loss is skipped for ``logits_to_keep != 0``, TRL's ``fused_lm_head=True`` calls
(TRL's own head then runs), a LoRA or modules_to_save lm_head and a custom
``loss_function``. Where the swap differs from HF: with every label ignored the
fused loss is 0 where HF's is NaN, and LoRA dropout masks are drawn by the
kernels (same distribution as PEFT's, other random numbers).
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import logging
import sys
import textwrap
import types
import weakref
from collections import Counter
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import UserError
from workbench.families import GLU_ACTIVATIONS, Family, family, family_of
from workbench.host_copy import HostCopy
from workbench.kernels import _common
from workbench.kernels._lora_ops import packed
from workbench.kernels.add_rms_norm import add_rms_norm
from workbench.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from workbench.kernels.geglu import geglu
from workbench.kernels.lora_mlp import lora_mlp
from workbench.kernels.lora_o import lora_o
from workbench.kernels.lora_qkv import lora_qkv
from workbench.kernels.nf4 import NF4Weight
from workbench.kernels.rms_norm import rms_norm
from workbench.kernels.rope import rope
from workbench.kernels.swiglu import swiglu

__all__ = ["patch_model", "unpatch_model", "options_from_config", "PatchReport", "Fallback", "kernel_calls",
           "fused_loss_patched", "OPTIONS"]

log = logging.getLogger(__name__)

#: The switches of :func:`patch_model`, all on by default.
OPTIONS = ("rms_norm", "rope", "mlp", "loss", "lora", "nf4")
#: A kernel switch off by default (patch_model's docstring): the decoder layer's residual add and
#: post_attention_layernorm as one add_rms_norm kernel. Needs rms_norm.
FUSE_ADD_NORM = "fuse_add_norm"
#: Not a kernel but a choice of numerics (patch_model's docstring): an fp32 adapter on a 16-bit
#: base computed in the base's dtype outside autocast too, as autocast computes it. Off by default.
ADAPTER_AS_AUTOCAST = "adapter_as_autocast"

_STATE = "_workbench_patch"     # per swapped module: what was installed, to undo it
_ROOT = "_workbench_patched"    # on the transformers model: the report and the swapped modules

_CALLS: Counter = Counter()


def kernel_calls() -> dict[str, int]:
    """How many times each kernel has run through patched modules in this process
    (a swapped forward that fell back to the original code does not count), and the
    preference loss in workbench.preference's fused trainers (:func:`note_call`)."""
    return dict(_CALLS)


def note_call(kernel: str) -> None:
    """Count one run of ``kernel`` made outside a patched module: the fused DPO / ORPO loss,
    which runs in the preference trainers' loss, not in the model's forward."""
    _CALLS[kernel] += 1


# --------------------------------------------------------------------------- report
@dataclass
class Fallback:
    """A place where a kernel could apply but the original code stays, and why."""

    module: str
    kernel: str
    reason: str

    def __str__(self) -> str:
        return f"{self.module or '<model>'}: {self.kernel} not used: {self.reason}"


@dataclass
class PatchReport:
    """What :func:`patch_model` swapped: ``swapped[kernel][module type] = count``
    (module type: the HF class name, or the attribute name of a PEFT LoRA layer,
    whose class is PEFT's generic ``Linear``), and the fallbacks."""

    family: str
    options: dict[str, bool]
    swapped: dict[str, dict[str, int]] = field(default_factory=dict)
    fallbacks: list[Fallback] = field(default_factory=list)

    def count(self, kernel: str) -> int:
        return sum(self.swapped.get(kernel, {}).values())

    def to_dict(self) -> dict:
        return {"family": self.family, "options": dict(self.options),
                "swapped": {k: dict(v) for k, v in self.swapped.items()},
                "fallbacks": [asdict(f) for f in self.fallbacks]}

    def __str__(self) -> str:
        """A few lines for a log: swaps per kernel, fallbacks grouped by kernel and reason."""
        lines = [f"kernels patched into a {self.family} model:"]
        for kernel, per_type in self.swapped.items():
            lines.append(f"  {kernel}: " + ", ".join(f"{n} x{c}" for n, c in per_type.items()))
        if not self.swapped:
            lines.append("  nothing")
        groups: dict[tuple[str, str], list[str]] = {}
        for f in self.fallbacks:
            groups.setdefault((f.kernel, f.reason), []).append(f.module or "<model>")
        for (kernel, reason), where in groups.items():
            place = where[0] if len(where) == 1 else f"{len(where)} modules, e.g. {where[0]}"
            lines.append(f"  fallback: {kernel} not used in {place}: {reason}")
        return "\n".join(lines)

    def _add(self, kernel: str, module_type: str) -> None:
        per = self.swapped.setdefault(kernel, {})
        per[module_type] = per.get(module_type, 0) + 1


# --------------------------------------------------------------------------- per-call checks
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


#: The float dtypes the kernels take and autocast casts between.
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def _runnable(t: torch.Tensor, autocast_ok: bool = False, kernel: str = "", quantized: bool = False) -> bool:
    """Whether the kernels can run on ``t``'s device in ``t``'s dtype right now,
    computing what HF would: a CUDA tensor (or the CPU under Triton's interpreter),
    and no autocast that would run HF's ops in another dtype (``autocast_ok``: the
    caller has settled what HF computes under autocast: HF's ops there are on no
    autocast list, or the caller applies autocast's casts itself). ``kernel`` and
    ``quantized`` (a bitsandbytes 4-bit base) word the warning of a bypass."""
    dev = t.device.type
    if dev == "cpu" and not _common.INTERPRET:
        _warn_once("cpu", "workbench kernels bypassed: the model runs on the CPU and TRITON_INTERPRET=1 was not "
                          "set before triton was imported; the original PyTorch code runs instead.")
        return False
    if dev not in ("cpu", "cuda"):
        return False
    if not autocast_ok and torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) != t.dtype:
        to = torch.get_autocast_dtype(dev)
        _warn_once(f"autocast:{kernel}:{quantized}", _autocast_bypass(kernel or "kernels", t.dtype, to, quantized))
        return False
    return True


def _autocast_bypass(kernel: str, dtype: torch.dtype, to: torch.dtype, quantized: bool) -> str:
    """The warning when autocast keeps ``kernel`` out: what runs instead, and what the
    user can change, if anything."""
    what = (f"workbench {kernel} bypassed under torch.autocast to {_name(to)} on {_name(dtype)} activations; "
            f"HF/PEFT's code runs there instead")
    if quantized:
        # "Load the model in bf16" is no advice here: a QLoRA user did. The fp32 comes from
        # prepare_model_for_kbit_training, which casts every parameter that is not 4-bit
        # (norms, embeddings, the head) to fp32, so the residual stream and norms are fp32.
        return (f"{what}. On a 4-bit (QLoRA) base, peft's prepare_model_for_kbit_training casts the norms and "
                f"embeddings to float32, so the layers after each norm run on {_name(dtype)} activations; the LoRA "
                f"kernels take those under autocast only where the 4-bit base computes in autocast's dtype: load it "
                f"with bnb_4bit_compute_dtype={_name(to)}. workbench.patch.kernel_calls() counts the kernels that "
                f"did run.")
    return (f"{what}. For it to run, load the model in {_name(to)} (a LoRA adapter may stay in float32: "
            f"the LoRA kernels fuse it under autocast).")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _plain(t) -> bool:
    """A dense, local tensor (not a DTensor shard or a quantized parameter)."""
    return type(t) in (torch.Tensor, nn.Parameter)


def _kernel_scope(t: torch.Tensor):
    """Autocast off around a kernel call. The caller already holds the operands HF's
    code computes on (in autocast's dtype, or where HF's ops are on no autocast
    list), so autocast must change nothing inside."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext()


def _ran(kernel: str) -> None:
    _CALLS[kernel] += 1


# --------------------------------------------------------------------------- installing forwards
@dataclass
class _Swap:
    """What was installed on one module, and what it replaced."""

    fn: object                      # the function bound as the instance's forward
    had_forward: bool = False       # whether the instance had its own forward before
    previous: object = None         # that forward (e.g. another library's wrapper)
    adapter_as_autocast: bool = False   # patch_model's switch of that name


@dataclass
class _NormSwap(_Swap):
    eps_attr: str = "variance_epsilon"
    offset: float = 0.0
    casting: str = "llama"


@dataclass
class _LayerSwap(_Swap):
    signature: inspect.Signature | None = None   # of HF's layer forward, under its decorators
    hidden: str = "hidden_states"               # its first parameter after self
    var_kw: str = "kwargs"                      # its ** parameter
    renamed: tuple[str, ...] = ()               # kwargs its deprecate_kwarg decorators rename


@dataclass
class _AttentionSwap(_Swap):
    rope: bool = False
    qkv: tuple[str, str, str] | None = None   # projections fused by lora_qkv, in q, k, v order


@dataclass
class _ProjSwap(_Swap):
    name: str = ""                  # attribute name in the parent (q_proj, ...)
    qkv_index: int | None = None    # position in its attention's lora_qkv group
    single: bool = False            # may run alone through lora_o


@dataclass
class _MLPSwap(_Swap):
    projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    activation: tuple[str, str] | None = None   # (swiglu|geglu, approximate) when the activation is swapped
    fused: bool = False                         # gate, up and down run as one lora_mlp


@dataclass
class _LossSwap(_Swap):
    softcap_key: str | None = None


def _install(module: nn.Module, swap: _Swap) -> None:
    swap.had_forward = "forward" in module.__dict__
    swap.previous = module.__dict__.get("forward")
    module.__dict__[_STATE] = swap
    module.forward = types.MethodType(swap.fn, module)


def _installed_here(module: nn.Module) -> bool:
    swap = module.__dict__.get(_STATE)
    current = module.__dict__.get("forward")
    return (swap is not None and isinstance(current, types.MethodType) and current.__self__ is module
            and current.__func__ is swap.fn)


def _uninstall(module: nn.Module) -> None:
    swap = module.__dict__.pop(_STATE)
    if swap.had_forward:
        module.__dict__["forward"] = swap.previous
    else:
        del module.__dict__["forward"]


def _original(module: nn.Module, *args, **kwargs):
    swap = module.__dict__[_STATE]
    if swap.had_forward:
        return swap.previous(*args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


# --------------------------------------------------------------------------- module globals (RoPE)
class _AttentionCall:
    """One running patched attention forward: whether RoPE goes through our kernel,
    and the q/k/v computed by lora_qkv for its input (reused by k_proj and v_proj)."""

    __slots__ = ("attention", "rope", "x", "qkv")

    def __init__(self, attention: nn.Module, rope_on: bool):
        self.attention, self.rope, self.x, self.qkv = attention, rope_on, None, None


_CALL: ContextVar[_AttentionCall | None] = ContextVar("workbench_attention_call", default=None)

# (module name, attribute) -> [original function, dispatcher, roots holding it]
_GLOBALS: dict[tuple[str, str], list] = {}


def _rope_dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        call = _CALL.get()
        if (call is not None and call.rope and not args and set(kwargs) <= {"unsqueeze_dim"}
                and kwargs.get("unsqueeze_dim", 1) == 1 and _rope_ready(q, k, cos, sin)):
            dtype = _rope_dtype(q, k, cos, sin)
            _ran("rope")
            with _kernel_scope(q):
                return rope(q.to(dtype), k.to(dtype), cos.to(dtype), sin.to(dtype))
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.__wrapped__ = original
    apply_rotary_pos_emb.__doc__ = original.__doc__
    return apply_rotary_pos_emb


def _rope_ready(q, k, cos, sin) -> bool:
    """HF's [B, H, S, D] q/k and gathered [B or 1, S, R] cos/sin, on one device, in
    dtypes whose HF result the kernel computes (:func:`_rope_dtype`)."""
    return (q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape
            and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2] == cos.shape[1]
            and q.shape[3] == k.shape[3] and cos.shape[0] in (1, q.shape[0])
            and cos.shape[2] % 2 == 0 and 0 < cos.shape[2] <= q.shape[3]
            and _rope_dtype(q, k, cos, sin) is not None
            and q.device == k.device == cos.device == sin.device and _runnable(q, autocast_ok=True))


def _rope_dtype(q, k, cos, sin) -> torch.dtype | None:
    """The dtype HF's ``apply_rotary_pos_emb`` computes and returns q and k in, where
    the kernel on the exact upcasts of all four to it computes the same; else None.

    HF's ops there (mul, add, neg, slicing, cat) are on no autocast list, CPU or CUDA
    (cat's "promote" on CUDA is type promotion too), so autocast changes nothing: HF
    returns q in the promotion of q, cos and sin, and k in that of k, cos and sin. The
    kernel returns both in its operands' one dtype, so it runs where the two agree.
    The mixed case is real: an fp32 model, or QLoRA's fp32 residual stream, under bf16
    autocast hands RoPE the rotary embedding's fp32 tables (it returns them in the
    hidden states' dtype) and autocast's bf16 q/k projections. HF rotates the exact
    fp32 upcasts of q and k in fp32 and returns fp32; so does the kernel given those
    upcasts (it computes in fp32 and rounds once, to fp32)."""
    dtypes = {q.dtype, k.dtype, cos.dtype, sin.dtype}
    if len(dtypes) == 1:
        return q.dtype
    if not dtypes <= set(_AUTOCAST_CASTS):
        return None
    q_out = torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)
    k_out = torch.promote_types(torch.promote_types(k.dtype, cos.dtype), sin.dtype)
    return q_out if q_out == k_out else None


def _hold_global(module_name: str, attr: str, make, root: nn.Module) -> None:
    key = (module_name, attr)
    if key not in _GLOBALS:
        module = importlib.import_module(module_name)
        original = getattr(module, attr, None)
        if original is None:
            raise UserError(f"this transformers version's {module_name} has no {attr}; patch with rope=False.")
        dispatcher = make(original)
        setattr(module, attr, dispatcher)
        _GLOBALS[key] = [original, dispatcher, weakref.WeakSet()]
    _GLOBALS[key][2].add(root)
    weakref.finalize(root, _release_if_unheld, key)


def _release_if_unheld(key: tuple[str, str]) -> None:
    """A patched model was garbage-collected without unpatch_model: once no live
    patched model holds this module global, put the original function back."""
    entry = _GLOBALS.get(key)
    if entry is None or list(entry[2]):  # iterating a WeakSet yields live models only
        return
    module = sys.modules.get(key[0])
    if module is not None and getattr(module, key[1], None) is entry[1]:
        setattr(module, key[1], entry[0])
    del _GLOBALS[key]


def _release_global(key: tuple[str, str], root: nn.Module) -> None:
    entry = _GLOBALS.get(key)
    if entry is None:
        return
    original, dispatcher, holders = entry
    holders.discard(root)
    if not holders:
        module = importlib.import_module(key[0])
        if getattr(module, key[1]) is dispatcher:
            setattr(module, key[1], original)
        del _GLOBALS[key]


# --------------------------------------------------------------------------- PEFT LoRA layers
def _is_lora(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("lora_A", "lora_B", "lora_dropout", "scaling", "base_layer"))


def _is_bnb_4bit(base: nn.Module) -> bool:
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(base).__mro__)


def _quant_state(base: nn.Module):
    """The 4-bit weight's quant_state; FSDP's flat-parameter views lose it from the
    weight and bitsandbytes then takes the module's copy, as here."""
    state = getattr(base.weight, "quant_state", None)
    return state if state is not None else getattr(base, "quant_state", None)


def _adapter(layer: nn.Module) -> str | None:
    active = list(getattr(layer, "active_adapters", []))
    return active[0] if len(active) == 1 and active[0] in layer.lora_A else None


def _dropout_p(layer: nn.Module, name: str) -> float:
    drop = layer.lora_dropout[name]
    return float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0


def _lora_problem(layer: nn.Module, nf4: bool, allow_bias: bool) -> str | None:
    """Why this LoRA layer cannot run through our LoRA kernels (checked once, at patch
    time), or None. The kernels implement vanilla LoRA on a frozen dense or NF4 base."""
    name = _adapter(layer)
    if name is None:
        return f"{len(list(getattr(layer, 'active_adapters', [])))} active adapters (the kernels take exactly one)"
    if getattr(layer, "use_dora", {}).get(name):
        return "DoRA is configured"
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None:
        return f"LoRA variant {type(variant).__name__} is configured"
    if getattr(layer, "lora_bias", {}).get(name) or layer.lora_B[name].bias is not None:
        return "lora_bias is configured"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out is set"
    if type(layer.lora_A[name]) is not nn.Linear or type(layer.lora_B[name]) is not nn.Linear:
        return f"the adapter is a {type(layer.lora_A[name]).__name__}, not a Linear"
    if not isinstance(layer.lora_dropout[name], (nn.Dropout, nn.Identity)):
        return f"lora_dropout is a {type(layer.lora_dropout[name]).__name__}"
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if a.dtype != b.dtype:
        return f"lora_A is {a.dtype} but lora_B is {b.dtype}"
    base = layer.base_layer
    if _is_bnb_4bit(base):
        if not nf4:
            return "the base is 4-bit and nf4=False"
        state = _quant_state(base)
        if getattr(state, "quant_type", None) != "nf4":
            return f"the 4-bit base uses {getattr(state, 'quant_type', None)!r}, not nf4"
        if getattr(state, "packing_format_for_cpu", False):
            return "bitsandbytes repacked the 4-bit weight for its CPU inference kernel"
        compute = getattr(base, "compute_dtype", None)
        if compute is not None and compute != a.dtype and not _autocast_adapter(a.dtype, compute):
            return f"the 4-bit base computes in {compute} but the adapter is {a.dtype}"
        weight_dtype = None
    elif type(base) is nn.Linear:
        weight_dtype = base.weight.dtype
        if base.weight.requires_grad:
            return "the base weight is trainable (the LoRA kernels keep it frozen)"
    else:
        return f"the base layer is a {type(base).__name__}, not a Linear or a bitsandbytes 4-bit Linear"
    if weight_dtype is not None and weight_dtype != a.dtype and not _autocast_adapter(a.dtype, weight_dtype):
        return f"the adapter is {a.dtype} but the base is {weight_dtype}"
    if base.bias is not None and not allow_bias:
        return "the base layer has a bias"
    if base.bias is not None and base.bias.requires_grad:
        return "the base bias is trainable"
    return None


def _autocast_adapter(adapter: torch.dtype, base: torch.dtype) -> bool:
    """An fp32 adapter on a 16-bit base (PEFT's default ``autocast_adapter_dtype``):
    fusable under autocast to the base dtype, which runs PEFT's LoRA matmuls in that
    dtype too (checked per call)."""
    return adapter == torch.float32 and base in (torch.bfloat16, torch.float16)


def _autocast_to(x: torch.Tensor, dtype: torch.dtype) -> bool:
    dev = x.device.type
    return torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == dtype


def _mixed_dtype(layers, x: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype the LoRA kernels compute ``layers`` in on an fp32 ``x`` (their
    mixed mode, kernels/_lora.py), or None where it does not apply.

    QLoRA under the Trainer's autocast: prepare_model_for_kbit_training leaves the
    residual stream, and so the norms' outputs, in fp32 while autocast runs in bf16.
    Each 4-bit LoRA linear then computes on autocast's dtype: bitsandbytes' Linear4bit
    casts x (and its bias) to its compute dtype, multiplies by the weight dequantized
    to it and returns the product upcast to x's fp32; PEFT's dropout runs on the fp32
    x and lora_A / lora_B under autocast on the casts of it, A and B; PEFT adds the
    LoRA term to the base's fp32 output in fp32. That is the kernels' mixed mode, so
    it applies where every layer's 4-bit base computes in autocast's dtype. Anywhere
    else (no autocast, another compute dtype, a dense base, whose output autocast
    leaves in bf16) the kernels keep their one-dtype rule."""
    dev = x.device.type
    if x.dtype != torch.float32 or not torch.is_autocast_enabled(dev):
        return None
    to = torch.get_autocast_dtype(dev)
    if to not in (torch.bfloat16, torch.float16):
        return None
    for layer in layers:
        base = getattr(layer, "base_layer", None)
        if base is None or not _is_bnb_4bit(base) or getattr(base, "compute_dtype", None) != to:
            return None
    return to


# --------------------------------------------------------------------------- adapter casts
class _CastAdapters(torch.autograd.Function):
    """Several adapter weights cast to one dtype at once: each output is ``w.to(dtype)`` and each
    gradient the upcast of the output's, as autocast's casts give, but in one concatenation and
    one cast each way instead of a launch (and an autograd node) per weight. The outputs are
    views of one buffer in the given order, so weights given back to back stack as a view
    (``_lora_ops.stack_rows``)."""

    @staticmethod
    def forward(ctx, dtype, *weights):
        ctx.set_materialize_grads(False)  # a weight whose cast went unused gets no gradient
        ctx.weight_dtype = weights[0].dtype
        return packed(weights, dtype)

    @staticmethod
    def backward(ctx, *grads):
        wanted = [i for i, g in enumerate(grads) if g is not None and ctx.needs_input_grad[1 + i]]
        out = [None] * len(grads)
        if wanted:
            for i, g in zip(wanted, packed((grads[i] for i in wanted), ctx.weight_dtype)):
                out[i] = g
        return (None, *out)


class _AdapterCasts:
    """The casts of one forward of a patched model: an fp32 adapter on a 16-bit base computes in
    the base's dtype (under autocast, or ``adapter_as_autocast``), and the first LoRA call of a
    decoder layer that needs its cast casts every such adapter of that layer at once
    (:class:`_CastAdapters`), A's before B's in the fused calls' order. A block per decoder
    layer, not one for the model: its gradients are then ready once that layer's backward is
    done, as the per-weight casts' were (DDP starts reducing them while backward goes on).

    Lives for one forward of the root module (its forward hooks), never longer: between two
    forwards an optimizer may write the fp32 weights without torch seeing it (bitsandbytes'
    8-bit optimizers write through a pointer), so a cast is never reused across forwards."""

    def __init__(self, root: nn.Module, blocks, outer: "_AdapterCasts | None"):
        self.root, self.outer = root, outer
        self.block_of = {id(layer): block for block in blocks for layer in block}
        self.done: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, layer: nn.Module, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype):
        """(a, b) in ``dtype``, from the layer's block cast (made now if need be), or None."""
        mode = (dtype, torch.is_grad_enabled())
        hit = self.done.get((id(a), *mode)), self.done.get((id(b), *mode))
        if hit[0] is None or hit[1] is None or hit[0][0] is not a or hit[1][0] is not b:
            block = self.block_of.get(id(layer))
            if block is None:
                return None
            weights = self._weights(block, a)
            if not any(w is a for w in weights) or not any(w is b for w in weights):
                return None
            for w, cast in zip(weights, _CastAdapters.apply(dtype, *weights)):
                self.done[(id(w), *mode)] = (w, cast)
            hit = self.done[(id(a), *mode)], self.done[(id(b), *mode)]
        return hit[0][1], hit[1][1]

    @staticmethod
    def _weights(block, like: torch.Tensor) -> list[torch.Tensor]:
        """The block's active adapter weights of ``like``'s dtype and device: A's, then B's.
        (Read through the modules' own dicts: this runs once per decoder layer and forward, on
        the host's critical path, and nn.Module's attribute lookup costs more than the rest.)"""
        As, Bs = [], []
        dtype, device = like.dtype, like.device
        for layer in block:
            name = _adapter(layer)
            if name is None:
                continue
            a = layer._modules["lora_A"]._modules[name]._parameters.get("weight")
            b = layer._modules["lora_B"]._modules[name]._parameters.get("weight")
            if (_plain(a) and _plain(b) and a.dtype == b.dtype == dtype
                    and a.device == device and b.device == device):
                As.append(a)
                Bs.append(b)
        return As + Bs


_CASTS: ContextVar[_AdapterCasts | None] = ContextVar("workbench_adapter_casts", default=None)


def _cast_adapter(layer: nn.Module, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype):
    """``a.to(dtype), b.to(dtype)``, taken from this forward's block cast where there is one."""
    casts = _CASTS.get()
    got = casts.get(layer, a, b, dtype) if casts is not None else None
    return got if got is not None else (a.to(dtype), b.to(dtype))


def _open_casts(root: nn.Module, args) -> None:
    """The root's forward pre-hook: this forward's adapter casts (:class:`_AdapterCasts`)."""
    state = root.__dict__.get(_ROOT)
    if state is not None and state.blocks:
        outer = _CASTS.get()
        while outer is not None and outer.root is root:  # left open by an interrupted forward
            outer = outer.outer
        _CASTS.set(_AdapterCasts(root, state.blocks, outer))


def _close_casts(root: nn.Module, args, output) -> None:
    """The root's forward hook (also when the forward raised): its casts go."""
    casts = _CASTS.get()
    if casts is not None and casts.root is root:
        _CASTS.set(casts.outer)


def _add_cast_hooks(root: nn.Module) -> None:
    root.register_forward_pre_hook(_open_casts)
    root.register_forward_hook(_close_casts, always_call=True)


def _remove_cast_hooks(root: nn.Module) -> None:
    """By identity, not by handle: a handle of a deep-copied model would remove the original's."""
    for hooks in (root._forward_pre_hooks, root._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn is _open_casts or fn is _close_casts]:
            del hooks[key]
            root._forward_hooks_always_called.pop(key, None)


class _AsDtype:
    """An NF4 weight that dequantizes as bitsandbytes does for an activation dtype:
    to its stored dtype first, then cast (``dequantize_4bit(...).to(A.dtype)``)."""

    def __init__(self, weight: NF4Weight, dtype: torch.dtype):
        self.weight, self.dtype, self.shape, self.device = weight, dtype, weight.shape, weight.device

    def dequantize(self) -> torch.Tensor:
        return self.weight.dequantize().to(self.dtype)


def _lora_operands(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None,
                   as_autocast: bool = False):
    """(W, A, B, bias, scaling, dropout p) of one LoRA layer for a call on ``x``, each in
    the dtype the layer computes in (``dtype``: x's own, or the 16-bit one of the
    kernels' mixed mode, :func:`_mixed_dtype`), or None when this call must take
    PEFT's own path. ``as_autocast``: an fp32 adapter on a 16-bit base computes in the
    base's dtype outside autocast as well (patch_model's ``adapter_as_autocast``)."""
    if layer.merged or layer.disable_adapters:
        return None
    name = _adapter(layer)
    if name is None:
        return None
    dt = dtype or x.dtype
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    base = layer.base_layer
    bias = base.bias
    if not (a.dtype == b.dtype and _plain(a) and _plain(b) and x.device == a.device == b.device):
        return None
    if a.dtype != dt:
        # PEFT under autocast: x is cast to the adapter's fp32, and autocast casts it and
        # the fp32 A and B to its dtype for each matmul: the same as A, B in that dtype.
        if not (_autocast_adapter(a.dtype, dt) and (as_autocast or _autocast_to(x, dt))):
            _warn_once("adapter-dtype", f"workbench LoRA kernels bypassed: the adapter is {a.dtype} and the "
                                        f"activations {x.dtype} outside autocast; PEFT's code runs instead "
                                        f"(patch with {ADAPTER_AS_AUTOCAST}=True to compute the adapter in "
                                        f"{x.dtype}, as autocast would).")
            return None
        a, b = _cast_adapter(layer, a, b, dt)
    if bias is not None and _is_bnb_4bit(base) and bias.dtype != dt and _plain(bias) \
            and getattr(base, "compute_dtype", None) == dt:
        bias = bias.to(dt)  # bitsandbytes adds the bias in its compute dtype: bias.to(compute_dtype)
    if bias is not None and (bias.dtype != dt or not _plain(bias)):
        return None
    if _is_bnb_4bit(base):
        state = _quant_state(base)
        if state is None or getattr(state, "packing_format_for_cpu", False):
            return None
        if getattr(base, "compute_dtype", None) not in (None, dt):
            return None
        weight = NF4Weight.from_bnb(base.weight, state)
        if weight.device != x.device:
            return None
        if weight.dtype != dt:
            weight = _AsDtype(weight, dt)
    else:
        weight = base.weight
        if not (_plain(weight) and weight.dtype == dt and weight.device == x.device) or weight.requires_grad:
            return None
    return weight, a, b, bias, float(layer.scaling[name]), _dropout_p(layer, name)


def _count_nf4(layers) -> None:
    for layer in layers:
        if _is_bnb_4bit(layer.base_layer):
            _ran("nf4_dequant")


def _lora_single(layer: nn.Module, x: torch.Tensor):
    mixed = _mixed_dtype([layer], x)
    ops = _lora_operands(layer, x, mixed, layer.__dict__[_STATE].adapter_as_autocast)
    if ops is None or ops[3] is not None or not _runnable(x, autocast_ok=mixed is not None, kernel="lora_o",
                                                          quantized=_on_4bit([layer])):
        return None
    weight, a, b, _, scaling, p = ops
    _ran("lora_o")
    _count_nf4([layer])
    with _kernel_scope(x):
        return lora_o(x, weight, a, b, scaling, dropout=p)


def _on_4bit(layers) -> bool:
    """Whether any of these (LoRA or plain) linears has a bitsandbytes 4-bit base."""
    return any(_is_bnb_4bit(getattr(m, "base_layer", m)) for m in layers)


def _lora_group(layers, x: torch.Tensor, kernel: str, as_autocast: bool = False):
    """Operands of every layer of a fused group, or None; the group shares one
    scaling and one dropout probability (and one dtype: x's, or the mixed mode's for
    all of them)."""
    mixed = _mixed_dtype(layers, x)
    if not _runnable(x, autocast_ok=mixed is not None, kernel=kernel, quantized=_on_4bit(layers)):
        return None
    ops = [_lora_operands(layer, x, mixed, as_autocast) for layer in layers]
    if any(o is None for o in ops) or len({(o[4], o[5]) for o in ops}) != 1:
        return None
    return ops


# --------------------------------------------------------------------------- swapped forwards
def _norm_dtypes(x: torch.Tensor, w: torch.Tensor, casting: str) -> tuple[torch.dtype, torch.dtype] | None:
    """(the dtype the kernel runs in, the dtype HF's RMSNorm returns) for input ``x``
    and weight ``w``, or None where no kernel call computes what HF's code does.

    Autocast never enters: HF's RMSNorm upcasts x to fp32 before its autocast-listed
    ops (pow and rsqrt, on CUDA's fp32 list: a no-op on fp32), and its mean, add, mul,
    ``.to`` and ``type_as`` are on no autocast list, CPU or CUDA. What remains is
    PyTorch's type promotion of x against w:

    * one dtype: the kernel in it, as without autocast;
    * Gemma, ``(x_hat * (1 + w.float())).type_as(x)``: fp32 math whatever w's dtype,
      rounded once to x's, which is the kernel on the fp32 upcasts, rounded to x's
      dtype (Gemma-2's post-attention and post-feed-forward norms on autocast's bf16
      outputs with fp32 weights: an fp32 model, or after prepare_model_for_kbit_training);
    * Llama, ``w * x_hat.to(x.dtype)``: x_hat rounds to x's dtype, the product is in
      the promoted dtype. The kernel rounds x_hat to the dtype it runs in, so it
      matches only where that is x's (x fp32, w 16-bit). A 16-bit x with an fp32 w
      (Qwen3's q_norm/k_norm on autocast's bf16 q/k, the weights fp32 as above) gets
      fp32 products of bf16-rounded x_hat: no kernel call gives that; HF's code runs.
    """
    if x.dtype == w.dtype:
        return x.dtype, x.dtype
    if x.dtype not in _AUTOCAST_CASTS or w.dtype not in _AUTOCAST_CASTS:
        return None
    if casting == "gemma":
        return torch.float32, x.dtype
    if torch.promote_types(x.dtype, w.dtype) == x.dtype:
        return x.dtype, x.dtype
    return None


def _norm_forward(self, x, *args, **kwargs):
    swap = self.__dict__[_STATE]
    w = self.weight
    dtypes = _norm_dtypes(x, w, swap.casting)
    if (not args and not kwargs and dtypes is not None and _plain(w) and x.device == w.device
            and _runnable(x, autocast_ok=True)):
        compute, out = dtypes
        _ran("rms_norm")
        with _kernel_scope(x):
            y = rms_norm(x.to(compute), w.to(compute), eps=float(getattr(self, swap.eps_attr)), offset=swap.offset,
                         casting=swap.casting)
        return y.to(out)
    return _original(self, x, *args, **kwargs)


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones), which a fused
    layer that computes the module's output without calling it would skip."""
    from torch.nn.modules import module as M

    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
           getattr(module, "_backward_pre_hooks", None))
    shared = (M._global_forward_hooks, M._global_forward_pre_hooks, M._global_backward_hooks,
              getattr(M, "_global_backward_pre_hooks", None))
    return any(bool(h) for h in (*own, *shared))


def _add_norm(norm: nn.Module, residual, attn_out):
    """(s, norm(s)) for HF's ``s = residual + attn_out`` and ``post_attention_layernorm(s)``
    from one add_rms_norm call, or None where no call computes what HF does: an add that
    broadcasts or promotes, or a norm whose swapped forward would not run its kernel in s's
    dtype (:func:`_norm_dtypes`: one dtype, or an fp32 s with a 16-bit Llama weight).
    Autocast changes neither step (add is on no autocast list; the norm: :func:`_norm_dtypes`)."""
    swap = norm.__dict__[_STATE]
    w = norm.weight
    if not (isinstance(residual, torch.Tensor) and isinstance(attn_out, torch.Tensor)
            and residual.shape == attn_out.shape and residual.dtype == attn_out.dtype
            and residual.device == attn_out.device == w.device and _plain(w)):
        return None
    if _norm_dtypes(residual, w, swap.casting) != (residual.dtype, residual.dtype) \
            or not _runnable(residual, autocast_ok=True):
        return None
    _ran("add_rms_norm")
    with _kernel_scope(residual):
        return add_rms_norm(residual, attn_out, w.to(residual.dtype), eps=float(getattr(norm, swap.eps_attr)),
                            offset=swap.offset, casting=swap.casting)


def _layer_forward(self, *args, **kwargs):
    """HF's decoder layer forward (:func:`_layer_pattern` checked it is Llama's), with the
    residual add and post_attention_layernorm fused where :func:`_add_norm` can."""
    swap = self.__dict__[_STATE]
    norm = getattr(self, "post_attention_layernorm", None)
    if (norm is None or not _installed_here(norm) or _hooked(norm)
            or any(name in kwargs for name in swap.renamed)  # HF's decorator renames those
            # transformers checkpoints the layer in its class forward's wrapper (editing the cache
            # arguments first), which an instance forward bypasses: HF's forward runs those calls.
            or (getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled())):
        return _original(self, *args, **kwargs)
    try:
        bound = swap.signature.bind(self, *args, **kwargs)
    except TypeError:  # HF's forward raises the same error
        return _original(self, *args, **kwargs)
    bound.apply_defaults()
    given = dict(bound.arguments)
    given.pop(next(iter(given)))  # self
    hidden_states = given.pop(swap.hidden)
    extra = given.pop(swap.var_kw)
    # HF's steps, names and calls (a module's hooks fire as they do under HF's forward).
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, **given, **extra)
    fused = _add_norm(norm, residual, hidden_states)
    if fused is None:
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = norm(hidden_states)
    else:
        residual, hidden_states = fused
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states


def _attention_forward(self, *args, **kwargs):
    token = _CALL.set(_AttentionCall(self, self.__dict__[_STATE].rope))
    try:
        return _original(self, *args, **kwargs)
    finally:
        _CALL.reset(token)


def _qkv_output(call: _AttentionCall, names: tuple[str, str, str], index: int, x: torch.Tensor):
    """This projection's output from one lora_qkv call on ``x`` (run on first use), or None."""
    if call.x is not x:
        layers = [getattr(call.attention, n) for n in names]
        ops = _lora_group(layers, x, "lora_qkv", call.attention.__dict__[_STATE].adapter_as_autocast)
        if ops is None:
            return None
        (wq, aq, bq, biq, s, p), (wk, ak, bk, bik, _, _), (wv, av, bv, biv, _, _) = ops
        _ran("lora_qkv")
        _count_nf4(layers)
        with _kernel_scope(x):
            call.qkv = lora_qkv(x, wq, aq, bq, wk, ak, bk, wv, av, bv, s, bq=biq, bk=bik, bv=biv, dropout=p)
        call.x = x
    return call.qkv[index]


def _proj_forward(self, x, *args, **kwargs):
    swap = self.__dict__[_STATE]
    if not args and not kwargs:
        call = _CALL.get()
        if swap.qkv_index is not None and call is not None and getattr(call.attention, swap.name, None) is self:
            names = call.attention.__dict__[_STATE].qkv
            out = _qkv_output(call, names, swap.qkv_index, x) if names else None
            if out is not None:
                return out
        if swap.single:
            out = _lora_single(self, x)
            if out is not None:
                return out
    return _original(self, x, *args, **kwargs)


def _mlp_forward(self, x, *args, **kwargs):
    swap = self.__dict__[_STATE]
    if args or kwargs:
        return _original(self, x, *args, **kwargs)
    if swap.fused:
        layers = [getattr(self, n) for n in swap.projs]
        ops = _lora_group(layers, x, "lora_mlp", swap.adapter_as_autocast)
        if ops is not None:
            (wg, ag, bg, _, s, p), (wu, au, bu, _, _, _), (wd, ad, bd, _, _, _) = ops
            activation, approximate = swap.activation
            _ran("lora_mlp")
            _count_nf4(layers)
            with _kernel_scope(x):
                return lora_mlp(x, wg, ag, bg, wu, au, bu, wd, ad, bd, s, activation=activation,
                                approximate=approximate, dropout=p)
    gate_name, up_name, down_name = swap.projs
    gate, up = getattr(self, gate_name)(x), getattr(self, up_name)(x)
    if (gate.dtype == up.dtype and gate.device == up.device
            and _runnable(gate, kernel=swap.activation[0], quantized=_on_4bit(getattr(self, n) for n in swap.projs))):
        kernel, approximate = swap.activation
        _ran(kernel)
        with _kernel_scope(gate):
            hidden = swiglu(gate, up) if kernel == "swiglu" else geglu(gate, up, approximate)
    else:
        hidden = self.act_fn(gate) * up
    return getattr(self, down_name)(hidden)


def _head_dtype(hidden: torch.Tensor, head: nn.Linear) -> torch.dtype | None:
    """The dtype HF's ``lm_head(hidden)`` computes (and returns its logits) in right
    now: autocast's, which casts both operands to it, else the common dtype of hidden
    and the weight; None when they differ outside autocast (the kernel then stays out)."""
    w, dev = head.weight, hidden.device.type
    if torch.is_autocast_enabled(dev) and hidden.dtype in _AUTOCAST_CASTS and w.dtype in _AUTOCAST_CASTS \
            and (head.bias is None or head.bias.dtype in _AUTOCAST_CASTS):
        return torch.get_autocast_dtype(dev)
    if hidden.dtype == w.dtype and (head.bias is None or head.bias.dtype == w.dtype):
        return w.dtype
    return None


def _loss_function_is_hf(model: nn.Module) -> bool:
    from transformers.loss.loss_utils import ForCausalLMLoss

    return model.loss_function is ForCausalLMLoss


#: The least share of ignored target rows for which the loss runs on the counted rows alone.
_CUT_SHARE = 1 / 64


class _CountedRows:
    """The target rows that count (not ``ignore_index``) of one loss call, counted before the
    backbone's forward is issued: a completion-only batch (SFT's prompts ignored) then sends
    only its counted rows through the LM head and the loss, as TRL's own fused head does, and
    neither the GEMMs over ignored rows nor a wait for the whole forward is paid.

    The count reaches the host as a :class:`workbench.host_copy.HostCopy`, queued ahead of the
    forward: reading it after the forward has been issued waits only for the GPU to reach that
    copy. During CUDA-graph capture nothing is counted (a read would sync)."""

    def __init__(self, target: torch.Tensor, ignore_index: int):
        self.valid = target.reshape(-1) != ignore_index
        self._count = HostCopy(self.valid.sum())

    def count(self) -> int | None:
        return self._count.value()

    def select(self, hidden: torch.Tensor, target: torch.Tensor):
        """``hidden`` as rows and ``target`` flat, cut to the counted rows where some, not all,
        count; else as they are. The loss is the same: an ignored row adds nothing to it, to the
        mean's denominator or to any gradient."""
        n, total = self.count(), self.valid.numel()
        # A row through the head costs about 6·hidden·vocab FLOPs; the cut costs a few passes over
        # hidden·rows bytes. So it pays once a small share of rows is ignored, not for the one
        # row each sequence ends with (1/seq of them).
        if n is None or n == 0 or total - n < total * _CUT_SHARE:
            return hidden, target
        valid = self.valid.to(hidden.device)
        rows = torch.nonzero_static(valid, size=n).squeeze(1)  # no sync: the size is known
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows),
                target.reshape(-1).index_select(0, rows))


def _causal_lm_forward(self, *args, **kwargs):
    """HF's CausalLM forward, except that with labels the loss comes from the fused
    lm_head + cross-entropy kernel and no logits are formed (``logits=None``)."""
    swap = self.__dict__[_STATE]
    original = swap.previous if swap.had_forward else types.MethodType(type(self).forward, self)
    try:
        bound = inspect.signature(original).bind(*args, **kwargs)
    except TypeError:
        return _original(self, *args, **kwargs)
    given = dict(bound.arguments)
    var_kw = next((n for n, p in bound.signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)
    extra = dict(given.pop(var_kw, {})) if var_kw else {}
    labels = given.pop("labels", None)
    keep = given.pop("logits_to_keep", 0)
    head = self.get_output_embeddings()
    if (labels is None or extra.get("fused_lm_head") or not isinstance(keep, int) or keep != 0
            or type(head) is not nn.Linear or not _plain(head.weight) or not _loss_function_is_hf(self)
            or not _runnable(head.weight, autocast_ok=True)):
        return _original(self, *args, **kwargs)
    extra.pop("fused_lm_head", None)  # TRL's switch, off here: not an argument of the backbone
    return_dict = extra.pop("return_dict", None)
    return_dict = self.config.return_dict if return_dict is None else return_dict

    ignore_index = extra.get("ignore_index", -100)
    target = extra.get("shift_labels")
    if target is None:  # HF's ForCausalLMLoss: position t predicts labels[t + 1], the last one nothing
        target = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    counted = _CountedRows(target, ignore_index)  # before the backbone is issued (_CountedRows)

    outputs = getattr(self, self.base_model_prefix)(**given, **extra)
    hidden = outputs.last_hidden_state
    softcap = getattr(self.config, swap.softcap_key, None) if swap.softcap_key else None
    compute = _head_dtype(hidden, head)
    if compute is not None and hidden.device == head.weight.device:
        rows, target = counted.select(hidden, target.to(hidden.device))
        # Under autocast HF's lm_head runs on autocast's casts of hidden, weight and bias
        # (e.g. QLoRA: fp32 after prepare_model_for_kbit_training, bf16 autocast): so does
        # the kernel, and the [N, V] logits are never formed in either dtype.
        bias = head.bias if head.bias is None else head.bias.to(compute)
        _ran("fused_linear_cross_entropy")
        with _kernel_scope(hidden):
            loss = fused_linear_cross_entropy(rows.to(compute), head.weight.to(compute), target.long(), bias=bias,
                                              ignore_index=ignore_index, softcap=softcap,
                                              num_items_in_batch=extra.get("num_items_in_batch"))
        logits = None
    else:  # what HF's forward would do with these hidden states (and it would likely fail the same way)
        logits = head(hidden)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **extra)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                 hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return out if return_dict else out.to_tuple()


# --------------------------------------------------------------------------- planning
def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper, or the model itself."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _lora_children(parent: nn.Module, names) -> list[nn.Module | None]:
    return [m if _is_lora(m) else None for m in (getattr(parent, n, None) for n in names)]


def _group_problem(layers, names, nf4: bool, allow_bias: bool) -> str | None:
    missing = [n for n, m in zip(names, layers) if m is None]
    if missing:
        return f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no LoRA adapter"
    for n, m in zip(names, layers):
        problem = _lora_problem(m, nf4, allow_bias)
        if problem:
            return f"{n}: {problem}"
    ops = [(float(m.scaling[_adapter(m)]), m.lora_dropout[_adapter(m)]) for m in layers]
    if len({s for s, _ in ops}) != 1:
        return "the adapters' scalings differ (one fused call takes one scaling)"
    if len({float(getattr(d, "p", 0.0)) for _, d in ops}) != 1:
        return "the adapters' dropout probabilities differ"
    return None


class _Plan:
    """The swaps patch_model is about to make, and its report."""

    def __init__(self, fam: Family, options: dict[str, bool]):
        self.fam, self.options = fam, options
        self.report = PatchReport(fam.name, dict(options))
        self.swaps: list[tuple[nn.Module, _Swap]] = []
        self.grouped: set[int] = set()   # id() of LoRA layers that a group (or a decision) already covers
        self.blocks: dict[str, list[nn.Module]] = {}   # the LoRA layers swapped, per decoder layer

    def lora(self, path: str, layers) -> None:
        """LoRA layers the kernels take, as one call does (q/k/v, gate/up/down, or one alone):
        their decoder layer's adapters are cast together (:class:`_AdapterCasts`)."""
        parts = path.split(".")
        numbered = [i for i, part in enumerate(parts) if part.isdigit()]
        key = ".".join(parts[:numbered[-1] + 1]) if numbered else path.rpartition(".")[0]
        self.blocks.setdefault(key, []).extend(layers)

    def add(self, module, swap, kernel=None, module_type=None):
        self.swaps.append((module, swap))
        if kernel:
            self.report._add(kernel, module_type or type(module).__name__)

    def fallback(self, path, kernel, reason):
        self.report.fallbacks.append(Fallback(path, kernel, reason))


def _plan_attention(plan: _Plan, path: str, attn: nn.Module) -> None:
    fam, opt = plan.fam, plan.options
    qkv = None
    if opt["lora"]:
        layers = _lora_children(attn, fam.qkv_projs)
        if any(layers):
            problem = _group_problem(layers, fam.qkv_projs, opt["nf4"], allow_bias=True)
            if problem is None:
                qkv = fam.qkv_projs
                for index, (name, layer) in enumerate(zip(fam.qkv_projs, layers)):
                    plan.grouped.add(id(layer))
                    plan.add(layer, _ProjSwap(_proj_forward, name=name, qkv_index=index))
                plan.report._add("lora_qkv", type(attn).__name__)
                plan.lora(path, layers)
                _note_nf4(plan, layers)
            else:
                plan.fallback(path, "lora_qkv", problem)
    if opt["rope"] or qkv:
        plan.add(attn, _AttentionSwap(_attention_forward, rope=opt["rope"], qkv=qkv), "rope" if opt["rope"] else None)


def _plan_mlp(plan: _Plan, path: str, mlp: nn.Module, config) -> None:
    fam, opt = plan.fam, plan.options
    act_name = getattr(config, fam.activation_key, None)
    activation = GLU_ACTIVATIONS.get(act_name)
    if opt["mlp"] and activation is None:
        plan.fallback(path, "swiglu/geglu", f"activation {act_name!r} has no GLU kernel "
                                            f"(supported: {', '.join(GLU_ACTIVATIONS)})")
    if not (opt["mlp"] and activation is not None):
        return  # lora_mlp includes the activation: without it, the projections go alone (lora_o)
    fused = False
    if opt["lora"]:
        layers = _lora_children(mlp, fam.mlp_projs)
        if any(layers):
            problem = _group_problem(layers, fam.mlp_projs, opt["nf4"], allow_bias=False)
            if problem is None:
                fused = True
                plan.grouped.update(id(m) for m in layers)
                plan.report._add("lora_mlp", type(mlp).__name__)
                plan.lora(path, layers)
                _note_nf4(plan, layers)
            else:
                plan.fallback(path, "lora_mlp", problem)
    # Reported under lora_mlp when fused (which runs the same activation kernel inside).
    plan.add(mlp, _MLPSwap(_mlp_forward, projs=fam.mlp_projs, activation=activation, fused=fused),
             None if fused else activation[0])


def _note_nf4(plan: _Plan, layers) -> None:
    for layer in layers:
        if _is_bnb_4bit(layer.base_layer):
            plan.report._add("nf4_dequant", type(layer.base_layer).__name__)


#: The body of Llama's decoder layer forward (transformers 5.x), with its parameters' names
#: filled in: {h} the hidden states, {kw} the ** parameter, {args} every other parameter
#: passed on by name. Comments and a docstring aside, the installed source must be this.
_LLAMA_LAYER = """
residual = {h}
{h} = self.input_layernorm({h})
{h}, _ = self.self_attn(hidden_states={h}, {args}**{kw})
{h} = residual + {h}
residual = {h}
{h} = self.post_attention_layernorm({h})
{h} = self.mlp({h})
{h} = residual + {h}
return {h}
"""


#: transformers' GradientCheckpointingLayer wraps each layer class's forward in this (5.x).
_CHECKPOINTING_WRAPPER = "GradientCheckpointingLayer.__init_subclass__.<locals>.forward_with_checkpointing"


def _sorted_keywords(tree: ast.AST) -> ast.AST:
    """Keyword arguments in name order (plain names as values: their order changes nothing)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            node.keywords.sort(key=lambda k: (k.arg is None, k.arg or ""))
    return tree


def _layer_pattern(cls: type) -> _LayerSwap | str:
    """A :class:`_LayerSwap` for decoder layers of ``cls`` when its forward is Llama's layer
    (:data:`_LLAMA_LAYER`) under nothing but transformers' ``deprecate_kwarg`` decorators (which
    rename a kwarg; a call that passes one goes to HF's code), else why not."""
    fn, renamed = cls.forward, []
    while hasattr(fn, "__wrapped__"):
        code = fn.__code__
        name = getattr(code, "co_qualname", code.co_name)
        cells = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
        if name.startswith("deprecate_kwarg.") and "old_name" in cells:
            renamed.append(cells["old_name"])
        elif name != _CHECKPOINTING_WRAPPER:  # that one: _layer_forward leaves checkpointed calls to HF
            return f"its forward is wrapped by {name!r}, whose handling of arguments the fused layer does not reproduce"
        fn = fn.__wrapped__
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source).body[0]
        signature = inspect.signature(fn)
    except (OSError, TypeError, SyntaxError, IndexError, ValueError) as err:
        return f"its forward's source cannot be read ({type(err).__name__})"
    params = list(signature.parameters.values())
    var_kw = [p.name for p in params if p.kind is p.VAR_KEYWORD]
    named = [p for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not isinstance(tree, ast.FunctionDef) or len(var_kw) != 1 or not named \
            or len(named) + len(var_kw) + 1 != len(params):
        return "its forward's parameters are not (self, hidden states, named arguments, **kwargs)"
    hidden = named[0].name
    expected = _LLAMA_LAYER.format(h=hidden, kw=var_kw[0], args="".join(f"{p.name}={p.name}, " for p in named[1:]))
    body = tree.body[1:] if (tree.body and isinstance(tree.body[0], ast.Expr)
                             and isinstance(tree.body[0].value, ast.Constant)) else tree.body
    got = [ast.dump(_sorted_keywords(stmt)) for stmt in body]
    want = [ast.dump(_sorted_keywords(stmt)) for stmt in ast.parse(expected).body]
    if got != want:
        return "its forward is not Llama's (residual add, then post_attention_layernorm) in this transformers version"
    return _LayerSwap(_layer_forward, signature=signature, hidden=hidden, var_kw=var_kw[0], renamed=tuple(renamed))


def _plan_layer(plan: _Plan, path: str, layer: nn.Module) -> None:
    if "forward" in layer.__dict__:
        plan.fallback(path, "add_rms_norm", "the layer's forward was replaced on the instance (by a hook or "
                                            "another library)")
        return
    if not _is_a(getattr(layer, "post_attention_layernorm", None), plan.fam.norm):
        plan.fallback(path, "add_rms_norm", f"its post_attention_layernorm is not a {plan.fam.norm}")
        return
    swap = _layer_pattern(type(layer))
    if isinstance(swap, str):
        plan.fallback(path, "add_rms_norm", swap)
        return
    plan.add(layer, swap, "add_rms_norm")


def _is_a(module: nn.Module, class_name: str) -> bool:
    """Whether ``module`` is an instance of the HF class named ``class_name`` (by name,
    through the MRO: FSDP2 re-classes the modules it wraps as subclasses)."""
    return any(c.__name__ == class_name for c in type(module).__mro__)


def _plan(root: nn.Module, fam: Family, options: dict[str, bool]) -> _Plan:
    plan = _Plan(fam, options)
    config = root.config
    modules = dict(root.named_modules())
    for path, module in modules.items():
        if _is_a(module, fam.norm) and options["rms_norm"]:
            plan.add(module, _NormSwap(_norm_forward, eps_attr=fam.norm_eps_attr, offset=fam.norm_offset,
                                       casting=fam.norm_casting), "rms_norm")
        elif fam.decoder_layer and _is_a(module, fam.decoder_layer):
            if options[FUSE_ADD_NORM]:  # (patch_model checked its requirement, rms_norm)
                _plan_layer(plan, path, module)
        elif _is_a(module, fam.attention):
            _plan_attention(plan, path, module)
        elif _is_a(module, fam.mlp):
            _plan_mlp(plan, path, module, config)
    if options["lora"]:  # every other LoRA linear runs alone through lora_o
        for path, module in modules.items():
            if not _is_lora(module) or id(module) in plan.grouped:
                continue
            attr = path.rsplit(".", 1)[-1]
            problem = _lora_problem(module, options["nf4"], allow_bias=False)
            if problem:
                plan.fallback(path, "lora_o", problem)
                continue
            plan.add(module, _ProjSwap(_proj_forward, name=attr, single=True), "lora_o", attr)
            plan.lora(path, [module])
            _note_nf4(plan, [module])
    # q/k/v swapped for lora_qkv also fall back to lora_o alone when lora_o can take them.
    for module, swap in plan.swaps:
        if isinstance(swap, _ProjSwap) and swap.qkv_index is not None:
            swap.single = _lora_problem(module, options["nf4"], allow_bias=False) is None
    if options["loss"]:
        _plan_loss(plan, root, fam)
    return plan


def _plan_loss(plan: _Plan, root: nn.Module, fam: Family) -> None:
    if not _is_a(root, fam.causal_lm):
        plan.fallback("", "fused_linear_cross_entropy", f"the model is a {type(root).__name__}, not a {fam.causal_lm}")
        return
    head = root.get_output_embeddings()
    if type(head) is not nn.Linear:
        plan.fallback("lm_head", "fused_linear_cross_entropy",
                      f"lm_head is a {type(head).__name__} (e.g. LoRA or modules_to_save), not a plain Linear")
        return
    if not _loss_function_is_hf(root):
        plan.fallback("", "fused_linear_cross_entropy", "the model has a custom loss_function")
        return
    plan.add(root, _LossSwap(_causal_lm_forward, softcap_key=fam.softcap_key), "fused_linear_cross_entropy")


# --------------------------------------------------------------------------- public API
#: patch_model's switches that are off unless asked for.
_OFF_BY_DEFAULT = (FUSE_ADD_NORM, ADAPTER_AS_AUTOCAST)
#: A switch that works only with another one on: switch -> (the switch it needs, why).
_REQUIRES = {FUSE_ADD_NORM: ("rms_norm", "it fuses the residual add into the swapped post_attention_layernorm")}


def _missing_requirement(options: dict[str, bool]) -> tuple[str, str, str] | None:
    """(switch, the switch it needs, why) for the first switch on whose requirement is off, else
    None: the one rule patch_model and a run config's ``kernels:`` both enforce, each in its own words."""
    return next(((k, need, why) for k, (need, why) in _REQUIRES.items() if options.get(k) and not options.get(need)),
                None)


def options_from_config(value) -> dict[str, bool] | None:
    """patch_model's options from a training config's ``kernels:`` value: ``true``
    (the default kernels), ``false`` or absent (``None``: do not patch), or a mapping of
    some of :data:`OPTIONS` to booleans (the others stay on) and, optionally,
    ``fuse_add_norm`` and ``adapter_as_autocast`` (off unless given)."""
    if value is None or value is False:
        return None
    defaults = {**dict.fromkeys(OPTIONS, True), **dict.fromkeys(_OFF_BY_DEFAULT, False)}
    if value is True:
        return defaults
    if isinstance(value, dict):
        switches = (*OPTIONS, *_OFF_BY_DEFAULT)
        unknown = sorted(set(value) - set(switches))
        if unknown:
            raise UserError(f"kernels: unknown switch(es) {', '.join(map(str, unknown))}; the switches are "
                            f"{', '.join(switches)}.")
        bad = [k for k, v in value.items() if not isinstance(v, bool)]
        if bad:
            raise UserError(f"kernels: {bad[0]} must be true or false, got {value[bad[0]]!r}.")
        options = {**defaults, **value}
        missing = _missing_requirement(options)
        if missing:
            switch, need, why = missing
            raise UserError(f"kernels: {switch} needs {need} ({why}); drop {need}: false or {switch}: true.")
        return options
    raise UserError(f"kernels: must be true, false or a mapping of {', '.join(OPTIONS)} to true/false, "
                    f"got {value!r}.")


@dataclass
class _Root:
    report: PatchReport
    modules: list[nn.Module]
    globals: list[tuple[str, str]]
    blocks: list[tuple[nn.Module, ...]] = field(default_factory=list)   # _AdapterCasts' blocks


def patch_model(model: nn.Module, *, rms_norm: bool = True, rope: bool = True, mlp: bool = True,
                loss: bool = True, lora: bool = True, nf4: bool = True, fuse_add_norm: bool = False,
                adapter_as_autocast: bool = False) -> PatchReport:
    """Swap the math of ``model`` (a transformers causal LM of a supported family,
    optionally wrapped by PEFT, optionally on a bitsandbytes 4-bit base) for our
    kernels, in place. Returns what was swapped and what fell back, and why.

    ``fuse_add_norm`` (needs ``rms_norm``) also swaps the decoder layer's forward, to run its
    residual add and post_attention_layernorm as one ``add_rms_norm`` kernel (the module
    docstring). Off by default: it measured no faster step at the 1B LoRA shape.

    ``adapter_as_autocast`` chooses numerics, not kernels. PEFT keeps an adapter in fp32 on
    a 16-bit base and, outside autocast, computes its branch in fp32 (x cast up, fp32
    GEMMs, the sum cast back); the LoRA kernels then stay out and PEFT's code runs. With
    the switch on, such an adapter computes in the base's dtype outside autocast too,
    exactly as ``torch.autocast`` to that dtype computes it (the Trainer's ``bf16=True``):
    the adapter's matmuls, its scaling and the sum in bf16, the gradients of A and B
    formed in bf16 and accumulated into the fp32 parameters. Off by default, so a patched
    model follows the numerics its unpatched twin follows.

    Patching an already patched model with the same switches returns its report
    and changes nothing; with other switches it raises UserError (unpatch first).
    """
    options = dict(rms_norm=rms_norm, rope=rope, mlp=mlp, loss=loss, lora=lora, nf4=nf4,
                   fuse_add_norm=fuse_add_norm, adapter_as_autocast=adapter_as_autocast)
    for key, value in options.items():
        if not isinstance(value, bool):
            raise UserError(f"patch option {key} must be true or false, got {value!r}.")
    missing = _missing_requirement(options)
    if missing:
        switch, need, why = missing
        raise UserError(f"patch option {switch}=True needs {need}=True ({why}); pass {need}=True or leave "
                        f"{switch} off.")
    if not isinstance(model, nn.Module):
        raise UserError(f"patch_model needs a torch model, got a {type(model).__name__}.")
    root = _hf_model(model)
    fam = family(family_of(root))
    existing = root.__dict__.get(_ROOT)
    if existing is not None:
        if existing.report.options == options:
            return existing.report
        raise UserError(f"this model is already patched with {existing.report.options}; call "
                        f"workbench.unpatch(model) before patching it with {options}.")

    if getattr(root, "use_kernels", False) and callable(getattr(root, "reset_kernels", None)):
        # transformers (>= 5.25, with the `kernels` package) kernelizes a model it loads with
        # Hub kernels by default and again at every model.train(), replacing each layer's
        # forward: ours would be dropped at the Trainer's first train(). Back to the torch
        # layers (where USE_HUB_KERNELS=0 forbids even that call, nothing was swapped in
        # since: only the flag that re-kernelizes is left to clear), then ours.
        try:
            root.reset_kernels()
        except ValueError:
            root._use_kernels = False
    plan = _plan(root, fam, options)
    for _, swap in plan.swaps:
        swap.adapter_as_autocast = adapter_as_autocast
    held = [(fam.module, "apply_rotary_pos_emb")] if plan.report.count("rope") else []
    installed: list[nn.Module] = []
    try:  # all or nothing
        for module_name, attr in held:
            _hold_global(module_name, attr, _rope_dispatcher, root)
        for module, swap in plan.swaps:
            if _STATE in module.__dict__:
                raise UserError(f"module {type(module).__name__} is already patched as part of another model; "
                                "unpatch that model first.")
            _install(module, swap)
            installed.append(module)
    except BaseException:
        for module in installed:
            _uninstall(module)
        for key in held:
            _release_global(key, root)
        raise
    blocks = [tuple(layers) for layers in plan.blocks.values()]
    root.__dict__[_ROOT] = _Root(plan.report, installed, held, blocks)
    if blocks:
        _add_cast_hooks(root)
    return plan.report


def unpatch_model(model: nn.Module) -> bool:
    """Undo :func:`patch_model` exactly: every swapped module gets back the forward
    it had, and module-level functions are restored once no patched model uses
    them. Returns False (and does nothing) when the model is not patched."""
    root = _hf_model(model)
    state = root.__dict__.get(_ROOT)
    if state is None:
        return False
    wrapped = [type(m).__name__ for m in state.modules if not _installed_here(m)]
    if wrapped:
        raise UserError(f"cannot unpatch: the forward of {len(wrapped)} patched module(s) (first: {wrapped[0]}) was "
                        "replaced after patching (e.g. by a hook or another library); remove that wrapper first.")
    for module in state.modules:
        _uninstall(module)
    for key in state.globals:
        _release_global(key, root)
    _remove_cast_hooks(root)
    del root.__dict__[_ROOT]
    return True


def fused_loss_patched(model: nn.Module) -> bool:
    """Whether :func:`patch_model` put the fused linear cross-entropy into this
    model's CausalLM forward. A wrapper installed afterwards (TRL's fused LM head)
    does not change the answer: labelled calls without its ``fused_lm_head`` switch
    still pass through to ours."""
    return isinstance(_hf_model(model).__dict__.get(_STATE), _LossSwap)


class _CallableModule(types.ModuleType):
    """``workbench.patch`` is this module (Python binds a package's submodules as its
    attributes), so calling it must patch: ``workbench.patch(model)``."""

    def __call__(self, model, **options):
        return patch_model(model, **options)


sys.modules[__name__].__class__ = _CallableModule
