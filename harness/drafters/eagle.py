"""EAGLE draft heads (Li et al. 2024 "EAGLE", "EAGLE-2"; 2025 "EAGLE-3"): the modules, the
on-disk format (ours is the released one) and a strict loader. Used by training
(``harness.train.eagle``) and decoding (``methods/eagle*.py``).

Alignment, both versions: the head's position ``j`` reads the pair (target feature ``f_j`` of
token ``x_j``, embedding of the next token ``x_{j+1}``) and outputs its estimate of the
target's next feature; the logits of that output predict ``x_{j+2}``. Its position id is
``j`` (upstream: the pair's index). When drafting further the head reads its own output in
place of ``f`` (it has no target feature for a drafted token).

EAGLE-1/2 head (``version=1``)::

    z = fc([embed(x_{j+1}) ; f_j])       fc: 2h -> h, bias (upstream default; config "bias")
    z = layers(z)                         Llama decoder layer(s); layer 0 has NO input norm
    logits = target_lm_head(z)            the target's frozen LM head, no final norm
    f_j = the target's last hidden state (after its final norm: what its LM head reads)

EAGLE-3 head (``version=3``)::

    g = fc([f_low ; f_mid ; f_high])      3*H -> h, no bias; only target features go through fc:
                                          the head's own h-wide output is fed back as is
    a = [input_layernorm(embed(x)) ; hidden_norm(g)]      2h: q/k/v read 2h
    z = g + o_proj(attention(a));  z = z + mlp(post_attention_layernorm(z))   (midlayer)
    logits = lm_head(norm(z))             the head's own LM head over its draft vocabulary
    target id = draft id + d2t[draft id]; t2d[target id] = "target id is in the draft vocabulary"
    f_low/mid/high = the input of target decoder layers ``fused_layers`` (index i = the
    output of layer i-1, as transformers' ``hidden_states[i]``; upstream 2, N//2, N-3)

The embedding is always the target's (upstream freezes it and loads it from the target).

On disk (written by ``save_head``, read by ``load_head``; the released formats)::

    config.json            EAGLE-1/2: a Llama config of one layer (+ "bias"); EAGLE-3:
                           "architectures": ["LlamaForCausalLMEagle3"], draft_vocab_size,
                           [target_hidden_size], [eagle_config.eagle_aux_hidden_state_layer_ids]
    pytorch_model.bin | model.safetensors
        EAGLE-1/2: fc.weight, fc.bias, layers.0.self_attn.{q,k,v,o}_proj.weight,
                   layers.0.mlp.{gate,up,down}_proj.weight, layers.0.post_attention_layernorm.weight
                   (+ layers.i.input_layernorm.weight for i > 0)
        EAGLE-3:   fc.weight, midlayer.{hidden_norm,input_layernorm,post_attention_layernorm}.weight,
                   midlayer.self_attn.{q,k,v,o}_proj.weight, midlayer.mlp.{gate,up,down}_proj.weight,
                   norm.weight, lm_head.weight, d2t (int64 [draft vocab]), t2d (bool [vocab])

Also accepted, as upstream / SGLang / vLLM do: ``embed_tokens.weight`` (a copy of the target's
embedding: shape-checked, then the target's own is used), a ``model.`` prefix on every key,
``lm_head.weight`` beside an EAGLE-1/2 head (shape-checked; the target's is used), ``d2t``/``t2d``
beside an EAGLE-3 head with the full vocabulary (must be the identity). Anything else missing,
extra or mis-shaped is refused with ``EagleHeadError`` naming the key (upstream loads with
``strict=False`` and silently keeps random weights).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.engine import ModelLoadError

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("pytorch_model.bin", "model.safetensors")  # upstream's order of preference
SAVE_NAME = "model.safetensors"
EAGLE3_ARCH = "LlamaForCausalLMEagle3"


class EagleHeadError(ModelLoadError, ValueError):
    """An EAGLE head that cannot be used as given; the message names the key / field and the fix."""


def default_fused_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low / mid / high feature layers for a target of ``num_layers`` layers.

    Upstream (and vLLM's default): the inputs of layers 2, N//2 and N-3. Those are distinct only
    for N >= 7; shallower targets (the zoo's) get N//4, N//2, 3N//4 (N >= 4) or 0, 1, 2, where
    index N is the final (normed) output, as in transformers' ``hidden_states``.
    """
    n = num_layers
    if n >= 7:
        return (2, n // 2, n - 3)
    if n >= 4:
        return (n // 4, n // 2, 3 * n // 4)
    if n >= 2:
        return (0, 1, 2)
    raise EagleHeadError(f"EAGLE-3 needs a target with at least 2 layers to fuse features, got {n}")


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _rope_of(config: Any) -> tuple[float, Optional[dict]]:
    """(rope theta, rope scaling dict or None) of a transformers config (v4 or v5 fields) or a dict."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    params = get("rope_parameters", None)
    if params:
        params = dict(params)
        theta = float(params.pop("rope_theta", get("rope_theta", None) or 10000.0))
        scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
        return theta, scaling
    return float(get("rope_theta", None) or 10000.0), (dict(get("rope_scaling")) if get("rope_scaling", None) else None)


@dataclass
class EagleHeadConfig:
    version: int = 1  # 1 = EAGLE-1/2 head (fc 2h->h + decoder layer, target LM head); 3 = EAGLE-3 head
    hidden_size: int = 0  # h: the head's width (= the target's hidden size: it reads the target's embedding)
    intermediate_size: int = 0  # MLP width of the head's decoder layer
    num_attention_heads: int = 0  # query heads of the head's attention
    num_key_value_heads: int = 0  # key/value heads (GQA; = num_attention_heads for MHA)
    head_dim: int = 0  # per-head width (EAGLE-1/2 upstream: hidden_size // num_attention_heads)
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm in the head
    rope_theta: float = 10000.0  # RoPE base of the head's attention
    rope_scaling: Optional[dict] = None  # RoPE scaling as in a transformers config (None = plain RoPE)
    max_position_embeddings: int = 2048  # informational (RoPE needs no table)
    vocab_size: int = 0  # the target's vocabulary (rows of its LM head and embedding)
    draft_vocab_size: int = 0  # v3: rows of the head's own LM head (< vocab_size: mapped with d2t/t2d)
    target_hidden_size: int = 0  # v3: width of one target feature (fc reads 3x this); 0 = hidden_size
    fused_layers: tuple[int, ...] = ()  # v3: target hidden-state indices fused (low, mid, high)
    num_layers: int = 1  # decoder layers in the head (released heads: 1; v3 supports only 1)
    fc_bias: bool = True  # fc has a bias (upstream: EAGLE-1/2 default true, config "bias"; EAGLE-3 false)
    attention_bias: bool = False  # q/k/v projections have biases (Qwen2-based heads; config "qkv_bias")
    hidden_act: str = "silu"  # MLP activation (a transformers ACT2FN name)

    def __post_init__(self) -> None:
        self.fused_layers = tuple(int(i) for i in self.fused_layers)
        if self.version == 3:
            self.draft_vocab_size = self.draft_vocab_size or self.vocab_size
            self.target_hidden_size = self.target_hidden_size or self.hidden_size
        else:  # EAGLE-3 only fields
            self.draft_vocab_size, self.target_hidden_size, self.fused_layers = 0, 0, ()

    @property
    def feature_size(self) -> int:
        """Width of the target features the head reads (v1: h; v3: 3 fused layers)."""
        return self.hidden_size if self.version == 1 else len(self.fused_layers) * self.target_hidden_size

    @property
    def maps_vocab(self) -> bool:
        """True when the head drafts in a smaller vocabulary (d2t / t2d maps)."""
        return self.version == 3 and self.draft_vocab_size != self.vocab_size

    def validate(self) -> "EagleHeadConfig":
        if self.version not in (1, 3):
            raise EagleHeadError(f"EAGLE head version must be 1 (EAGLE-1/2) or 3 (EAGLE-3), got {self.version}")
        sizes = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
        for name in sizes:
            if int(getattr(self, name)) < 1:
                raise EagleHeadError(f"EAGLE head config: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise EagleHeadError(f"EAGLE head config: {self.num_attention_heads} attention heads are not a multiple "
                                 f"of {self.num_key_value_heads} key/value heads")  # fmt: skip
        if self.num_layers < 1:
            raise EagleHeadError(f"EAGLE head config: num_layers must be >= 1, got {self.num_layers}")
        if self.version == 3:
            if self.num_layers != 1:
                raise EagleHeadError(f"EAGLE-3 heads with {self.num_layers} decoder layers are not supported (released heads have 1)")
            if len(self.fused_layers) != 3 or len(set(self.fused_layers)) != 3:
                raise EagleHeadError(f"EAGLE-3 fuses 3 distinct target layers, got fused_layers={list(self.fused_layers)}")
            if not 1 <= self.draft_vocab_size <= self.vocab_size:
                raise EagleHeadError(f"EAGLE-3 draft_vocab_size={self.draft_vocab_size} must be in 1..{self.vocab_size} (the target's vocabulary)")
        return self

    @classmethod
    def from_target(cls, target_config: Any, version: int, **overrides: Any) -> "EagleHeadConfig":
        """The head upstream trains for this target: one decoder layer shaped like the target's.

        ``overrides``: any field (e.g. ``draft_vocab_size=1024``, ``fused_layers=(1, 3, 5)``).
        EAGLE-3 defaults: ``default_fused_layers`` and a draft vocabulary of a quarter of the
        target's (upstream: 32k of Llama 3's 128k) for vocabularies of 4096 and more.
        """
        text = _text_config(target_config)
        heads = int(text.num_attention_heads)
        hidden = int(text.hidden_size)
        theta, scaling = _rope_of(text)
        vocab = int(text.vocab_size)
        fields: dict[str, Any] = dict(
            version=version,
            hidden_size=hidden,
            intermediate_size=int(text.intermediate_size),
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=(int(getattr(text, "head_dim", None) or hidden // heads)) if version == 3 else hidden // heads,
            rms_norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(getattr(text, "max_position_embeddings", 2048) or 2048),
            vocab_size=vocab,
            hidden_act=str(getattr(text, "hidden_act", "silu")),
            fc_bias=version == 1,
        )
        if version == 3:
            fields.update(
                draft_vocab_size=vocab // 4 if vocab >= 4096 else vocab,
                target_hidden_size=hidden,
                fused_layers=default_fused_layers(int(text.num_hidden_layers)),
            )
        fields.update(overrides)
        return cls(**fields).validate()


# ------------------------------------------------------------------------------ modules


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, computed in float32 (Llama's)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class HeadCache:
    """The head's own KV cache: per decoder layer, keys and values ``[B, kv_heads, S, head_dim]``.

    ``truncate(n)`` rolls back to the first n entries; ``keep(indices)`` keeps those entries
    (in order), e.g. the committed prefix plus the accepted path of a drafted tree.
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __len__(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new entries of ``layer``; returns all of that layer's keys and values."""
        if layer == len(self.keys):
            self.keys.append(keys)
            self.values.append(values)
        else:
            self.keys[layer] = torch.cat((self.keys[layer], keys), dim=2)
            self.values[layer] = torch.cat((self.values[layer], values), dim=2)
        return self.keys[layer], self.values[layer]

    def truncate(self, length: int) -> None:
        if length > len(self):
            raise ValueError(f"cannot truncate a head cache of {len(self)} entries to {length}")
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]

    def keep(self, indices: Sequence[int] | torch.Tensor) -> None:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"keep() indices must be in [0, {len(self)}), got {idx.tolist()}")
        self.keys = [k.index_select(2, idx.to(k.device)) for k in self.keys]
        self.values = [v.index_select(2, idx.to(v.device)) for v in self.values]


