"""Models assembled from a canonical layout (zoo/layout.py): CausalLM and ImageClassifier.

Read top to bottom: the output record, building one sublayer, the pre-norm residual block, shared
blocks (Zamba) and their per-site parts, the causal language model, the image classifier (Vision
Mamba), initialisation, and `build_model`.

Every residual sublayer is pre-norm:  h <- h + sublayer(RMSNorm(h)),  with h kept in fp32 when
`residual_in_fp32` (the sublayer itself runs in the weights' dtype).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from layers.norm import RMSNorm
from zoo import registry
from zoo.layout import LayoutError, load_config

# Output projections whose init is divided by sqrt(number of residual sublayers) (GPT-2 / mamba_ssm):
# each residual branch then adds variance ~1/N, so the stream's variance stays O(1) with depth.
RESIDUAL_OUT_PROJ_NAMES = ("out_proj", "o_proj", "down_proj")


@dataclass
class ModelOutput:
    """logits: [batch, seqlen, vocab] (causal LM) or [batch, num_classes] (classifier);
    aux_loss: scalar, the sum of the weighted MoE losses (0 without MoE);
    aux_losses: name -> scalar, each summed over layers."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    aux_losses: dict = field(default_factory=dict)


def build_layer(entry: dict, *, device=None, dtype=None, where: str = "", source: str = "") -> nn.Module:
    """One canonical layout entry {"type": name, **kwargs} -> the layer module."""
    kwargs = {k: v for k, v in entry.items() if k != "type"}
    cls = registry.get(entry["type"])
    try:
        return cls(**kwargs, device=device, dtype=dtype)
    except (ValueError, TypeError) as e:
        prefix = f"{source}: " if source else ""
        raise LayoutError(f"{prefix}{where}, {entry['type']}: {e}") from None


def _init_state_of(layer: nn.Module, batch_size: int, dtype, device, max_seqlen):
    """A layer's inference state; passes max_seqlen only to layers that take it (attention)."""
    params = inspect.signature(layer.init_state).parameters
    kwargs = {"dtype": dtype, "device": device}
    if max_seqlen is not None and "max_seqlen" in params:
        kwargs["max_seqlen"] = max_seqlen
    return layer.init_state(batch_size, **kwargs)


def _call(layer: nn.Module, x, state, seq_idx):
    """Run a sublayer; returns (y, aux dict) whatever the layer type (MoE returns (y, aux))."""
    out = layer(x, state=state, seq_idx=seq_idx)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, {}


class ResidualBlock(nn.Module):
    """h -> h + sublayer(RMSNorm(h + extra)); `extra` is a shared block's output that Zamba adds to the
    next sublayer's input but not to the residual stream (Glorioso et al. 2024, eq. 6)."""

    def __init__(self, entry: dict, d_model: int, norm_eps: float, *, device=None, dtype=None,
                 where: str = "", source: str = ""):
        super().__init__()
        self.norm = RMSNorm(d_model, eps=norm_eps, device=device, dtype=dtype)
        self.mixer = build_layer(entry, device=device, dtype=dtype, where=where, source=source)

    def forward(self, h, *, extra=None, state=None, seq_idx=None):
        x = self.norm(h if extra is None else h + extra)
        y, aux = _call(self.mixer, x.to(self.norm.weight.dtype), state, seq_idx)
        return h + y.to(h.dtype), aux


