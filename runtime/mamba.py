"""Mamba and Mamba2 mixers (transformers' MambaMixer / Mamba2Mixer, same parameter names) over
the scan kernels, and the per-sequence state cache their decode steps read and update.

    mixer = MambaMixer(MambaMixerConfig(hidden_size=768, state_size=16, ...), dtype=torch.bfloat16, device="cuda")
    mixer.load_state_dict(hf_block.mixer.state_dict())     # transformers' names and shapes
    state = mixer.new_state(batch=2)                        # zeros: conv [B, C, K], ssm f32
    y = mixer(hidden, state)                                # prefill [B, L, H]: leaves the states
    y1 = mixer.step(next_hidden, state)                     # decode [B, 1, H] or [B, H]: states in place

    cache = MambaStateCache(num_layers=24, max_seqs=8, conv_shape=mixer.conv_shape,
                            ssm_shape=mixer.ssm_shape, dtype=torch.bfloat16, device="cuda")
    cache.allocate(3)                                       # slot 3: a new sequence, states reset
    state = cache.states(layer, [3])                        # a MixerState over slot 3's rows

What runs where: the projections through runtime/linear.py (the generated small-token product
for decode-sized CUDA calls, cuBLAS beyond); the causal convolution, the selective scan (Mamba)
and the SSD chunked scan, its state update and the gated RMSNorm (Mamba2) through
runtime/scan.py and runtime/ssd.py, which run generated kernels on CUDA tensors and their torch
references on CPU tensors. This module holds no scan math of its own.

States are transformers' cache layouts: the conv state [B, C, K] holds the last K inputs of the
convolution (newest last, zeros before the sequence's start), in the model's dtype; the SSM state
is float32, [B, D, N] for Mamba, [B, heads, head_dim, N] for Mamba2. A prefill with a state
continues from it (a fresh state is zeros: a new sequence) and leaves the states after its last
token; a decode step advances them by one token in place.

One difference from transformers, where it differs from itself: its Mamba2 decode step applies
no time_step_limit clamp (neither does mamba_ssm's), its prefill does; the mixers do the same,
so they agree with transformers' cache at every step.

With LAYERFORGE_MAMBA_PREFETCH=1 (off: measured slower, benchmarks/NOTES.md) a Mamba2 decode step on a
CUDA GPU asks for out_proj's weight to come into L2 (runtime/prefetch.py) after the state update and before the
norm, so the product at decode rows reads it from L2: the norm between moves little, and cuBLAS reads that weight
at 0.44 of copy at 64 rows from DRAM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..codegen.plan import env_switch
from . import scan, ssd
from .linear import Linear, gemv

__all__ = ["MambaMixerConfig", "Mamba2MixerConfig", "MambaMixer", "Mamba2Mixer", "MixerState",
           "MambaStateCache", "StateCacheError", "prefetch_default"]


def prefetch_default() -> bool:
    """Whether a Mamba2 decode step on a CUDA GPU prefetches out_proj's weight into L2 before its norm
    (LAYERFORGE_MAMBA_PREFETCH=1; off). On an H100 the step took 163.2 -> 166.4 us at batch 64 and 41.1 -> 44.3 at
    batch 1 with it (bench_mamba --ab-switch, three rounds each, one run): the prefetch's launch and its DRAM reads
    cost more than the product saves."""
    return env_switch("LAYERFORGE_MAMBA_PREFETCH", False)


@dataclass(frozen=True, kw_only=True)
class MambaMixerConfig:
    """Mamba (v1) mixer sizes, as transformers' MambaConfig names them: intermediate_size D
    (expand * hidden_size), state_size N, time_step_rank R, conv_kernel K."""
    hidden_size: int
    intermediate_size: int
    state_size: int
    time_step_rank: int
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True

    def __post_init__(self):
        if self.conv_kernel not in scan.CONV_WIDTHS:
            raise ValueError(f"MambaMixerConfig: conv_kernel {self.conv_kernel} is not served (the convolution "
                             f"kernels take widths {scan.CONV_WIDTHS})")


@dataclass(frozen=True, kw_only=True)
class Mamba2MixerConfig:
    """Mamba2 mixer sizes, as transformers' Mamba2Config names them: intermediate_size I =
    expand * hidden_size = num_heads * head_dim; n_groups G of B/C heads (dividing num_heads);
    state_size N; the gated RMSNorm's eps (layer_norm_epsilon) over groups of I / G."""
    hidden_size: int
    intermediate_size: int
    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int = 1
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    chunk_size: int = 256
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.conv_kernel not in scan.CONV_WIDTHS:
            raise ValueError(f"Mamba2MixerConfig: conv_kernel {self.conv_kernel} is not served (the convolution "
                             f"kernels take widths {scan.CONV_WIDTHS})")
        if self.num_heads * self.head_dim != self.intermediate_size:
            raise ValueError(f"Mamba2MixerConfig: num_heads * head_dim ({self.num_heads} * {self.head_dim}) is not "
                             f"the intermediate size {self.intermediate_size} (expand * hidden_size)")
        if self.num_heads % self.n_groups:
            raise ValueError(f"Mamba2MixerConfig: n_groups {self.n_groups} does not divide num_heads {self.num_heads}")

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: x, then B and C of every group."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size


