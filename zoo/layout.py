"""The layout language: a model YAML (or dict) -> one validated, canonical config.

Every form (explicit list, pattern string, Jamba-style every/offset rules, Megatron ratios, shared
blocks, per-layer overrides, bidirectional wrapping) expands into ONE list of residual sublayers,
``config["layout"]``, each entry a dict ``{"type": <registry name>, **full constructor kwargs}``.
That expanded config is what checkpoints save, what `zoo show` prints and what
``zoo.build_model(config)`` rebuilds identically (a config holding ``layout`` is already canonical).

docs/layout-language.md is the user-facing description of every key; this module is its
implementation. All errors are LayoutError (a ValueError) naming the source file, the YAML path and
the fix.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import os
from typing import Any

import yaml

from zoo import registry

MODEL_KINDS = ("causal_lm", "image_classifier")

# Megatron's symbols (megatron/core/ssm: M = Mamba, * = attention, - = MLP) plus E for MoE.
DEFAULT_SYMBOLS = {"M": "mamba2", "*": "attention", "-": "mlp", "E": "moe"}

CHANNEL_MIXERS = ("mlp", "moe")

TOP_LEVEL_KEYS = {
    "name": "model name (free text)",
    "description": "free text",
    "model": "causal_lm | image_classifier",
    "d_model": "residual stream width",
    "vocab_size": "token vocabulary (causal_lm)",
    "tie_embeddings": "share the embedding matrix with the output head",
    "residual_in_fp32": "keep the residual stream in fp32 under low-precision weights",
    "norm_eps": "epsilon of the pre-norms and the final norm",
    "init": "{std, rescale_out_proj}",
    "image": "image classifier settings (model: image_classifier)",
    "bidirectional": "{combine, share}: run every sequence mixer in both directions",
    "layers": "list of sublayers, or {count, mixer, ffn, attention_ratio, mlp_ratio, insert}",
    "pattern": "one symbol per residual sublayer",
    "symbols": "symbol -> layer type for `pattern`",
    "repeat": "repeat `pattern` this many times",
    "shared": "named blocks whose weights are shared across their sites",
    "insert": "{block: {at, every}}: where shared blocks are applied",
    "overrides": "{sublayer index: {kwarg: value}}",
    "layout": "the canonical per-sublayer list (as saved with checkpoints)",
}
# every registered layer type may also appear at top level as a section of default kwargs
LAYERS_DICT_KEYS = ("count", "mixer", "ffn", "attention_ratio", "mlp_ratio", "insert")
INIT_KEYS = {"std": 0.02, "rescale_out_proj": True}
IMAGE_KEYS = {"image_size": 224, "patch_size": 16, "in_channels": 3, "num_classes": 1000,
              "pool": "middle_cls", "pos_embed": True}
IMAGE_POOLS = ("middle_cls", "head_cls", "mean")
BIDIRECTIONAL_KEYS = {"combine": "mean", "share": True}
SHARED_KEYS = {"input": "hidden", "output": "next_input", "blocks": None, "lora_rank": 0,
               "lora_targets": ["mlp"]}
SHARED_INPUTS = ("hidden", "concat_embeddings")
SHARED_OUTPUTS = ("next_input", "residual")
LORA_TARGETS = ("mlp", "qkv")


class LayoutError(ValueError):
    """A model config that cannot be expanded or built; the message names file, YAML path and fix."""


class _Ctx:
    """Where a config came from, so that errors can name it."""

    def __init__(self, source: str | None):
        self.source = source or "<config>"

    def error(self, path: str, message: str) -> LayoutError:
        where = f"{path} " if path else ""
        return LayoutError(f"{self.source}: {where}{message}")


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(ctx: _Ctx, path: str, d: dict, allowed, what: str = "key") -> None:
    for key in d:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise ctx.error(where, f"is not a known {what}{_did_you_mean(key, allowed)}; "
                                   f"valid: {', '.join(map(str, allowed))}")


def _as_int(ctx: _Ctx, path: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.error(path, f"= {value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ctx.error(path, f"= {value} must be >= {minimum}")
    return value


def _as_dict(ctx: _Ctx, path: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ctx.error(path, f"must be a mapping, got {type(value).__name__} {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# Loading and dotted overrides
# --------------------------------------------------------------------------------------------------

def read_yaml(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LayoutError(f"{path}: no such model config; configs live in configs/models/*.yaml")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise LayoutError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise LayoutError(f"{path}: a model config must be a YAML mapping at top level")
    return raw


def resolve_config_path(name: str) -> str:
    """A path as given, or a bare name looked up in configs/models/ (and configs/models/tiny/)."""
    if os.path.exists(name):
        return name
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")
    for candidate in (os.path.join(root, name), os.path.join(root, name + ".yaml"),
                      os.path.join(root, "tiny", name), os.path.join(root, "tiny", name + ".yaml")):
        if os.path.exists(candidate):
            rel = os.path.relpath(candidate)
            return rel if not rel.startswith("..") else candidate
    return name


def apply_overrides(raw: dict, overrides: dict, source: str | None = None) -> dict:
    """Return a copy of `raw` with dotted-key overrides applied.

    `{"layers.attention_ratio": 0.25, "d_model": 96}` sets raw["layers"]["attention_ratio"] and
    raw["d_model"]; integer segments index lists (`layers.3.d_state`); a value of None deletes the
    key. Setting one layout form (`pattern`, `layers`, `layout`) at top level removes the others
    from the base, so an ablation variant can replace the layout wholesale.
    """
    ctx = _Ctx(source)
    out = copy.deepcopy(raw)
    forms = ("pattern", "layers", "layout")
    for dotted, value in overrides.items():
        keys = str(dotted).split(".")
        if len(keys) == 1 and keys[0] in forms and value is not None:
            for other in forms:
                if other != keys[0]:
                    out.pop(other, None)
            if keys[0] != "pattern":
                out.pop("symbols", None)
                out.pop("repeat", None)
        node = out
        for i, key in enumerate(keys[:-1]):
            sub_path = ".".join(keys[: i + 1])
            if isinstance(node, list):
                node = node[_list_index(ctx, sub_path, node, key)]
                continue
            if key not in node or node[key] is None:
                node[key] = {}
            elif isinstance(node[key], str) and isinstance(node, dict):
                # `mixer: mamba` upgraded to a rule mapping by an override such as mixer.attention.every
                node[key] = {"default": node[key]}
            if not isinstance(node[key], (dict, list)):
                raise ctx.error(f"override {dotted}", f"cannot descend into {sub_path} = {node[key]!r}")
            node = node[key]
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(ctx, dotted, node, last)] = value
        elif value is None:
            node.pop(last, None)
        else:
            node[last] = copy.deepcopy(value)
    return out


def _list_index(ctx: _Ctx, path: str, node: list, key: str) -> int:
    try:
        index = int(key)
    except ValueError:
        raise ctx.error(f"override {path}", f"indexes a list: use an integer, not {key!r}") from None
    if not -len(node) <= index < len(node):
        raise ctx.error(f"override {path}", f"index {index} is out of range for a list of {len(node)}")
    return index


def load_config(path_or_dict: str | os.PathLike | dict, **overrides) -> dict:
    """A model config (YAML path, bare config name, or dict) + dotted overrides -> canonical config.

    The canonical config has the model-wide keys with their defaults filled in, `shared` (the shared
    block definitions, expanded) and `layout` (the per-sublayer list with full kwargs).
    """
    if isinstance(path_or_dict, dict):
        raw, source = path_or_dict, path_or_dict.get("name") and f"<config {path_or_dict.get('name')}>"
    else:
        source = resolve_config_path(os.fspath(path_or_dict))
        raw = read_yaml(source)
    if overrides:
        raw = apply_overrides(raw, overrides, source)
    return _expand(raw, _Ctx(source))


def expand_layout(path_or_dict, **overrides) -> list[dict]:
    """Just the canonical per-sublayer list of a config."""
    return load_config(path_or_dict, **overrides)["layout"]


# --------------------------------------------------------------------------------------------------
# Megatron's hybrid allocation
# --------------------------------------------------------------------------------------------------

def allocate_layers(count: int, attention_ratio: float, mlp_ratio: float) -> str:
    """Megatron-LM's hybrid allocation: `count` sublayers as a string of M / * / -.

    Attention layers are spread evenly with Mamba sections before, between and after them (a running
    counter of Mamba slots left in the current section, placed when it drops below one half); MLP
    layers then replace Mamba slots by the same rule over the remaining Mamba positions.
    """
    n_attention = round(count * attention_ratio)
    n_mamba = count - n_attention
    section = n_mamba / (n_attention + 1)
    kinds = ["M"] * count
    budget = section
    for i in range(count):
        if budget < 0.5:
            kinds[i] = "*"
            budget += section
        else:
            budget -= 1
    n_mlp = round(count * mlp_ratio)
    if n_mlp > 0:
        per_mlp = (n_mamba - n_mlp) / n_mlp
        budget = per_mlp
        for i in range(count):
            if kinds[i] != "M":
                continue
            if budget < 0.5:
                kinds[i] = "-"
                budget += per_mlp
            else:
                budget -= 1
    return "".join(kinds)


# --------------------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------------------

def _expand(raw: dict, ctx: _Ctx) -> dict:
    if not isinstance(raw, dict):
        raise ctx.error("", "a model config must be a mapping")
    type_names = registry.names()
    allowed = list(TOP_LEVEL_KEYS) + [t for t in type_names if t not in TOP_LEVEL_KEYS]
    _check_keys(ctx, "", raw, allowed)

    kind = raw.get("model", "causal_lm")
    if kind not in MODEL_KINDS:
        raise ctx.error("model", f"= {kind!r} must be one of {', '.join(MODEL_KINDS)}"
                                 f"{_did_you_mean(kind, MODEL_KINDS)}")
    if "d_model" not in raw:
        raise ctx.error("", "d_model is missing: set the residual width, e.g. `d_model: 768`")
    d_model = _as_int(ctx, "d_model", raw["d_model"], minimum=1)

    cfg: dict[str, Any] = {"name": raw.get("name", "unnamed"), "model": kind, "d_model": d_model}
    if "description" in raw:
        cfg["description"] = raw["description"]
    if kind == "causal_lm":
        if "vocab_size" not in raw:
            raise ctx.error("", "vocab_size is missing: a causal_lm needs `vocab_size: <int>`")
        cfg["vocab_size"] = _as_int(ctx, "vocab_size", raw["vocab_size"], minimum=1)
        cfg["tie_embeddings"] = bool(raw.get("tie_embeddings", True))
        if "image" in raw:
            raise ctx.error("image", "is only for `model: image_classifier`")
    else:
        for key in ("vocab_size", "tie_embeddings"):
            if key in raw:
                raise ctx.error(key, "is only for `model: causal_lm`; an image classifier has "
                                     "`image: {num_classes, ...}` instead")
        image = dict(IMAGE_KEYS)
        given = _as_dict(ctx, "image", raw.get("image"))
        _check_keys(ctx, "image", given, IMAGE_KEYS)
        image.update(given)
        for key in ("image_size", "patch_size", "in_channels", "num_classes"):
            _as_int(ctx, f"image.{key}", image[key], minimum=1)
        if image["image_size"] % image["patch_size"]:
            raise ctx.error("image.patch_size", f"= {image['patch_size']} must divide image.image_size = "
                                                f"{image['image_size']}")
        if image["pool"] not in IMAGE_POOLS:
            raise ctx.error("image.pool", f"= {image['pool']!r} must be one of {', '.join(IMAGE_POOLS)}")
        cfg["image"] = image
    cfg["residual_in_fp32"] = bool(raw.get("residual_in_fp32", True))
    norm_eps = raw.get("norm_eps", 1e-5)
    if not isinstance(norm_eps, (int, float)) or isinstance(norm_eps, bool) or norm_eps <= 0:
        raise ctx.error("norm_eps", f"= {norm_eps!r} must be a positive number")
    cfg["norm_eps"] = float(norm_eps)
    init = dict(INIT_KEYS)
    given = _as_dict(ctx, "init", raw.get("init"))
    _check_keys(ctx, "init", given, INIT_KEYS)
    init.update(given)
    cfg["init"] = init

    if "layout" in raw:
        # already canonical (a saved config): re-validate every entry, fill nothing new in
        for key in ("layers", "pattern", "symbols", "repeat", "insert", "overrides"):
            if key in raw:
                raise ctx.error(key, "cannot be combined with `layout` (the expanded form); "
                                     "keep one of them")
        if not isinstance(raw["layout"], list) or not raw["layout"]:
            raise ctx.error("layout", "must be a non-empty list of sublayers")
        shared = {}
        for name, block in _as_dict(ctx, "shared", raw.get("shared")).items():
            shared[name] = _expand_shared_block(ctx, name, block, raw, d_model, canonical=True)
        cfg["shared"] = shared
        layout = []
        for i, entry in enumerate(raw["layout"]):
            entry = _as_dict(ctx, f"layout.{i}", entry)
            if entry.get("type") == "shared":
                _check_keys(ctx, f"layout.{i}", entry, ("type", "block", "site"))
                if entry.get("block") not in shared:
                    raise ctx.error(f"layout.{i}.block", f"= {entry.get('block')!r} is not a block of "
                                                         f"`shared` ({', '.join(shared) or 'none defined'})")
                layout.append(dict(entry))
            else:
                layout.append(_complete_entry(ctx, f"layout.{i}", dict(entry), {}, d_model))
        cfg["layout"] = layout
        if "bidirectional" in raw:
            cfg["bidirectional"] = raw["bidirectional"]
        _check_model_kind(ctx, cfg)
        return cfg

    # a section's keys are checked even when no sublayer of that type is used (a sweep may switch a
    # type off), so that a misspelt kwarg is never silently ignored
    for type_name in registry.names():
        if type_name in raw and type_name not in TOP_LEVEL_KEYS:
            _check_section(ctx, type_name, _type_section(ctx, raw, type_name))
    main = _expand_main_stack(ctx, raw)                 # [(type, entry kwargs, yaml path)]
    main = _apply_overrides_by_index(ctx, raw, main)
    bidir = None
    if "bidirectional" in raw or kind == "image_classifier":
        given = raw.get("bidirectional", {} if kind == "image_classifier" else None)
        if given is False:
            given = None
        if given is True:
            given = {}
        if given is not None:
            given = _as_dict(ctx, "bidirectional", given)
            _check_keys(ctx, "bidirectional", given, BIDIRECTIONAL_KEYS)
            bidir = {**BIDIRECTIONAL_KEYS, **given}
            if bidir["combine"] not in ("mean", "sum"):
                raise ctx.error("bidirectional.combine", f"= {bidir['combine']!r} must be mean or sum")
            cfg["bidirectional"] = bidir

    layout = []
    for type_name, kwargs, path in main:
        section = _type_section(ctx, raw, type_name)
        entry = _complete_entry(ctx, path, {"type": type_name, **kwargs}, section, d_model)
        if bidir is not None:
            entry = _make_bidirectional(ctx, path, entry, bidir, d_model)
        layout.append(entry)

    shared = {}
    for name, block in _as_dict(ctx, "shared", raw.get("shared")).items():
        shared[name] = _expand_shared_block(ctx, name, block, raw, d_model, canonical=False)
    cfg["shared"] = shared
    cfg["layout"] = _insert_shared_sites(ctx, raw, layout, shared, main)
    _check_model_kind(ctx, cfg)
    return cfg


def _check_model_kind(ctx: _Ctx, cfg: dict) -> None:
    if cfg["model"] == "image_classifier":
        for i, entry in enumerate(cfg["layout"]):
            if entry["type"] == "moe":
                continue
            if entry["type"] == "attention" and entry.get("causal", True):
                raise ctx.error(f"layout.{i}", "an image classifier needs non-causal attention: "
                                               "set `attention: {causal: false}`")
            if entry["type"] == "shared":
                raise ctx.error(f"layout.{i}", "shared blocks are for causal_lm models only")


def _type_section(ctx: _Ctx, raw: dict, type_name: str) -> dict:
    if type_name in TOP_LEVEL_KEYS:          # `bidirectional:` is the model-wide option, not a section
        return {}
    section = _as_dict(ctx, type_name, raw.get(type_name))
    return dict(section)


def _check_section(ctx: _Ctx, type_name: str, section: dict) -> None:
    params = _signature_params(registry.get(type_name, ctx=ctx, path=type_name))
    for key in section:
        if key not in params or key in ("device", "dtype"):
            raise ctx.error(f"{type_name}.{key}", f"is not an argument of {type_name}"
                                                  f"{_did_you_mean(key, params)}; valid: "
                                                  f"{', '.join(p for p in params if p not in ('device', 'dtype'))}")


def _parse_layer_item(ctx: _Ctx, path: str, item) -> tuple[str, dict]:
    """A sublayer written as `mamba` or `{type: mamba, d_state: 64}` -> (type, kwargs)."""
    if isinstance(item, str):
        type_name, kwargs = item, {}
    elif isinstance(item, dict):
        if "type" not in item:
            raise ctx.error(path, f"needs a `type` (one of {', '.join(registry.names())})")
        kwargs = dict(item)
        type_name = kwargs.pop("type")
    else:
        raise ctx.error(path, f"= {item!r} must be a layer type name or a mapping with `type`")
    _check_type_name(ctx, path, type_name)
    return type_name, kwargs


def _check_type_name(ctx: _Ctx, path: str, type_name) -> None:
    if type_name not in registry.names() or type_name == "shared":
        raise ctx.error(path, f"= {type_name!r} is not a layer type{_did_you_mean(type_name, registry.names())}; "
                              f"known types: {', '.join(registry.names())}")


def _expand_main_stack(ctx: _Ctx, raw: dict) -> list[tuple[str, dict, str]]:
    has_layers, has_pattern = "layers" in raw, "pattern" in raw
    if has_layers and has_pattern:
        raise ctx.error("", "has both `layers` and `pattern`: keep one layout form")
    if not has_layers and not has_pattern:
        raise ctx.error("", "has no layout: give `pattern: \"M*M-\"`, `layers: [...]` or "
                            "`layers: {count: ..., mixer: ...}`")
    for key in ("symbols", "repeat"):
        if key in raw and not has_pattern:
            raise ctx.error(key, "only applies to `pattern`")
    if has_pattern:
        return _expand_pattern(ctx, raw)
    layers = raw["layers"]
    if isinstance(layers, list):
        if not layers:
            raise ctx.error("layers", "is an empty list: give at least one sublayer")
        return [(*_parse_layer_item(ctx, f"layers.{i}", item), f"layers.{i}") for i, item in enumerate(layers)]
    if isinstance(layers, dict):
        return _expand_layers_dict(ctx, layers)
    raise ctx.error("layers", f"must be a list of sublayers or a mapping with `count`, got {layers!r}")


def _expand_pattern(ctx: _Ctx, raw: dict) -> list[tuple[str, dict, str]]:
    pattern = raw["pattern"]
    if not isinstance(pattern, str) or not pattern.strip():
        raise ctx.error("pattern", f"= {pattern!r} must be a non-empty string of layer symbols")
    symbols = {k: (v, {}) for k, v in DEFAULT_SYMBOLS.items()}
    for sym, value in _as_dict(ctx, "symbols", raw.get("symbols")).items():
        sym = str(sym)
        if len(sym) != 1 or sym.isspace() or sym == "|":
            raise ctx.error(f"symbols.{sym}", "a symbol must be one non-space character other than '|'")
        symbols[sym] = _parse_layer_item(ctx, f"symbols.{sym}", value)
    repeat = _as_int(ctx, "repeat", raw.get("repeat", 1), minimum=1)
    # spaces and '|' are allowed as visual separators (Megatron uses '|' between pipeline stages)
    clean = "".join(ch for ch in pattern if not ch.isspace() and ch != "|")
    out = []
    for r in range(repeat):
        for j, ch in enumerate(clean):
            if ch not in symbols:
                raise ctx.error("pattern", f"has unknown symbol {ch!r} at position {j}; known: "
                                           f"{', '.join(repr(s) for s in symbols)}; map it with "
                                           f"`symbols: {{{ch!r}: <layer type>}}`")
            type_name, kwargs = symbols[ch]
            out.append((type_name, dict(kwargs), f"pattern[{j}]"))
    return out


def _parse_rule(ctx: _Ctx, path: str, rule, count: int) -> set[int]:
    """`{every, offset}` or `{at: int | [ints]}` -> the set of layer indices it selects."""
    rule = _as_dict(ctx, path, rule)
    _check_keys(ctx, path, rule, ("every", "offset", "at"))
    if "at" in rule:
        if "every" in rule or "offset" in rule:
            raise ctx.error(path, "give either `at: [indices]` or `every`/`offset`, not both")
        at = rule["at"] if isinstance(rule["at"], list) else [rule["at"]]
        picked = set()
        for k, i in enumerate(at):
            i = _as_int(ctx, f"{path}.at", i, minimum=0)
            if i >= count:
                raise ctx.error(f"{path}.at", f"index {i} must be smaller than the layer count = {count}")
            picked.add(i)
        return picked
    if "every" not in rule:
        raise ctx.error(path, "needs `every` (and optionally `offset`) or `at`")
    every = _as_int(ctx, f"{path}.every", rule["every"], minimum=1)
    offset = _as_int(ctx, f"{path}.offset", rule.get("offset", 0), minimum=0)
    if offset >= every:
        raise ctx.error(f"{path}.offset", f"= {offset} must be smaller than every = {every}")
    return {i for i in range(count) if i % every == offset}


def _parse_slot(ctx: _Ctx, path: str, slot, count: int, allow_none: bool) -> list[tuple[str, dict] | None]:
    """`mixer` / `ffn`: a type name, none, or {default: type, <type>: rule, ...} -> one choice per layer."""
    if slot is None or slot == "none":
        if not allow_none:
            raise ctx.error(path, "cannot be none: every layer needs a sequence mixer")
        return [None] * count
    if isinstance(slot, str):
        _check_type_name(ctx, path, slot)
        return [(slot, {})] * count
    slot = _as_dict(ctx, path, slot)
    default = slot.get("default", None if allow_none else "__missing__")
    if default == "__missing__":
        raise ctx.error(path, "needs `default: <layer type>` for the layers no rule selects")
    if default is not None and default != "none":
        _check_type_name(ctx, f"{path}.default", default)
        choice = [(default, {})] * count
    else:
        choice = [None] * count
    owner: dict[int, str] = {}
    for type_name, rule in slot.items():
        if type_name == "default":
            continue
        _check_type_name(ctx, f"{path}.{type_name}", type_name)
        for i in sorted(_parse_rule(ctx, f"{path}.{type_name}", rule, count)):
            if i in owner:
                raise ctx.error(f"{path}.{type_name}", f"selects layer {i}, which {path}.{owner[i]} "
                                                       f"already selects: make the rules disjoint")
            owner[i] = type_name
            choice[i] = (type_name, {})
    return choice


def _expand_layers_dict(ctx: _Ctx, layers: dict) -> list[tuple[str, dict, str]]:
    _check_keys(ctx, "layers", layers, LAYERS_DICT_KEYS)
    if "count" not in layers:
        raise ctx.error("layers", "needs `count` (the number of layers)")
    count = _as_int(ctx, "layers.count", layers["count"], minimum=1)
    ratio_form = "attention_ratio" in layers or "mlp_ratio" in layers
    if ratio_form:
        if "ffn" in layers:
            raise ctx.error("layers.ffn", "cannot be combined with attention_ratio / mlp_ratio (the "
                                          "ratios place the MLP sublayers themselves)")
        ratios = {}
        for key in ("attention_ratio", "mlp_ratio"):
            value = layers.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ctx.error(f"layers.{key}", f"= {value!r} must be a number in [0, 1]")
            ratios[key] = float(value)
        if ratios["attention_ratio"] + ratios["mlp_ratio"] > 1.0:
            raise ctx.error("layers.attention_ratio", f"+ mlp_ratio = {ratios['attention_ratio']} + "
                                                      f"{ratios['mlp_ratio']} must be at most 1")
        mixer = layers.get("mixer", "mamba2")
        if not isinstance(mixer, str):
            raise ctx.error("layers.mixer", "with ratios must be one layer type (the SSM that fills "
                                            "the remaining slots), e.g. `mixer: mamba2`")
        _check_type_name(ctx, "layers.mixer", mixer)
        kinds = allocate_layers(count, ratios["attention_ratio"], ratios["mlp_ratio"])
        names = {"M": mixer, "*": "attention", "-": "mlp"}
        return [(names[ch], {}, f"layers[{i}] ({ch} by ratio)") for i, ch in enumerate(kinds)]
    mixers = _parse_slot(ctx, "layers.mixer", layers.get("mixer", "mamba2"), count, allow_none=False)
    ffns = _parse_slot(ctx, "layers.ffn", layers.get("ffn"), count, allow_none=True)
    out = []
    for i in range(count):
        out.append((*mixers[i], f"layers[{i}].mixer"))
        if ffns[i] is not None:
            out.append((*ffns[i], f"layers[{i}].ffn"))
    return out


def _apply_overrides_by_index(ctx: _Ctx, raw: dict, main: list) -> list:
    overrides = _as_dict(ctx, "overrides", raw.get("overrides"))
    main = [(t, dict(k), p) for t, k, p in main]
    for key, kwargs in overrides.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ctx.error(f"overrides.{key}", "keys are sublayer indices (0-based, as `zoo show` "
                                                "prints them)") from None
        if not 0 <= index < len(main):
            raise ctx.error(f"overrides.{key}", f"index {index} is outside the {len(main)} sublayers")
        kwargs = dict(_as_dict(ctx, f"overrides.{key}", kwargs))
        type_name, base, _ = main[index]
        if "type" in kwargs:
            type_name = kwargs.pop("type")
            _check_type_name(ctx, f"overrides.{key}.type", type_name)
            base = {}
        main[index] = (type_name, {**base, **kwargs}, f"overrides.{key}")
    return main


def _signature_params(cls) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _plain(value):
    """YAML-safe copies of defaults: tuples -> lists."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _complete_entry(ctx: _Ctx, path: str, entry: dict, section: dict, d_model: int) -> dict:
    """type + section defaults + the entry's own kwargs -> every constructor kwarg, checked by name."""
    type_name = entry.pop("type")
    _check_type_name(ctx, f"{path}.type", type_name)
    cls = registry.get(type_name, ctx=ctx, path=path)
    params = _signature_params(cls)
    params.pop("device", None)
    params.pop("dtype", None)
    kwargs = {"d_model": d_model} if "d_model" in params else {}
    for where, given in ((type_name, section), (path, entry)):
        for key, value in given.items():
            if key not in params:
                raise ctx.error(f"{where}.{key}", f"is not an argument of {type_name} "
                                                  f"({cls.__module__}.{cls.__name__})"
                                                  f"{_did_you_mean(key, params)}; valid: {', '.join(params)}")
            kwargs[key] = value
    full = {"type": type_name}
    for name, p in params.items():
        if name in kwargs:
            full[name] = _plain(kwargs[name])
        elif p.default is not inspect.Parameter.empty:
            full[name] = _plain(p.default)
        else:
            raise ctx.error(path, f"{type_name} needs `{name}`: set it under `{type_name}:` at top level "
                                  f"or on this layer")
    return full


