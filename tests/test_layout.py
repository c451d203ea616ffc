"""The layout language: every form expands as documented (docs/layout-language.md), and every bad
config gives a LayoutError naming the YAML path and the fix."""
from __future__ import annotations

import pytest
import yaml

from zoo.layout import LayoutError, allocate_layers, apply_overrides, load_config, pattern_string

TINY = {"d_model": 32, "vocab_size": 64, "attention": {"n_heads": 4}, "mlp": {"d_ff": 64},
        "moe": {"d_ff": 64, "num_experts": 4, "top_k": 2}, "mamba": {"d_state": 8},
        "mamba2": {"d_state": 8, "headdim": 16, "chunk_size": 16}}

# Published by NVIDIA for mamba2-hybrid-8b (Waleffe et al. 2024), produced by Megatron-LM's allocator.
NVIDIA_8B_PATTERN = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"


def config(**layout):
    return {**TINY, **layout}


def types(cfg: dict) -> list[str]:
    return [e["type"] for e in load_config(cfg)["layout"]]


# ------------------------------------------------------------------------------------------ forms

def test_megatron_allocation_reproduces_the_published_nvidia_hybrid_pattern():
    assert allocate_layers(56, 0.08, 0.5) == NVIDIA_8B_PATTERN


def test_ratio_form_expands_to_the_megatron_pattern_with_the_chosen_mixer():
    got = types(config(layers={"count": 56, "attention_ratio": 0.08, "mlp_ratio": 0.5, "mixer": "mamba2"}))
    want = [{"M": "mamba2", "*": "attention", "-": "mlp"}[c] for c in NVIDIA_8B_PATTERN]
    assert got == want


@pytest.mark.parametrize("count,attn,mlp", [(48, 0.125, 0.0), (24, 0.25, 0.25), (10, 0.1, 0.5), (7, 0.0, 0.3)])
def test_ratio_allocation_places_the_rounded_counts_evenly(count, attn, mlp):
    kinds = allocate_layers(count, attn, mlp)
    assert len(kinds) == count
    assert kinds.count("*") == round(count * attn)
    assert kinds.count("-") == round(count * mlp)
    if kinds.count("*"):
        # attention never first or last, and the runs of other layers around it differ by at most one
        runs = [len(r) for r in kinds.split("*")]
        assert kinds[0] != "*" and kinds[-1] != "*"
        assert max(runs) - min(runs) <= 1


def test_jamba_rules_put_attention_at_4_12_20_28_and_moe_at_odd_layers():
    layout = load_config("configs/models/jamba-v0.1.yaml")["layout"]
    assert len(layout) == 64                                   # 32 layers x (mixer + ffn)
    mixers, ffns = layout[0::2], layout[1::2]
    assert [i for i, e in enumerate(mixers) if e["type"] == "attention"] == [4, 12, 20, 28]
    assert all(e["type"] == "mamba" for i, e in enumerate(mixers) if i not in (4, 12, 20, 28))
    assert [i for i, e in enumerate(ffns) if e["type"] == "moe"] == list(range(1, 32, 2))
    assert all(e["type"] == "mlp" for i, e in enumerate(ffns) if i % 2 == 0)
    moe = ffns[1]
    assert (moe["num_experts"], moe["top_k"], moe["d_ff"]) == (16, 2, 14336)
    assert mixers[0]["inner_norms"] == "learned" and mixers[4]["n_kv_heads"] == 8


def test_rules_with_at_lists_and_no_ffn():
    got = types(config(layers={"count": 5, "mixer": {"default": "mamba2", "attention": {"at": [0, 3]}}}))
    assert got == ["attention", "mamba2", "mamba2", "attention", "mamba2"]


def test_pattern_with_remapped_symbols_kwargs_and_repeat():
    cfg = config(pattern="M*-E", symbols={"M": "mamba", "L": {"type": "mamba2", "d_state": 32}}, repeat=2)
    assert types(cfg) == ["mamba", "attention", "mlp", "moe"] * 2
    layout = load_config(config(pattern="ML|M", symbols={"L": {"type": "mamba2", "d_state": 32}}))["layout"]
    assert [e["d_state"] for e in layout] == [8, 32, 8]       # section default 8, symbol's own 32
    assert pattern_string(layout) == "MMM"


def test_explicit_list_with_inline_kwargs():
    layout = load_config(config(layers=["mamba", {"type": "attention", "n_heads": 2}, "mlp"]))["layout"]
    assert [e["type"] for e in layout] == ["mamba", "attention", "mlp"]
    assert layout[1]["n_heads"] == 2 and layout[1]["d_model"] == 32


def test_per_layer_overrides_change_only_their_sublayer():
    layout = load_config(config(pattern="MMMM", overrides={2: {"d_state": 64}, 3: {"type": "attention"}}))["layout"]
    assert [e["d_state"] for e in layout[:3]] == [8, 8, 64]
    assert layout[3]["type"] == "attention" and layout[3]["n_heads"] == 4


