"""Mamba-1 selective scan in pure PyTorch: a sequential reference, a fast chunked scan, one recurrent step.

The selective state-space recurrence of Mamba-1 (Gu & Dao 2023, arXiv:2312.00752, Algorithm 2), for every
channel d and state n:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t        y_t = <C_t, h_t> + D * u_t,   out_t = y_t * silu(z_t)

The three public functions mirror `mamba_ssm` (`selective_scan_fn`, `selective_scan_ref`,
`selective_state_update`) so that the backbone can swap the CUDA kernels in when they import:

    selective_scan_ref(u, delta, A, B, C, ...)    sequential loop in plain autograd; the reference
    selective_scan(u, delta, A, B, C, ...)        chunked scan with a hand-written backward; for training
    selective_state_update(state, x, dt, A, B, C, ...) -> (y, new_state)    one token; for step()

Layout (mamba_ssm's): u, delta, z (batch, D, L); A (D, N); B, C (batch, N, L), input-dependent and
ungrouped; D, delta_bias (D,); h0 and the last state (batch, D, N). We add `h0`, an initial state, so that
a long timeline can be scanned in pieces (incremental prediction, HMT segments).

Why the chunked scan looks the way it does (measurements: shared/research/proto_mamba_scan.md):
* Mamba-1's A is a separate value per (channel, state), so Mamba-2's "segsum" chunk form costs a factor of
  the chunk length more work and memory (19.6 s vs 0.24 s per layer at 4k), and the factorised
  cumulative-decay form exp(S_t) * cumsum(exp(-S_s) * b_s) overflows to NaN already at the standard init.
* So we run the recurrence itself, vectorised: each segment of the sequence is cut into chunks of
  `chunk_size` tokens; a local scan runs inside every chunk at once (a loop of chunk_size steps over all chunks),
  then a short loop carries the state from chunk to chunk. Decays are products of the per-step factors
  exp(dt * A), so no exp ever sees a positive argument when A <= 0 and nothing can overflow.
* Segments run one after another, so the (batch, L, D, N) states never exist for the whole sequence; only
  the state entering each segment is saved, and the backward recomputes a segment's states from it.
  A hand-written backward is what makes this fast and small: the same algorithm in plain autograd with
  checkpointing was 2.5x slower and took 2.7x the memory at the model level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Measured on 2 CPU cores, one layer D=512, N=16, L=4096 (research note §1 sweep, re-checked for this code):
# small blocks win because a segment's (batch, tokens, D, N) buffers stay in cache. So SEGMENT_SIZE counts
# tokens over the whole batch: at batch 4, 32 tokens per row was 1.25x faster than 128, with 25% less memory.
CHUNK_SIZE = 16
SEGMENT_SIZE = 128


# --------------------------------------------------------------------------------------------------------
# Shared pieces: checks, dtype, dt, skip and gate
# --------------------------------------------------------------------------------------------------------


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, h0) -> None:
    if u.dim() != 3 or u.shape[-1] == 0:
        raise ValueError(f"u must be (batch, D, L) with L >= 1, got shape {tuple(u.shape)}.")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"A must be real with shape (D, N) = ({dim}, N), got {tuple(A.shape)} {A.dtype}.")
    n_state = A.shape[1]
    expected = {
        "delta": (delta, (batch, dim, length)),
        "B": (B, (batch, n_state, length)),
        "C": (C, (batch, n_state, length)),
        "D": (D, (dim,)),
        "z": (z, (batch, dim, length)),
        "delta_bias": (delta_bias, (dim,)),
        "h0": (h0, (batch, dim, n_state)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            hint = (
                " (grouped 4-D B/C are not supported: Mamba-1 uses one group)" if name in ("B", "C") else ""
            )
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}{hint}.")


def _check_step_inputs(state, x, dt, A, B, C, D, z, dt_bias) -> None:
    if state.dim() != 3:
        raise ValueError(f"state must be (batch, D, N), got shape {tuple(state.shape)}.")
    batch, dim, n_state = state.shape
    expected = {
        "x": (x, (batch, dim)),
        "dt": (dt, (batch, dim)),
        "A": (A, (dim, n_state)),
        "B": (B, (batch, n_state)),
        "C": (C, (batch, n_state)),
        "D": (D, (dim,)),
        "z": (z, (batch, dim)),
        "dt_bias": (dt_bias, (dim,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} for state {tuple(state.shape)}, got {tuple(tensor.shape)}."
            )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Like mamba_ssm, the scan always runs in at least float32: in bf16 it is slower on CPU and its errors
    # reach 1e-1 on the state gradient (research note §4).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype)


def _no_autocast(device: torch.device):
    # CPU autocast runs bmm/einsum in bf16; the scan must stay in float32 whatever the caller enabled.
    return torch.autocast(device_type=device.type, enabled=False)


def _discretize_dt(delta: torch.Tensor, delta_bias: torch.Tensor | None, softplus: bool) -> torch.Tensor:
    """dt = softplus(delta + delta_bias), channels in dim 1 (mamba_ssm adds the bias before the softplus)."""
    if delta_bias is not None:
        delta = delta + delta_bias.reshape(-1, *(1,) * (delta.dim() - 2))
    return F.softplus(delta) if softplus else delta


def _skip_and_gate(y, u, D, z) -> torch.Tensor:
    """out = (y + D * u) * silu(z), channels in dim 1."""
    if D is not None:
        y = y + u * D.reshape(-1, *(1,) * (u.dim() - 2))
    if z is not None:
        y = y * F.silu(z)
    return y


# --------------------------------------------------------------------------------------------------------
# Sequential reference
# --------------------------------------------------------------------------------------------------------


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    h0: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one token at a time, in plain autograd. Returns y (batch, D, L) [, last state].

    Slow (a Python step per token, (batch, D, L, N) saved for backward): it exists to hold the fast
    paths to. Unlike mamba_ssm's fast kernel, gradients also flow through the returned last state.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, h0)
    dtype_in, dtype = u.dtype, _compute_dtype(u)
    u, delta, A, B, C, D, z, delta_bias, h0 = (
        _cast(x, dtype) for x in (u, delta, A, B, C, D, z, delta_bias, h0)
    )
    with _no_autocast(u.device):
        dt = _discretize_dt(delta, delta_bias, delta_softplus)
        decay = torch.exp(torch.einsum("bdl,dn->lbdn", dt, A))  # (L, batch, D, N)
        inp = torch.einsum("bdl,bnl->lbdn", dt * u, B)  # (L, batch, D, N)
        h = h0 if h0 is not None else u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        ys = []
        # unbind, not decay[t]: the backward of each index op allocates a full-size zero gradient, which
        # makes the loop O(L^2) (that is why transformers' CPU fallback takes ~110 s per step at 1k).
        for decay_t, inp_t, C_t in zip(decay.unbind(0), inp.unbind(0), C.unbind(-1), strict=True):
            h = decay_t * h + inp_t  # (batch, D, N)
            ys.append(torch.einsum("bdn,bn->bd", h, C_t))
        y = torch.stack(ys, dim=-1)  # (batch, D, L)
        out = _skip_and_gate(y, u, D, z).to(dtype_in)
    return (out, h) if return_last_state else out


# --------------------------------------------------------------------------------------------------------
# Chunked scan: the per-segment kernels
# --------------------------------------------------------------------------------------------------------


def _segment_states(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, h_in: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact states of one segment and its per-step decays.

    u, dt: (b, T, D); B: (b, T, N); A: (D, N); h_in: (b, D, N), the state before the segment; T % chunk == 0.
    Returns h, decay: (b, T, D, N) with h[:, t] the state after token t and decay[:, t] = exp(dt_t * A).
    """
    b, T, dim = u.shape
    n_state = A.shape[1]
    n_chunks = T // chunk
    decay = torch.exp(dt.unsqueeze(-1) * A)  # dt >= 0 and A <= 0 in Mamba: every exp argument is <= 0
    h = torch.einsum("btd,btn->btdn", dt * u, B)  # the inputs dt*u*B; turned into states in place below
    decay_c = decay.view(b, n_chunks, chunk, dim, n_state)
    h_c = h.view(b, n_chunks, chunk, dim, n_state)

    # Local scans, all chunks at once, each starting from a zero state. `cum` is the decay from the chunk's
    # start through step t, built as a running product rather than exp(A * cumsum(dt)): same value, and it
    # shares the recurrence's rounding.
    cum = torch.empty_like(decay_c)
    cum[:, :, 0] = decay_c[:, :, 0]
    for t in range(1, chunk):
        h_c[:, :, t].addcmul_(decay_c[:, :, t], h_c[:, :, t - 1])
        torch.mul(cum[:, :, t - 1], decay_c[:, :, t], out=cum[:, :, t])

    # Carry the true state across chunk boundaries: enter[:, k] is the state before chunk k.
    enter = h.new_empty(b, n_chunks + 1, dim, n_state)
    enter[:, 0] = h_in
    for k in range(n_chunks):
        torch.addcmul(h_c[:, k, -1], cum[:, k, -1], enter[:, k], out=enter[:, k + 1])

    # A local state plus the entering state decayed to step t is the exact state (linearity).
    h_c.addcmul_(cum, enter[:, :n_chunks].unsqueeze(2))
    return h, decay


