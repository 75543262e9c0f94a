"""Llama-style decoder with scaled rotary positions, built from transformers' Llama blocks (DESIGN.md §5).

    tokens [B, T] -> embed [B, T, D] -> n_layers x LlamaDecoderLayer -> LlamaRMSNorm -> hidden [B, T, D]

Reused from transformers: `LlamaDecoderLayer` (pre-norm attention + SwiGLU MLP), `LlamaRMSNorm`,
`LlamaRotaryEmbedding` and its rope types (`rope_parameters`), the attention functions chosen by name
(`config._attn_implementation`, looked up in `AttentionInterface`) and their mask builders
(`create_causal_mask`, looked up in `AttentionMaskInterface`). We do not use `LlamaModel` because we need
to own two things it decides for us: the position ids (token index, or event time with rope.position=time)
and the attention mask (none at all for right padding, see `TransformerBackbone.forward`). Sparse attention
patterns (`attention.pattern`, ehrlong/backbones/attention.py) plug in as a registered attention function.

RoPE scaling (`rope.*` -> `rope_parameters`; formulas in research/anchor_longcontext.md §2.2):

    rope.type  required                         optional                               max_position_embeddings
    default    -                                -                                      context_length (unused)
    linear     factor                           -                                      context_length (unused)
    dynamic    factor                           original_context_length                original_context_length
    yarn       factor, original_context_length  beta_fast (32), beta_slow (1)          original * factor
    llama3     factor, original_context_length  low_freq_factor (1), high_freq_f. (4)  original * factor

`max_position_embeddings` matters to transformers only where the last column says so: `dynamic` keeps the
unscaled frequencies up to it and rescales the base for longer sequences (so it must be the trained length,
which defaults to `context_length`); `yarn` and `llama3` check that it equals original * factor (and warn
otherwise). `longrope` needs per-dimension `short_factor` / `long_factor` lists found by search (Phi-3),
which `rope.*` does not carry, so it is rejected with that explanation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from ehrlong.backbones import Size, require_right_padding, resolve_size
from ehrlong.backbones.attention import (
    ATTENTION_PATTERNS,
    PATTERN_PARAMS,
    SPARSE_IMPLEMENTATION,
    register_sparse_attention,
)
from ehrlong.errors import ConfigError

if TYPE_CHECKING:
    from ehrlong.config import AttentionConfig, RopeConfig, TrainConfig

register_sparse_attention()

# base is the Context Clues Llama scale (d=768, 8 layers, 12 heads; research/anchor_context_clues.md §3).
SIZES = {
    "tiny": Size(d_model=256, n_layers=4, n_heads=4),
    "small": Size(d_model=512, n_layers=8, n_heads=8),
    "base": Size(d_model=768, n_layers=8, n_heads=12),
}

PAD = 0  # token id of padding (tokenizer contract, DESIGN.md §3)

# rope.type -> (required, optional) fields of `rope.*` besides `theta`. Each goes to the `rope_parameters`
# key of the same name, except original_context_length: original_max_position_embeddings for yarn and
# llama3, max_position_embeddings for dynamic (see the table above).
ROPE_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ("original_context_length",)),
    "yarn": (("factor", "original_context_length"), ("beta_fast", "beta_slow")),
    "llama3": (("factor", "original_context_length"), ("low_freq_factor", "high_freq_factor")),
}
ALL_ROPE_FIELDS = (
    "factor",
    "original_context_length",
    "beta_fast",
    "beta_slow",
    "low_freq_factor",
    "high_freq_factor",
)
# Llama 3.1's published values (meta-llama/Llama-3.1-8B config.json); transformers has no default for them.
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def rope_parameters(rope: RopeConfig, context_length: int) -> tuple[dict, int]:
    """`rope.*` -> (transformers `rope_parameters` dict, `max_position_embeddings`), checked per rope type."""
    if rope.type == "longrope":
        raise ConfigError(
            "rope.type='longrope' needs per-dimension short_factor / long_factor lists (searched per model, "
            "Phi-3 style), which rope.* does not provide. Use rope.type=yarn or rope.type=llama3 for a "
            "context extension with a single factor."
        )
    if rope.type not in ROPE_FIELDS:
        raise ConfigError(f"unknown rope.type {rope.type!r}. Valid rope types: {', '.join(ROPE_FIELDS)}.")
    if rope.theta <= 0:
        raise ConfigError(f"rope.theta must be > 0, got {rope.theta}. The usual values are 10000 or 500000.")

    required, optional = ROPE_FIELDS[rope.type]
    for name in required:
        if getattr(rope, name) is None:
            raise ConfigError(
                f"rope.type={rope.type} needs rope.{name}; set rope.{name}=... "
                f"(required for {rope.type}: {', '.join('rope.' + r for r in required)})."
            )
    for name in ALL_ROPE_FIELDS:
        if getattr(rope, name) is not None and name not in required + optional:
            used = ", ".join("rope." + f for f in required + optional) or "none besides rope.theta"
            raise ConfigError(
                f"rope.{name}={getattr(rope, name)} has no effect with rope.type={rope.type} "
                f"(it uses {used}). Remove rope.{name} or pick a rope.type that uses it."
            )
    if rope.factor is not None and rope.factor < 1:
        raise ConfigError(f"rope.factor must be >= 1 (context extension), got {rope.factor}.")
    if rope.original_context_length is not None and rope.original_context_length < 1:
        raise ConfigError(
            "rope.original_context_length must be a positive token count, "
            f"got {rope.original_context_length}."
        )

    params: dict = {"rope_type": rope.type, "rope_theta": float(rope.theta)}
    if rope.type in ("linear", "dynamic"):
        params["factor"] = float(rope.factor)
    if rope.type == "yarn":
        params["factor"] = float(rope.factor)
        params["original_max_position_embeddings"] = rope.original_context_length
        for name in ("beta_fast", "beta_slow"):
            if getattr(rope, name) is not None:  # unset: transformers' 32 / 1, the YaRN paper's values
                params[name] = float(getattr(rope, name))
    if rope.type == "llama3":
        params["factor"] = float(rope.factor)
        params["original_max_position_embeddings"] = rope.original_context_length
        for name, default in LLAMA3_DEFAULTS.items():
            value = getattr(rope, name)
            params[name] = float(default if value is None else value)
        if params["high_freq_factor"] <= params["low_freq_factor"]:
            raise ConfigError(
                f"rope.high_freq_factor ({params['high_freq_factor']}) must be > rope.low_freq_factor "
                f"({params['low_freq_factor']}); Llama 3.1 uses 4 and 1."
            )

    if rope.type == "dynamic":
        # Dynamic NTK keeps the unscaled frequencies up to max_position_embeddings, grows the base beyond.
        max_positions = rope.original_context_length or context_length
    elif rope.type in ("yarn", "llama3"):
        # transformers expects factor == max_position_embeddings / original_max_position_embeddings
        # and warns otherwise.
        max_positions = int(rope.original_context_length * rope.factor)
    else:
        max_positions = context_length  # not read by the default / linear frequency computation
    return params, max_positions


def attention_implementation(name: str) -> str:
    """Check that `name` is an attention function transformers knows (built-in or registered by ehrlong)."""
    # "eager" is transformers' fallback and is not in the registry; everything else (sdpa, flex_attention,
    # flash_attention_*, and functions registered with AttentionInterface.register) is.
    valid = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name not in valid:
        raise ConfigError(f"unknown transformer.attn_implementation {name!r}. Valid: {', '.join(valid)}.")
    return name


def attention_pattern(attn: AttentionConfig, n_heads: int, dropout: float) -> dict | None:
    """`attention.*` -> {"pattern": name, **params} for the sparse attention function; None for dense."""
    if attn.pattern not in ATTENTION_PATTERNS:
        raise ConfigError(
            f"unknown attention.pattern {attn.pattern!r}. Valid patterns: {', '.join(ATTENTION_PATTERNS)}."
        )
    if attn.pattern == "dense":
        return None  # transformer.attn_implementation (sdpa or eager) is the dense reference
    for name, minimum in (("window", 1), ("sinks", 0), ("group", 2), ("block", 1)):
        value = getattr(attn, name)
        if name in PATTERN_PARAMS[attn.pattern] and value is not None and value < minimum:
            raise ConfigError(
                f"attention.{name} must be >= {minimum} for attention.pattern={attn.pattern}, got {value}."
            )
    if attn.pattern == "longlora_shift" and (attn.group % 2 or n_heads % 2):
        raise ConfigError(
            f"attention.pattern=longlora_shift shifts half of the heads by half a group: attention.group "
            f"({attn.group}) and transformer.n_heads ({n_heads}) must both be even."
        )
    if dropout:
        raise ConfigError(
            f"attention.pattern={attn.pattern} has no attention dropout; set model.dropout=0 (got {dropout})."
        )
    return {"pattern": attn.pattern, **{name: getattr(attn, name) for name in PATTERN_PARAMS[attn.pattern]}}


def llama_config(cfg: TrainConfig, vocab_size: int) -> LlamaConfig:
    """The LlamaConfig all blocks of the backbone share, from the `model`, `transformer`, `rope` groups."""
    size = resolve_size(SIZES, cfg)
    n_heads = cfg.transformer.n_heads or size.n_heads
    n_kv_heads = cfg.transformer.n_kv_heads or n_heads
    if size.d_model % n_heads != 0 or (size.d_model // n_heads) % 2 != 0:
        raise ConfigError(
            f"model.d_model={size.d_model} must split into transformer.n_heads={n_heads} heads of an even "
            "size (RoPE rotates pairs of dimensions); pick n_heads dividing d_model with an even quotient."
        )
    if n_heads % n_kv_heads != 0:
        raise ConfigError(
            f"transformer.n_heads={n_heads} must be a multiple of transformer.n_kv_heads={n_kv_heads} "
            f"(grouped-query attention shares each key/value head among n_heads / n_kv_heads query heads)."
        )
    params, max_positions = rope_parameters(cfg.rope, cfg.context_length)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.d_model,
        intermediate_size=cfg.transformer.ffn_dim or 4 * size.d_model,
        num_hidden_layers=size.n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=max_positions,
        rope_parameters=params,
        attention_dropout=cfg.model.dropout,  # the only dropout a Llama block has
        pad_token_id=PAD,
        bos_token_id=None,
        eos_token_id=None,
        use_cache=False,
        tie_word_embeddings=False,  # the LM head lives in the Lightning module (model.tie_embeddings)
    )
    # The layers read these on every call, so setting them on the shared config switches all of them.
    # A sparse pattern runs through our registered attention function, which reads config.attention_pattern.
    config.attention_pattern = attention_pattern(cfg.attention, n_heads, cfg.model.dropout)
    config._attn_implementation = (
        SPARSE_IMPLEMENTATION
        if config.attention_pattern
        else attention_implementation(cfg.transformer.attn_implementation)
    )
    return config


def index_positions(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Rotary position of each token: its index in the row. [B, T] long.

    Padding repeats the last real position instead of counting on. Real positions never see padding
    (causal), so this changes nothing there, except that `dynamic` RoPE scales by max(position) + 1:
    with this, it scales by the longest real row, not by how much padding the batch carries.
    """
    positions = torch.arange(length, device=device).expand(batch, length)  # [B, T]
    if mask is None:
        return positions
    last = (mask.sum(dim=-1, keepdim=True) - 1).clamp(min=0)  # [B, 1] index of each row's last real token
    return torch.minimum(positions, last)


