"""The model families the workbench supports, and everything that differs between them.

One table (:data:`FAMILIES`), one row per family. Code elsewhere (the kernel
patcher, the tests, the training harness) reads the row instead of branching on
the family's name, so adding a family means adding a row here and a tiny config
that exercises it.

What differs, read from transformers 5.23's modeling files (the GPU image has 5.17):

* RMSNorm casting. Llama, Mistral, Qwen2 and Qwen3 normalise in fp32, round the
  normalised value to the input dtype, then multiply by the weight
  (``weight * hidden.to(input_dtype)``). Gemma and Gemma-2 stay in fp32 to the end
  and scale by ``1 + weight`` (the stored weight is w - 1), rounding once
  (``output.type_as(x)``). The epsilon lives in ``variance_epsilon`` or ``eps``.
* Qwen3 also normalises q and k per head (``q_norm`` / ``k_norm``), with the same
  RMSNorm class as its hidden-state norms. Gemma-2 has four norms per layer.
* The gated MLP's activation: SiLU (SwiGLU) or Gemma's ``gelu_pytorch_tanh``
  (GeGLU, tanh form), read from the config key ``hidden_act`` or, for Gemma-2,
  ``hidden_activation``.
* Gemma-2 soft-caps the final logits: ``cap * tanh(logits / cap)`` with
  ``config.final_logit_softcapping``.
* Qwen2's q/k/v projections carry a bias; the others' do not. (Nothing reads this
  from the table: the patcher looks at each projection.)
* The decoder layer. Llama, Mistral, Qwen2, Qwen3 and Gemma run the same layer forward:
  norm, attention, ``residual + attn_out``, ``post_attention_layernorm``, MLP, residual
  add; with ``fuse_add_norm`` the patcher fuses the middle add and norm (``add_rms_norm``),
  after checking the installed forward's source against that pattern. Gemma-2's layer norms the attention
  and MLP outputs as well (four norms a layer): it keeps HF's layer forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.errors import UserError


@dataclass(frozen=True)
class Family:
    """One supported architecture, as HF transformers implements it."""

    name: str
    #: ``config.model_type`` values that belong to this family.
    model_types: tuple[str, ...]
    #: transformers' modeling module (holds the classes below and ``apply_rotary_pos_emb``).
    module: str
    config_class: str
    causal_lm: str
    attention: str
    mlp: str
    #: Every RMSNorm class of the family (hidden-state norms and, for Qwen3, q/k norms).
    norm: str
    #: ``"llama"`` or ``"gemma"``: where the norm rounds (kernels/rms_norm.py casting modes).
    norm_casting: str
    #: Added to the stored weight: Gemma's ``(1 + w)``.
    norm_offset: float
    norm_eps_attr: str
    #: RMSNorm modules per decoder layer (the model adds one final norm).
    norms_per_layer: int
    #: Config key naming the MLP activation (a key of transformers' ``ACT2FN``).
    activation_key: str
    #: Config key of the final-logit soft cap, or None where the family has none.
    softcap_key: str | None = None
    #: The decoder layer class whose forward is Llama's (``hidden = residual + attn_out``, then
    #: ``post_attention_layernorm(hidden)``), where add_rms_norm fuses the two (with fuse_add_norm);
    #: None: HF's layer runs.
    decoder_layer: str | None = None
    #: Attribute names of the attention's q/k/v and output projections, and of the MLP's
    #: gate/up/down projections (the same in every family today).
    qkv_projs: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")
    o_proj: str = "o_proj"
    mlp_projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    #: Family-specific arguments of the tiny test config (see :func:`tiny_config`).
    tiny: dict[str, Any] = field(default_factory=dict)


def _llama_like(name: str, prefix: str, norms_per_layer: int = 2, **kw) -> Family:
    return Family(
        name=name, model_types=(name,), module=f"transformers.models.{name}.modeling_{name}",
        config_class=f"{prefix}Config", causal_lm=f"{prefix}ForCausalLM", attention=f"{prefix}Attention",
        mlp=f"{prefix}MLP", norm=f"{prefix}RMSNorm", norm_casting="llama", norm_offset=0.0,
        norm_eps_attr="variance_epsilon", norms_per_layer=norms_per_layer, activation_key="hidden_act",
        decoder_layer=f"{prefix}DecoderLayer", **kw)


def _gemma_like(name: str, prefix: str, **kw) -> Family:
    return Family(
        name=name, model_types=(name,), module=f"transformers.models.{name}.modeling_{name}",
        config_class=f"{prefix}Config", causal_lm=f"{prefix}ForCausalLM", attention=f"{prefix}Attention",
        mlp=f"{prefix}MLP", norm=f"{prefix}RMSNorm", norm_casting="gemma", norm_offset=1.0,
        norm_eps_attr="eps", **kw)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    _llama_like("llama", "Llama"),
    _llama_like("mistral", "Mistral"),
    _llama_like("qwen2", "Qwen2"),  # q/k/v with biases: lora_qkv takes them
    # q_norm and k_norm: two more Qwen3RMSNorm per layer.
    _llama_like("qwen3", "Qwen3", norms_per_layer=4),
    _gemma_like("gemma", "Gemma", norms_per_layer=2, activation_key="hidden_act", decoder_layer="GemmaDecoderLayer",
                tiny={"hidden_act": "gelu_pytorch_tanh"}),
    _gemma_like("gemma2", "Gemma2", norms_per_layer=4, activation_key="hidden_activation",
                softcap_key="final_logit_softcapping",
                # Caps low enough that the tanh bends within a tiny model's logit range.
                tiny={"hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": 5.0,
                      "attn_logit_softcapping": 20.0, "query_pre_attn_scalar": 16}),
)}

#: The MLP activations our GLU kernels reproduce, by ACT2FN name: (kernel, approximate).
#: Other names (gelu_new, gelu_python_tanh, ...) compute differently and are not swapped.
GLU_ACTIVATIONS: dict[str, tuple[str, str]] = {
    "silu": ("swiglu", "none"),
    "swish": ("swiglu", "none"),
    "gelu": ("geglu", "none"),
    "gelu_pytorch_tanh": ("geglu", "tanh"),
}

#: Shape of every tiny config: 2 layers, grouped-query attention (4 query heads, 2
#: key-value heads) and an intermediate size that is not a power of two, so the
#: kernels' GQA and masked-tail paths run.
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def supported() -> str:
    return ", ".join(FAMILIES)


def family(name: str) -> Family:
    """The table row of family ``name``."""
    if name not in FAMILIES:
        raise UserError(f"unsupported model family {name!r}; supported families: {supported()}.")
    return FAMILIES[name]


def family_of(config_or_model) -> str:
    """The family name of a transformers config, model, or PEFT model wrapping one.

    Raises UserError naming the supported families for any other architecture."""
    config = getattr(config_or_model, "config", config_or_model)  # a model's config, or the config itself
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UserError(f"cannot tell the architecture of a {type(config_or_model).__name__} (it has no "
                        f"config.model_type); pass a transformers model or config of a supported family: "
                        f"{supported()}.")
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam.name
    raise UserError(f"model type {model_type!r} is not supported; supported families: {supported()}.")


def tiny_config(family_name: str, vocab_size: int = 320, **overrides):
    """A 2-layer config of ``family_name`` for tests and the built-in pipeline, built offline.

    Hidden 64, 4 query / 2 key-value heads of dim 16, intermediate 96, eager
    attention (deterministic on CPU, and Gemma-2's attention soft cap needs it);
    ``overrides`` win over everything."""
    from workbench.offline import enforce_offline

    enforce_offline()
    import transformers

    fam = family(family_name)
    kwargs = {"vocab_size": vocab_size, **TINY_SHAPE, **fam.tiny, "attn_implementation": "eager", **overrides}
    return getattr(transformers, fam.config_class)(**kwargs)