class DecodingHeadCache(HeadCache):
    """The head's cache while decoding (no autograd): each layer's keys and values live in a
    buffer ``[B, kv_heads, capacity, head_dim]`` grown by doubling, of which the first
    ``len(self)`` entries are valid. ``append`` writes the new entries in place, ``truncate``
    (dropping a drafted tree's entries every step) only moves the length, ``keep`` moves the
    kept entries to the front: nothing is rebuilt per step. Training keeps ``HeadCache``, whose
    concatenations autograd can follow."""

    def __init__(self) -> None:
        super().__init__()
        self.lengths: list[int] = []  # valid entries per layer (a forward appends layer by layer)

    def __len__(self) -> int:
        return self.lengths[0] if self.lengths else 0

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = keys.shape[2]
        if layer == len(self.keys):  # the layer's first entries: a buffer with room to grow
            self.keys.append(keys.new_empty(*keys.shape[:2], max(2 * new, 64), keys.shape[3]))
            self.values.append(values.new_empty(*values.shape[:2], max(2 * new, 64), values.shape[3]))
            self.lengths.append(0)
        start = self.lengths[layer]
        if start + new > self.keys[layer].shape[2]:  # full: double the capacity, keep the valid entries
            for buffers in (self.keys, self.values):
                old = buffers[layer]
                grown = old.new_empty(*old.shape[:2], 2 * (start + new), old.shape[3])
                grown[:, :, :start] = old[:, :, :start]
                buffers[layer] = grown
        self.keys[layer][:, :, start : start + new] = keys
        self.values[layer][:, :, start : start + new] = values
        self.lengths[layer] = start + new
        return self.keys[layer][:, :, : start + new], self.values[layer][:, :, : start + new]

    def truncate(self, length: int) -> None:
        if length > len(self):
            raise ValueError(f"cannot truncate a head cache of {len(self)} entries to {length}")
        self.lengths = [min(n, length) for n in self.lengths]

    def keep(self, indices: Sequence[int] | torch.Tensor) -> None:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"keep() indices must be in [0, {len(self)}), got {idx.tolist()}")
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[:, :, : idx.numel()] = buffer.index_select(2, idx.to(buffer.device))
        self.lengths = [idx.numel()] * len(self.lengths)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid keys and values of layer ``index``."""
        n = self.lengths[index]
        return self.keys[index][:, :, :n], self.values[index][:, :, :n]


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated: RoPE's ``x * cos + rotate_half(x) * sin`` is then
    ``x * cos + x.roll(half) * signed_sin`` (the same products, one op instead of three)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class Attention(nn.Module):
    """Llama attention reading ``in_features`` (h for EAGLE-1/2, 2h for EAGLE-3's midlayer)."""

    def __init__(self, cfg: EagleHeadConfig, in_features: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(in_features, self.heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(in_features, self.kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(in_features, self.kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)
        self.fused: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # q|k|v weight, bias (decoding)

    def fuse(self) -> None:
        """Decoding: q, k and v from one matmul over a copy of their weights stacked (the same
        products, one call instead of three). The weights must not change afterwards."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        bias = torch.cat([p.bias for p in projections]) if self.q_proj.bias is not None else None
        self.fused = (torch.cat([p.weight for p in projections]).detach(), bias.detach() if bias is not None else None)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], allowed: Optional[torch.Tensor],
                cache: Optional[HeadCache], layer: int) -> torch.Tensor:  # fmt: skip
        b, t, _ = x.shape
        heads, kv_heads = self.heads, self.kv_heads
        # 1. q, k, v as one [B, heads + 2 kv_heads, T, d] tensor
        if self.fused is not None:
            qkv = F.linear(x, *self.fused)
        else:
            qkv = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        qkv = qkv.view(b, t, heads + 2 * kv_heads, self.head_dim).transpose(1, 2)
        # 2. RoPE on q and k at once (rope: cos and the signed sin, [B, T, d])
        cos, signed_sin = (r.unsqueeze(1) for r in rope)
        qk = qkv[:, : heads + kv_heads]
        qk = qk * cos + qk.roll(self.head_dim // 2, dims=-1) * signed_sin
        q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
        # 3. attention over the cached entries and the new ones
        if cache is not None:
            k, v = cache.append(layer, k, v)
        group = heads // kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: EagleHeadConfig):
        super().__init__()
        from transformers.activations import ACT2FN  # noqa: PLC0415

        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        if cfg.hidden_act not in ACT2FN:
            raise EagleHeadError(f"EAGLE head config: unknown hidden_act '{cfg.hidden_act}'")
        self.act = ACT2FN[cfg.hidden_act]
        self.fused: Optional[torch.Tensor] = None  # gate|up weight (decoding)

    def fuse(self) -> None:
        """Decoding: gate and up from one matmul over a copy of their weights stacked."""
        self.fused = torch.cat((self.gate_proj.weight, self.up_proj.weight)).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            gate, up = F.linear(x, self.fused).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """EAGLE-1/2 layer ``index``: a Llama decoder layer, without the input norm when index == 0
    (its input is fc's output, upstream's choice)."""

    def __init__(self, cfg: EagleHeadConfig, index: int):
        super().__init__()
        self.self_attn = Attention(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if index > 0 else None
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.index = index

    def forward(self, x, rope, allowed, cache):  # noqa: ANN001, ANN201 (internal)
        a = self.input_layernorm(x) if self.input_layernorm is not None else x
        x = x + self.self_attn(a, rope, allowed, cache, self.index)
        return x + self.mlp(self.post_attention_layernorm(x))


class FusedDecoderLayer(nn.Module):
    """EAGLE-3's ``midlayer``: attention over ``[input_layernorm(embedding) ; hidden_norm(g)]``
    (2h), the residual stream starting from g (un-normed)."""

    def __init__(self, cfg: EagleHeadConfig):
        super().__init__()
        self.self_attn = Attention(cfg, 2 * cfg.hidden_size)
        self.mlp = MLP(cfg)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds, g, rope, allowed, cache):  # noqa: ANN001, ANN201 (internal)
        a = torch.cat((self.input_layernorm(embeds), self.hidden_norm(g)), dim=-1)
        x = g + self.self_attn(a, rope, allowed, cache, 0)
        return x + self.mlp(self.post_attention_layernorm(x))


class EagleHead(nn.Module):
    """One EAGLE head; ``state_dict`` keys are the released checkpoints' (see the module doc).

    ``forward(features, input_ids, embed, positions, cache, mask) -> hidden [B, T, h]``;
    ``logits(hidden, target_lm_head)`` -> [B, T, V] (v1) or [B, T, V_draft] (v3);
    ``target_logits(...)`` -> always over the target vocabulary (v3: -inf outside the draft one);
    ``to_target(draft_ids)`` maps draft ids to target ids (identity for v1 / a full vocabulary).
    """

    def __init__(self, cfg: EagleHeadConfig):
        super().__init__()
        from transformers import LlamaConfig  # noqa: PLC0415
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: PLC0415

        cfg.validate()
        self.config = cfg
        h = cfg.hidden_size
        if cfg.version == 1:
            self.fc = nn.Linear(2 * h, h, bias=cfg.fc_bias)
            self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        else:
            self.midlayer = FusedDecoderLayer(cfg)
            self.fc = nn.Linear(cfg.feature_size, h, bias=cfg.fc_bias)
            self.norm = RMSNorm(h, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
            if cfg.maps_vocab:
                self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
                self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        # RoPE tables (non-persistent buffers: not in the state dict), any transformers rope type
        rope_cfg = LlamaConfig(hidden_size=h, num_attention_heads=cfg.num_attention_heads, head_dim=cfg.head_dim,
                               rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                               max_position_embeddings=max(cfg.max_position_embeddings, 1))  # fmt: skip
        self.rotary_emb = LlamaRotaryEmbedding(rope_cfg)
        self.decoding = False  # set by for_decoding: fused projections, RoPE from a table
        self.rope_table: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # decoding: cos, signed sin per position
        self.lm_transposed: Optional[tuple[nn.Module, torch.Tensor, Optional[torch.Tensor]]] = None  # decoding: (LM head, its weight^T, bias)
        self.target_ids: Optional[torch.Tensor] = None  # decoding, v3 with a map: the target id of each draft id

    @torch.no_grad()
    def for_decoding(self, target_lm_head: Optional[nn.Module] = None) -> "EagleHead":
        """Make the forward lean for decoding: q|k|v and gate|up each one matmul over stacked
        copies of their weights, RoPE read from a table of positions (``rope``) instead of
        recomputed per forward, and the logits (v1: of ``target_lm_head``) from a transposed copy
        of the LM head's weight: a product over a few rows reads it row by row, far faster once
        the target's forward has pushed it out of the CPU's caches. The outputs are the same; the
        weights must not change afterwards (call it again if they do; training never calls it)."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                module.fuse()
        self.decoding, self.rope_table = True, None
        lm_head = target_lm_head if self.config.version == 1 else self.lm_head
        self.lm_transposed = (lm_head, lm_head.weight.t().contiguous(), lm_head.bias) if lm_head is not None else None
        if self.config.maps_vocab:
            self.target_ids = torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t
        return self

    def rope(self, positions: torch.Tensor, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) [B, T, d] of ``positions``. After ``for_decoding``: rows of a table
        covering positions ``0..end-1`` (grown by doubling; the rows are what the rotary embedding
        gives, position by position); else computed by the rotary embedding."""
        if not self.decoding or self.rotary_emb.rope_type in ("dynamic", "longrope"):  # these depend on the length
            cos, sin = self.rotary_emb(like, positions)
            return cos, _signed_sin(sin)
        table = self.rope_table
        if table is None or table[0].shape[0] < end or table[0].dtype != like.dtype:
            size = max(end, 2 * table[0].shape[0] if table is not None else 256)
            cos, sin = self.rotary_emb(like, torch.arange(size, device=like.device)[None])
            table = self.rope_table = (cos[0], _signed_sin(sin[0]))
        return table[0][positions], table[1][positions]

    # ---- the vocabulary map (EAGLE-3) ------------------------------------------------------
    @torch.no_grad()
    def set_vocab_map(self, target_ids: Sequence[int] | torch.Tensor) -> None:
        """Make the draft vocabulary ``target_ids`` (draft id i -> target_ids[i], increasing)."""
        ids = torch.as_tensor(target_ids, dtype=torch.long).flatten().to(self.d2t.device)
        if ids.numel() != self.config.draft_vocab_size or (ids[1:] <= ids[:-1]).any():
            raise EagleHeadError(f"the draft vocabulary needs {self.config.draft_vocab_size} increasing target ids")
        self.d2t.copy_(ids - torch.arange(ids.numel(), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target ids of draft-vocabulary ids (identity without a map)."""
        if not self.config.maps_vocab:
            return draft_ids
        return draft_ids + self.d2t[draft_ids]

    # ---- the forward -------------------------------------------------------------------------
    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        embed: nn.Module,
        positions: torch.Tensor,
        cache: Optional[HeadCache] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The head's outputs for T new pairs after the ``len(cache)`` cached ones.

        features: [B, T, F] target features (``feature_size`` wide) or the head's own outputs
            (h wide; v3 then skips fc; v1 reads either, both are h wide).
        input_ids: [B, T] the token after each feature's token; embed: the target's input embedding.
        positions: [B, T] or [T] position ids (upstream: the pair index j); after ``for_decoding``
            each must be below ``len(cache) + T`` (a pair's index is: the RoPE table's extent).
        cache: appended to when given (None: no past, nothing kept).
        mask: bool [T, past + T] or [B, T, past + T], True = may attend; default causal.
        """
        b, t = input_ids.shape
        past = len(cache) if cache is not None else 0
        embeds = embed(input_ids).to(features.dtype)
        pos = torch.as_tensor(positions, device=input_ids.device).long().reshape(-1, t).expand(b, t)
        rope = self.rope(pos, past + t, embeds)
        allowed = self._allowed(mask, b, t, past, input_ids.device)
        cfg = self.config
        if cfg.version == 1:
            if features.shape[-1] != cfg.hidden_size:
                raise EagleHeadError(f"EAGLE-1/2 head reads {cfg.hidden_size}-wide features, got {features.shape[-1]}")
            x = self.fc(torch.cat((embeds, features), dim=-1))
            for layer in self.layers:
                x = layer(x, rope, allowed, cache)
            return x
        if features.shape[-1] == self.fc.in_features:
            g = self.fc(features)
        elif features.shape[-1] == cfg.hidden_size:
            g = features
        else:
            raise EagleHeadError(f"EAGLE-3 head reads {self.fc.in_features}-wide fused features or its own "
                                 f"{cfg.hidden_size}-wide output, got {features.shape[-1]}")  # fmt: skip
        return self.midlayer(embeds, g, rope, allowed, cache)

    @staticmethod
    def _allowed(mask: Optional[torch.Tensor], b: int, t: int, past: int, device: torch.device) -> Optional[torch.Tensor]:
        if mask is None:
            if t == 1:
                return None  # one query sees everything
            return torch.ones(t, past + t, dtype=torch.bool, device=device).tril(diagonal=past).view(1, 1, t, past + t)
        mask = mask.to(device=device, dtype=torch.bool)
        if tuple(mask.shape[-2:]) != (t, past + t) or mask.dim() not in (2, 3):
            raise ValueError(f"head mask must be [{t}, {past + t}] or [B, {t}, {past + t}], got {list(mask.shape)}")
        return mask.view(-1, 1, t, past + t)

    def logits(self, hidden: torch.Tensor, target_lm_head: nn.Module) -> torch.Tensor:
        """v1: the target's LM head on the output; v3: the head's own norm + LM head (draft vocabulary)."""
        lm_head = target_lm_head if self.config.version == 1 else self.lm_head
        x = hidden if self.config.version == 1 else self.norm(hidden)
        if self.lm_transposed is None or self.lm_transposed[0] is not lm_head:
            return lm_head(x)
        _, weight_t, bias = self.lm_transposed
        return x @ weight_t if bias is None else x @ weight_t + bias

    def target_logits(self, hidden: torch.Tensor, target_lm_head: nn.Module) -> torch.Tensor:
        """Logits over the target vocabulary (v3 with a map: -inf for tokens outside the draft one)."""
        logits = self.logits(hidden, target_lm_head)
        if not self.config.maps_vocab:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        if self.target_ids is not None:  # decoding: the ids tabulated once
            return full.index_copy_(-1, self.target_ids, logits)
        index = (torch.arange(self.config.draft_vocab_size, device=logits.device) + self.d2t).expand_as(logits)
        return full.scatter(-1, index, logits)


# ------------------------------------------------------------------------------ features


def target_features(hidden_states: Sequence[torch.Tensor], cfg: EagleHeadConfig) -> torch.Tensor:
    """The features the head reads, from transformers' ``output_hidden_states`` tuple
    (``hidden_states[i]`` = input of layer i, the last = the final normed output)."""
    if cfg.version == 1:
        return hidden_states[-1]
    return torch.cat([hidden_states[i] for i in cfg.fused_layers], dim=-1)


def vocab_map(token_counts: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """The draft vocabulary upstream uses: the ``draft_vocab_size`` most frequent target ids
    (ties by lower id), in increasing id order. Pass it to ``EagleHead.set_vocab_map``."""
    counts = torch.as_tensor(token_counts, dtype=torch.float64).flatten()
    order = sorted(range(counts.numel()), key=lambda i: (-float(counts[i]), i))[:draft_vocab_size]
    return torch.tensor(sorted(order), dtype=torch.long)


# ------------------------------------------------------------------------------ saving


def released_config(cfg: EagleHeadConfig, dtype: torch.dtype = torch.float16) -> dict:
    """config.json in the released format of ``cfg.version`` (readable by upstream, SGLang, vLLM)."""
    meta: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if cfg.version == 1 else EAGLE3_ARCH],
        "model_type": "llama",
        "hidden_act": cfg.hidden_act,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "num_hidden_layers": cfg.num_layers,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "bias": cfg.fc_bias,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    if cfg.attention_bias:
        meta["qkv_bias" if cfg.version == 1 else "attention_bias"] = True
    if cfg.version == 3:
        meta.update(head_dim=cfg.head_dim, draft_vocab_size=cfg.draft_vocab_size,
                    eagle_config={"eagle_aux_hidden_state_layer_ids": list(cfg.fused_layers), "use_aux_hidden_state": True})  # fmt: skip
        if cfg.target_hidden_size != cfg.hidden_size:
            meta["target_hidden_size"] = cfg.target_hidden_size
    return meta


def save_head(head: EagleHead, cfg: EagleHeadConfig, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float16,
              extra: Optional[dict] = None) -> Path:  # fmt: skip
    """Write ``model.safetensors`` (floating tensors in ``dtype``; d2t/t2d as they are) and the
    released-format config.json (+ ``"harness": extra`` for provenance) into ``out_dir``."""
    from safetensors.torch import save_file  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().to("cpu").contiguous()
             for k, v in head.state_dict().items()}  # fmt: skip
    save_file(state, str(out / SAVE_NAME), metadata={"format": "pt"})
    meta = released_config(cfg, dtype)
    if extra:
        meta["harness"] = extra
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


# ------------------------------------------------------------------------------ loading


def _resolve_dir(source: str | os.PathLike) -> Path:
    """A local directory (or a weights file's directory), else a hub id fetched by huggingface_hub."""
    from harness.paths import is_path_like, resolve_repo_path  # noqa: PLC0415

    path = resolve_repo_path(str(source))
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    local = is_path_like(str(source)) or resolve_repo_path(Path(str(source)).parts[0]).is_dir()  # e.g. zoo/...
    if local:
        raise EagleHeadError(f"no EAGLE head at '{source}' (train one: harness train eagle version=1|3, "
                             "or set method.<name>.head=<directory or hub id>)")  # fmt: skip
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415

        return Path(snapshot_download(str(source), allow_patterns=[CONFIG_NAME, *WEIGHTS_NAMES]))
    except Exception as exc:  # noqa: BLE001 (any hub failure is one message)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EagleHeadError(f"cannot fetch EAGLE head '{source}' from the hub: {first} "
                             "(give a local directory with config.json and pytorch_model.bin or model.safetensors)") from exc  # fmt: skip


def _read_state(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    for name in WEIGHTS_NAMES:
        file = directory / name
        if not file.is_file():
            continue
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise EagleHeadError(f"{file} does not hold a state dict of tensors")
        return state, file
    raise EagleHeadError(f"'{directory}' holds neither {' nor '.join(WEIGHTS_NAMES)} (an EAGLE head's weights)")


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``model.`` prefix carried by every key but lm_head / d2t / t2d (SGLang / vLLM dumps)."""
    free = {"lm_head.weight", "d2t", "t2d"}
    keyed = [k for k in state if k not in free]
    if keyed and all(k.startswith("model.") for k in keyed):
        return {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    return state


def _detect_version(state: dict[str, torch.Tensor], meta: dict, file: Path) -> int:
    by_keys = 3 if any(k.startswith("midlayer.") for k in state) else 1 if any(k.startswith("layers.") for k in state) else 0
    by_config = 3 if (EAGLE3_ARCH in (meta.get("architectures") or []) or "draft_vocab_size" in meta) else 0
    if by_keys == 0:
        raise EagleHeadError(f"{file} is not an EAGLE head: no midlayer.* (EAGLE-3) or layers.0.* (EAGLE-1/2) keys")
    if by_config == 3 and by_keys == 1:
        raise EagleHeadError(f"{file.parent / CONFIG_NAME} describes an EAGLE-3 head but {file.name} holds EAGLE-1/2 keys (layers.*)")
    return by_keys


def _need(meta: dict, key: str, file: Path) -> Any:
    if meta.get(key) is None:
        raise EagleHeadError(f"{file} lacks the field '{key}'")
    return meta[key]


def config_from_released(meta: dict, version: int, target_config: Any, state: dict[str, torch.Tensor],
                         where: Path) -> EagleHeadConfig:  # fmt: skip
    """An ``EagleHeadConfig`` from a released config.json (+ the target's, for defaults)."""
    text = _text_config(target_config)
    heads = int(_need(meta, "num_attention_heads", where))
    hidden = int(_need(meta, "hidden_size", where))
    theta, scaling = _rope_of(meta)
    if version == 1:
        # upstream reads "bias" (default true); a config without it follows the weights
        fc_bias = bool(meta["bias"]) if "bias" in meta else "fc.bias" in state
        head_dim = hidden // heads
    else:
        fc_bias = bool(meta.get("bias", False))
        head_dim = int(meta.get("head_dim") or hidden // heads)
    layer_ids = (meta.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    fused = tuple(layer_ids) if layer_ids else (default_fused_layers(int(text.num_hidden_layers)) if version == 3 else ())
    return EagleHeadConfig(
        version=version,
        hidden_size=hidden,
        intermediate_size=int(_need(meta, "intermediate_size", where)),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(meta.get("max_position_embeddings") or 2048),
        vocab_size=int(_need(meta, "vocab_size", where)),
        draft_vocab_size=int(meta.get("draft_vocab_size") or 0),
        target_hidden_size=int(meta.get("target_hidden_size") or 0),
        fused_layers=fused,
        num_layers=int(meta.get("num_hidden_layers") or 1),
        fc_bias=fc_bias,
        attention_bias=bool(meta.get("qkv_bias" if version == 1 else "attention_bias", False)),
        hidden_act=str(meta.get("hidden_act", "silu")),
    ).validate()


def _check_target(cfg: EagleHeadConfig, target_config: Any, where: Path) -> None:
    text = _text_config(target_config)
    if cfg.vocab_size != int(text.vocab_size):
        raise EagleHeadError(f"the EAGLE head at {where} is for a vocabulary of {cfg.vocab_size}, the target has {text.vocab_size}")
    if cfg.hidden_size != int(text.hidden_size):
        raise EagleHeadError(f"the EAGLE head at {where} is {cfg.hidden_size} wide, the target's hidden size is "
                             f"{text.hidden_size} (the head reads the target's embedding)")  # fmt: skip
    if cfg.version == 3:
        if cfg.target_hidden_size != int(text.hidden_size):
            raise EagleHeadError(f"the EAGLE-3 head at {where} fuses {cfg.target_hidden_size}-wide features, "
                                 f"the target's are {text.hidden_size}")  # fmt: skip
        n = int(text.num_hidden_layers)
        bad = [i for i in cfg.fused_layers if not 0 <= i <= n]
        if bad:
            raise EagleHeadError(f"the EAGLE-3 head at {where} fuses layers {list(cfg.fused_layers)}; the target has "
                                 f"hidden states 0..{n} (eagle_config.eagle_aux_hidden_state_layer_ids)")  # fmt: skip


def _take_extras(state: dict[str, torch.Tensor], cfg: EagleHeadConfig, file: Path) -> dict[str, torch.Tensor]:
    """Check and drop the tensors the released formats may carry that this head does not keep."""
    state = dict(state)
    extras = {"embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    if cfg.version == 1:
        extras["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for key, shape in extras.items():
        if key in state:
            if tuple(state[key].shape) != shape:
                raise EagleHeadError(f"{file}: '{key}' has shape {list(state[key].shape)}, expected {list(shape)} "
                                     "(the target's)")  # fmt: skip
            del state[key]
    if cfg.version == 3 and not cfg.maps_vocab:  # full vocabulary: a map, if present, must be the identity
        d2t, t2d = state.pop("d2t", None), state.pop("t2d", None)
        if d2t is not None and (tuple(d2t.shape) != (cfg.vocab_size,) or bool(d2t.any())):
            raise EagleHeadError(f"{file}: 'd2t' must be all zeros of shape [{cfg.vocab_size}] for a full draft vocabulary")
        if t2d is not None and (tuple(t2d.shape) != (cfg.vocab_size,) or not bool(t2d.bool().all())):
            raise EagleHeadError(f"{file}: 't2d' must be all true of shape [{cfg.vocab_size}] for a full draft vocabulary")
    if cfg.maps_vocab and "t2d" not in state and "d2t" in state:  # SGLang / vLLM need only d2t
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        ids = torch.arange(state["d2t"].numel()) + state["d2t"].long()
        t2d[ids.clamp(0, cfg.vocab_size - 1)] = True
        state["t2d"] = t2d
    return state


def _check_keys(state: dict[str, torch.Tensor], head: EagleHead, file: Path) -> None:
    expected = head.state_dict()
    version = "EAGLE-3" if head.config.version == 3 else "EAGLE-1/2"
    for key in sorted(expected):
        if key not in state:
            raise EagleHeadError(f"{file}: missing key '{key}' (an {version} head of this config.json needs it)")
    for key in sorted(state):
        if key not in expected:
            raise EagleHeadError(f"{file}: unexpected key '{key}' (not part of an {version} head of this config.json)")
    for key in sorted(expected):
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise EagleHeadError(f"{file}: key '{key}' has shape {list(state[key].shape)}, "
                                 f"expected {list(expected[key].shape)} from config.json")  # fmt: skip


def _check_vocab_map(head: EagleHead, file: Path) -> None:
    cfg = head.config
    if not cfg.maps_vocab:
        return
    ids = torch.arange(cfg.draft_vocab_size) + head.d2t.cpu()
    if ids.min() < 0 or ids.max() >= cfg.vocab_size or (ids[1:] <= ids[:-1]).any():
        raise EagleHeadError(f"{file}: 'd2t' does not map the draft vocabulary to distinct increasing target ids in 0..{cfg.vocab_size - 1}")
    want = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    want[ids] = True
    if not torch.equal(head.t2d.cpu(), want):
        first = int((head.t2d.cpu() != want).nonzero()[0])
        raise EagleHeadError(f"{file}: 't2d' disagrees with 'd2t' at target id {first}")


def load_head(
    source: str | os.PathLike,
    target_config: Any,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device | str] = None,
) -> tuple[EagleHead, EagleHeadConfig]:
    """An EAGLE head from a directory, a weights file or a hub id, strictly (see the module doc).

    ``target_config``: the target model's transformers config (vocabulary, width, layers).
    Raises ``EagleHeadError`` (a ``ModelLoadError``) naming the first bad key or field.
    """
    directory = _resolve_dir(source)
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise EagleHeadError(f"'{directory}' has no {CONFIG_NAME} (an EAGLE head needs one beside its weights)")
    try:
        meta = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EagleHeadError(f"{config_file} is not valid JSON: {exc}") from exc
    state, file = _read_state(directory)
    state = _strip_prefix(state)
    version = _detect_version(state, meta, file)
    cfg = config_from_released(meta, version, target_config, state, config_file)
    _check_target(cfg, target_config, directory)
    head = EagleHead(cfg)
    state = _take_extras(state, cfg, file)
    _check_keys(state, head, file)
    head.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, strict=True)
    _check_vocab_map(head, file)
    head.to(device=device or "cpu", dtype=dtype)  # buffers d2t / t2d keep their integer / bool dtypes
    head.eval()
    head.requires_grad_(False)
    return head, cfg


def describe(cfg: EagleHeadConfig) -> dict:
    """The config as plain JSON-able values (cards, Generation.extra)."""
    out = asdict(cfg)
    out["fused_layers"] = list(cfg.fused_layers)
    return out


__all__ = [
    "DecodingHeadCache", "EagleHead", "EagleHeadConfig", "EagleHeadError", "HeadCache", "default_fused_layers", "describe",
    "load_head", "released_config", "save_head", "target_features", "vocab_map",
]  # fmt: skip