def time_positions(
    times: torch.Tensor | None, mask: torch.Tensor | None, positions_per_day: float
) -> torch.Tensor:
    """Rotary position of each token from its event time: days since the row's first token, times
    `positions_per_day`. [B, T] float.

    Token distance in an EHR says little about time: a year between two visits and ten minutes between two
    labs can both be one token. With time positions, rotary angles measure elapsed time, so events a year
    apart are far apart whatever lies between them, and all events at one timestamp share a position (their
    order still comes from the causal mask). Measuring from the row's first token keeps the numbers small
    (fp32 angles) and changes nothing else: RoPE scores depend only on position differences.
    Padding takes the last real token's position, as in `index_positions`.
    """
    if times is None:
        raise ValueError("rope.position=time needs `times` [B, T] (days); the batch has none.")
    positions = (times - times[:, :1]).float() * positions_per_day
    if mask is None:
        return positions
    last = (mask.sum(dim=-1, keepdim=True) - 1).clamp(min=0)  # [B, 1]
    return torch.where(mask, positions, positions.gather(1, last))


POSITIONS = ("index", "time")  # rope.position


class TransformerBackbone(nn.Module):
    """Token embedding, Llama decoder layers, final RMSNorm; no LM head (the Lightning module owns it)."""

    def __init__(
        self,
        config: LlamaConfig,
        activation_checkpointing: bool = False,
        position: str = "index",
        positions_per_day: float = 1.0,
    ):
        super().__init__()
        if position not in POSITIONS:
            raise ConfigError(f"unknown rope.position {position!r}. Valid: {', '.join(POSITIONS)}.")
        if positions_per_day <= 0:
            raise ConfigError(
                f"rope.positions_per_day must be > 0, got {positions_per_day} (1 = one position per day, "
                "24 = per hour)."
            )
        self.config = config
        self.position = position
        self.positions_per_day = positions_per_day
        self.d_model = config.hidden_size
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=PAD)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, layer_idx=i) for i in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # One rotary module for all layers: cos/sin are computed once per forward, as in LlamaModel.
        self.rotary = LlamaRotaryEmbedding(config)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # "Small init" N(0, sqrt(2 / (5 d))) (Nguyen & Salazar 2019, "Transformers without Tears"; GPT-NeoX).
        # At d=768 it is 0.023, about transformers' Llama initializer_range of 0.02; at the CPU widths it is
        # larger, which the tied LM head needs: with 0.02 at d=32 the logits start near zero and a 60-step fit
        # of a periodic sequence ended at half its starting loss (tests/test_backbone_contract.py).
        # Each residual branch's output projection is scaled by 1/sqrt(2 n_layers) (GPT-2, Radford et al.
        # 2019) so the residual stream's variance does not grow with depth. RMSNorm weights start at 1.
        std = math.sqrt(2 / (5 * self.d_model))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):  # Llama blocks have no biases
                residual_out = name.endswith(("self_attn.o_proj", "mlp.down_proj"))
                nn.init.normal_(
                    module.weight, std=std / math.sqrt(2 * len(self.layers)) if residual_out else std
                )
        self.embed.weight[PAD].zero_()

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] or embeddings [B, T, D]; mask [B, T] True on real tokens, right padded -> [B, T, D].

        `times` [B, T] (days) sets the rotary positions with rope.position=time and is unused otherwise.
        """
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens [B, T] or embeddings [B, T, d_model]")
        x = self.embed(tokens) if embeddings is None else embeddings  # [B, T, D]
        batch, length = x.shape[:2]
        mask = None if mask is None else mask.bool()
        require_right_padding(mask, "transformer")

        if self.position == "time":
            position_ids = time_positions(times, mask, self.positions_per_day)  # [B, T] float
        else:
            position_ids = index_positions(mask, batch, length, x.device)  # [B, T]
        cos, sin = self.rotary(x, position_ids)  # [B, T, head_dim] each, already times attention_scaling

        # No padding mask, on purpose. Rows are right padded and attention is causal, so a real token at t
        # only attends to positions <= t, which are all real: padding cannot reach real outputs (tested in
        # test_padding_invariance), and the loss ignores outputs at padding. Without a padding mask, SDPA
        # stays on its is_causal=True path and never builds a [B, 1, T, T] mask (256 MB per row at 16k;
        # research/env_feasibility.md §3c). Left padding would break this, hence the check above.
        # create_causal_mask asks the mask builder registered for the attention implementation: None for
        # sdpa (is_causal), an additive causal mask for eager. position_ids are not passed: transformers
        # would read any non-consecutive ids (padding repeats, event times) as packed-document boundaries.
        # The sparse patterns get the [B, T] padding mask through their registered mask builder (they check
        # it; they need none either, for the same reason).
        sparse = self.config._attn_implementation == SPARSE_IMPLEMENTATION
        attention_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=x,
            attention_mask=mask if sparse else None,
            cache=None,
            position_ids=None,
        )

        # Keyword arguments the layers do not name reach the attention function (via LlamaAttention's
        # **kwargs): the way to hand a custom attention more inputs.
        layer_kwargs = {"attention_mask": attention_mask, "position_embeddings": (cos, sin)}
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                # Keep only each layer's input; recompute its activations in backward.
                x = checkpoint(layer, x, use_reentrant=False, **layer_kwargs)
            else:
                x = layer(x, **layer_kwargs)  # [B, T, D]
        return self.norm(x)


def build(cfg: TrainConfig, vocab_size: int) -> TransformerBackbone:
    """The transformer backbone at `cfg.size` with `cfg.model` / `cfg.transformer` / `cfg.rope` applied."""
    return TransformerBackbone(
        llama_config(cfg, vocab_size),
        cfg.model.activation_checkpointing,
        position=cfg.rope.position,
        positions_per_day=cfg.rope.positions_per_day,
    )
