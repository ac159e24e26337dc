"""What differs per architecture between a transformers checkpoint and llama.cpp's GGUF.

One row per supported family (the HF ``model_type``). Everything else — tensor
names (gguf-py's ``TensorNameMap``), the common hyperparameters — is shared.

==========  =========  ==========  ===========  ==================================
family      GGUF arch  rope rows   norm weight  other
==========  =========  ==========  ===========  ==================================
llama       llama      permuted    w            output tensor may be tied
mistral     llama      permuted    w            HF's sliding window is not written
qwen2       qwen2      as is       w            q/k/v biases
qwen3       qwen3      as is       w            per-head q/k RMSNorm (attn_q_norm)
gemma       gemma      as is       1 + w        always tied; llama.cpp scales the
                                                embeddings by sqrt(hidden) itself
gemma2      gemma2     as is       1 + w        logit soft-capping (attention and
                                                final), sliding window on even
                                                layers, 4 norms per layer
==========  =========  ==========  ===========  ==================================

* rope rows: HF rotates the two halves of each head (``rotate_half``); llama.cpp's
  ``llama`` arch rotates adjacent pairs, so q/k rows are reordered for it. qwen2,
  qwen3 and gemma use llama.cpp's NEOX rope, which is HF's layout already.
* norm weight: HF's Gemma RMSNorm multiplies by ``1 + w``; llama.cpp multiplies by
  the stored weight, so GGUF stores ``1 + w`` (computed in fp32).
* gemma2's attention scale: HF uses ``query_pre_attn_scalar ** -0.5``, llama.cpp
  uses ``head_dim ** -0.5`` except for the 46-layer (27B) model, where it uses
  ``(hidden / heads) ** -0.5``; a checkpoint whose scalar differs is refused.

A checkpoint this table cannot describe exactly (rope scaling, biases where
llama.cpp has none, a sliding-window layout llama.cpp does not implement) is refused
with a UserError instead of being exported wrong.
"""
from __future__ import annotations

from dataclasses import dataclass

from workbench.errors import UserError


@dataclass(frozen=True)
class Arch:
    gguf_arch: str          # gguf.MODEL_ARCH member name
    permute_qk: bool        # llama.cpp rotates adjacent pairs (the `llama` arch)
    activations: tuple      # MLP activations llama.cpp computes for this arch
    notes: tuple = ()


# Family names, norm offsets (Gemma's 1 + w) and activation keys come from
# workbench.families; this table adds only what is GGUF-specific.
ARCHS: dict[str, Arch] = {
    "llama": Arch("LLAMA", permute_qk=True, activations=("silu",)),
    "mistral": Arch("LLAMA", permute_qk=True, activations=("silu",),
                    notes=("llama.cpp attends over the whole context: HF Mistral's sliding window "
                           "only matters beyond {sliding_window} tokens",)),
    "qwen2": Arch("QWEN2", permute_qk=False, activations=("silu",)),
    "qwen3": Arch("QWEN3", permute_qk=False, activations=("silu",)),
    "gemma": Arch("GEMMA", permute_qk=False, activations=("gelu_pytorch_tanh",)),
    "gemma2": Arch("GEMMA2", permute_qk=False, activations=("gelu_pytorch_tanh",)),
}


def arch_for(config: dict) -> tuple[str, Arch]:
    """(family, row) for a checkpoint's config.json, or a UserError naming what is supported."""
    from types import SimpleNamespace

    from workbench.families import family_of

    family = family_of(SimpleNamespace(model_type=config.get("model_type")))
    return family, ARCHS[family]


def norm_offset(family: str) -> float:
    """What HF adds to a stored RMSNorm weight (Gemma: 1); GGUF stores weight + offset."""
    from workbench.families import family as family_row

    return family_row(family).norm_offset


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def check_exportable(config: dict) -> list[str]:
    """Refuse what llama.cpp would compute differently; return notes for the report."""
    family, arch = arch_for(config)
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"rope scaling {rope_type!r} is not supported by the GGUF exporter (only unscaled rope); "
                        "export a checkpoint without rope_parameters.rope_type or convert it with llama.cpp's own tools.")
    from workbench.families import family as family_row

    act = config.get(family_row(family).activation_key)
    if act not in arch.activations:
        raise UserError(f"{family} with activation {act!r} cannot be exported: llama.cpp computes "
                        f"{' / '.join(arch.activations)} for this architecture.")
    for flag in ("attention_bias", "mlp_bias"):
        if family != "qwen2" and config.get(flag):
            raise UserError(f"{family} with {flag}=true is not supported by the GGUF exporter (it neither "
                            "converts nor verifies those bias tensors); export a checkpoint without them.")
    if config.get("use_sliding_window"):
        raise UserError(f"{family} with use_sliding_window=true cannot be exported: llama.cpp attends over the "
                        "whole context for this architecture.")
    if family == "gemma2":
        _check_gemma2(config)
    notes = []
    if family == "mistral" and config.get("sliding_window"):
        notes += [n.format(sliding_window=config["sliding_window"]) for n in arch.notes]
    return notes


def _check_gemma2(config: dict) -> None:
    n_layers = config["num_hidden_layers"]
    expected = (config["hidden_size"] // config["num_attention_heads"]) if n_layers == 46 else head_dim(config)
    if config.get("query_pre_attn_scalar", expected) != expected:
        raise UserError(f"gemma2 with query_pre_attn_scalar={config['query_pre_attn_scalar']} cannot be exported: "
                        f"llama.cpp scales attention by 1/sqrt({expected}) for this model shape.")
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
        if config.get(key) is None:
            raise UserError(f"gemma2 without {key} cannot be exported: llama.cpp always applies it "
                            "(and would use its own default value).")
    layer_types = config.get("layer_types")
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if layer_types is not None and list(layer_types) != alternating:
        raise UserError("gemma2 layer_types must alternate sliding/full attention starting with sliding "
                        "(what llama.cpp implements); this checkpoint's layout differs.")


def add_hparams(writer, config: dict) -> None:
    """The arch's hyperparameters, on a gguf.GGUFWriter."""
    family, _ = arch_for(config)
    hd = head_dim(config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if family == "gemma2":
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])