@dataclass
class MixerState:
    """One layer's states for a batch of sequences: conv [B, C, K] (model dtype, newest input
    last) and ssm float32 ([B, D, N] Mamba, [B, heads, head_dim, N] Mamba2)."""
    conv: torch.Tensor
    ssm: torch.Tensor


def _keep_inputs(conv_state: torch.Tensor, x: torch.Tensor) -> None:
    """conv_state [B, C, K] <- the last K columns of conv_state ++ x ([B, C, L]): the inputs a
    following step's convolution reads (transformers' cache keeps the same K)."""
    K, L = conv_state.shape[-1], x.shape[-1]
    if L >= K:
        conv_state.copy_(x[..., L - K:])
    else:
        conv_state.copy_(torch.cat([conv_state[..., L:], x.to(conv_state.dtype)], dim=-1))


def _conv_prefill(x: torch.Tensor, conv: torch.nn.Conv1d, state: MixerState | None, *,
                  channels_last: bool = False) -> torch.Tensor:
    """silu(causal conv of x [B, C, L]) continuing from the state's inputs (zeros without one),
    which then keeps the last K inputs. channels_last: x [B, L, C] (a column slice of the
    projection, read in place) -> [B, L, C]."""
    C, _, K = conv.weight.shape
    initial = None if state is None else state.conv[..., 1:].contiguous()
    conv1d = scan.causal_conv1d_channels_last if channels_last else scan.causal_conv1d
    y = conv1d(x, conv.weight.view(C, K), conv.bias, activation="silu", initial_state=initial)
    if state is not None:
        _keep_inputs(state.conv, x.transpose(1, 2) if channels_last else x)
    return y


def _vectors(t: torch.Tensor, lead: int) -> torch.Tensor:
    """t as the SSD kernels read it in place (ssd.readable_in_place), else a contiguous copy."""
    return t if ssd.readable_in_place(t, lead) else t.contiguous()


def _check_state(what: str, state: MixerState | None, batch: int, conv_shape, ssm_shape, dtype, device) -> None:
    if state is None:
        return
    if not isinstance(state, MixerState):
        raise TypeError(f"{what}: state must be a MixerState, got {type(state).__name__}")
    for name, t, shape, dt in (("conv", state.conv, (batch, *conv_shape), dtype),
                               ("ssm", state.ssm, (batch, *ssm_shape), torch.float32)):
        if tuple(t.shape) != shape or t.dtype != dt or t.device != device:
            raise ValueError(f"{what}: state.{name} must be {dt} {list(shape)} on {device}, got {t.dtype} "
                             f"{list(t.shape)} on {t.device}")