def test_constructor_defaults_are_written_into_every_entry():
    from layers.mamba2 import Mamba2
    import inspect

    entry = load_config(config(pattern="M"))["layout"][0]
    params = [p for p in inspect.signature(Mamba2.__init__).parameters if p not in ("self", "device", "dtype")]
    assert sorted(k for k in entry if k != "type") == sorted(params)


def test_zamba_sites_match_transformers_zamba_definition():
    # transformers' ZambaConfig: layer types [m, m, hybrid] + [hybrid if i % 6 == 4 else m for i < n-3];
    # a hybrid layer = the shared block, then that layer's Mamba.
    hybrid = [2] + [3 + i for i in range(76 - 3) if i % 6 == 4]
    cfg = load_config("configs/models/zamba-7b.yaml")
    layer, sites = 0, []
    for e in cfg["layout"]:
        if e["type"] == "shared":
            sites.append(layer)
        else:
            layer += 1
    assert layer == 76 and sites == hybrid
    assert cfg["shared"]["attn_block"]["input"] == "concat_embeddings"
    assert cfg["shared"]["attn_block"]["blocks"][0]["d_model"] == 2 * 3712


def test_zamba2_sites_follow_the_published_hybrid_layer_ids_and_alternate_blocks():
    hybrid_layer_ids = [6, 12, 18, 24, 30, 36, 42, 47, 51]    # Zyphra/Zamba2-2.7B config.json
    layout = load_config("configs/models/zamba2-2.7b.yaml")["layout"]
    layer, sites = 0, []
    for e in layout:
        if e["type"] == "shared":
            sites.append((layer, e["block"], e["site"]))
        else:
            layer += 1
    assert [s[0] for s in sites] == hybrid_layer_ids
    assert [s[1] for s in sites] == ["block_a", "block_b"] * 4 + ["block_a"]
    assert [s[2] for s in sites] == [0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_insert_every_counts_layers_in_rules_form_and_sublayers_otherwise():
    shared = {"blk": {"blocks": ["mlp"]}}
    by_layer = load_config(config(shared=shared, layers={"count": 4, "mixer": "mamba2", "ffn": "mlp",
                                                         "insert": {"blk": {"at": 1, "every": 2}}}))["layout"]
    assert pattern_string(by_layer) == "M-SM-M-SM-"
    by_sublayer = load_config(config(shared=shared, pattern="M-M-", insert={"blk": {"at": 1, "every": 2}}))["layout"]
    assert pattern_string(by_sublayer) == "MS-MS-"


def test_insert_blocks_list_cycles_the_blocks_over_the_sites():
    shared = {"a": {"blocks": ["mlp"]}, "b": {"blocks": ["mlp"]}}
    layout = load_config(config(shared=shared, pattern="MMMMMM",
                                insert={"sites": {"blocks": ["a", "b"], "at": [1, 2, 4]}}))["layout"]
    assert [(e["block"], e["site"]) for e in layout if e["type"] == "shared"] == [("a", 0), ("b", 0), ("a", 1)]
    with pytest.raises(LayoutError, match=r"insert.sites.blocks 'c' is not a block of `shared`"):
        load_config(config(shared=shared, pattern="MM", insert={"sites": {"blocks": ["a", "c"], "at": [0, 1]}}))


def test_bidirectional_wraps_mixers_vim_style():
    layout = load_config(config(pattern="m*M-", symbols={"m": "mamba"}, bidirectional={"combine": "sum"}))["layout"]
    assert [e["type"] for e in layout] == ["bimamba", "attention", "bidirectional", "mlp"]
    assert layout[0]["combine"] == "sum" and layout[1]["causal"] is False
    assert layout[2]["mixer"]["type"] == "mamba2"


# ---------------------------------------------------------------------------------- overrides

def test_dotted_overrides_address_yaml_keys():
    base = config(layers={"count": 8, "attention_ratio": 0.125})
    cfg = load_config(base, **{"layers.attention_ratio": 0.25, "d_model": 48, "mamba2.d_state": 4})
    assert cfg["d_model"] == 48
    assert [e["type"] for e in cfg["layout"]].count("attention") == 2
    assert all(e["d_state"] == 4 for e in cfg["layout"] if e["type"] == "mamba2")
    assert "attention_ratio" in base["layers"] and base["layers"]["attention_ratio"] == 0.125   # base untouched


def test_override_none_deletes_and_list_indices_index():
    cfg = apply_overrides(config(layers=["mamba", {"type": "mamba", "d_state": 4}]),
                          {"layers.1.d_state": 16, "moe": None})
    assert cfg["layers"][1]["d_state"] == 16 and "moe" not in cfg


def test_setting_a_layout_form_replaces_the_other_forms():
    cfg = load_config(config(layers={"count": 8, "attention_ratio": 0.25}), pattern="M*")
    assert [e["type"] for e in cfg["layout"]] == ["mamba2", "attention"]


def test_override_upgrades_a_type_name_to_rules():
    cfg = load_config(config(layers={"count": 4, "mixer": "mamba2"}), **{"layers.mixer.attention.every": 2})
    assert [e["type"] for e in cfg["layout"]] == ["attention", "mamba2"] * 2


def test_canonical_config_round_trips_through_yaml():
    cfg = load_config("configs/models/zamba2-7b.yaml")
    again = load_config(yaml.safe_load(yaml.safe_dump(cfg)))
    assert again == cfg


# ------------------------------------------------------------------------------------- errors

BAD = [
    ("offset_not_below_every",
     config(layers={"count": 8, "mixer": {"default": "mamba", "attention": {"every": 8, "offset": 8}}}),
     "layers.mixer.attention.offset = 8 must be smaller than every = 8"),
    ("unknown_top_level_key", config(pattern="M", mixr=1), "mixr is not a known key"),
    ("unknown_layer_type_in_list", config(layers=["mamaba"]), "did you mean 'mamba'"),
    ("unknown_layer_type_in_rules", config(layers={"count": 2, "mixer": "atention"}), "did you mean 'attention'"),
    ("unknown_kwarg_in_section", config(pattern="m", symbols={"m": "mamba"}, mamba={"d_stat": 4}),
     "mamba.d_stat is not an argument of mamba"),
    ("ratio_outside_unit_interval", config(layers={"count": 8, "attention_ratio": 1.5}),
     "layers.attention_ratio = 1.5 must be a number in [0, 1]"),
    ("ratios_summing_above_one", config(layers={"count": 8, "attention_ratio": 0.6, "mlp_ratio": 0.6}),
     "must be at most 1"),
    ("unknown_pattern_symbol", config(pattern="MX"), "unknown symbol 'X' at position 1"),
    ("both_layout_forms", config(pattern="M", layers=["mamba"]), "keep one layout form"),
    ("missing_layout", config(), "has no layout"),
    ("missing_d_model", {"vocab_size": 4, "pattern": "-", "mlp": {"d_ff": 4}}, "d_model is missing"),
    ("missing_required_kwarg", {"d_model": 8, "vocab_size": 4, "pattern": "*"}, "attention needs `n_heads`"),
    ("override_index_out_of_range", config(pattern="MM", overrides={5: {"d_state": 4}}),
     "overrides.5 index 5 is outside the 2 sublayers"),
    ("overlapping_rules",
     config(layers={"count": 4, "mixer": {"default": "mamba2", "attention": {"every": 2}, "mamba": {"at": 2}}}),
     "make the rules disjoint"),
    ("insert_of_unknown_block", config(shared={"blk": {"blocks": ["mlp"]}}, pattern="MM", insert={"blok": {"at": 1}}),
     "did you mean 'blk'"),
    ("shared_block_never_inserted", config(shared={"blk": {"blocks": ["mlp"]}}, pattern="MM"), "no `insert` places them"),
    ("site_past_the_end", config(shared={"blk": {"blocks": ["mlp"]}}, pattern="MM", insert={"blk": {"at": 2}}),
     "is past the last sublayer"),
    ("bad_shared_input", config(shared={"blk": {"blocks": ["mlp"], "input": "embeddings"}}, pattern="MM",
                                insert={"blk": {"at": 1}}), "shared.blk.input"),
    ("classifier_key_on_lm", config(pattern="M", image={"num_classes": 3}), "image is only for"),
    ("patch_not_dividing_image", {"model": "image_classifier", "d_model": 8, "pattern": "m", "symbols": {"m": "mamba"},
                                  "image": {"image_size": 30, "patch_size": 8}}, "image.patch_size = 8 must divide"),
    ("bad_model_kind", config(pattern="M", model="causal"), "model = 'causal' must be one of"),
]


@pytest.mark.parametrize("name,cfg,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_raises_layout_error_naming_the_key(name, cfg, message):
    with pytest.raises(LayoutError) as info:
        load_config(cfg)
    assert message in str(info.value)


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("d_model: 32\nvocab_size: 8\nmamba: {d_state: 4}\n"
                    "layers:\n  count: 8\n  mixer: {default: mamba, attention: {every: 8, offset: 8}}\n")
    with pytest.raises(LayoutError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: layers.mixer.attention.offset = 8 must be smaller than every = 8"


def test_layer_constructor_errors_become_layout_errors_with_the_layer_path():
    from zoo.models import build_model

    with pytest.raises(LayoutError) as info:
        build_model(config(pattern="M*", attention={"n_heads": 3}))
    assert "sublayer 1 (layout.1), attention" in str(info.value) and "n_heads=3" in str(info.value)


def test_cli_set_values_are_parsed_as_yaml():
    from zoo.layout import parse_set_args

    assert parse_set_args(["a.b=0.25", "c=mamba2", "d=null", "e=[1, 2]"]) == {
        "a.b": 0.25, "c": "mamba2", "d": None, "e": [1, 2]}
    with pytest.raises(LayoutError, match="write key=value"):
        parse_set_args(["novalue"])


def test_misspelt_kwarg_in_an_unused_section_is_still_an_error():
    with pytest.raises(LayoutError, match="moe.top_kk is not an argument of moe"):
        load_config(config(pattern="M", moe={"d_ff": 4, "num_experts": 2, "top_kk": 1}))