def _make_bidirectional(ctx: _Ctx, path: str, entry: dict, bidir: dict, d_model: int) -> dict:
    """Wrap sequence mixers so they see the sequence in both directions (Vision Mamba)."""
    type_name = entry["type"]
    if type_name in CHANNEL_MIXERS or type_name in ("bimamba", "bidirectional"):
        return entry
    if type_name == "attention":
        return {**entry, "causal": False}
    if type_name == "mamba" and bidir["share"]:
        kwargs = {k: v for k, v in entry.items() if k != "type"}
        return _complete_entry(ctx, path, {"type": "bimamba", **kwargs, "combine": bidir["combine"]}, {}, d_model)
    return _complete_entry(ctx, path, {"type": "bidirectional", "mixer": entry,
                                       "combine": bidir["combine"]}, {}, d_model)


def _expand_shared_block(ctx: _Ctx, name: str, block, raw: dict, d_model: int, canonical: bool) -> dict:
    path = f"shared.{name}"
    if name in registry.names():
        raise ctx.error(path, f"a shared block cannot be named like the layer type {name!r}")
    block = _as_dict(ctx, path, block)
    allowed = list(SHARED_KEYS) + [t for t in registry.names() if t != "shared"]
    _check_keys(ctx, path, block, allowed)
    out = {k: copy.deepcopy(block.get(k, v)) for k, v in SHARED_KEYS.items()}
    if out["input"] not in SHARED_INPUTS:
        raise ctx.error(f"{path}.input", f"= {out['input']!r} must be one of {', '.join(SHARED_INPUTS)}")
    if out["output"] not in SHARED_OUTPUTS:
        raise ctx.error(f"{path}.output", f"= {out['output']!r} must be one of {', '.join(SHARED_OUTPUTS)}")
    if not isinstance(out["blocks"], list) or not out["blocks"]:
        raise ctx.error(f"{path}.blocks", "must be a non-empty list of sublayers, e.g. [attention, mlp]")
    out["lora_rank"] = _as_int(ctx, f"{path}.lora_rank", out["lora_rank"], minimum=0)
    targets = out["lora_targets"]
    if not isinstance(targets, list):
        raise ctx.error(f"{path}.lora_targets", f"must be a list drawn from {', '.join(LORA_TARGETS)}")
    for t in targets:
        if t not in LORA_TARGETS:
            raise ctx.error(f"{path}.lora_targets", f"has {t!r}; valid: {', '.join(LORA_TARGETS)}")
    width_in = 2 * d_model if out["input"] == "concat_embeddings" else d_model
    blocks = []
    for j, item in enumerate(out["blocks"]):
        sub = f"{path}.blocks.{j}"
        if canonical:
            entry = dict(_as_dict(ctx, sub, item))
            type_name = entry.get("type")
            _check_type_name(ctx, f"{sub}.type", type_name)
            blocks.append(_complete_entry(ctx, sub, entry, {}, entry.get("d_model", d_model)))
            continue
        type_name, kwargs = _parse_layer_item(ctx, sub, item)
        if type_name not in ("attention", "mlp", "moe", "mamba", "mamba2"):
            raise ctx.error(sub, f"= {type_name!r} cannot be part of a shared block")
        # block-level sections (shared.x.attention: {...}) override the model-wide ones
        section = {**_type_section(ctx, raw, type_name),
                   **_as_dict(ctx, f"{path}.{type_name}", block.get(type_name))}
        # the first sublayer reads the block input (2 d_model wide for concat_embeddings) and maps
        # back to d_model; the rest work at d_model
        width = width_in if j == 0 else d_model
        blocks.append(_complete_entry(ctx, sub, {"type": type_name, **kwargs}, section, width))
    out["blocks"] = blocks
    if out["lora_rank"] and "qkv" in targets and not any(b["type"] == "attention" for b in blocks):
        raise ctx.error(f"{path}.lora_targets", "has qkv but the block has no attention")
    if out["lora_rank"] and "mlp" in targets and not any(b["type"] == "mlp" for b in blocks):
        raise ctx.error(f"{path}.lora_targets", "has mlp but the block has no mlp")
    return out