class SharedBlock(nn.Module):
    """A block whose weights serve every site it is inserted at (Zamba / Zamba2).

    x_in: [b, l, d_in] (d_in = 2 d_model for input concat_embeddings) -> [b, l, d_model]:
        y = x_in; for each sublayer: y = sublayer(RMSNorm(y))
    as in Zamba's shared transformer (no residual inside the block; its first sublayer maps d_in back
    to d_model: the attention's o_proj is [d_model, n_heads * head_dim]).
    """

    def __init__(self, spec: dict, d_model: int, norm_eps: float, *, device=None, dtype=None,
                 name: str = "", source: str = ""):
        super().__init__()
        self.input, self.output = spec["input"], spec["output"]
        width_in = 2 * d_model if self.input == "concat_embeddings" else d_model
        self.norms = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for j, entry in enumerate(spec["blocks"]):
            width = width_in if j == 0 else d_model
            self.norms.append(RMSNorm(width, eps=norm_eps, device=device, dtype=dtype))
            self.blocks.append(build_layer(entry, device=device, dtype=dtype,
                                           where=f"shared.{name}.blocks.{j}", source=source))
        if width_in != d_model:
            self._narrow_output(self.blocks[0], d_model, device, dtype, name)
        # LoRA: forward hooks on the shared linears add the active site's adapter output (set per call)
        self._active_lora = None
        self.lora_targets = {}          # adapter key -> (in_features, out_features)
        if spec["lora_rank"]:
            for j, block in enumerate(self.blocks):
                for key, projs in self._lora_groups(j, block, spec["lora_targets"]).items():
                    linears = [getattr(block, p) for p in projs]
                    self.lora_targets[key] = (linears[0].in_features, sum(l.out_features for l in linears))
                    start = 0
                    for linear in linears:
                        end = start + linear.out_features
                        linear.register_forward_hook(self._make_lora_hook(key, start, end))
                        start = end

    @staticmethod
    def _narrow_output(block: nn.Module, d_model: int, device, dtype, name: str) -> None:
        for proj in RESIDUAL_OUT_PROJ_NAMES:
            old = getattr(block, proj, None)
            if isinstance(old, nn.Linear):
                setattr(block, proj, nn.Linear(old.in_features, d_model, bias=old.bias is not None,
                                               device=device, dtype=dtype))
                block.reset_parameters()        # the layer's own init covers the new projection
                return
        raise LayoutError(f"shared.{name}: the first sublayer of a concat_embeddings block reads 2 * d_model "
                          f"and must end in an out_proj / o_proj / down_proj that can map back to d_model")

    @staticmethod
    def _lora_groups(j: int, block: nn.Module, targets) -> dict[str, list[str]]:
        """Adapter key -> the projections one adapter feeds. As Zamba2: one adapter for the MLP's
        gate and up projections together (B's output split between them), one per q, k, v."""
        groups = {}
        if "qkv" in targets and hasattr(block, "q_proj"):
            for p in ("q_proj", "k_proj", "v_proj"):
                groups[f"blocks_{j}_{p}"] = [p]
        if "mlp" in targets and isinstance(getattr(block, "up_proj", None), nn.Linear):
            gate = ["gate_proj"] if isinstance(getattr(block, "gate_proj", None), nn.Linear) else []
            groups[f"blocks_{j}_mlp"] = gate + ["up_proj"]
        return groups

    def _make_lora_hook(self, key: str, start: int, end: int):
        def hook(module, args, output):
            adapters = self._active_lora
            if adapters is None or key not in adapters:
                return output
            return output + adapters[key](args[0])[..., start:end]
        return hook

    def forward(self, x_in, *, states=None, seq_idx=None, lora=None):
        self._active_lora = lora
        try:
            y, aux_all = x_in, {}
            for j, (norm, block) in enumerate(zip(self.norms, self.blocks)):
                y, aux = _call(block, norm(y), None if states is None else states[j], seq_idx)
                for k, v in aux.items():
                    aux_all[k] = aux_all.get(k, 0.0) + v
        finally:
            self._active_lora = None
        return y, aux_all


class SharedSite(nn.Module):
    """The unshared parts of one site of a shared block: `linear` [d_model, d_model] applied to the
    block's output, and the site's LoRA adapters (A: in -> rank, B: rank -> out; B starts at zero)."""

    def __init__(self, block_name: str, site: int, block: SharedBlock, d_model: int, lora_rank: int,
                 *, device=None, dtype=None):
        super().__init__()
        self.block_name, self.site = block_name, site
        self.linear = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)
        self.lora = nn.ModuleDict({
            key: nn.Sequential(nn.Linear(fan_in, lora_rank, bias=False, device=device, dtype=dtype),
                               nn.Linear(lora_rank, fan_out, bias=False, device=device, dtype=dtype))
            for key, (fan_in, fan_out) in block.lora_targets.items()})

    def forward(self, x_in, block: SharedBlock, *, states=None, seq_idx=None):
        y, aux = block(x_in, states=states, seq_idx=seq_idx, lora=self.lora if len(self.lora) else None)
        return self.linear(y), aux


def _sum_aux(total: dict, aux: dict) -> None:
    for k, v in aux.items():
        total[k] = total[k] + v if k in total else v