class _Mixer(torch.nn.Module):
    """What both mixers share: input checks and their states' shapes."""

    conv_shape: tuple[int, int]
    ssm_shape: tuple[int, ...]

    def _check(self, what: str, hidden: torch.Tensor, state: MixerState | None, batch: int) -> None:
        w = self.in_proj.weight
        if hidden.dtype != w.dtype or hidden.device != w.device:
            raise ValueError(f"{what}: hidden must be {w.dtype} on {w.device} (the mixer's), got {hidden.dtype} "
                             f"on {hidden.device}")
        _check_state(what, state, batch, self.conv_shape, self.ssm_shape, w.dtype, w.device)

    def _check_prefill(self, hidden: torch.Tensor, state: MixerState | None) -> None:
        H = self.config.hidden_size
        if hidden.dim() != 3 or hidden.shape[2] != H or hidden.shape[1] == 0:
            raise ValueError(f"forward: hidden must be [B, L >= 1, {H}], got {list(hidden.shape)}")
        self._check("forward", hidden, state, hidden.shape[0])

    def _check_step(self, hidden: torch.Tensor, state: MixerState | None) -> tuple[torch.Tensor, tuple[int, ...]]:
        """A decode step's rows [B, H] from hidden [B, 1, H] or [B, H] (checked with the state), and
        the shape to give back."""
        H = self.config.hidden_size
        if hidden.dim() == 3 and hidden.shape[1] == 1 and hidden.shape[2] == H:
            h = hidden[:, 0]
        elif hidden.dim() == 2 and hidden.shape[1] == H:
            h = hidden
        else:
            raise ValueError(f"step: hidden must be [B, 1, {H}] or [B, {H}], got {list(hidden.shape)}")
        if state is None:
            raise ValueError("step: a decode step needs the sequences' state (forward() leaves one)")
        self._check("step", h, state, h.shape[0])
        return h, tuple(hidden.shape)

    def new_state(self, batch: int) -> MixerState:
        """Zero states for `batch` new sequences, on the mixer's device."""
        w = self.in_proj.weight
        return MixerState(torch.zeros(batch, *self.conv_shape, dtype=w.dtype, device=w.device),
                          torch.zeros(batch, *self.ssm_shape, dtype=torch.float32, device=w.device))

    def _A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())


class MambaMixer(_Mixer):
    """transformers' MambaMixer: in_proj -> (x, z); x through the causal conv and SiLU; x_proj ->
    (dt, B, C); dt_proj's product (its bias goes into the scan as delta_bias, in f32); the
    selective scan with D and the silu(z) gate; out_proj. Parameters: in_proj, conv1d, x_proj,
    dt_proj, A_log, D, out_proj, as transformers names and shapes them."""

    def __init__(self, config: MambaMixerConfig, *, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = c = config
        H, D, N, R, K = c.hidden_size, c.intermediate_size, c.state_size, c.time_step_rank, c.conv_kernel
        kw = dict(dtype=dtype, device=device)
        self.in_proj = Linear(H, 2 * D, bias=c.use_bias, **kw)
        self.conv1d = torch.nn.Conv1d(D, D, K, groups=D, padding=K - 1, bias=c.use_conv_bias, **kw)
        self.x_proj = Linear(D, R + 2 * N, bias=False, **kw)
        self.dt_proj = Linear(R, D, bias=True, **kw)
        # S4D-real A (A = -[1..N] per channel) and D = 1, as transformers initialises them
        self.A_log = torch.nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(D, 1).to(**kw))
        self.D = torch.nn.Parameter(torch.ones(D, **kw))
        self.out_proj = Linear(D, H, bias=c.use_bias, **kw)
        self.conv_shape = (D, K)
        self.ssm_shape = (D, N)
        for p in self.parameters():
            p.requires_grad_(False)

    def _dt_B_C(self, xc: torch.Tensor):
        """(dt, B, C) of the conv's output rows xc [..., D]: dt = dt_proj.weight @ x_proj's first R
        outputs, without dt_proj's bias (the scan adds it)."""
        c = self.config
        dt, B, C = self.x_proj(xc).split([c.time_step_rank, c.state_size, c.state_size], dim=-1)
        return gemv(dt, self.dt_proj.weight), B, C

    def forward(self, hidden: torch.Tensor, state: MixerState | None = None) -> torch.Tensor:
        """Prefill: hidden [B, L, H] -> [B, L, H]; with a state, continues from it and leaves
        the states after the last token."""
        self._check_prefill(hidden, state)
        D = self.config.intermediate_size
        xz = self.in_proj(hidden)                                   # [B, L, 2D]
        x = xz[..., :D].transpose(1, 2).contiguous()                # [B, D, L]: the scan's layout
        z = xz[..., D:].transpose(1, 2).contiguous()
        xc = _conv_prefill(x, self.conv1d, state)
        dt, B, C = self._dt_B_C(xc.transpose(1, 2))
        out = scan.selective_scan(
            xc, dt.transpose(1, 2).contiguous(), self._A(), B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(), self.D.float(), z, self.dt_proj.bias.float(), delta_softplus=True,
            initial_state=None if state is None else state.ssm, return_final_state=state is not None)
        if state is not None:
            out, last = out
            state.ssm.copy_(last)
        return self.out_proj(out.transpose(1, 2))

    def step(self, hidden: torch.Tensor, state: MixerState) -> torch.Tensor:
        """Decode one token of each sequence: hidden [B, 1, H] or [B, H] -> the same shape; the
        state's conv and SSM rows advance in place."""
        h, shape = self._check_step(hidden, state)
        D, K = self.conv_shape
        xz = self.in_proj(h)                                        # [B, 2D]
        z = xz[:, D:].contiguous()
        xc = scan.causal_conv1d_update(xz[:, :D], state.conv, self.conv1d.weight.view(D, K), self.conv1d.bias,
                                       activation="silu")               # x read in place
        dt, B, C = self._dt_B_C(xc)
        # A_log, D and dt_proj's bias as the parameters hold them (A = -exp(A_log) in the kernel)
        y = scan.selective_state_update(state.ssm, xc, dt, self.A_log, B.contiguous(), C.contiguous(), self.D,
                                        z, self.dt_proj.bias, dt_softplus=True, a_log=True)
        return self.out_proj(y).view(shape)