def _insert_shared_sites(ctx: _Ctx, raw: dict, layout: list, shared: dict, main: list) -> list:
    """Put `{"type": "shared", "block", "site"}` entries before the layers `insert` names."""
    top, nested = raw.get("insert"), raw.get("layers", {}).get("insert") if isinstance(raw.get("layers"), dict) else None
    if top is not None and nested is not None:
        raise ctx.error("insert", "is given both at top level and under `layers`; keep one")
    insert, path = (nested, "layers.insert") if nested is not None else (top, "insert")
    insert = _as_dict(ctx, path, insert)
    if shared and not insert:
        raise ctx.error("shared", f"defines {', '.join(shared)} but no `insert` places them; add "
                                  f"`insert: {{{next(iter(shared))}: {{at: 2, every: 6}}}}`")
    # position units: layers (mixer + ffn) in the rules form, sublayers otherwise
    layers = raw.get("layers")
    by_layer = isinstance(layers, dict) and "attention_ratio" not in layers and "mlp_ratio" not in layers
    if by_layer:
        starts = [i for i, (_, _, p) in enumerate(main) if p.endswith(".mixer")]
    else:
        starts = list(range(len(layout)))
    unit = "layer" if by_layer else "sublayer"
    site_of: dict[int, str] = {}
    for name, rule in insert.items():
        rule = _as_dict(ctx, f"{path}.{name}", rule)
        _check_keys(ctx, f"{path}.{name}", rule, ("at", "every", "blocks"))
        # `{label: {blocks: [a, b], at: ...}}` cycles the blocks over the sites (Zamba2); otherwise
        # the key itself names the block
        cycle = rule.get("blocks", [name])
        if not isinstance(cycle, list) or not cycle:
            raise ctx.error(f"{path}.{name}.blocks", "must be a non-empty list of shared block names")
        for block in cycle:
            if block not in shared:
                where = f"{path}.{name}.blocks" if "blocks" in rule else f"{path}.{name}"
                raise ctx.error(where, f"{block!r} is not a block of `shared`{_did_you_mean(block, shared)}; "
                                       f"defined: {', '.join(shared) or 'none'}")
        if "at" not in rule:
            raise ctx.error(f"{path}.{name}", "needs `at` (first site, or a list of sites) and optionally `every`")
        if isinstance(rule["at"], list):
            if "every" in rule:
                raise ctx.error(f"{path}.{name}", "give `at` as a list or `at` + `every`, not both")
            sites = [_as_int(ctx, f"{path}.{name}.at", a, minimum=0) for a in rule["at"]]
        else:
            at = _as_int(ctx, f"{path}.{name}.at", rule["at"], minimum=0)
            if at >= len(starts):
                raise ctx.error(f"{path}.{name}.at", f"{unit} {at} is past the last {unit} ({len(starts) - 1})")
            every = _as_int(ctx, f"{path}.{name}.every", rule.get("every", len(starts) + 1), minimum=1)
            sites = list(range(at, len(starts), every))
        for k, s in enumerate(sites):
            if s >= len(starts):
                raise ctx.error(f"{path}.{name}.at", f"{unit} {s} is past the last {unit} ({len(starts) - 1})")
            if s in site_of:
                raise ctx.error(f"{path}.{name}", f"places a block before {unit} {s}, where "
                                                  f"{site_of[s]} already is")
            site_of[s] = cycle[k % len(cycle)]
    before = {starts[s]: name for s, name in site_of.items()}
    out, counter = [], {}
    for i, entry in enumerate(layout):
        if i in before:
            name = before[i]
            out.append({"type": "shared", "block": name, "site": counter.get(name, 0)})
            counter[name] = counter.get(name, 0) + 1
        out.append(entry)
    for name in shared:
        if name not in counter:
            raise ctx.error(f"{path}", f"places no site for shared block {name!r}")
    return out