def _segment_state_grads(
    decay: torch.Tensor, gy: torch.Tensor, C: torch.Tensor, g_out: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """dLoss/dh_t for every step of one segment: the reverse scan g_t = C_t gy_t + decay_{t+1} g_{t+1}.

    decay: (b, T, D, N); gy: (b, T, D); C: (b, T, N); g_out: (b, D, N), the gradient reaching the segment's
    last state from later tokens (or from the returned last state). Same two-loop scheme as the forward,
    mirrored in time. Returns g (b, T, D, N) and the gradient of the state entering the segment (b, D, N).
    """
    b, T, dim, n_state = decay.shape
    n_chunks = T // chunk
    g = torch.einsum("btd,btn->btdn", gy, C)  # direct term C_t gy_t; turned into the full gradient in place
    decay_c = decay.view(b, n_chunks, chunk, dim, n_state)
    g_c = g.view(b, n_chunks, chunk, dim, n_state)

    # Local reverse scans inside every chunk, each starting from zero at the chunk's end. `after` is the
    # product of the decays after step t up to the chunk's end (1 at the last step).
    after = torch.empty_like(decay_c)
    after[:, :, -1] = 1.0
    for t in range(chunk - 2, -1, -1):
        g_c[:, :, t].addcmul_(decay_c[:, :, t + 1], g_c[:, :, t + 1])
        torch.mul(after[:, :, t + 1], decay_c[:, :, t + 1], out=after[:, :, t])

    # Reverse carry: leave[:, k + 1] is the gradient reaching the last state of chunk k from later chunks;
    # leave[:, 0] is the gradient of the state entering the segment.
    leave = g.new_empty(b, n_chunks + 1, dim, n_state)
    leave[:, n_chunks] = g_out
    for k in range(n_chunks - 1, -1, -1):
        g_first = torch.addcmul(g_c[:, k, 0], after[:, k, 0], leave[:, k + 1])  # full g at the chunk's start
        torch.mul(decay_c[:, k, 0], g_first, out=leave[:, k])

    g_c.addcmul_(after, leave[:, 1:].unsqueeze(2))
    return g, leave[:, 0]


def _shifted_decayed_states(h: torch.Tensor, decay: torch.Tensor, h_in: torch.Tensor) -> torch.Tensor:
    """q_t = decay_t * h_{t-1} (h_{-1} = h_in), the factor of dLoss/d(dt*A).

    Computed from the previous state, not as h_t - dt_t*u_t*B_t: that difference cancels badly when the
    input term dominates, which gave 9e-6 error on dA under large dt in the prototype.
    """
    q = torch.empty_like(h)
    torch.mul(decay[:, 1:], h[:, :-1], out=q[:, 1:])
    torch.mul(decay[:, 0], h_in, out=q[:, 0])
    return q


def _segments(length: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, length, size)]