class _ZooModel(nn.Module):
    """What CausalLM and ImageClassifier share: the stack of sublayers built from the layout, the
    shared blocks, parameter counting and initialisation."""

    def _build_stack(self, cfg: dict, device, dtype, source: str) -> None:
        d, eps = cfg["d_model"], cfg["norm_eps"]
        self.shared = nn.ModuleDict({
            name: SharedBlock(spec, d, eps, device=device, dtype=dtype, name=name, source=source)
            for name, spec in cfg["shared"].items()})
        self.layers = nn.ModuleList()
        sublayer = 0            # index in the main stack, as `zoo show` and `overrides` count
        for i, entry in enumerate(cfg["layout"]):
            if entry["type"] == "shared":
                spec = cfg["shared"][entry["block"]]
                self.layers.append(SharedSite(entry["block"], entry["site"], self.shared[entry["block"]], d,
                                              spec["lora_rank"], device=device, dtype=dtype))
            else:
                self.layers.append(ResidualBlock(entry, d, eps, device=device, dtype=dtype,
                                                 where=f"sublayer {sublayer} (layout.{i})", source=source))
                sublayer += 1
        self.norm_f = RMSNorm(d, eps=eps, device=device, dtype=dtype)

    @property
    def layout(self) -> list[dict]:
        return self.config["layout"]

    def _run_stack(self, h, emb, state, seq_idx):
        """h: [b, l, d] residual stream (fp32 if residual_in_fp32); emb: the token embeddings (Zamba's
        concat input). Returns (h, aux_losses)."""
        aux_total: dict = {}
        pending = None          # a shared block's output waiting to join the next sublayer's input
        compute_dtype = self.norm_f.weight.dtype
        for i, layer in enumerate(self.layers):
            layer_state = None if state is None else state[i]
            if isinstance(layer, SharedSite):
                block = self.shared[layer.block_name]
                x_in = h if block.input == "hidden" else torch.cat([h, emb.to(h.dtype)], dim=-1)
                t, aux = layer(x_in.to(compute_dtype), block, states=layer_state, seq_idx=seq_idx)
                if block.output == "residual":
                    h = h + t.to(h.dtype)
                else:
                    pending = t.to(h.dtype) if pending is None else pending + t.to(h.dtype)
            else:
                h, aux = layer(h, extra=pending, state=layer_state, seq_idx=seq_idx)
                pending = None
            _sum_aux(aux_total, aux)
        if pending is not None:
            h = h + pending
        return h, aux_total

    def _output(self, logits, aux_total) -> ModelOutput:
        if aux_total:
            aux_loss = sum(aux_total.values())
        else:
            aux_loss = torch.zeros((), device=logits.device, dtype=torch.float32)
        return ModelOutput(logits=logits, aux_loss=aux_loss, aux_losses=aux_total)

    def num_parameters(self, active: bool = False) -> int:
        """Unique parameters (tied and shared weights once). active=True counts, for each MoE layer,
        only top_k of its num_experts experts (the router and any shared expert count fully)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        for module, entry in self._moe_modules():
            expert = sum(p.numel() for n, p in module.named_parameters() if n.startswith("experts"))
            total -= expert - expert * entry["top_k"] // entry["num_experts"]
        return total

    def _moe_modules(self):
        for i, entry in enumerate(self.layout):
            if entry["type"] == "moe":
                yield self.layers[i].mixer, entry
        for name, spec in self.config["shared"].items():
            for j, entry in enumerate(spec["blocks"]):
                if entry["type"] == "moe":
                    yield self.shared[name].blocks[j], entry

    def parameters_by_type(self) -> dict[str, int]:
        """Parameter count per layer type (with its pre-norm), shared blocks, sites, embeddings, head."""
        out: dict[str, int] = {}

        def add(key, n):
            out[key] = out.get(key, 0) + n

        seen = set()

        def count(module):
            n = 0
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
            return n

        for i, entry in enumerate(self.layout):
            add("shared_site" if entry["type"] == "shared" else entry["type"], count(self.layers[i]))
        for name in self.shared:
            add("shared_block", count(self.shared[name]))
        add("embeddings_and_head", count(self))        # whatever is left: embeddings, final norm, head
        return {k: v for k, v in out.items() if v}

    # ---------------------------------------------------------------------------------- init
    def init_weights(self) -> None:
        """The whole documented init, from scratch (for a model materialised with `to_empty`):
        every layer's own reset_parameters(), then `_init_model_weights`."""
        for module in self.modules():
            if module is not self and isinstance(module, tuple(_layer_classes(self.config))):
                module.reset_parameters()
        self._init_model_weights()

    def _init_model_weights(self) -> None:
        """The model-level init of mamba_ssm, applied once by build_model:
        - embeddings (token, position, class) ~ N(0, std); norms one; site linears, untied head,
          LoRA A ~ N(0, std); LoRA B zero (so an untrained adapter changes nothing);
        - every nn.Linear bias inside the layers zero, except biases the layer marks as its own
          init (`_no_weight_decay` or `_no_reinit`, e.g. Mamba's dt_proj.bias);
        - the weights of out_proj / o_proj / down_proj (and MoE's stacked down projections) divided
          by sqrt(N), N = the number of residual sublayers of the main stack (mamba_ssm's
          n_residuals_per_layer * n_layer), when init.rescale_out_proj.
        Layers keep their own init for everything else (A_log, D, dt, conv)."""
        std = self.config["init"]["std"]
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Embedding):
                    nn.init.normal_(module.weight, std=std)
                elif isinstance(module, RMSNorm) and module.weight is not None:
                    nn.init.ones_(module.weight)
                elif isinstance(module, nn.Linear) and module.bias is not None:
                    if not (getattr(module.bias, "_no_weight_decay", False) or getattr(module.bias, "_no_reinit", False)):
                        nn.init.zeros_(module.bias)
            for site in self.layers:
                if isinstance(site, SharedSite):
                    nn.init.normal_(site.linear.weight, std=std)
                    for adapter in site.lora.values():
                        nn.init.normal_(adapter[0].weight, std=std)
                        nn.init.zeros_(adapter[1].weight)
            self._init_extra(std)
            if self.config["init"]["rescale_out_proj"]:
                n_residuals = sum(1 for e in self.layout if e["type"] != "shared")
                scale = 1.0 / math.sqrt(n_residuals)
                for name, p in self.named_parameters():
                    parts = name.split(".")
                    if parts[-1] == "bias" or not (set(parts[-2:]) & set(RESIDUAL_OUT_PROJ_NAMES)):
                        continue
                    if name.startswith("layers.") and ".linear." in name:
                        continue
                    p.mul_(scale)

    def _init_extra(self, std: float) -> None:
        pass