# --------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------

SHOW_SYMBOLS = {"mamba": "m", "mamba2": "M", "attention": "*", "mlp": "-", "moe": "E",
                "bimamba": "B", "bidirectional": "b", "shared": "S"}


def pattern_string(layout: list[dict]) -> str:
    """One symbol per sublayer: m Mamba, M Mamba-2, * attention, - MLP, E MoE, B/b bidirectional,
    S shared-block site."""
    return "".join(SHOW_SYMBOLS.get(e["type"], "?") for e in layout)


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=120)


def parse_set_args(items: list[str] | None) -> dict:
    """CLI `--set key=value` items -> {dotted key: value}, values parsed as YAML (`12`, `0.25`, `true`,
    `null`, `[1, 2]`, `mamba2`)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise LayoutError(f"--set {item!r}: write key=value, e.g. --set layers.attention_ratio=0.25")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise LayoutError(f"--set {item!r}: the value is not valid YAML: {e}") from None
    return out


def non_default_kwargs(entry: dict) -> dict:
    """The kwargs of a canonical entry that differ from its constructor's defaults (for printing)."""
    if entry["type"] == "shared":
        return {k: v for k, v in entry.items() if k != "type"}
    params = _signature_params(registry.get(entry["type"]))
    out = {}
    for k, v in entry.items():
        if k in ("type", "d_model"):
            continue
        p = params.get(k)
        if p is None or p.default is inspect.Parameter.empty or _plain(p.default) != v:
            out[k] = v
    return out
