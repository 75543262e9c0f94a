"""Causal attention patterns for the transformer backbone, as plain functions over (q, k, v).

Every pattern is `fn(q, k, v, *, scale=None, **params) -> out`, with q, k, v and out shaped
[batch, heads, seq_len, head_dim]; k and v must have as many heads as q (expand grouped-query heads before
calling). All patterns are causal: a query at position t never sees a key after t.

    dense            every key <= t                                   (the reference)
    sliding_window   keys (t - window, t]
    lambda           keys (t - window, t] plus the first `sinks` keys  (LM-Infinite, arXiv:2308.16137)
    longlora_shift   keys <= t inside t's group of `group` tokens; the second half of the heads uses groups
                     shifted by group // 2                            (LongLoRA S^2-Attn, arXiv:2309.12307)

`pattern_mask(name, seq_len, **params)` returns the exact boolean mask (True = may attend) each pattern uses,
so that every pattern can be held to `F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`.

Why blocked SDPA and not a mask over the full score matrix (shared/research/env_feasibility.md section 3d):
FlexAttention has no backward on CPU in torch 2.13, and dense SDPA with a band mask still computes all T^2
scores (7.6 s fwd+bwd at 16k against 3.45 s for plain causal SDPA). So the sparse patterns cut the sequence
into query blocks and give each block only the keys its mask can touch, in one batched SDPA call: the cost
is O(T * window) (or O(T * group)) instead of O(T^2), and autograd differentiates through SDPA as usual.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------------
# Checks on inputs and parameters (errors name the value, the rule and the fix).
# ------------------------------------------------------------------------------------------------------


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D [batch, heads, seq_len, head_dim]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    if q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q and k must have the same shape and v the same [batch, heads, seq_len]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}. For grouped-query attention, repeat the k/v heads "
            "(repeat_interleave on dim 1) before calling."
        )


def _check_int(name: str, value: object, minimum: int, pattern: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"attention pattern {pattern!r}: {name} must be an integer >= {minimum}; got {value!r}."
        )
    return value


# ------------------------------------------------------------------------------------------------------
# dense: the reference.
# ------------------------------------------------------------------------------------------------------


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None):
    _check_qkv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def dense_mask(seq_len: int) -> torch.Tensor:
    return torch.ones(seq_len, seq_len, dtype=torch.bool).tril()


# Query block size of the banded patterns when `block` is not given (see _band_attention).
DEFAULT_BLOCK = 256

# ------------------------------------------------------------------------------------------------------
# sliding_window and lambda: a causal band of `window` keys, plus `sinks` leading keys for lambda.
# ------------------------------------------------------------------------------------------------------


def _band_attention(
    q, k, v, *, window: int, sinks: int, block: int | None, scale: float | None, pattern: str
):
    """Blocked band attention shared by sliding_window (sinks=0) and lambda (LM-Infinite's Lambda shape).

    Queries are cut into blocks of `block` tokens. Block i (queries [i*block, (i+1)*block)) can only see keys
    [i*block - window + 1, (i+1)*block), a slab of block + window - 1 keys; this is LM-Infinite's blockwise
    scheme (each query block paired with the keys just before it, global-branch keys concatenated in front).
    """
    _check_qkv(q, k, v)
    window = _check_int("window", window, 1, pattern)
    sinks = _check_int("sinks", sinks, 0, pattern)
    if block is not None:
        block = _check_int("block", block, 1, pattern)
    batch, heads, seq_len, head_dim = q.shape
    # A window or sink count past the sequence changes nothing; clamping keeps the padding below small.
    window = min(window, seq_len)
    sinks = min(sinks, seq_len)
    # Each slab holds block + window - 1 keys for `block` queries, so smaller blocks waste fewer masked scores
    # but make more, smaller SDPA calls. At T=16k, window=1024 (B=1, H=4, hd=64, 2 CPU cores) fwd+bwd took
    # 1.05 s with block=128, 0.87 s with 256, 0.91 s with 512, and 3.7 s for dense causal SDPA.
    block = min(block or min(DEFAULT_BLOCK, window), seq_len)
    num_blocks = -(-seq_len // block)
    padded_len = num_blocks * block
    slab_len = block + window - 1

    # Queries: [B, H, padded_len, hd] -> [B*H, num_blocks, block, hd]; the padded queries are dropped at the end.
    q_blocks = F.pad(q, (0, 0, 0, padded_len - seq_len)).reshape(batch * heads, num_blocks, block, head_dim)

    # Keys/values: window - 1 pad positions in front so that block 0 has a full slab, then overlapping slabs
    # [B*H, num_blocks, slab_len, hd]. unfold is a view, but the reshape copies it: (block + window - 1) / block
    # times the size of k (5x at block 256, window 1024), still O(T * window). The backward sums the overlaps.
    def slabs(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, window - 1, padded_len - seq_len))
        x = x.unfold(2, slab_len, block).transpose(-1, -2)
        return x.reshape(batch * heads, num_blocks, slab_len, x.shape[-1])

    k_slabs, v_slabs = slabs(k), slabs(v)

    # Absolute positions: query j of block i is i*block + j; slab key s of block i is i*block - window + 1 + s.
    block_start = torch.arange(num_blocks, device=q.device)[:, None, None] * block  # [nb, 1, 1]
    q_pos = block_start + torch.arange(block, device=q.device)[None, :, None]  # [nb, block, 1]
    k_pos = block_start - window + 1 + torch.arange(slab_len, device=q.device)[None, None, :]  # [nb, 1, slab]
    distance = q_pos - k_pos
    # Front-pad keys (k_pos < 0) stay masked. Every query sees itself, so no row is fully masked, not even
    # for the padded queries at the end (their outputs are discarded).
    mask = (distance >= 0) & (distance < window) & (k_pos >= 0)  # [nb, block, slab_len]

    if sinks > 0:
        # LM-Infinite's global branch: the first `sinks` keys, for every block. A sink already inside the
        # query's window is masked here, or it would be counted twice in the softmax.
        sink_pos = torch.arange(sinks, device=q.device)[None, None, :]  # [1, 1, sinks]
        sink_mask = (sink_pos <= q_pos) & (q_pos - sink_pos >= window)  # [nb, block, sinks]
        k_sinks = k[:, :, :sinks].reshape(batch * heads, 1, sinks, head_dim).expand(-1, num_blocks, -1, -1)
        v_sinks = v[:, :, :sinks].reshape(batch * heads, 1, sinks, v.shape[-1]).expand(-1, num_blocks, -1, -1)
        k_slabs = torch.cat([k_sinks, k_slabs], dim=2)
        v_slabs = torch.cat([v_sinks, v_slabs], dim=2)
        mask = torch.cat([sink_mask, mask], dim=2)

    # Only the first blocks have masks of their own (front padding, sinks still inside the window): from
    # start >= window - 1 + sinks on, every block's mask is the same [block, keys] matrix. Giving those blocks
    # that one matrix, broadcast, instead of a [nb, block, keys] stack keeps SDPA on its fused CPU kernel:
    # at T=16k, window 1024, block 256 (B=1, H=4, hd=64, 2 cores) fwd+bwd fell from 1.50 s to 0.87 s
    # (dense causal SDPA: 3.7 s).
    early = min(num_blocks, -(-(window - 1 + sinks) // block))
    parts = []
    if early > 0:  # blocks play the role of heads; the [early, block, keys] mask broadcasts over batch*heads
        parts.append(
            F.scaled_dot_product_attention(
                q_blocks[:, :early],
                k_slabs[:, :early],
                v_slabs[:, :early],
                attn_mask=mask[:early],
                scale=scale,
            )
        )
    if early < num_blocks:
        parts.append(
            F.scaled_dot_product_attention(
                q_blocks[:, early:], k_slabs[:, early:], v_slabs[:, early:], attn_mask=mask[-1], scale=scale
            )
        )
    out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return out.reshape(batch, heads, padded_len, v.shape[-1])[:, :, :seq_len]


def sliding_window_attention(q, k, v, *, window: int, block: int | None = None, scale: float | None = None):
    return _band_attention(
        q, k, v, window=window, sinks=0, block=block, scale=scale, pattern="sliding_window"
    )


def sliding_window_mask(seq_len: int, *, window: int, block: int | None = None) -> torch.Tensor:
    window = _check_int("window", window, 1, "sliding_window")
    pos = torch.arange(seq_len)
    distance = pos[:, None] - pos[None, :]
    return (distance >= 0) & (distance < window)


def lambda_attention(
    q, k, v, *, window: int, sinks: int, block: int | None = None, scale: float | None = None
) -> torch.Tensor:
    return _band_attention(q, k, v, window=window, sinks=sinks, block=block, scale=scale, pattern="lambda")


def lambda_mask(seq_len: int, *, window: int, sinks: int, block: int | None = None) -> torch.Tensor:
    window = _check_int("window", window, 1, "lambda")
    sinks = _check_int("sinks", sinks, 0, "lambda")
    pos = torch.arange(seq_len)
    causal = pos[:, None] >= pos[None, :]
    return sliding_window_mask(seq_len, window=window) | (causal & (pos[None, :] < sinks))


# ------------------------------------------------------------------------------------------------------
# longlora_shift: LongLoRA's shifted sparse attention (S^2-Attn), without the wrap-around.
# ------------------------------------------------------------------------------------------------------


def _check_longlora(group: int, heads: int | None) -> int:
    group = _check_int("group", group, 2, "longlora_shift")
    if group % 2:
        raise ValueError(
            f"attention pattern 'longlora_shift': group must be even (it is shifted by group // 2); "
            f"got {group}."
        )
    if heads is not None and (heads < 2 or heads % 2):
        raise ValueError(
            f"attention pattern 'longlora_shift': heads must be even and >= 2 (half of them use "
            f"shifted groups); got {heads}."
        )
    return group


def _grouped_causal(x_q, x_k, x_v, *, group: int, scale: float | None) -> torch.Tensor:
    """Causal attention within consecutive groups [0, G), [G, 2G), ... of `group` tokens: [B, h, T, d]."""
    batch, heads, seq_len, _ = x_q.shape
    if seq_len == 0:
        return x_q.new_zeros(batch, heads, 0, x_v.shape[-1])
    num_groups = -(-seq_len // group)
    back = num_groups * group - seq_len

    def grouped(x: torch.Tensor) -> torch.Tensor:  # [B, h, T, d] -> [B*h, num_groups, group, d]
        return F.pad(x, (0, 0, 0, back)).reshape(batch * heads, num_groups, group, x.shape[-1])

    # The back padding sits after every real token, so is_causal alone hides it. No explicit mask: a plain
    # is_causal call keeps SDPA on its fast CPU kernel instead of materialising masked scores.
    out = F.scaled_dot_product_attention(
        grouped(x_q), grouped(x_k), grouped(x_v), is_causal=True, scale=scale
    )
    return out.reshape(batch, heads, num_groups * group, x_v.shape[-1])[:, :, :seq_len]


def longlora_shift_attention(q, k, v, *, group: int, scale: float | None = None) -> torch.Tensor:
    """LongLoRA S^2-Attn: heads [0, H/2) attend within groups [0, G), [G, 2G), ...; heads [H/2, H) within
    groups shifted by G/2: [0, G/2), [G/2, 3G/2), ...

    LongLoRA's non-flash reference rolls the shifted heads by -G/2, so its last group holds the first G/2
    tokens after the last ones and early tokens see late ones. Its flash version shifts the group boundaries
    instead (cu_seqlens offsets); we do the same: the shifted heads attend causally within the first partial
    group [0, G/2), then within plain groups of the tokens from G/2 on, so nothing sees the future.
    """
    _check_qkv(q, k, v)
    heads = q.shape[1]
    group = _check_longlora(group, heads)
    half, shift = heads // 2, group // 2
    plain = _grouped_causal(q[:, :half], k[:, :half], v[:, :half], group=group, scale=scale)
    q2, k2, v2 = q[:, half:], k[:, half:], v[:, half:]
    first = F.scaled_dot_product_attention(
        q2[:, :, :shift], k2[:, :, :shift], v2[:, :, :shift], is_causal=True, scale=scale
    )
    rest = _grouped_causal(q2[:, :, shift:], k2[:, :, shift:], v2[:, :, shift:], group=group, scale=scale)
    return torch.cat([plain, torch.cat([first, rest], dim=2)], dim=1)


def longlora_shift_mask(seq_len: int, *, group: int, heads: int) -> torch.Tensor:
    """[heads, T, T]: the first half of the heads uses plain groups, the second half shifted groups."""
    group = _check_longlora(group, heads)
    pos = torch.arange(seq_len)
    causal = pos[:, None] >= pos[None, :]
    plain = causal & (pos[:, None] // group == pos[None, :] // group)
    shift = group // 2
    shifted = causal & ((pos[:, None] + shift) // group == (pos[None, :] + shift) // group)
    half = heads // 2
    return torch.cat([plain.expand(half, -1, -1), shifted.expand(heads - half, -1, -1)], dim=0)


# ------------------------------------------------------------------------------------------------------
# Registries: chosen by `attention.pattern`.
# ------------------------------------------------------------------------------------------------------

ATTENTION_PATTERNS: dict[str, Callable[..., torch.Tensor]] = {
    "dense": dense_attention,
    "sliding_window": sliding_window_attention,
    "lambda": lambda_attention,
    "longlora_shift": longlora_shift_attention,
}

PATTERN_MASKS: dict[str, Callable[..., torch.Tensor]] = {
    "dense": dense_mask,
    "sliding_window": sliding_window_mask,
    "lambda": lambda_mask,
    "longlora_shift": longlora_shift_mask,
}


def _lookup(registry: dict[str, Callable[..., torch.Tensor]], name: str) -> Callable[..., torch.Tensor]:
    if name not in registry:
        raise ValueError(f"unknown attention pattern {name!r}; valid patterns: {sorted(registry)}.")
    return registry[name]


def get_attention_pattern(name: str) -> Callable[..., torch.Tensor]:
    """The attention function registered under `name`; unknown names list the valid ones."""
    return _lookup(ATTENTION_PATTERNS, name)


def pattern_mask(name: str, seq_len: int, **params) -> torch.Tensor:
    """The exact mask (True = may attend) pattern `name` uses: bool [T, T], or [heads, T, T] for
    longlora_shift (pass heads=), whose two halves of heads use different groups. It broadcasts against
    [batch, heads, T, T] scores, so `F.scaled_dot_product_attention(q, k, v, attn_mask=mask)` is the reference.
    """
    mask_fn = _lookup(PATTERN_MASKS, name)
    return mask_fn(_check_int("seq_len", seq_len, 1, name), **params)


# ------------------------------------------------------------------------------------------------------
# transformers integration: one attention function for every pattern, registered under SPARSE_IMPLEMENTATION.
# ------------------------------------------------------------------------------------------------------

SPARSE_IMPLEMENTATION = "ehrlong_sparse"

# attention.<field> each pattern reads (the rest of AttentionConfig does not apply to it).
PATTERN_PARAMS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "sliding_window": ("window", "block"),
    "lambda": ("window", "sinks", "block"),
    "longlora_shift": ("group",),
}


def sparse_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature (AttentionInterface): q [B, H, T, hd], k/v [B, H_kv, T, hd]
    after RoPE -> (out [B, T, H, hd], None). The pattern and its parameters come from
    `module.config.attention_pattern`, a dict {"pattern": name, **params} that llama_config sets.
    """
    from ehrlong.backbones import is_right_padded

    spec = dict(module.config.attention_pattern)
    name = spec.pop("pattern")
    if attention_mask is not None and not is_right_padded(attention_mask):
        # Right padding needs no mask: every pattern is causal, so a real query never reaches a padded key.
        # Left padding or holes would need per-row key masks, which the blocked kernels do not carry.
        raise ValueError(
            f"attention pattern {name!r} supports right-padded rows only (mask True then False); "
            "got a padding mask with a real token after padding."
        )
    if dropout:
        raise ValueError(f"attention pattern {name!r} has no attention dropout; set model.dropout=0.")
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: share each k/v head among `groups`
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if name == "longlora_shift" and not module.training:
        # LongLoRA's shifted groups are a training-time approximation; its inference is full attention
        # (forward_flashattn_inference in the reference code).
        name, spec = "dense", {}
    out = get_attention_pattern(name)(query, key, value, scale=scaling, **spec)
    return out.transpose(1, 2).contiguous(), None


def sparse_padding_mask(batch_size, q_length, kv_length, attention_mask=None, **kwargs):
    """Mask builder for SPARSE_IMPLEMENTATION (AttentionMaskInterface). Without one registered,
    transformers hands a custom attention function attention_mask=None and padding would be lost silently
    (research/anchor_longcontext.md §3.7). The patterns build their causal structure themselves, so all
    they need is which keys are real: the [B, T] padding mask as given (None when there is no padding).
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


def register_sparse_attention() -> None:
    """Make attn_implementation=SPARSE_IMPLEMENTATION known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SPARSE_IMPLEMENTATION, sparse_attention_forward)
    AttentionMaskInterface.register(SPARSE_IMPLEMENTATION, sparse_padding_mask)