def _layer_classes(config: dict):
    types = {e["type"] for e in config["layout"] if e["type"] != "shared"}
    for spec in config["shared"].values():
        types |= {e["type"] for e in spec["blocks"]}
    return [registry.get(t) for t in sorted(types)]


class CausalLM(_ZooModel):
    """Token embedding -> pre-norm residual sublayers (and shared-block sites) -> RMSNorm -> head.

    forward(input_ids [b, l] int64, *, state=None, seq_idx=None) -> ModelOutput(logits [b, l, vocab]).
    """

    def __init__(self, config: dict, *, device=None, dtype=None, source: str = ""):
        super().__init__()
        self.config = config
        d, vocab = config["d_model"], config["vocab_size"]
        self.residual_in_fp32 = config["residual_in_fp32"]
        self.embedding = nn.Embedding(vocab, d, device=device, dtype=dtype)
        self._build_stack(config, device, dtype, source)
        self.lm_head = nn.Linear(d, vocab, bias=False, device=device, dtype=dtype)
        if config["tie_embeddings"]:
            self.lm_head.weight = self.embedding.weight

    def _init_extra(self, std: float) -> None:
        if self.config["tie_embeddings"]:
            # to_empty() materialises tied parameters separately: tie them again
            self.lm_head.weight = self.embedding.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=std)

    def init_state(self, batch_size: int, *, dtype=None, device=None, max_seqlen: int | None = None) -> list:
        """The inference state of every sublayer, a list aligned with `layers` (None for MLP/MoE; for
        a shared-block site, the list of its sublayers' states: each site has its own KV cache)."""
        param = self.embedding.weight
        dtype, device = dtype or param.dtype, device or param.device
        states = []
        for layer in self.layers:
            if isinstance(layer, SharedSite):
                block = self.shared[layer.block_name]
                states.append([_init_state_of(b, batch_size, dtype, device, max_seqlen) for b in block.blocks])
            else:
                states.append(_init_state_of(layer.mixer, batch_size, dtype, device, max_seqlen))
        return states

    def forward(self, input_ids: torch.Tensor, *, state: list | None = None,
                seq_idx: torch.Tensor | None = None) -> ModelOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seqlen] integer ids, got shape {tuple(input_ids.shape)}")
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state has {len(state)} entries for {len(self.layers)} layers: "
                             f"make it with model.init_state(batch_size)")
        emb = self.embedding(input_ids)                                   # [b, l, d]
        h = emb.float() if self.residual_in_fp32 else emb
        h, aux = self._run_stack(h, emb, state, seq_idx)
        h = self.norm_f(h).to(self.lm_head.weight.dtype)
        return self._output(self.lm_head(h), aux)                         # logits [b, l, vocab]