class GatedRMSNorm(torch.nn.Module):
    """transformers' MambaRMSNormGated's parameter (`weight` [I]) and math (runtime/ssd.py's
    gated_rms_norm): rms_norm(x * silu(z)) over groups of `group_size`, times weight."""

    def __init__(self, size: int, group_size: int, eps: float, *, dtype=None, device=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
        self.group_size, self.eps = group_size, float(eps)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return ssd.gated_rms_norm(x, z, self.weight, self.eps, group_size=self.group_size)


class Mamba2Mixer(_Mixer):
    """transformers' Mamba2Mixer: in_proj -> (z, xBC, dt); xBC through the causal conv and SiLU,
    split into x (heads of head_dim), B and C (n_groups of state_size); the SSD scan with dt_bias,
    softplus, the time-step limit, A = -exp(A_log) and D per head; the gated RMSNorm with z (in a
    decode step the state update applies the gate, rounded to the model dtype, and the norm runs
    ungated); out_proj. Parameters: in_proj, conv1d, dt_bias, A_log, D, norm, out_proj."""

    def __init__(self, config: Mamba2MixerConfig, *, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = c = config
        H, I, Hh, N, K = c.hidden_size, c.intermediate_size, c.num_heads, c.state_size, c.conv_kernel
        kw = dict(dtype=dtype, device=device)
        self.in_proj = Linear(H, I + c.conv_dim + Hh, bias=c.use_bias, **kw)
        self.conv1d = torch.nn.Conv1d(c.conv_dim, c.conv_dim, K, groups=c.conv_dim, padding=K - 1,
                                      bias=c.use_conv_bias, **kw)
        self.dt_bias = torch.nn.Parameter(torch.ones(Hh, **kw))
        self.A_log = torch.nn.Parameter(torch.log(torch.arange(1, Hh + 1, dtype=torch.float32)).to(**kw))
        self.D = torch.nn.Parameter(torch.ones(Hh, **kw))
        self.norm = GatedRMSNorm(I, I // c.n_groups, c.norm_eps, **kw)
        self.out_proj = Linear(I, H, bias=c.use_bias, **kw)
        self.conv_shape = (c.conv_dim, K)
        self.ssm_shape = (Hh, c.head_dim, N)
        for p in self.parameters():
            p.requires_grad_(False)

    def _split(self, zxbcdt: torch.Tensor):
        c = self.config
        return zxbcdt.split([c.intermediate_size, c.conv_dim, c.num_heads], dim=-1)

    def _x_B_C(self, xbc: torch.Tensor):
        """x [.., heads, head_dim], B and C [.., groups, state]: views of the conv's output where
        the kernels can read them in place (prefill), else copies."""
        c = self.config
        G, N = c.n_groups, c.state_size
        x, B, C = xbc.split([c.intermediate_size, G * N, G * N], dim=-1)
        lead = xbc.dim() - 1
        return (_vectors(x.unflatten(-1, (c.num_heads, c.head_dim)), lead), _vectors(B.unflatten(-1, (G, N)), lead),
                _vectors(C.unflatten(-1, (G, N)), lead))

    def forward(self, hidden: torch.Tensor, state: MixerState | None = None) -> torch.Tensor:
        """Prefill: hidden [B, L, H] -> [B, L, H]; with a state, continues from it and leaves
        the states after the last token."""
        self._check_prefill(hidden, state)
        c = self.config
        Bsz, L, _ = hidden.shape
        z, xbc, dt = self._split(self.in_proj(hidden))
        xbc = _conv_prefill(xbc, self.conv1d, state, channels_last=True)   # [B, L, C]
        x, B, C = self._x_B_C(xbc)
        # the gate in the norm on a z copy: measured faster than the chunk scan reading z in place
        # and applying it (benchmarks/NOTES.md: 1.751 against 1.812 ms at 1 x 8192)
        out = ssd.ssd_scan(x, dt, self._A(), B, C, D=self.D, z=None, dt_bias=self.dt_bias, dt_softplus=True,
                           dt_limit=tuple(c.time_step_limit), chunk_size=c.chunk_size,
                           initial_state=None if state is None else state.ssm, return_final_state=state is not None)
        if state is not None:
            out, last = out
            state.ssm.copy_(last)
        y = self.norm(out.reshape(Bsz, L, c.intermediate_size), z.contiguous())
        return self.out_proj(y)

    def step(self, hidden: torch.Tensor, state: MixerState) -> torch.Tensor:
        """Decode one token of each sequence: hidden [B, 1, H] or [B, H] -> the same shape; the
        state's conv and SSM rows advance in place."""
        h, shape = self._check_step(hidden, state)
        c = self.config
        Cd, K = self.conv_shape
        # in_proj's output is read in place: xBC by the conv, z and dt by the state update, which
        # also takes A = -exp(A_log), D and dt_bias as the parameters hold them and applies the
        # gate, so the norm that follows is the plain (grouped) RMSNorm: one launch each, no copies
        z, xbc, dt = self._split(self.in_proj(h))
        xbc = scan.causal_conv1d_update(xbc, state.conv, self.conv1d.weight.view(Cd, K), self.conv1d.bias,
                                        activation="silu")
        x, B, C = self._x_B_C(xbc)
        y = ssd.ssd_state_update(state.ssm, x, dt, self.A_log, B, C, D=self.D,
                                 z=z.unflatten(-1, (c.num_heads, c.head_dim)), dt_bias=self.dt_bias, dt_softplus=True,
                                 a_log=True)   # no time_step_limit in decode: see the module's note
        w = getattr(self.out_proj, "weight", None)
        if h.is_cuda and isinstance(w, torch.Tensor) and w.is_cuda and prefetch_default():
            from .prefetch import prefetch_l2
            prefetch_l2(w)   # into L2 under the norm: out_proj then reads it there (the module's note)
        y = self.norm(y.reshape(h.shape[0], c.intermediate_size))
        return self.out_proj(y).view(shape)


# ---- the state cache -------------------------------------------------------------------------

class StateCacheError(ValueError):
    """A slot the state cache cannot serve: out of range, not allocated, given twice in a step."""


class MambaStateCache:
    """Every layer's conv and SSM states for max_seqs sequences, one slot each:
    conv [num_layers, max_seqs, C, K] in the model's dtype, ssm float32 [num_layers, max_seqs,
    *ssm_shape]. allocate(slot) starts a sequence (its rows reset to zeros), free(slot) ends it;
    the bookkeeping is on the host, so nothing here reads the device.

    states(layer, slots) gives a step the rows of its sequences: views when the slots are
    consecutive and ascending (a decode batch of slots 0..B-1: the kernels update the cache in
    place), else gathered copies that commit() writes back."""

    def __init__(self, *, num_layers: int, max_seqs: int, conv_shape: tuple[int, int], ssm_shape: tuple[int, ...],
                 dtype: torch.dtype, device=None):
        if num_layers < 1 or max_seqs < 1:
            raise StateCacheError("MambaStateCache: num_layers and max_seqs must be positive")
        self.num_layers, self.max_seqs = num_layers, max_seqs
        self.conv = torch.zeros(num_layers, max_seqs, *conv_shape, dtype=dtype, device=device)
        self.ssm = torch.zeros(num_layers, max_seqs, *ssm_shape, dtype=torch.float32, device=device)
        self.active = np.zeros(max_seqs, dtype=bool)
        self.lengths = np.zeros(max_seqs, dtype=np.int64)    # tokens each sequence has run (advance())

    @property
    def device(self) -> torch.device:
        return self.conv.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv.dtype

    def nbytes(self, slots: int | None = None) -> int:
        """Bytes of the states of `slots` sequences (all of them by default), every layer."""
        n = self.max_seqs if slots is None else slots
        per = (self.conv[:, :1].numel() * self.conv.element_size() + self.ssm[:, :1].numel() * 4)
        return per * n

    def _slot(self, slot) -> int:
        s = int(slot)
        if not 0 <= s < self.max_seqs:
            raise StateCacheError(f"slot {s} is out of range [0, max_seqs={self.max_seqs})")
        return s

    def allocate(self, slot: int) -> None:
        """Start a sequence in `slot`: its states are zeros (a free slot or one being reused)."""
        s = self._slot(slot)
        self.conv[:, s].zero_()
        self.ssm[:, s].zero_()
        self.active[s] = True
        self.lengths[s] = 0

    def free(self, slot: int) -> None:
        s = self._slot(slot)
        if not self.active[s]:
            raise StateCacheError(f"free: slot {s} is not allocated")
        self.active[s] = False

    def advance(self, slots, counts) -> None:
        """Record that sequences `slots` ran counts[i] more tokens (host bookkeeping only)."""
        np.add.at(self.lengths, np.asarray(slots, dtype=np.int64), np.asarray(counts, dtype=np.int64))

    def check(self, slots) -> list[int]:
        """The slots of a step, checked: allocated, in range, each at most once."""
        out = [self._slot(s) for s in slots]
        if len(set(out)) != len(out):
            raise StateCacheError(f"a step runs each sequence once; slots {out} repeat one")
        idle = [s for s in out if not self.active[s]]
        if idle:
            raise StateCacheError(f"slot {idle[0]} is not allocated (allocate() starts a sequence)")
        return out

    @staticmethod
    def consecutive(slots: list[int]) -> bool:
        return all(b == a + 1 for a, b in zip(slots, slots[1:]))

    def states(self, layer: int, slots: list[int], index: torch.Tensor | None = None) -> MixerState:
        """Layer `layer`'s states of `slots` (checked slots, check()): views of the cache when they
        are consecutive and ascending, else copies gathered by `index` (the slots as a long
        tensor on the cache's device; made here when None)."""
        if self.consecutive(slots):
            a, b = slots[0], slots[-1] + 1
            return MixerState(self.conv[layer, a:b], self.ssm[layer, a:b])
        if index is None:
            index = torch.tensor(slots, dtype=torch.long, device=self.device)
        return MixerState(self.conv[layer].index_select(0, index), self.ssm[layer].index_select(0, index))

    def commit(self, layer: int, slots: list[int], state: MixerState, index: torch.Tensor | None = None) -> None:
        """Write gathered states back (nothing to do for views)."""
        if self.consecutive(slots):
            return
        if index is None:
            index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.conv[layer].index_copy_(0, index, state.conv)
        self.ssm[layer].index_copy_(0, index, state.ssm)