class _ChunkedScan(torch.autograd.Function):
    """y_t = <C_t, h_t> and the last state, time-major: u, dt (b, T, D); B, C (b, T, N); T % chunk == 0.

    Saves only the inputs and the state entering each segment; the backward recomputes each segment's
    states from that, in reverse segment order, and carries the state gradient leftwards.
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0, chunk: int, segment: int):
        u, dt, B, C = (x.contiguous() for x in (u, dt, B, C))
        parts = _segments(u.shape[1], segment)
        y = torch.empty_like(u)
        entries = h0.new_empty(h0.shape[0], len(parts), *h0.shape[1:])  # (b, n_segments, D, N)
        h_last = h0
        with _no_autocast(u.device):
            for s, part in enumerate(parts):
                entries[:, s] = h_last
                h, _ = _segment_states(u[:, part], dt[:, part], A, B[:, part], h_last, chunk)
                y[:, part] = torch.einsum("btdn,btn->btd", h, C[:, part])
                h_last = h[:, -1].clone()  # a copy, so that the segment's buffer can be freed
        ctx.chunk, ctx.segment = chunk, segment
        ctx.save_for_backward(u, dt, A, B, C, entries)
        return y, h_last

    @staticmethod
    def backward(ctx, gy, g_last):
        u, dt, A, B, C, entries = ctx.saved_tensors
        gy = gy.contiguous()
        gu, gdt, gB, gC = (torch.empty_like(x) for x in (u, dt, B, C))
        gA = torch.zeros_like(A)
        g_state = g_last  # the gradient reaching the end of the current segment from the right
        parts = _segments(u.shape[1], ctx.segment)
        with _no_autocast(u.device):
            for s in reversed(range(len(parts))):
                part, h_in = parts[s], entries[:, s]
                u_s, dt_s, B_s, C_s, gy_s = u[:, part], dt[:, part], B[:, part], C[:, part], gy[:, part]
                h, decay = _segment_states(u_s, dt_s, A, B_s, h_in, ctx.chunk)
                gC[:, part] = torch.einsum("btd,btdn->btn", gy_s, h)
                q = _shifted_decayed_states(h, decay, h_in)
                del h
                g, g_state = _segment_state_grads(decay, gy_s, C_s, g_state, ctx.chunk)
                del decay
                # Input term (dt*u)_t B_t: gx = dLoss/d(dt*u).
                gx = torch.einsum("btdn,btn->btd", g, B_s)
                gB[:, part] = torch.einsum("btd,btdn->btn", dt_s * u_s, g)
                gu[:, part] = dt_s * gx
                # Decay term exp(dt_t A) h_{t-1}: dLoss/d(dt_t A) = g_t * q_t.
                gq = g.mul_(q)
                gdt[:, part] = u_s * gx + torch.einsum("btdn,dn->btd", gq, A)
                gA += gq.mul_(dt_s.unsqueeze(-1)).sum((0, 1))
        return gu, gdt, gA, gB, gC, g_state, None, None


# --------------------------------------------------------------------------------------------------------
# Chunked scan: the public entry point
# --------------------------------------------------------------------------------------------------------


def _pad_time(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad (b, L, ...) to (b, L + pad, ...); a zero dt means decay 1 and no input, so the state holds."""
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    h0: torch.Tensor | None = None,
    *,
    chunk_size: int = CHUNK_SIZE,
    segment_size: int = SEGMENT_SIZE,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `selective_scan_ref`; the fast path for CPU training (any device works).

    Returns out (batch, D, L), laid out time-major in memory (a transposed view: what the out projection
    reads), and with `return_last_state` the state after the last token (batch, D, N) in the compute dtype
    (float32, or float64 for float64 inputs).

    Gradients reach every tensor input, including h0, and also flow from the returned last state (which
    mamba_ssm's kernel ignores). Any L: the sequence is padded internally to a multiple of `chunk_size`
    with dt = 0 (decay 1, no input), which leaves the state unchanged. `segment_size` (a multiple of
    `chunk_size`) counts tokens over the whole batch: each row advances segment_size // batch tokens per
    segment, rounded down to whole chunks and at least one chunk. The defaults are the fastest measured on
    2 CPU cores.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, h0)
    if chunk_size < 1 or segment_size < chunk_size or segment_size % chunk_size:
        raise ValueError(
            f"segment_size ({segment_size}) must be a positive multiple of chunk_size ({chunk_size}); "
            f"the defaults are chunk_size={CHUNK_SIZE}, segment_size={SEGMENT_SIZE}."
        )
    dtype_in, dtype = u.dtype, _compute_dtype(u)
    u, delta, A, B, C, D, z, delta_bias, h0 = (
        _cast(x, dtype) for x in (u, delta, A, B, C, D, z, delta_bias, h0)
    )
    batch, dim, length = u.shape
    if h0 is None:
        h0 = u.new_zeros(batch, dim, A.shape[1])
    with _no_autocast(u.device):
        dt = _discretize_dt(delta, delta_bias, delta_softplus)
        # (b, D, L) -> time-major (b, L, D), padded to whole chunks: the kernels want a token's D x N state
        # block contiguous. Free when the caller's (b, D, L) tensors are transposed views, as in the backbone.
        u_t, dt_t, B_t, C_t = (_pad_time(x.transpose(1, 2), -length % chunk_size) for x in (u, dt, B, C))
        row_segment = max(chunk_size, segment_size // batch // chunk_size * chunk_size)
        y, h_last = _ChunkedScan.apply(u_t, dt_t, A, B_t, C_t, h0, chunk_size, row_segment)
        y = y[:, :length].transpose(1, 2)  # (b, D, L)
        out = _skip_and_gate(y, u, D, z).to(dtype_in)
    return (out, h_last) if return_last_state else out


# --------------------------------------------------------------------------------------------------------
# One recurrent step
# --------------------------------------------------------------------------------------------------------


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the recurrence by one token: state (batch, D, N); x, dt, z (batch, D); B, C (batch, N).

    mamba_ssm's version writes the new state into `state`; this one returns (y, new_state) and leaves its
    inputs untouched, so it is safe under autograd and for branching generation. y has x's dtype, the new
    state has state's dtype.
    """
    _check_step_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    dtype = _compute_dtype(x)
    x_in, state_in = x, state
    state, x, dt, A, B, C, D, z, dt_bias = (_cast(t, dtype) for t in (state, x, dt, A, B, C, D, z, dt_bias))
    with _no_autocast(x.device):
        dt = _discretize_dt(dt, dt_bias, dt_softplus)  # (batch, D)
        decay = torch.exp(dt.unsqueeze(-1) * A)  # (batch, D, N)
        new_state = decay * state + (dt * x).unsqueeze(-1) * B.unsqueeze(1)
        y = torch.einsum("bdn,bn->bd", new_state, C)
        y = _skip_and_gate(y, x, D, z)
    return y.to(x_in.dtype), new_state.to(state_in.dtype)