class ImageClassifier(_ZooModel):
    """Vision Mamba (Zhu et al., 2024): patch embedding (conv, stride = patch) -> class token (in the
    middle of the patch sequence, at its head, or none with mean pooling) -> learned position embedding
    -> bidirectional pre-norm residual sublayers -> RMSNorm -> pooled token -> linear head.

    forward(images [b, c, h, w]) -> ModelOutput(logits [b, num_classes]).
    """

    def __init__(self, config: dict, *, device=None, dtype=None, source: str = ""):
        super().__init__()
        self.config = config
        image, d = config["image"], config["d_model"]
        self.residual_in_fp32 = config["residual_in_fp32"]
        self.patch_size, self.pool = image["patch_size"], image["pool"]
        self.num_patches = (image["image_size"] // image["patch_size"]) ** 2
        self.patch_embed = nn.Conv2d(image["in_channels"], d, kernel_size=self.patch_size,
                                     stride=self.patch_size, device=device, dtype=dtype)
        n_tokens = self.num_patches + (0 if self.pool == "mean" else 1)
        self.cls_token = (nn.Parameter(torch.zeros(1, 1, d, device=device, dtype=dtype))
                          if self.pool != "mean" else None)
        self.pos_embed = (nn.Parameter(torch.zeros(1, n_tokens, d, device=device, dtype=dtype))
                          if image["pos_embed"] else None)
        self._build_stack(config, device, dtype, source)
        self.head = nn.Linear(d, image["num_classes"], device=device, dtype=dtype)

    def _init_extra(self, std: float) -> None:
        for p in (self.cls_token, self.pos_embed):
            if p is not None:
                nn.init.normal_(p, std=std)
        nn.init.normal_(self.head.weight, std=std)
        nn.init.zeros_(self.head.bias)

    def init_state(self, *args, **kwargs):
        raise ValueError("an image classifier sees the whole image at once: it has no inference state")

    def forward(self, images: torch.Tensor) -> ModelOutput:
        if images.dim() != 4:
            raise ValueError(f"images must be [batch, channels, height, width], got shape {tuple(images.shape)}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)           # [b, num_patches, d]
        if x.shape[1] != self.num_patches:
            size = self.config["image"]["image_size"]
            raise ValueError(f"images of shape {tuple(images.shape)} give {x.shape[1]} patches; the model "
                             f"was built for {size}x{size} (image.image_size)")
        b = x.shape[0]
        cls_pos = {"middle_cls": self.num_patches // 2, "head_cls": 0}.get(self.pool)
        if cls_pos is not None:
            cls = self.cls_token.expand(b, -1, -1)
            x = torch.cat([x[:, :cls_pos], cls, x[:, cls_pos:]], dim=1)  # [b, num_patches + 1, d]
        if self.pos_embed is not None:
            x = x + self.pos_embed
        h = x.float() if self.residual_in_fp32 else x
        h, aux = self._run_stack(h, x, None, None)
        h = self.norm_f(h)
        pooled = h.mean(dim=1) if cls_pos is None else h[:, cls_pos]      # [b, d]
        return self._output(self.head(pooled.to(self.head.weight.dtype)), aux)


MODEL_CLASSES = {"causal_lm": CausalLM, "image_classifier": ImageClassifier}


def build_model(path_or_dict, *, device=None, dtype=None, **overrides) -> nn.Module:
    """YAML path / config name / dict (raw or canonical `model.config`) + dotted overrides -> model.

    `zoo.build_model("configs/models/jamba-v0.1.yaml", device="meta")` builds without memory;
    `zoo.build_model(cfg, **{"layers.attention_ratio": 0.25, "d_model": 96})` applies overrides.
    """
    if isinstance(path_or_dict, (str, bytes)) or hasattr(path_or_dict, "__fspath__"):
        from zoo.layout import resolve_config_path
        source = resolve_config_path(str(path_or_dict))
    else:
        source = f"<config {path_or_dict.get('name', 'unnamed')}>"
    cfg = load_config(path_or_dict, **overrides)
    model = MODEL_CLASSES[cfg["model"]](cfg, device=device, dtype=dtype, source=source)
    model._init_model_weights()
    return model
