"""Mamba-1 backbone (Gu & Dao, 2023), the model that reached 16k context in Context Clues (Wornow et al.).

Each block is the `mamba_simple.Mamba` mixer of state-spaces/mamba, with the same parameter names as
transformers' `MambaForCausalLM` (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj):

    x, z = in_proj(h)                        # [B, T, 2 * d_inner]
    x = silu(causal depthwise conv1d(x))     # kernel d_conv, over time
    dt, B, C = x_proj(x)                     # input-dependent step size and state projections
    y = selective_scan(x, dt_proj(dt), -exp(A_log), B, C, D, z)   # y = (C.h + D x) * silu(z)
    out = out_proj(y)

Two paths compute the same function (DESIGN.md §7.4): with CUDA and `mamba-ssm` / `causal-conv1d`
installed (the `[cuda]` extra) their fused kernels; everywhere else the chunked pure-torch scan of
`ehrlong.backbones.scan`, which tests hold to a sequential reference.

Incremental prediction (issue 6) carries a per-layer state (conv [B, d_inner, d_conv], ssm [B, d_inner,
d_state]) from `init_state()`. Two ways advance it, and they mix freely:

    hidden, state = backbone.prefill(tokens [B, M], state, lengths=lengths)   # M tokens, chunk-parallel
    hidden, state = backbone.step(tokens [B], state)                          # one token

Both compute the same function as forward() over the whole timeline at the new positions, at a cost that
depends on the new tokens only, not on the history the state summarises.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ehrlong.backbones import Size, resolve_size
from ehrlong.backbones.scan import selective_scan, selective_state_update
from ehrlong.config import MambaConfig, TrainConfig
from ehrlong.errors import ConfigError

try:  # Optional CUDA kernels: never required, never installed on CPU.
    from causal_conv1d import causal_conv1d_fn as _cuda_conv1d
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_scan
except ImportError:
    _cuda_scan = _cuda_conv1d = None

# tiny trains on a 2-core CPU; base is the mamba-130m shape that Context Clues trained (d 768, 24 layers).
SIZES = {
    "tiny": Size(d_model=256, n_layers=4),
    "small": Size(d_model=512, n_layers=12),
    "base": Size(d_model=768, n_layers=24),
}
KERNELS = ("auto", "torch")
_warned_no_kernels = False


@dataclass(frozen=True)
class MixerDims:
    d_model: int
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At least float32 (bf16 is too coarse for the mean square); float64 stays float64 so that float64
        # runs can check the model to rounding (tests/test_incremental.py).
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class MambaMixer(nn.Module):
    def __init__(self, dims: MixerDims, use_cuda_kernels: bool, scan_chunk: int, scan_segment: int):
        super().__init__()
        self.dims = dims
        d_inner, n = dims.d_inner, dims.d_state
        self.use_cuda_kernels = use_cuda_kernels
        self.scan_kwargs = {"chunk_size": scan_chunk, "segment_size": scan_segment}
        self.in_proj = nn.Linear(dims.d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, dims.d_conv, groups=d_inner, padding=dims.d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dims.dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(dims.dt_rank, d_inner, bias=True)
        # S4D-real init: A = -(1..N) per channel; kept as log so A stays negative (decay) under training.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.A_log._no_weight_decay = True  # as mamba_ssm: decaying A towards 0 would erase long memory
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(d_inner, dims.d_model, bias=False)
        self._init_dt()

    @torch.no_grad()
    def _init_dt(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        # As mamba_simple: softplus(dt bias) log-uniform in [dt_min, dt_max], so initial memory spans
        # roughly 10 to 1000 steps.
        nn.init.uniform_(self.dt_proj.weight, -(self.dims.dt_rank**-0.5), self.dims.dt_rank**-0.5)
        dt = torch.exp(
            torch.rand(self.dims.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        )
        dt = dt.clamp(min=dt_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x [B, d_inner, T] -> delta [B, d_inner, T], B and C [B, N, T]
        d = self.dims
        x_dbl = self.x_proj(x.transpose(1, 2))  # [B, T, dt_rank + 2N]
        dt, b, c = torch.split(x_dbl, [d.dt_rank, d.d_state, d.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # bias is applied inside the scan
        return delta, b.transpose(1, 2), c.transpose(1, 2)  # views: the scan reads them time-major

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h [B, T, d_model]
        T = h.shape[1]
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # each [B, d_inner, T]
        A = -torch.exp(self.A_log.float())
        if self.use_cuda_kernels and h.is_cuda:
            x = _cuda_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
            delta, b, c = self._ssm_inputs(x)
            y = _cuda_scan(
                x, delta, A, b, c, self.D.float(), z, self.dt_proj.bias.float(), delta_softplus=True
            )
        else:
            x = F.silu(self.conv1d(x)[..., :T])
            delta, b, c = self._ssm_inputs(x)
            y = selective_scan(
                x,
                delta,
                A,
                b,
                c,
                self.D.float(),
                z,
                self.dt_proj.bias.float(),
                delta_softplus=True,
                **self.scan_kwargs,
            )
        return self.out_proj(y.transpose(1, 2))

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        # conv holds the last d_conv inputs of the conv (the newest last), in the model's dtype; ssm the
        # recurrent state in the scan's compute dtype (float32, or float64 for a float64 model).
        d = self.dims
        conv = torch.zeros(batch, d.d_inner, d.d_conv, device=device, dtype=dtype)
        ssm_dtype = torch.promote_types(dtype, torch.float32)
        ssm = torch.zeros(batch, d.d_inner, d.d_state, device=device, dtype=ssm_dtype)
        return conv, ssm

    def prefill(self, h: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], lengths=None):
        # h [B, M, d_model], M new tokens continuing `state` -> ([B, M, d_model], new state). The same
        # function as forward() at those positions, costing O(M): the conv starts from the inputs carried in
        # the conv state instead of zero padding, and the scan starts from the ssm state (h0).
        # Always the pure-torch path, on any device: mamba_ssm's selective_scan_fn takes no initial state,
        # so it cannot continue a timeline.
        # lengths [B] (optional): row i's real tokens are h[i, :lengths[i]]; its new state is the one after
        # its own last real token, and its outputs at padded positions are meaningless.
        conv_state, ssm_state = state
        batch, M, _ = h.shape
        k = self.dims.d_conv
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # each [B, d_inner, M]
        # The carried inputs then the new ones: the state's newest column is the token just before this chunk.
        x_all = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # [B, d_inner, d_conv + M]
        w = self.conv1d.weight
        x = F.silu(F.conv1d(x_all[..., 1:], w, self.conv1d.bias, groups=w.shape[0]))  # [B, d_inner, M]
        if lengths is None:
            conv_state = x_all[..., -k:].clone()  # a copy: a view would keep all of x_all alive
        else:
            # Row i's last real token sits at column d_conv + lengths[i] - 1 of x_all; keep the d_conv
            # columns ending there (lengths[i] = 0 keeps the old state).
            cols = lengths.view(batch, 1, 1) + torch.arange(k, device=h.device)
            conv_state = x_all.gather(-1, cols.expand(-1, x_all.shape[1], -1))

        delta, b, c = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())
        dt_bias, softplus = self.dt_proj.bias.float(), True
        if lengths is not None:
            # Padded positions get dt = 0: decay exp(0 * A) = 1 and input 0 * x * B = 0, so the ssm state
            # passes through them exactly unchanged (the trick the scan uses to pad to whole chunks).
            # Discretising here, as the scan would (softplus(delta + bias)), keeps real positions identical.
            real = torch.arange(M, device=h.device) < lengths.view(batch, 1)  # [B, M]
            dtype = torch.promote_types(x.dtype, torch.float32)  # the scan's compute dtype
            delta = F.softplus(delta.to(dtype) + dt_bias.to(dtype).view(-1, 1)) * real.unsqueeze(1)
            dt_bias, softplus = None, False
        y, ssm = selective_scan(
            x,
            delta,
            A,
            b,
            c,
            self.D.float(),
            z,
            dt_bias,
            delta_softplus=softplus,
            return_last_state=True,
            h0=ssm_state,
            **self.scan_kwargs,
        )
        return self.out_proj(y.transpose(1, 2)), (conv_state, ssm.to(ssm_state.dtype))

    def step(self, h: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        # h [B, d_model] one token -> ([B, d_model], new state). Same function as forward() at that position.
        conv_state, ssm_state = state
        x, z = self.in_proj(h).chunk(2, dim=-1)  # [B, d_inner]
        conv_state = torch.cat([conv_state[..., 1:], x.unsqueeze(-1)], dim=-1)
        x = F.silu((conv_state * self.conv1d.weight.squeeze(1)).sum(-1) + self.conv1d.bias)
        dt, b, c = torch.split(
            self.x_proj(x), [self.dims.dt_rank, self.dims.d_state, self.dims.d_state], dim=-1
        )
        delta = dt @ self.dt_proj.weight.T
        A = -torch.exp(self.A_log.float())
        y, ssm_state = selective_state_update(
            ssm_state, x, delta, A, b, c, self.D.float(), z, self.dt_proj.bias.float(), dt_softplus=True
        )
        return self.out_proj(y), (conv_state, ssm_state)


class MambaBlock(nn.Module):
    def __init__(self, dims: MixerDims, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(dims.d_model)
        self.mixer = MambaMixer(dims, **mixer_kwargs)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mixer(self.norm(h))

    def step(self, h: torch.Tensor, state):
        out, state = self.mixer.step(self.norm(h), state)
        return h + out, state

    def prefill(self, h: torch.Tensor, state, lengths=None):
        out, state = self.mixer.prefill(self.norm(h), state, lengths)
        return h + out, state


class MambaBackbone(nn.Module):
    def __init__(self, vocab_size: int, size: Size, mcfg: MambaConfig, dropout: float, checkpointing: bool):
        super().__init__()
        self.d_model = size.d_model
        dims = MixerDims(
            d_model=size.d_model,
            d_inner=mcfg.expand * size.d_model,
            d_state=mcfg.d_state,
            d_conv=mcfg.d_conv,
            dt_rank=mcfg.dt_rank or math.ceil(size.d_model / 16),
        )
        use_cuda = mcfg.kernels == "auto" and _cuda_scan is not None
        self.embed = nn.Embedding(vocab_size, size.d_model, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            MambaBlock(
                dims, use_cuda_kernels=use_cuda, scan_chunk=mcfg.scan_chunk, scan_segment=mcfg.scan_segment
            )
            for _ in range(size.n_layers)
        )
        self.norm_f = RMSNorm(size.d_model)
        self.checkpointing = checkpointing
        self._init_weights(size.n_layers)

    @torch.no_grad()
    def _init_weights(self, n_layers: int) -> None:
        nn.init.normal_(self.embed.weight, std=0.02)
        self.embed.weight[0].zero_()
        for layer in self.layers:
            # GPT-2 style: scale residual-branch outputs by 1/sqrt(n_layers) so the stream's variance
            # does not grow with depth (mamba_ssm's _init_weights, rescale_prenorm_residual).
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            layer.mixer.out_proj.weight /= math.sqrt(n_layers)

    def forward(self, tokens=None, times=None, mask=None, embeddings=None) -> torch.Tensor:
        # tokens [B, T] or embeddings [B, T, D] -> hidden [B, T, D]. `times` unused: order carries time here.
        # Padding sits at the right end and every operation is causal, so padded positions cannot change
        # real ones; `mask` is not needed inside the model (the loss masks padding out).
        h = self.drop(self.embed(tokens) if embeddings is None else embeddings)
        for layer in self.layers:
            if self.checkpointing and self.training:
                h = checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        return self.norm_f(h)

    def init_state(self, batch: int, device=None):
        dtype = self.embed.weight.dtype
        return [layer.mixer.init_state(batch, device, dtype) for layer in self.layers]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state, times=None):
        # tokens [B] -> (hidden [B, D], state): one recurrent step; O(1) in the history length.
        h = self.embed(tokens)
        new_state = []
        for layer, s in zip(self.layers, state, strict=True):
            h, s = layer.step(h, s)
            new_state.append(s)
        return self.norm_f(h), new_state

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, state=None, times=None, lengths: torch.Tensor | None = None):
        """Advance the recurrent state by M tokens at once: tokens [B, M] -> (hidden [B, M, D], new state).

        `state` is what init_state(), step() or an earlier prefill() returned (None: a fresh timeline).
        hidden[:, j] equals forward() over the whole timeline so far at that token, and the new state
        continues exactly where the M tokens end, so prefill() and step() can be mixed freely. The cost is
        O(M) whatever the history length: the state stands in for it (issue 6).

        lengths [B] (optional) lets rows be right-padded to M: row i's real tokens are tokens[i, :lengths[i]]
        (0 allowed), its new state is the one after its own last real token, and padding never changes it.
        hidden at padded positions is meaningless; row i's last-token hidden state is hidden[i, lengths[i] - 1].
        Inference only, like step(): no dropout, no gradients. `times` is unused (order carries time here).
        """
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be [batch, M] with M >= 1, got shape {tuple(tokens.shape)}.")
        batch, M = tokens.shape
        if state is None:
            state = self.init_state(batch, tokens.device)
        if len(state) != len(self.layers):
            raise ValueError(
                f"state has {len(state)} layer states but the model has {len(self.layers)} layers; "
                "pass what init_state(), step() or prefill() of this model returned."
            )
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=tokens.device)
            if lengths.shape != (batch,) or lengths.is_floating_point():
                raise ValueError(
                    f"lengths must be an integer tensor of shape ({batch},), one per row of tokens, "
                    f"got shape {tuple(lengths.shape)} {lengths.dtype}."
                )
            if bool((lengths < 0).any()) or bool((lengths > M).any()):
                raise ValueError(
                    f"lengths must lie in [0, {M}] (the number of token columns), got {lengths.tolist()}."
                )
            lengths = lengths.long()
        h = self.embed(tokens)
        new_state = []
        for layer, s in zip(self.layers, state, strict=True):
            h, s = layer.prefill(h, s, lengths)
            new_state.append(s)
        return self.norm_f(h), new_state


def build(cfg: TrainConfig, vocab_size: int) -> MambaBackbone:
    if cfg.mamba.kernels not in KERNELS:
        raise ConfigError(f"mamba.kernels={cfg.mamba.kernels!r} is not one of {', '.join(KERNELS)}.")
    global _warned_no_kernels
    if (
        cfg.mamba.kernels == "auto"
        and _cuda_scan is None
        and torch.cuda.is_available()
        and not _warned_no_kernels
    ):
        warnings.warn(
            "CUDA is available but mamba-ssm / causal-conv1d are not installed: using the pure-torch scan. "
            "Install the kernels with `pip install -e '.[cuda]'` for full speed.",
            stacklevel=2,
        )
        _warned_no_kernels = True
    size = resolve_size(SIZES, cfg)
    return MambaBackbone(vocab_size, size, cfg.mamba, cfg.model.dropout, cfg.model.activation_checkpointing)
