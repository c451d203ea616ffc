"""Hugging Face checkpoints (a directory with config.json + safetensors) <-> zoo models.

Reading: `load_hf(path)` translates config.json into a zoo config (the layout language) and renames
the weights into the zoo's names; the zoo model then computes what the transformers model computes
(tests/test_hf.py proves it per model type). Writing: `export_hf(model, out_dir)` writes a
directory that `transformers` loads, for the mamba, falcon_mamba, mamba2 and jamba layouts.

Each supported `model_type` is one `_Format`: a config translator and a key map
(zoo key -> HF key) built from the translated config. Expert weights are the one place where the
tensors themselves change: the zoo stacks them as [experts, in, out] (the layout torch._grouped_mm
wants), the on-disk HF convention stores one [out, in] Linear weight per expert, and transformers'
in-memory convention fuses gate and up as [experts, 2 * d_ff, d_model]; both HF forms are read.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


class HFConversionError(ValueError):
    """A Hugging Face checkpoint the zoo cannot represent; the message names the field."""


# ----------------------------------------------------------------------------------------------
# Reading the directory

def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """A directory with a config.json that names a model_type (the zoo's own format has config.yaml)."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg) as f:
        return "model_type" in json.load(f)


def read_hf_config(path: str | os.PathLike) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: one safetensors file, sharded safetensors with an index,
    or the older pytorch_model.bin (loaded with weights_only=True)."""
    from safetensors.torch import load_file

    path = str(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return state
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    for name in ("pytorch_model.bin.index.json", "pytorch_model.bin"):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            if name.endswith(".json"):
                with open(full) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                state = {}
                for shard in shards:
                    state.update(torch.load(os.path.join(path, shard), map_location="cpu", weights_only=True))
                return state
            return torch.load(full, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no weights found; expected one of {', '.join(HF_WEIGHT_FILES)}")


# ----------------------------------------------------------------------------------------------
# Config translation helpers

def _get(hf: dict, key: str, default=None, *, required: bool = False):
    if key in hf and hf[key] is not None:
        return hf[key]
    if required:
        raise HFConversionError(f"config.json: field '{key}' is required for model_type "
                                f"{hf.get('model_type')!r}")
    return default


def _require(hf: dict, key: str, allowed, what: str = "") -> None:
    value = hf.get(key)
    if value is not None and value not in allowed:
        raise HFConversionError(f"config.json: {key}={value!r} is not supported{what}; the zoo supports "
                                f"{', '.join(map(repr, allowed))}")


def _json_float(value) -> float:
    """transformers writes non-finite floats as {"__float__": "Infinity"}; plain JSON may say Infinity."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def _dt_rank(hf: dict, key: str, d_model: int):
    rank = _get(hf, key, "auto")
    return "auto" if rank == "auto" else int(rank)


def _lm_common(hf: dict, name: str, eps: float, tie_default: bool) -> dict:
    return {
        "name": name,
        "model": "causal_lm",
        "d_model": int(_get(hf, "hidden_size", required=True)),
        "vocab_size": int(_get(hf, "vocab_size", required=True)),
        "tie_embeddings": bool(_get(hf, "tie_word_embeddings", tie_default)),
        "residual_in_fp32": bool(_get(hf, "residual_in_fp32", True)),
        "norm_eps": float(eps),
    }


# ----------------------------------------------------------------------------------------------
# Per model type: config translation and key map

@dataclass
class _Format:
    """One Hugging Face model type: how its config becomes a zoo config and how zoo keys map to its keys."""
    to_zoo_config: Callable[[dict], dict]
    hf_key: Callable[[str, list[dict]], str]           # (zoo key, zoo layout) -> the on-disk HF key
    to_hf_config: Callable[[dict], dict] | None = None  # zoo config -> HF config (export)
    in_memory_roots: tuple[tuple[str, str], ...] = ()   # transformers' in-memory prefixes -> on-disk ones
    prepare: Callable[[dict], dict] | None = None       # tensor rewrites beyond renaming (fused projections)


def _mamba_config(hf: dict) -> dict:
    _require(hf, "hidden_act", ("silu",))
    falcon = hf.get("model_type") == "falcon_mamba"
    mamba = {
        "d_state": int(_get(hf, "state_size", 16)), "d_conv": int(_get(hf, "conv_kernel", 4)),
        "expand": int(_get(hf, "expand", 2)), "dt_rank": _dt_rank(hf, "time_step_rank", 0),
        "conv_bias": bool(_get(hf, "use_conv_bias", True)), "bias": bool(_get(hf, "use_bias", False)),
        "dt_min": float(_get(hf, "time_step_min", 1e-3)), "dt_max": float(_get(hf, "time_step_max", 0.1)),
        "dt_init_floor": float(_get(hf, "time_step_floor", 1e-4)),
    }
    if falcon:
        mamba.update(inner_norms="weightless", norm_eps=float(_get(hf, "mixer_rms_eps", 1e-6)))
    intermediate = hf.get("intermediate_size")
    if intermediate is not None and intermediate != mamba["expand"] * hf["hidden_size"]:
        raise HFConversionError(f"config.json: intermediate_size={intermediate} != expand * hidden_size = "
                                f"{mamba['expand'] * hf['hidden_size']}; the zoo derives d_inner from expand")
    cfg = _lm_common(hf, hf.get("model_type", "mamba"), _get(hf, "layer_norm_epsilon", 1e-5), True)
    cfg.update(mamba=mamba, layers={"count": int(_get(hf, "num_hidden_layers", required=True)), "mixer": "mamba"})
    return cfg


def _mamba2_config(hf: dict) -> dict:
    _require(hf, "hidden_act", ("silu",))
    d_model, expand = int(hf["hidden_size"]), int(_get(hf, "expand", 2))
    headdim, nheads = int(_get(hf, "head_dim", 64)), int(_get(hf, "num_heads", required=True))
    if nheads * headdim != expand * d_model:
        raise HFConversionError(f"config.json: num_heads * head_dim = {nheads * headdim} must equal expand * "
                                f"hidden_size = {expand * d_model} (the zoo's Mamba2 has d_ssm = d_inner)")
    limit = tuple(_json_float(v) for v in _get(hf, "time_step_limit", (0.0, math.inf)))
    cfg = _lm_common(hf, "mamba2", _get(hf, "layer_norm_epsilon", 1e-5), False)
    cfg.update(mamba2={
        "d_state": int(_get(hf, "state_size", 128)), "d_conv": int(_get(hf, "conv_kernel", 4)),
        "expand": expand, "headdim": headdim, "ngroups": int(_get(hf, "n_groups", 1)),
        "conv_bias": bool(_get(hf, "use_conv_bias", True)), "bias": bool(_get(hf, "use_bias", False)),
        "chunk_size": int(_get(hf, "chunk_size", 256)), "dt_limit": list(limit),
        "dt_min": float(_get(hf, "time_step_min", 1e-3)), "dt_max": float(_get(hf, "time_step_max", 0.1)),
        "dt_init_floor": float(_get(hf, "time_step_floor", 1e-4)),
        "norm_eps": float(_get(hf, "layer_norm_epsilon", 1e-5)),
    }, layers={"count": int(_get(hf, "num_hidden_layers", required=True)), "mixer": "mamba2"})
    return cfg


def _jamba_config(hf: dict) -> dict:
    _require(hf, "hidden_act", ("silu",))
    eps = float(_get(hf, "rms_norm_eps", 1e-6))
    d_model = int(hf["hidden_size"])
    n_heads = int(_get(hf, "num_attention_heads", required=True))
    cfg = _lm_common(hf, "jamba", eps, False)
    attn_period, attn_offset = int(_get(hf, "attn_layer_period", 8)), int(_get(hf, "attn_layer_offset", 4))
    moe_period, moe_offset = int(_get(hf, "expert_layer_period", 2)), int(_get(hf, "expert_layer_offset", 1))
    num_experts = int(_get(hf, "num_experts", 16))
    d_ff = int(_get(hf, "intermediate_size", required=True))
    ffn = {"default": "mlp"}
    if num_experts > 1:
        ffn["moe"] = {"every": moe_period, "offset": moe_offset}
    cfg.update(
        mamba={"d_state": int(_get(hf, "mamba_d_state", 16)), "d_conv": int(_get(hf, "mamba_d_conv", 4)),
               "expand": int(_get(hf, "mamba_expand", 2)), "dt_rank": _dt_rank(hf, "mamba_dt_rank", d_model),
               "conv_bias": bool(_get(hf, "mamba_conv_bias", True)), "bias": bool(_get(hf, "mamba_proj_bias", False)),
               "inner_norms": "learned", "norm_eps": eps},
        attention={"n_heads": n_heads, "n_kv_heads": int(_get(hf, "num_key_value_heads", n_heads))},
        mlp={"d_ff": d_ff, "activation": "swiglu"},
        moe={"d_ff": d_ff, "num_experts": num_experts, "top_k": int(_get(hf, "num_experts_per_tok", 2)),
             "activation": "swiglu", "router": "softmax", "normalize_topk": False,
             "load_balancing_coef": float(_get(hf, "router_aux_loss_coef", 0.001))},
        layers={"count": int(_get(hf, "num_hidden_layers", required=True)),
                "mixer": {"default": "mamba", "attention": {"every": attn_period, "offset": attn_offset}},
                "ffn": ffn},
    )
    return cfg


def _mamba2_section(hf: dict, *, d_model: int, nheads_key: str, headdim_key: str, groups_key: str,
                    state_key: str, conv_key: str, expand_key: str, chunk_key: str, conv_bias_key: str,
                    bias_key: str, eps: float) -> dict:
    """The Mamba-2 kwargs shared by bamba and nemotron_h configs (each names the fields its own way)."""
    expand = int(_get(hf, expand_key, 2))
    nheads = int(_get(hf, nheads_key, required=True))
    headdim = _get(hf, headdim_key, "auto")
    headdim = expand * d_model // nheads if headdim == "auto" else int(headdim)
    if nheads * headdim != expand * d_model:
        raise HFConversionError(f"config.json: {nheads_key} * {headdim_key} = {nheads * headdim} must equal "
                                f"{expand_key} * hidden_size = {expand * d_model}")
    return {
        "d_state": int(_get(hf, state_key, 128)), "d_conv": int(_get(hf, conv_key, 4)), "expand": expand,
        "headdim": headdim, "ngroups": int(_get(hf, groups_key, 1)), "chunk_size": int(_get(hf, chunk_key, 256)),
        "conv_bias": bool(_get(hf, conv_bias_key, True)), "bias": bool(_get(hf, bias_key, False)),
        "dt_limit": [_json_float(v) for v in _get(hf, "time_step_limit", (0.0, math.inf))], "norm_eps": eps,
    }


def _bamba_config(hf: dict) -> dict:
    _require(hf, "hidden_act", ("silu",))
    eps = float(_get(hf, "rms_norm_eps", 1e-5))
    d_model = int(hf["hidden_size"])
    n_heads = int(_get(hf, "num_attention_heads", required=True))
    rope = _get(hf, "rope_parameters", {}) or {}
    if rope.get("rope_type", "default") != "default":
        raise HFConversionError(f"config.json: rope_parameters.rope_type={rope['rope_type']!r}: the zoo "
                                f"supports the default (unscaled) RoPE")
    cfg = _lm_common(hf, "bamba", eps, False)
    cfg["residual_in_fp32"] = False
    cfg.update(
        mamba2=_mamba2_section(hf, d_model=d_model, nheads_key="mamba_n_heads", headdim_key="mamba_d_head",
                               groups_key="mamba_n_groups", state_key="mamba_d_state", conv_key="mamba_d_conv",
                               expand_key="mamba_expand", chunk_key="mamba_chunk_size",
                               conv_bias_key="mamba_conv_bias", bias_key="mamba_proj_bias", eps=eps),
        attention={"n_heads": n_heads, "n_kv_heads": int(_get(hf, "num_key_value_heads", n_heads)),
                   "rope": True, "rope_theta": float(rope.get("rope_theta", 10000.0)),
                   "rope_fraction": float(rope.get("partial_rotary_factor", 1.0)),
                   "bias": bool(_get(hf, "attention_bias", False))},
        mlp={"d_ff": int(_get(hf, "intermediate_size", required=True)), "activation": "swiglu",
             "bias": bool(_get(hf, "mlp_bias", False))},
        layers={"count": int(_get(hf, "num_hidden_layers", required=True)),
                "mixer": {"default": "mamba2", "attention": {"at": list(_get(hf, "attn_layer_indices", []))}},
                "ffn": "mlp"},
    )
    if not cfg["layers"]["mixer"]["attention"]["at"]:
        cfg["layers"]["mixer"] = "mamba2"
    return cfg


_NEMOTRON_SYMBOLS = {"mamba": "mamba2", "linear_attention": "mamba2", "M": "mamba2", "attention": "attention",
                     "full_attention": "attention", "*": "attention", "mlp": "mlp", "-": "mlp", "moe": "moe",
                     "E": "moe"}


def _nemotron_config(hf: dict) -> dict:
    eps = float(_get(hf, "layer_norm_epsilon", 1e-5))
    d_model = int(hf["hidden_size"])
    blocks = _get(hf, "layers_block_type") or list(_get(hf, "hybrid_override_pattern", "", required=True))
    unknown = sorted({b for b in blocks if b not in _NEMOTRON_SYMBOLS})
    if unknown:
        raise HFConversionError(f"config.json: layers_block_type has {unknown}; the zoo maps "
                                f"{', '.join(sorted(_NEMOTRON_SYMBOLS))}")
    if int(_get(hf, "n_group", 1)) != 1 or _get(hf, "moe_latent_size") is not None:
        raise HFConversionError("config.json: n_group > 1 (group-limited routing) and moe_latent_size are not "
                                "supported by the zoo's MoE")
    if int(_get(hf, "num_nextn_predict_layers", 0)):
        raise HFConversionError("config.json: num_nextn_predict_layers > 0 (multi-token prediction heads) "
                                "is not supported")
    n_heads = int(_get(hf, "num_attention_heads", required=True))
    act = _get(hf, "mlp_hidden_act", "relu2")
    if act not in ("relu2", "silu", "gelu", "relu"):
        raise HFConversionError(f"config.json: mlp_hidden_act={act!r} is not supported")
    cfg = _lm_common(hf, "nemotron_h", eps, False)
    cfg["residual_in_fp32"] = bool(_get(hf, "residual_in_fp32", False))
    cfg.update(
        mamba2=_mamba2_section(hf, d_model=d_model, nheads_key="mamba_num_heads", headdim_key="mamba_head_dim",
                               groups_key="n_groups", state_key="ssm_state_size", conv_key="conv_kernel",
                               expand_key="expand", chunk_key="chunk_size", conv_bias_key="use_conv_bias",
                               bias_key="mamba_proj_bias", eps=eps),
        attention={"n_heads": n_heads, "n_kv_heads": int(_get(hf, "num_key_value_heads", n_heads)),
                   "head_dim": int(_get(hf, "head_dim", d_model // n_heads)),
                   "bias": bool(_get(hf, "attention_bias", False))},
        mlp={"d_ff": int(_get(hf, "intermediate_size", required=True)), "activation": act,
             "bias": bool(_get(hf, "mlp_bias", False))},
        moe={"d_ff": int(_get(hf, "moe_intermediate_size", 1)), "num_experts": int(_get(hf, "n_routed_experts", 1)),
             "top_k": int(_get(hf, "num_experts_per_tok", 1)), "activation": act, "router": "sigmoid",
             "normalize_topk": bool(_get(hf, "norm_topk_prob", True)),
             "routed_scaling_factor": float(_get(hf, "routed_scaling_factor", 1.0)),
             "shared_expert_d_ff": (int(_get(hf, "moe_shared_expert_intermediate_size"))
                                    if int(_get(hf, "n_shared_experts", 0)) else None)},
        layers=[_NEMOTRON_SYMBOLS[b] for b in blocks],
    )
    return cfg


def _zamba2_config(hf: dict) -> dict:
    """Zamba2: Mamba-2 layers; "hybrid" layers run a shared attention + MLP block first (blocks alternate:
    the k-th hybrid layer uses block k % num_mem_blocks), fed concat(hidden, embeddings), its output
    passed through a per-site linear and added to the Mamba layer's input (zoo: output next_input)."""
    if _get(hf, "use_long_context", False):
        raise HFConversionError("config.json: use_long_context=true (rescaled RoPE) is not supported")
    eps = float(_get(hf, "rms_norm_eps", 1e-5))
    d_model = int(hf["hidden_size"])
    types = _get(hf, "layers_block_type", required=True)
    unknown = sorted({t for t in types if t not in ("mamba", "linear_attention", "hybrid")})
    if unknown:
        raise HFConversionError(f"config.json: layers_block_type has {unknown}; zamba2 layers are "
                                f"mamba / linear_attention / hybrid")
    n_heads = int(_get(hf, "num_attention_heads", required=True))
    head_dim = int(_get(hf, "attention_head_dim", 2 * d_model // n_heads))
    n_blocks = int(_get(hf, "num_mem_blocks", 1))
    hybrid = [i for i, t in enumerate(types) if t == "hybrid"]
    act = _get(hf, "hidden_act", "gelu")
    if act not in ("gelu", "silu"):
        raise HFConversionError(f"config.json: hidden_act={act!r} is not supported (gelu or silu)")
    rope = _get(hf, "rope_parameters", {}) or {}
    rank = int(_get(hf, "adapter_rank", 128))
    targets = ["mlp"] + (["qkv"] if _get(hf, "use_shared_attention_adapter", False) else [])
    cfg = _lm_common(hf, "zamba2", eps, True)
    cfg["residual_in_fp32"] = False
    bias = bool(_get(hf, "add_bias_linear", False))
    cfg.update(
        mamba2={"d_state": int(_get(hf, "mamba_d_state", 64)), "d_conv": int(_get(hf, "mamba_d_conv", 4)),
                "expand": int(_get(hf, "mamba_expand", 2)), "headdim": int(_get(hf, "mamba_headdim", 64)),
                "ngroups": int(_get(hf, "mamba_ngroups", 1)), "chunk_size": int(_get(hf, "chunk_size", 256)),
                "conv_bias": True, "bias": bias, "norm_eps": 1e-5,
                # Zamba2 clamps dt from below at time_step_min (transformers: time_step_limit)
                "dt_limit": [float(_get(hf, "time_step_min", 1e-3)), math.inf]},
        attention={"n_heads": n_heads, "n_kv_heads": int(_get(hf, "num_key_value_heads", n_heads)),
                   "head_dim": head_dim, "softmax_scale": (head_dim / 2) ** -0.5,
                   "rope": bool(_get(hf, "use_mem_rope", False)),
                   "rope_theta": float(rope.get("rope_theta", 10000.0))},
        mlp={"d_ff": int(_get(hf, "intermediate_size", 4 * d_model)),
             "activation": "geglu" if act == "gelu" else "swiglu", "bias": bias},
        shared={f"block_{b}": {"input": "concat_embeddings", "blocks": ["attention", "mlp"],
                               "lora_rank": rank, "lora_targets": targets} for b in range(n_blocks)},
        layers={"count": len(types), "mixer": "mamba2",
                "insert": {f"block_{b}": {"at": hybrid[b::n_blocks]} for b in range(n_blocks) if hybrid[b::n_blocks]}},
    )
    return cfg


def _zamba2_sites(layout: list[dict]) -> tuple[dict[int, int], dict[int, tuple[int, int, int]], dict[str, int]]:
    """From the zoo layout: main position -> HF layer; site position -> (HF layer, hybrid index k,
    HF layer holding the block's weights); block name -> HF layer holding its weights (the first
    hybrid layer that uses it, which is where transformers saves the tied block and all its adapters)."""
    main, sites, holder = {}, {}, {}
    hf_layer, k = 0, 0
    for pos, entry in enumerate(layout):
        if entry["type"] == "shared":
            holder.setdefault(entry["block"], hf_layer)
            sites[pos] = (hf_layer, k, holder[entry["block"]])
            k += 1
        else:
            main[pos] = hf_layer
            hf_layer += 1
    return main, sites, holder


_ZAMBA2_BLOCK = {"norms.0.weight": "input_layernorm.weight", "norms.1.weight": "pre_ff_layernorm.weight",
                 "blocks.0.": "self_attn.", "blocks.1.": "feed_forward."}
_ZAMBA2_LORA = {"blocks_0_q_proj": "self_attn.linear_q_adapter_list", "blocks_0_k_proj": "self_attn.linear_k_adapter_list",
                "blocks_0_v_proj": "self_attn.linear_v_adapter_list", "blocks_1_mlp": "feed_forward.gate_up_proj_adapter_list"}


def _shared_block_key(zoo_key: str, holder: dict[str, int], inner: str, table: dict[str, str],
                      model_type: str) -> str:
    """shared.<block>.<rest> -> model.layers.{holder}.<inner>.<renamed rest>: transformers keeps a
    tied shared block under the first hybrid layer that uses it."""
    _, block, rest = zoo_key.split(".", 2)
    for ours, theirs in table.items():
        if rest.startswith(ours):
            return f"model.layers.{holder[block]}.{inner}.{theirs}{rest[len(ours):]}"
    raise HFConversionError(f"{zoo_key} has no {model_type} counterpart")


def _zamba2_key(zoo_key: str, layout: list[dict]) -> str:
    if zoo_key in _LM_ENDS:
        return {"embedding.weight": "model.embed_tokens.weight", "norm_f.weight": "model.final_layernorm.weight",
                "lm_head.weight": "lm_head.weight"}[zoo_key]
    main, sites, holder = _zamba2_sites(layout)
    if zoo_key.startswith("shared."):
        return _shared_block_key(zoo_key, holder, "shared_transformer", _ZAMBA2_BLOCK, "zamba2")
    pos, rest = _split_layer_key(zoo_key)
    if pos in sites:
        hf_layer, k, hold = sites[pos]
        if rest == "linear.weight":
            return f"model.layers.{hf_layer}.linear.weight"
        _, adapter, tail = rest.split(".", 2)                       # lora.<adapter>.<0|1>.weight
        return f"model.layers.{hold}.shared_transformer.{_ZAMBA2_LORA[adapter]}.{k}.{tail}"
    hf_layer = main[pos]
    hybrid = pos > 0 and layout[pos - 1]["type"] == "shared"
    inner = "mamba_decoder." if hybrid else ""
    if rest == "norm.weight":
        return f"model.layers.{hf_layer}.{inner}input_layernorm.weight"
    return f"model.layers.{hf_layer}.{inner}mamba.{rest[len('mixer.'):]}"


def _split_gate_up(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zamba2's fused MLP Linear gate_up_proj [2 d_ff, d] (gate rows first) -> gate_proj, up_proj."""
    out = {}
    for key, value in hf_state.items():
        if key.endswith("feed_forward.gate_up_proj.weight"):
            gate, up = value.chunk(2, dim=0)
            out[key.replace("gate_up_proj", "gate_proj")] = gate
            out[key.replace("gate_up_proj", "up_proj")] = up
        else:
            out[key] = value
    return out


def _zamba_config(hf: dict) -> dict:
    """Zamba (v1): Mamba-1 layers with n_mamba_heads heads (per-head x_proj / dt_proj, B, C); "hybrid"
    layers first run ONE shared attention + MLP block (weights tied across all sites) on
    concat(hidden, embeddings), whose output goes through a per-site linear and is added to that Mamba
    layer's input only (zoo: output next_input). Attention: no positional encoding, score scale
    (head_dim/2)^-0.5. No residual inside the block (zoo SharedBlock)."""
    _require(hf, "hidden_mamba_act", ("silu",))
    act = _get(hf, "hidden_act", "gelu")
    if act not in ("gelu", "silu"):
        raise HFConversionError(f"config.json: hidden_act={act!r} is not supported (gelu or silu)")
    eps = float(_get(hf, "rms_norm_eps", 1e-5))
    d_model = int(_get(hf, "hidden_size", required=True))
    n_layers = int(_get(hf, "num_hidden_layers", required=True))
    attn_width = int(_get(hf, "attention_hidden_size", 2 * d_model))
    if attn_width != 2 * d_model:
        raise HFConversionError(f"config.json: attention_hidden_size={attn_width} must be 2 * hidden_size = "
                                f"{2 * d_model} (the shared block reads concat(hidden, embeddings))")
    n_heads = int(_get(hf, "num_attention_heads", required=True))
    head_dim = int(_get(hf, "attention_head_dim", 2 * d_model // n_heads))
    types = _get(hf, "layers_block_type")
    if types is None:           # transformers' default placement: hybrid at 2, then at 3 + i, i % period == offset
        period, offset = int(_get(hf, "attn_layer_period", 6)), int(_get(hf, "attn_layer_offset", 4))
        types = ["mamba", "mamba", "hybrid"] + ["hybrid" if i % period == offset else "mamba"
                                                for i in range(n_layers - 3)]
    unknown = sorted({t for t in types if t not in ("mamba", "linear_attention", "hybrid")})
    if unknown:
        raise HFConversionError(f"config.json: layers_block_type has {unknown}; zamba layers are "
                                f"mamba / linear_attention / hybrid")
    if len(types) != n_layers:
        raise HFConversionError(f"config.json: layers_block_type has {len(types)} entries but "
                                f"num_hidden_layers={n_layers}")
    d_inner = int(_get(hf, "mamba_expand", 2)) * d_model
    n_mamba_heads = int(_get(hf, "n_mamba_heads", 2))
    if d_inner % n_mamba_heads:
        raise HFConversionError(f"config.json: n_mamba_heads={n_mamba_heads} must divide mamba_expand * "
                                f"hidden_size = {d_inner}")
    hybrid = [i for i, t in enumerate(types) if t == "hybrid"]
    cfg = _lm_common(hf, "zamba", eps, True)
    cfg["residual_in_fp32"] = False
    cfg.update(
        mamba={"d_state": int(_get(hf, "mamba_d_state", 16)), "d_conv": int(_get(hf, "mamba_d_conv", 4)),
               "expand": int(_get(hf, "mamba_expand", 2)), "dt_rank": _dt_rank(hf, "mamba_dt_rank", d_model),
               "conv_bias": bool(_get(hf, "mamba_conv_bias", True)), "bias": bool(_get(hf, "mamba_proj_bias", False)),
               "dt_min": float(_get(hf, "time_step_min", 1e-3)), "dt_max": float(_get(hf, "time_step_max", 0.1)),
               "dt_init_floor": float(_get(hf, "time_step_floor", 1e-4)), "n_heads": n_mamba_heads},
        attention={"n_heads": n_heads, "n_kv_heads": int(_get(hf, "num_key_value_heads", n_heads)),
                   "head_dim": head_dim, "softmax_scale": (head_dim / 2) ** -0.5},
        mlp={"d_ff": int(_get(hf, "intermediate_size", required=True)),
             "activation": "geglu" if act == "gelu" else "swiglu"},
        layers={"count": n_layers, "mixer": "mamba"},
    )
    if hybrid:
        cfg["shared"] = {"attn_block": {"input": "concat_embeddings", "output": "next_input",
                                        "blocks": ["attention", "mlp"]}}
        cfg["layers"]["insert"] = {"attn_block": {"at": hybrid}}
    return cfg


_ZAMBA_BLOCK = {"norms.0.weight": "input_layernorm.weight", "norms.1.weight": "pre_ff_layernorm.weight",
                "blocks.0.": "self_attn.", "blocks.1.": "feed_forward."}


def _zamba_key(zoo_key: str, layout: list[dict]) -> str:
    """zamba: main layer i is HF layer i (under mamba_decoder. when a shared site precedes it); the
    site before it holds model.layers.{i}.linear; the shared block's weights live under the first
    hybrid layer's shared_transf (transformers ties the others to it)."""
    if zoo_key in _LM_ENDS:
        return {"embedding.weight": "model.embed_tokens.weight", "norm_f.weight": "model.final_layernorm.weight",
                "lm_head.weight": "lm_head.weight"}[zoo_key]
    main, sites, holder = _zamba2_sites(layout)
    if zoo_key.startswith("shared."):
        return _shared_block_key(zoo_key, holder, "shared_transf", _ZAMBA_BLOCK, "zamba")
    pos, rest = _split_layer_key(zoo_key)
    if pos in sites:
        if rest != "linear.weight":
            raise HFConversionError(f"import: {zoo_key} has no zamba counterpart (zamba sites have no LoRA)")
        return f"model.layers.{sites[pos][0]}.linear.weight"
    hybrid = pos > 0 and layout[pos - 1]["type"] == "shared"
    inner = "mamba_decoder." if hybrid else ""
    if rest == "norm.weight":
        return f"model.layers.{main[pos]}.{inner}input_layernorm.weight"
    return f"model.layers.{main[pos]}.{inner}mamba.{rest[len('mixer.'):]}"


_ZAMBA_SHARED_RE = re.compile(r"^model\.layers\.(\d+)\.shared_transf\.(.+)$")


def _zamba_prepare(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """zamba tensors -> the zoo's layouts:
    - in_proj rows alternate x and z channels (transformers views the output as [.., d_inner, 2]):
      rows 0::2 are x, rows 1::2 are z; the zoo's in_proj is x | z.
    - A_log [heads, headdim, d_state] -> [d_inner, d_state]; D [heads, headdim] -> [d_inner].
    - one head: x_proj_weight [1, ...], dt_proj_weight [1, ...], dt_proj_bias [1, ...] -> the zoo's
      x_proj / dt_proj Linears.
    - shared_transf copies under later hybrid layers (checkpoints saved without tying) must equal the
      first one's and are dropped."""
    out, shared = {}, {}
    for key, value in hf_state.items():
        m = _ZAMBA_SHARED_RE.match(key)
        if m:
            shared.setdefault(m.group(2), []).append((int(m.group(1)), key, value))
            continue
        if ".mamba." in key:
            name = key.rsplit(".mamba.", 1)[1]
            base = key[: -len(name)]
            if name in ("in_proj.weight", "in_proj.bias"):
                value = torch.cat([value[0::2], value[1::2]], dim=0)
            elif name == "A_log":
                value = value.reshape(-1, value.shape[-1])
            elif name == "D":
                value = value.reshape(-1)
            elif name in ("x_proj_weight", "dt_proj_weight", "dt_proj_bias") and value.shape[0] == 1:
                key, value = base + name.replace("_weight", ".weight").replace("_bias", ".bias"), value[0]
        out[key] = value
    for name, copies in shared.items():
        copies.sort(key=lambda c: c[0])
        _, first_key, first = copies[0]
        for _, key, value in copies[1:]:
            if value.shape != first.shape or not torch.equal(value, first):
                raise HFConversionError(f"checkpoint: {key} differs from {first_key}; zamba's shared block "
                                        f"must be one set of weights")
        out[first_key] = first
    return out


_LM_ENDS = {"embedding.weight", "norm_f.weight", "lm_head.weight"}


def _split_layer_key(zoo_key: str) -> tuple[int, str]:
    """'layers.12.mixer.in_proj.weight' -> (12, 'mixer.in_proj.weight')."""
    _, index, rest = zoo_key.split(".", 2)
    return int(index), rest


def _backbone_key(zoo_key: str, layout: list[dict], root: str = "backbone", embed: str = "embeddings",
                  renames: tuple = ()) -> str:
    """mamba, falcon_mamba, mamba2, nemotron_h: <root>.layers.{i}.{norm, mixer.*} map one to one,
    up to the per-format renames of names inside the mixer."""
    if zoo_key in _LM_ENDS:
        return {"embedding.weight": f"{root}.{embed}.weight", "norm_f.weight": f"{root}.norm_f.weight",
                "lm_head.weight": "lm_head.weight"}[zoo_key]
    i, rest = _split_layer_key(zoo_key)
    for ours, theirs in renames:
        if rest.startswith(ours):
            rest = theirs + rest[len(ours):]
            break
    return f"{root}.layers.{i}.{rest}"


def _jamba_key(zoo_key: str, layout: list[dict]) -> str:
    """jamba, bamba: HF layer i = zoo sublayers 2i (mixer, input_layernorm) and 2i+1 (feed_forward,
    pre_ff_layernorm)."""
    if zoo_key in _LM_ENDS:
        return {"embedding.weight": "model.embed_tokens.weight", "norm_f.weight": "model.final_layernorm.weight",
                "lm_head.weight": "lm_head.weight"}[zoo_key]
    j, rest = _split_layer_key(zoo_key)
    i, is_ffn = divmod(j, 2)
    if rest == "norm.weight":
        return f"model.layers.{i}.{'pre_ff_layernorm' if is_ffn else 'input_layernorm'}.weight"
    rest = rest[len("mixer."):]
    if is_ffn:
        return f"model.layers.{i}.feed_forward.{rest}"
    return f"model.layers.{i}.{'self_attn' if layout[j]['type'] == 'attention' else 'mamba'}.{rest}"


_NEMOTRON_RENAMES = (("mixer.router.", "mixer.gate."), ("mixer.e_score_correction_bias", "mixer.gate.e_score_correction_bias"),
                     ("mixer.shared_expert.", "mixer.shared_experts."))


def _nemotron_key(zoo_key: str, layout: list[dict]) -> str:
    return _backbone_key(zoo_key, layout, renames=_NEMOTRON_RENAMES)


def _mamba_hf_config(cfg: dict) -> dict:
    m = next(e for e in cfg["layout"] if e["type"] == "mamba")
    falcon = m.get("inner_norms") == "weightless"
    if m.get("inner_norms") not in (None, "weightless"):
        raise HFConversionError("export: a Mamba-1 layout with learned inner norms is a Jamba layout; "
                                "transformers' mamba format has no dt/B/C norms")
    out = {
        "model_type": "falcon_mamba" if falcon else "mamba",
        "architectures": ["FalconMambaForCausalLM" if falcon else "MambaForCausalLM"],
        "vocab_size": cfg["vocab_size"], "hidden_size": cfg["d_model"], "state_size": m["d_state"],
        "num_hidden_layers": len(cfg["layout"]), "layer_norm_epsilon": cfg["norm_eps"],
        "expand": m["expand"], "conv_kernel": m["d_conv"], "use_bias": m["bias"],
        "use_conv_bias": m["conv_bias"], "hidden_act": "silu", "residual_in_fp32": cfg["residual_in_fp32"],
        "time_step_rank": m["dt_rank"], "time_step_min": m["dt_min"], "time_step_max": m["dt_max"],
        "time_step_floor": m["dt_init_floor"], "tie_word_embeddings": cfg["tie_embeddings"],
        "intermediate_size": m["expand"] * cfg["d_model"],
    }
    if out["time_step_rank"] == "auto":
        out["time_step_rank"] = math.ceil(cfg["d_model"] / 16)
    if falcon:
        out["mixer_rms_eps"] = m["norm_eps"]
    return out


def _mamba2_hf_config(cfg: dict) -> dict:
    m = next(e for e in cfg["layout"] if e["type"] == "mamba2")
    if m.get("d_ssm") not in (None, m["expand"] * cfg["d_model"]):
        raise HFConversionError("export: transformers' mamba2 has no partial SSM (d_ssm < d_inner)")
    return {
        "model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"],
        "vocab_size": cfg["vocab_size"], "hidden_size": cfg["d_model"], "state_size": m["d_state"],
        "num_hidden_layers": len(cfg["layout"]), "layer_norm_epsilon": cfg["norm_eps"],
        "expand": m["expand"], "conv_kernel": m["d_conv"], "n_groups": m["ngroups"],
        "head_dim": m["headdim"], "num_heads": m["expand"] * cfg["d_model"] // m["headdim"],
        "use_bias": m["bias"], "use_conv_bias": m["conv_bias"], "hidden_act": "silu",
        "residual_in_fp32": cfg["residual_in_fp32"], "chunk_size": m["chunk_size"],
        "time_step_limit": list(m["dt_limit"]), "time_step_min": m["dt_min"], "time_step_max": m["dt_max"],
        "time_step_floor": m["dt_init_floor"], "tie_word_embeddings": cfg["tie_embeddings"],
    }


def _jamba_hf_config(cfg: dict) -> dict:
    layout = cfg["layout"]
    if len(layout) % 2:
        raise HFConversionError("export: a Jamba layout alternates mixer and FFN sublayers (even length)")
    mixers, ffns = layout[0::2], layout[1::2]
    attn_idx = [i for i, e in enumerate(mixers) if e["type"] == "attention"]
    moe_idx = [i for i, e in enumerate(ffns) if e["type"] == "moe"]
    period = lambda idx, n: (idx[1] - idx[0]) if len(idx) > 1 else n  # noqa: E731
    a_per, e_per = period(attn_idx, len(mixers)), period(moe_idx, len(ffns))
    a_off = attn_idx[0] if attn_idx else len(mixers)
    e_off = moe_idx[0] if moe_idx else 0
    if [i for i in range(len(mixers)) if i % a_per == a_off % a_per] != attn_idx or \
            [i for i in range(len(ffns)) if i % e_per == e_off % e_per] != moe_idx:
        raise HFConversionError("export: transformers' jamba places attention and MoE by period/offset; "
                                "this layout is not periodic")
    m = next(e for e in mixers if e["type"] == "mamba")
    a = next((e for e in mixers if e["type"] == "attention"), {"n_heads": 1, "n_kv_heads": 1})
    moe = next((e for e in ffns if e["type"] == "moe"), None)
    mlp = next((e for e in ffns if e["type"] == "mlp"), None)
    d_ff = (moe or mlp)["d_ff"]
    return {
        "model_type": "jamba", "architectures": ["JambaForCausalLM"], "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["d_model"], "intermediate_size": d_ff, "num_hidden_layers": len(mixers),
        "num_attention_heads": a["n_heads"], "num_key_value_heads": a["n_kv_heads"],
        "rms_norm_eps": cfg["norm_eps"], "tie_word_embeddings": cfg["tie_embeddings"],
        "num_experts": moe["num_experts"] if moe else 1, "num_experts_per_tok": moe["top_k"] if moe else 1,
        "expert_layer_period": e_per, "expert_layer_offset": e_off % e_per,
        "attn_layer_period": a_per, "attn_layer_offset": a_off % a_per,
        "mamba_d_state": m["d_state"], "mamba_d_conv": m["d_conv"], "mamba_expand": m["expand"],
        "mamba_dt_rank": m["dt_rank"] if m["dt_rank"] != "auto" else math.ceil(cfg["d_model"] / 16),
        "mamba_conv_bias": m["conv_bias"], "mamba_proj_bias": m["bias"], "hidden_act": "silu",
    }


FORMATS: dict[str, _Format] = {
    "mamba": _Format(_mamba_config, _backbone_key, _mamba_hf_config),
    "falcon_mamba": _Format(_mamba_config, _backbone_key, _mamba_hf_config),
    "mamba2": _Format(_mamba2_config, _backbone_key, _mamba2_hf_config),
    "jamba": _Format(_jamba_config, _jamba_key, _jamba_hf_config),
    "bamba": _Format(_bamba_config, _jamba_key),
    "nemotron_h": _Format(_nemotron_config, _nemotron_key, in_memory_roots=(("model.", "backbone."),)),
    "zamba": _Format(_zamba_config, _zamba_key, prepare=_zamba_prepare),
    "zamba2": _Format(_zamba2_config, _zamba2_key, prepare=_split_gate_up),
}


def _format_of(model_type: str | None) -> _Format:
    if model_type not in FORMATS:
        raise HFConversionError(f"config.json: model_type={model_type!r} is not supported; the zoo reads "
                                f"{', '.join(sorted(FORMATS))}")
    return FORMATS[model_type]


def hf_to_zoo_config(hf: dict) -> dict:
    """config.json (a dict) -> a zoo config in the layout language (not yet expanded)."""
    return _format_of(hf.get("model_type")).to_zoo_config(hf)


# ----------------------------------------------------------------------------------------------
# Weights

_EXPERT_RE = re.compile(r"^(.*experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _stack_experts(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert Linear weights [out, in] (on-disk convention) or fused gate_up [E, 2 f, d]
    (transformers' in-memory convention) -> zoo stacks [E, in, out] named `experts.<proj>`."""
    out, per_expert = {}, {}
    for key, value in hf_state.items():
        m = _EXPERT_RE.match(key)
        if m:
            per_expert.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
        elif key.endswith("experts.gate_up_proj"):
            gate, up = value.chunk(2, dim=1)
            out[key[: -len("gate_up_proj")] + "gate_proj"] = gate.transpose(1, 2)
            out[key[: -len("gate_up_proj")] + "up_proj"] = up.transpose(1, 2)
        elif re.search(r"experts\.(gate_proj|up_proj|down_proj)$", key) and value.dim() == 3:
            out[key] = value.transpose(1, 2)      # in-memory [E, out, in] -> [E, in, out]
        else:
            out[key] = value
    for (prefix, proj), tensors in per_expert.items():
        n = len(tensors)
        if sorted(tensors) != list(range(n)):
            raise HFConversionError(f"checkpoint: experts of {prefix!r} are not numbered 0..{n - 1}")
        out[prefix + proj] = torch.stack([tensors[e] for e in range(n)]).transpose(1, 2)
    return out


def _canonical_hf_keys(hf_state: dict[str, torch.Tensor], fmt: _Format) -> dict[str, torch.Tensor]:
    """transformers' in-memory names (what a state_dict() of its model gives) -> the on-disk names."""
    out = {}
    for key, value in hf_state.items():
        for mem, disk in fmt.in_memory_roots:
            if key.startswith(mem):
                key = disk + key[len(mem):]
                break
        out[key] = value
    return out


def hf_to_zoo_state_dict(hf_state: dict[str, torch.Tensor], hf_config: dict, model) -> dict[str, torch.Tensor]:
    """Rename (and for experts, restack) an HF state dict into `model`'s keys; every zoo tensor must be
    found with its exact shape, and every HF tensor must be used (rotary caches excepted)."""
    fmt = _format_of(hf_config.get("model_type"))
    hf_state = _stack_experts(_canonical_hf_keys(hf_state, fmt))
    if fmt.prepare is not None:
        hf_state = fmt.prepare(hf_state)
    tied = model.config.get("tie_embeddings", False)
    out, used = {}, set()
    for zoo_key, param in model.state_dict().items():
        if tied and zoo_key == "lm_head.weight":
            continue
        hf_key = fmt.hf_key(zoo_key, model.layout)
        if hf_key not in hf_state:
            raise HFConversionError(f"checkpoint: no tensor {hf_key!r} for the zoo's {zoo_key!r}")
        tensor = hf_state[hf_key]
        if tuple(tensor.shape) != tuple(param.shape):
            raise HFConversionError(f"checkpoint: {hf_key} has shape {tuple(tensor.shape)}, the model built "
                                    f"from config.json expects {tuple(param.shape)} for {zoo_key}")
        out[zoo_key] = tensor
        used.add(hf_key)
    if tied:
        out["lm_head.weight"] = out["embedding.weight"]
        used.add("lm_head.weight")
    unused = [k for k in hf_state if k not in used and "rotary_emb" not in k]
    if unused:
        raise HFConversionError(f"checkpoint: {len(unused)} tensors have no place in the zoo model "
                                f"(first: {unused[0]}); the config translation is missing a feature")
    return out


def load_hf(path: str | os.PathLike, *, device=None, dtype=None):
    """A zoo model with the weights of a Hugging Face checkpoint directory."""
    from zoo.models import build_model

    hf_config = read_hf_config(path)
    cfg = hf_to_zoo_config(hf_config)
    model = build_model(cfg, device="meta")
    state = hf_to_zoo_state_dict(read_hf_state_dict(path), hf_config, model)
    model = model.to_empty(device=device or "cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.get("tie_embeddings"))]
    if missing or unexpected:
        raise HFConversionError(f"checkpoint: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if model.config.get("tie_embeddings"):
        model.lm_head.weight = model.embedding.weight
    _restore_buffers(model)
    if dtype is not None:
        model = model.to(dtype)
    return model


def _restore_buffers(model) -> None:
    """Non-persistent buffers (e.g. rotary frequencies) are not in checkpoints: rebuild them after
    `to_empty` left them uninitialised."""
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()


def export_hf(model, out_dir: str | os.PathLike, model_type: str | None = None) -> str:
    """Write `model` as a Hugging Face checkpoint (config.json + model.safetensors) that transformers
    loads: model_type mamba / falcon_mamba (Mamba-1 stacks), mamba2, or jamba (mixer + FFN pairs)."""
    from safetensors.torch import save_file

    cfg = model.config
    types = {e["type"] for e in cfg["layout"]}
    if model_type is None:
        if types == {"mamba"}:
            model_type = "mamba"
        elif types == {"mamba2"}:
            model_type = "mamba2"
        elif "mamba" in types and types <= {"mamba", "attention", "mlp", "moe"}:
            model_type = "jamba"
        else:
            raise HFConversionError(f"export: layer types {sorted(types)} have no Hugging Face format; the zoo "
                                    f"exports pure Mamba, pure Mamba-2 and Jamba-style layouts")
    fmt = _format_of(model_type)
    if fmt.to_hf_config is None:
        raise HFConversionError(f"export: the zoo reads {model_type} checkpoints but writes only "
                                f"{', '.join(k for k, f in FORMATS.items() if f.to_hf_config)}")
    hf_config = fmt.to_hf_config(cfg)
    state = {}
    for zoo_key, tensor in model.state_dict().items():
        if zoo_key == "lm_head.weight" and cfg["tie_embeddings"]:
            continue
        hf_key = fmt.hf_key(zoo_key, model.layout)
        m = re.match(r"^(.*experts\.)(gate_proj|up_proj|down_proj)$", hf_key)
        if m:   # zoo [E, in, out] -> one [out, in] Linear weight per expert (transformers' on-disk form)
            for e, w in enumerate(tensor.transpose(1, 2)):
                state[f"{m.group(1)}{e}.{m.group(2)}.weight"] = w.contiguous()
        else:
            state[hf_key] = tensor.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.detach().cpu() for k, v in state.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return str(out_dir)
