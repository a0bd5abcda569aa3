"""Block-sparse attention forward with a fixed block size: Triton kernel, dispatch and custom op.

``block_sparse_attention(q, k, v, kv_block_counts, kv_block_indices, block_q=, block_k=, q_perm=None,
kv_perm=None)`` computes softmax attention where query block ``i`` (``block_q`` rows) attends only to
the ``counts[b, h, i]`` kv blocks (``block_k`` keys each) listed in ``indices[b, h, i, :count]``. See
:mod:`sparse_compile.kernels.block_sparse_reference` for the layout format and the optional token
permutations (blocks are runs of rows in the order ``q_perm`` / ``kv_perm`` give, while q, k, v and O
stay in token order); that module is the specification and the CPU path.

Dispatch (:func:`kernel_choice`): CUDA tensors on sm_90 that the Gluon kernel takes
(:func:`~sparse_compile.kernels.gluon_block_sparse.gluon_ineligibility`: fp16/bf16, D 64 or 128, layout
blocks 64/128/256, no permutations, TMA-readable q/k/v) run the Gluon kernel of
:mod:`~sparse_compile.kernels.gluon_block_sparse`; permuted calls it would otherwise take run it on
kernel-order copies of K and V, the kernel gathering Q and scattering O/LSE itself
(:func:`block_sparse_attention_gluon_on_kv_copies`); other CUDA tensors run the Triton kernel; CPU tensors
run the PyTorch reference, or the Triton kernel under Triton's interpreter when the process started
with ``TRITON_INTERPRET=1`` (see :func:`interpreter_active`). ``block_sparse_attention_triton`` and
``block_sparse_attention_gluon`` always run their kernel.

The kernel keeps one BLOCK_M x D query tile in registers and walks the kept kv blocks of its query
block, split into BLOCK_N sub-tiles, with an online (base-2) softmax in fp32; the scores of the
next tile are issued before the softmax of the current one. Only the last, partial kv block of a
sequence whose length is not a multiple of ``block_k`` is masked, in a second loop. On Hopper the
K/V tiles are read with TMA (device-side tensor descriptors) when the strides allow it.

- Any strides for q, k, v and O (each a ``(B, H, S, D)`` view), so the ``(B, S, H, D)`` storage of a
  diffusers attention call is read as is (TMA needs a unit last stride and 16-byte aligned others,
  which those views have), and O is written token-major by default (:func:`attention_output_like`), the
  layout the backend's op returns without a copy.
- *Permutations folded into the loads and stores* (``PERMUTE_Q`` / ``PERMUTE_KV``, compile-time flags:
  without a permutation the kernel is the one above), as in the variable-block kernel. A query tile
  loads its BLOCK_M entries of ``q_perm`` and gathers those token rows of q, then stores O and LSE
  to the same token rows. A K/V tile loads its BLOCK_N entries of ``kv_perm`` (contiguous: a kv tile
  is a run of kernel-order rows) and gathers those token rows of k and v; TMA cannot gather rows,
  so this variant reads K/V with pointer loads (each row D contiguous elements, so every row load
  stays coalesced). Q, K, V and O are never copied into kernel order and back: instead of gathers
  of Q, K and V and scatters of O and LSE the kernel does one int load per q row and two (K, V)
  per kept key.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.block_sparse_reference import BlockLayout, block_sparse_attention_reference
from sparse_compile.kernels.common import (
    LOG2E,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    attention_output_like,
    cdiv,
    check_out_buffer,
    check_permutation_values,
    check_strided_out_buffer,
    cuda_capability,
    default_scale,
    dot_precision,
    expand_batch_head,
    expand_permutation,
    interpreter_active,
    online_softmax_step,
    permutation_strides,
    token_order,
)
from sparse_compile.kernels.gluon_block_sparse import (
    gluon_config_ineligibility,
    gluon_ineligibility,
    launch_gluon_block_sparse,
    tma_readable,
)
from sparse_compile.kernels.permute_rows import gather_rows
from sparse_compile.kernels.tile_configs import (
    AUTOTUNE_TILES,
    TileConfig,
    block_sparse_tiles,
    interpreter_block_sparse_tile,
)

__all__ = [
    "BlockLayout",
    "block_sparse_attention",
    "block_sparse_attention_gluon",
    "block_sparse_attention_gluon_on_kv_copies",
    "block_sparse_attention_reference",
    "block_sparse_attention_triton",
    "check_layout_values",
    "kernel_choice",
    "tma_eligible",
    "validate_inputs",
]

# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------


def _check_block_size(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 16 or value > 256 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [16, 256], got {value!r}")


def validate_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    block_q: int,
    block_k: int,
    q_perm: Tensor | None = None,
    kv_perm: Tensor | None = None,
) -> BlockLayout:
    """Check shapes, dtypes and devices; return the layout and permutations expanded to ``(B, H, ...)``.

    Raises ``ValueError`` with a message naming the offending argument. Index and permutation
    *values* are not checked here (that needs a device sync); :func:`check_layout_values` and
    :func:`~sparse_compile.kernels.common.check_permutation_values` do it.
    """
    _check_block_size("block_q", block_q)
    _check_block_size("block_k", block_k)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype must be one of {SUPPORTED_DTYPES}, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    perms = [p for p in (q_perm, kv_perm) if p is not None]
    if any(t.device != q.device for t in (k, v, kv_block_counts, kv_block_indices, *perms)):
        raise ValueError("q, k, v, kv_block_counts, kv_block_indices and the permutations must be on one device")
    b, h, s_q, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(
            f"k and v must have shape (B, H, S_k, D) = ({b}, {h}, S_k, {d}); got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[2] == 0:
        raise ValueError("k and v must hold at least one key (S_k > 0)")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    nq = cdiv(s_q, block_q)
    counts = expand_batch_head(kv_block_counts, "kv_block_counts", b, h, (nq,), (torch.int32,))
    if kv_block_indices.dim() != 4:
        raise ValueError(f"kv_block_indices must be 4-D (B, H, NQ, MAXK), got shape {tuple(kv_block_indices.shape)}")
    indices = expand_batch_head(kv_block_indices, "kv_block_indices", b, h, (nq, None), (torch.int32,))
    q_perm = expand_permutation(q_perm, "q_perm", b, h, s_q)
    kv_perm = expand_permutation(kv_perm, "kv_perm", b, h, k.shape[2])
    return BlockLayout(counts, indices, q_perm, kv_perm)


def check_layout_values(kv_block_counts: Tensor, kv_block_indices: Tensor, num_kv_blocks: int) -> None:
    """Raise ``ValueError`` unless every count is in [0, MAXK] and the valid indices are ascending in [0, NK).

    Reads the layout (a device sync on GPU); the CPU path and tests call it.
    """
    maxk = kv_block_indices.shape[-1]
    if bool((kv_block_counts < 0).any()) or bool((kv_block_counts > maxk).any()):
        raise ValueError(f"kv_block_counts must lie in [0, MAXK={maxk}]")
    valid = torch.arange(maxk, device=kv_block_indices.device) < kv_block_counts.unsqueeze(-1)
    idx = kv_block_indices.long()
    if bool(((idx < 0) | (idx >= num_kv_blocks))[valid].any()):
        raise ValueError(f"kept kv block indices must lie in [0, NK={num_kv_blocks})")
    both_valid = valid[..., 1:]
    if bool((idx[..., 1:] <= idx[..., :-1])[both_valid].any()):
        raise ValueError("kept kv block indices must be strictly ascending")


# ------------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------------



@triton.jit
def _load_rows(
    src, perm, start_n, offs_n, offs_d, stride_n, stride_d, stride_p, S_K,
    USE_TMA: tl.constexpr, PERMUTE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Kernel-order rows [start_n, start_n + BLOCK_N) x D of K or V.

    ``src`` is a TMA descriptor or the head's base pointer. PERMUTE (pointer loads only): kernel-order
    row ``r`` is token row ``perm[r * stride_p]`` of ``src``. Rows past S_K read as 0 (TMA pads them;
    pointer loads mask them, and their permutation entries, only when ``MASKED``).
    """
    if USE_TMA:
        tile = src.load([start_n, 0])
    else:
        rows = start_n + offs_n
        if PERMUTE:
            if MASKED:
                tokens = tl.load(perm + rows * stride_p, mask=rows < S_K, other=0).to(tl.int32)
            else:
                tokens = tl.load(perm + rows * stride_p).to(tl.int32)
        else:
            tokens = rows
        ptrs = src + tokens[:, None] * stride_n + offs_d[None, :] * stride_d
        if MASKED:
            tile = tl.load(ptrs, mask=rows[:, None] < S_K, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _tile_start(idx_row, stride_ik, t, valid, LAYOUT_BK: tl.constexpr, BLOCK_N: tl.constexpr):
    """First key of kv tile ``t`` of a q block: tile t is sub-tile t % SUB_N of kept block idx_row[t // SUB_N]."""
    SUB_N: tl.constexpr = LAYOUT_BK // BLOCK_N
    kv_block = tl.load(idx_row + (t // SUB_N) * stride_ik, mask=valid, other=0)
    return kv_block * LAYOUT_BK + (t % SUB_N) * BLOCK_N


def _block_sparse_fwd(
    Q, K, V, O, LSE, COUNTS, INDICES, Q_PERM, KV_PERM,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_qpb, stride_qph, stride_qpm,
    stride_kpb, stride_kph, stride_kpn,
    stride_cb, stride_ch, stride_cq,
    stride_ib, stride_ih, stride_iq, stride_ik,
    H, S_Q, S_K, qk_scale,
    HEAD_DIM: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    PERMUTE_Q: tl.constexpr,
    PERMUTE_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (batch, head) against the kept kv blocks of their q block.

    Grid: (cdiv(S_Q, BLOCK_M), B * H). Q, K, V and O have any strides; LSE is contiguous fp32
    (B, H, S_Q). PERMUTE_Q: kernel-order row ``r`` is token ``Q_PERM[r]`` of Q, O and LSE (rows are
    gathered and results scattered by token); PERMUTE_KV likewise for K and V, with pointer loads
    (USE_TMA must be off). Without them Q_PERM / KV_PERM are unused and may be None.
    ``qk_scale`` is softmax scale * log2(e): scores live in base 2 until the LSE is written.
    The main loop is software-pipelined: QK^T of tile t+1 is issued before the softmax of tile t, so
    the tensor cores work on it while the warps do the exponentials.
    """
    SUB_N: tl.constexpr = LAYOUT_BK // BLOCK_N
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    q_block = pid_m // (LAYOUT_BQ // BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S_Q

    if PERMUTE_Q:
        q_rows = tl.load(Q_PERM + off_b * stride_qpb + off_h * stride_qph + offs_m * stride_qpm, mask=row_ok, other=0)
        q_rows = q_rows.to(tl.int32)
    else:
        q_rows = offs_m
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + q_rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_src = K + off_b * stride_kb + off_h * stride_kh
    v_src = V + off_b * stride_vb + off_h * stride_vh
    if USE_TMA:
        k_src = tl.make_tensor_descriptor(k_src, [S_K, HEAD_DIM], [stride_kn, 1], [BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(v_src, [S_K, HEAD_DIM], [stride_vn, 1], [BLOCK_N, HEAD_DIM])
    if PERMUTE_KV:
        kv_perm = KV_PERM + off_b * stride_kpb + off_h * stride_kph
    else:
        kv_perm = KV_PERM

    count = tl.load(COUNTS + off_b * stride_cb + off_h * stride_ch + q_block * stride_cq)
    idx_row = INDICES + off_b * stride_ib + off_h * stride_ih + q_block * stride_iq
    n_tiles = count * SUB_N
    # Tiles [0, n_full) are whole; with EVEN_K false the kept last kv block (if partial) comes after.
    if EVEN_K:
        n_full = n_tiles
    else:
        last_block = tl.load(idx_row + (count - 1) * stride_ik, mask=count > 0, other=-1)
        n_full = n_tiles - (last_block == tl.cdiv(S_K, LAYOUT_BK) - 1).to(tl.int32) * SUB_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Whole tiles, pipelined: the prologue computes the scores of tile 0 (masked load: it may not exist).
    start_n = _tile_start(idx_row, stride_ik, 0, n_full > 0, LAYOUT_BK, BLOCK_N)
    k = _load_rows(k_src, kv_perm, start_n, offs_n, offs_d, stride_kn, stride_kd, stride_kpn, S_K,
                   USE_TMA, PERMUTE_KV, True)  # fmt: skip
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    for t in range(1, n_full):
        start_next = _tile_start(idx_row, stride_ik, t, True, LAYOUT_BK, BLOCK_N)
        k = _load_rows(k_src, kv_perm, start_next, offs_n, offs_d, stride_kn, stride_kd, stride_kpn, S_K,
                       USE_TMA, PERMUTE_KV, False)  # fmt: skip
        qk_next = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p, alpha, m_i, l_i = online_softmax_step(qk, m_i, l_i, qk_scale, False)
        v = _load_rows(v_src, kv_perm, start_n, offs_n, offs_d, stride_vn, stride_vd, stride_kpn, S_K,
                       USE_TMA, PERMUTE_KV, False)  # fmt: skip
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        qk = qk_next
        start_n = start_next
    if n_full > 0:
        p, alpha, m_i, l_i = online_softmax_step(qk, m_i, l_i, qk_scale, False)
        v = _load_rows(v_src, kv_perm, start_n, offs_n, offs_d, stride_vn, stride_vd, stride_kpn, S_K,
                       USE_TMA, PERMUTE_KV, False)  # fmt: skip
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    # The partial last kv block, masked (only when kept and S_K % block_k != 0).
    for t in range(n_full, n_tiles):
        start_n = _tile_start(idx_row, stride_ik, t, True, LAYOUT_BK, BLOCK_N)
        k = _load_rows(k_src, kv_perm, start_n, offs_n, offs_d, stride_kn, stride_kd, stride_kpn, S_K,
                       USE_TMA, PERMUTE_KV, True)  # fmt: skip
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        qk = tl.where((start_n + offs_n)[None, :] < S_K, qk, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(qk, m_i, l_i, qk_scale, False)
        v = _load_rows(v_src, kv_perm, start_n, offs_n, offs_d, stride_vn, stride_vd, stride_kpn, S_K,
                       USE_TMA, PERMUTE_KV, True)  # fmt: skip
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)

    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + q_rows[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * S_Q + q_rows, lse, mask=row_ok)


def _triton_config(tile: TileConfig) -> triton.Config:
    meta = {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n}
    return triton.Config(meta, num_warps=tile.num_warps, num_stages=tile.num_stages)


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """The candidates of this layout's blocks (:func:`~sparse_compile.kernels.tile_configs.block_sparse_tiles`)."""
    tiles = block_sparse_tiles(kwargs["LAYOUT_BQ"], kwargs["LAYOUT_BK"])
    kept = [c for c in configs if TileConfig(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in tiles]
    return kept or [_triton_config(t) for t in tiles]


_fwd_jit = triton.jit(_block_sparse_fwd)
_fwd_autotuned = triton.autotune(
    configs=[_triton_config(t) for t in AUTOTUNE_TILES],
    key=["HEAD_DIM", "LAYOUT_BQ", "LAYOUT_BK", "USE_TMA", "PERMUTE_Q", "PERMUTE_KV"],  # + the tensor dtypes
    prune_configs_by={"early_config_prune": _prune_configs},
)(_fwd_jit)


def _tma_scratch(size: int, alignment: int, stream: Optional[int]) -> Tensor:
    """Global-memory workspace Triton asks for when a kernel builds tensor descriptors on the device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def tma_eligible(k: Tensor, v: Tensor) -> bool:
    """Whether K/V may be read through TMA: CUDA sm_90+, unit last stride, 16-byte aligned base and strides."""
    if not k.is_cuda or torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    return tma_readable(k) and tma_readable(v)


def _output_buffers(q: Tensor, v: Tensor, out: Optional[Tensor], lse_out: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The caller's O and LSE buffers after checking them, or new ones: O token-major ``(B, H, S_q, D)`` in
    q's dtype (:func:`attention_output_like`), LSE contiguous fp32 ``(B, H, S_q)``."""
    b, h, s_q, d = q.shape
    out = attention_output_like(q, v) if out is None else out
    lse_out = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device) if lse_out is None else lse_out
    check_strided_out_buffer("out", out, (b, h, s_q, d), q.dtype, q.device)
    check_out_buffer("lse_out", lse_out, (b, h, s_q), torch.float32, q.device)
    return out, lse_out


def block_sparse_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    *,
    block_q: int,
    block_k: int,
    q_perm: Optional[Tensor] = None,
    kv_perm: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    tile: Optional[TileConfig] = None,
    use_tma: Optional[bool] = None,
    out: Optional[Tensor] = None,
    lse_out: Optional[Tensor] = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Run the Triton kernel: compiled on CUDA, or under Triton's interpreter (see :func:`interpreter_active`).

    Arguments as :func:`block_sparse_attention`; q, k, v are read through their strides (no copies).
    ``tile`` fixes the tile/launch config (default: :mod:`~sparse_compile.kernels.tile_configs`'s, autotuned
    on CUDA). ``use_tma`` forces TMA K/V loads on or off (default: on when :func:`tma_eligible` and
    there is no ``kv_perm``; TMA cannot gather permuted rows). ``out`` ``(B, H, S_q, D)`` in q's
    dtype with any non-overlapping strides (default: a new token-major tensor) and ``lse_out``
    ``(B, H, S_q)`` contiguous fp32 are optional buffers; every element is written. Layout and
    permutation values are not checked (no host sync).
    """
    lay = validate_inputs(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k, q_perm, kv_perm)
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    out, lse_out = _output_buffers(q, v, out, lse_out)
    interpret = interpreter_active()
    if q.device.type != "cuda" and not interpret:
        raise ValueError(
            f"the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported (got {q.device})"
        )
    if out.numel() > 0:
        if use_tma is None:
            use_tma = not interpret and lay.kv_perm is None and tma_eligible(k, v)
        if use_tma and (interpret or lay.kv_perm is not None or not tma_eligible(k, v)):
            raise ValueError(
                "use_tma=True needs CUDA sm_90+, 16-byte aligned K/V with unit last stride, and no kv_perm"
            )
        scale = default_scale(d, scale)
        args = (
            q, k, v, out, lse_out, lay.counts, lay.indices, lay.q_perm, lay.kv_perm,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *permutation_strides(lay.q_perm), *permutation_strides(lay.kv_perm),
            *lay.counts.stride(), *lay.indices.stride(),
            h, s_q, s_k, scale * LOG2E,
        )  # fmt: skip
        meta = dict(
            HEAD_DIM=d,
            LAYOUT_BQ=block_q,
            LAYOUT_BK=block_k,
            EVEN_K=s_k % block_k == 0,
            USE_TMA=use_tma,
            PERMUTE_Q=lay.q_perm is not None,
            PERMUTE_KV=lay.kv_perm is not None,
            DOT_PRECISION=dot_precision(q.dtype),
        )
        if tile is None and interpret:
            tile = interpreter_block_sparse_tile(block_q, block_k)
        _launch(args, meta, b * h, s_q, interpret, tile)
    return (out, lse_out) if return_lse else out


def _launch(args: tuple, meta: dict, bh: int, s_q: int, interpret: bool, tile: Optional[TileConfig]) -> None:
    """Launch the interpreted, fixed-tile or autotuned kernel over grid (cdiv(S_q, BLOCK_M), B*H).

    TMA launches install a Triton allocator (process-wide ``triton.set_allocator``) for the on-device
    descriptors' workspace. The first call per (D, block_q, block_k, TMA, permutations, dtype) autotunes, which
    launches the kernel several times: make it outside CUDA-graph capture.
    """
    if tile is not None and (meta["LAYOUT_BQ"] % tile.block_m or meta["LAYOUT_BK"] % tile.block_n):
        raise ValueError(f"{tile} must tile block_q={meta['LAYOUT_BQ']} and block_k={meta['LAYOUT_BK']}")
    if interpret:
        grid = (cdiv(s_q, tile.block_m), bh)
        _fwd_jit[grid](*args, **meta, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n)
        return
    if meta["USE_TMA"]:
        triton.set_allocator(_tma_scratch)
    with torch.cuda.device(args[0].device):
        if tile is None:
            _fwd_autotuned[lambda m: (cdiv(s_q, m["BLOCK_M"]), bh)](*args, **meta)
        else:
            grid = (cdiv(s_q, tile.block_m), bh)
            _fwd_jit[grid](*args, **meta, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                           num_warps=tile.num_warps, num_stages=tile.num_stages)  # fmt: skip


def block_sparse_attention_gluon(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    *,
    block_q: int,
    block_k: int,
    scale: Optional[float] = None,
    return_lse: bool = False,
    tile: Optional[TileConfig] = None,
    out: Optional[Tensor] = None,
    lse_out: Optional[Tensor] = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Run the TMA Gluon kernel (:mod:`~sparse_compile.kernels.gluon_block_sparse`, CUDA sm_90 only): arguments
    as :func:`block_sparse_attention_triton` without permutations (permuted calls:
    :func:`block_sparse_attention_gluon_on_kv_copies`); ``out`` must also have 16-byte aligned strides, it is
    stored by TMA. ``tile`` defaults to :func:`~sparse_compile.kernels.tile_configs.gluon_block_sparse_tile`.
    Raises ``ValueError`` with the reason when the kernel cannot take the call. Layout values are not checked
    (no host sync).
    """
    lay = validate_inputs(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k)
    reason = gluon_ineligibility(q, k, v, block_q, block_k, cuda_capability(q), has_permutation=False)
    if reason is not None:
        raise ValueError(reason)
    out, lse_out = _output_buffers(q, v, out, lse_out)
    if out.numel() > 0:
        if not tma_readable(out):
            raise ValueError("out must have a unit last stride and 16-byte aligned base and strides (TMA store)")
        launch_gluon_block_sparse(q, k, v, lay, block_q, block_k, default_scale(q.shape[-1], scale), out, lse_out,
                                  tile)  # fmt: skip
    return (out, lse_out) if return_lse else out


COPY_GROUP_BYTES = 1 << 28
"""Most bytes of kernel-order K/V copies that :func:`block_sparse_attention_gluon_on_kv_copies` holds at once
(at least one head's): it takes heads in groups under this bound, which keeps a permuted call's peak memory
near dense SDPA's at long sequences."""


def _copy_head_groups(heads: int, head_bytes: int) -> list[slice]:
    """Consecutive head slices of ``heads`` whose K/V copies (``head_bytes`` per head) fit ``COPY_GROUP_BYTES``,
    at least one head each."""
    group = max(1, COPY_GROUP_BYTES // max(head_bytes, 1))
    return [slice(start, min(heads, start + group)) for start in range(0, heads, group)]


def block_sparse_attention_gluon_on_kv_copies(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    *,
    block_q: int,
    block_k: int,
    q_perm: Optional[Tensor],
    kv_perm: Optional[Tensor],
    scale: Optional[float] = None,
    out: Optional[Tensor] = None,
    lse_out: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """A permuted call through the TMA Gluon kernel (CUDA sm_90) with only K and V copied.

    q ``(B, H, S_q, D)``, k/v ``(B, H, S_k, D)`` in token order with any strides; layout, ``q_perm``
    ``(B, H, S_q)`` and ``kv_perm`` ``(B, H, S_k)`` (either may be ``None``) as :func:`block_sparse_attention`.
    k and v are gathered into kernel order (:func:`~sparse_compile.kernels.permute_rows.gather_rows`, one
    launch for both), heads in groups whose copies fit ``COPY_GROUP_BYTES``; the kernel's ``PERMUTE_Q``
    variant reads q rows ``q_perm[b, h, i]`` in place (q copied only without a unit last stride) and writes O
    and LSE to them. Returns ``(O, LSE)`` in token order: ``out`` (``(B, H, S_q, D)`` in q's dtype, any
    non-overlapping strides; default a new token-major one) and ``lse_out`` (contiguous fp32 ``(B, H, S_q)``,
    natural log; default new). Raises ``ValueError`` with the reason when the kernel cannot take the call.
    """
    lay = validate_inputs(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k, q_perm, kv_perm)
    reason = gluon_config_ineligibility(q, block_q, block_k, cuda_capability(q))
    if reason is not None:
        raise ValueError(reason)
    b, h, s_q, d = q.shape
    out, lse = _output_buffers(q, v, out, lse_out)
    if out.numel() == 0:
        return out, lse
    q_in = q if q.stride(3) == 1 else q.contiguous()
    out_in = out if out.stride(3) == 1 else torch.empty_like(out, memory_format=torch.contiguous_format)
    scale = default_scale(d, scale)
    q_order = lay.q_perm if lay.q_perm is not None else token_order(None, b, h, s_q, q.device)
    kv_orders = token_order(lay.kv_perm, b, h, k.shape[2], q.device)
    head_bytes = b * k.shape[2] * (d + v.shape[-1]) * q.element_size()
    for heads in _copy_head_groups(h, head_bytes):
        k_copy, v_copy = gather_rows((k[:, heads], v[:, heads]), kv_orders[:, heads])
        group_layout = BlockLayout(lay.counts[:, heads], lay.indices[:, heads])
        launch_gluon_block_sparse(q_in[:, heads], k_copy, v_copy, group_layout, block_q, block_k, scale,
                                  out_in[:, heads], lse[:, heads], q_perm=q_order[:, heads])  # fmt: skip
    if out_in is not out:
        out.copy_(out_in)
    return out, lse


def kernel_choice(
    q: Tensor, k: Tensor, v: Tensor, block_q: int, block_k: int, has_permutation: bool,
    capability: Optional[tuple[int, int]] = None,
) -> str:  # fmt: skip
    """Which implementation the op runs for valid inputs: ``"gluon"``, ``"gluon_kv_copies"``, ``"triton"`` or
    ``"reference"``.

    On a CUDA device of ``capability`` (default: q's device's; CPU tensors without one are not on
    CUDA): the Gluon kernel when it takes the call as it is
    (:func:`~sparse_compile.kernels.gluon_block_sparse.gluon_ineligibility`); a permuted call it could take
    but for the permutation on kernel-order K/V copies (:func:`block_sparse_attention_gluon_on_kv_copies`:
    faster than the Triton kernel's permuted loads at every measured density, and than copies of q, k, v and O
    at low density, benchmarks/RESULTS.md); else the Triton kernel. Off CUDA: the Triton kernel under Triton's interpreter,
    else the reference.
    """
    capability = cuda_capability(q) if capability is None else capability
    if capability is None:
        return "triton" if interpreter_active() else "reference"
    if gluon_ineligibility(q, k, v, block_q, block_k, capability, has_permutation) is None:
        return "gluon"
    if has_permutation and gluon_config_ineligibility(q, block_q, block_k, capability) is None:
        return "gluon_kv_copies"
    return "triton"


def _dispatch(
    q: Tensor, k: Tensor, v: Tensor, counts: Tensor, indices: Tensor, block_q: int, block_k: int,
    scale: Optional[float], q_perm: Optional[Tensor], kv_perm: Optional[Tensor],
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The op's body: the kernel :func:`kernel_choice` picks, or the reference after checking the values."""
    lay = validate_inputs(q, k, v, counts, indices, block_q, block_k, q_perm, kv_perm)
    has_permutation = q_perm is not None or kv_perm is not None
    choice = kernel_choice(q, k, v, block_q, block_k, has_permutation)
    kwargs = dict(block_q=block_q, block_k=block_k, scale=scale, return_lse=True)
    if choice == "gluon":
        return block_sparse_attention_gluon(q, k, v, counts, indices, **kwargs)
    if choice == "gluon_kv_copies":
        return block_sparse_attention_gluon_on_kv_copies(q, k, v, counts, indices, block_q=block_q, block_k=block_k,
                                                         q_perm=q_perm, kv_perm=kv_perm, scale=scale)
    if choice == "triton":
        return block_sparse_attention_triton(q, k, v, counts, indices, q_perm=q_perm, kv_perm=kv_perm, **kwargs)
    check_layout_values(lay.counts, lay.indices, cdiv(k.shape[2], block_k))
    check_permutation_values("q_perm", lay.q_perm)
    check_permutation_values("kv_perm", lay.kv_perm)
    return block_sparse_attention_reference(q, k, v, counts, indices, q_perm=q_perm, kv_perm=kv_perm, **kwargs)


@torch.library.custom_op("sparse_compile::block_sparse_attention", mutates_args=())
def _block_sparse_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    block_q: int,
    block_k: int,
    scale: Optional[float] = None,
    q_perm: Optional[Tensor] = None,
    kv_perm: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Custom op: returns (O token-major (B, H, S_q, D) in q's dtype, LSE contiguous fp32 (B, H, S_q))."""
    return _dispatch(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k, scale, q_perm, kv_perm)


@_block_sparse_attention_op.register_fake
def _block_sparse_attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    block_q: int,
    block_k: int,
    scale: Optional[float] = None,
    q_perm: Optional[Tensor] = None,
    kv_perm: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    validate_inputs(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k, q_perm, kv_perm)
    b, h, s_q, _ = q.shape
    return attention_output_like(q, v), q.new_empty((b, h, s_q), dtype=torch.float32)


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    *,
    block_q: int,
    block_k: int,
    q_perm: Optional[Tensor] = None,
    kv_perm: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention through the ``sparse_compile::block_sparse_attention`` op (torch.compile-safe).

    q ``(B, H, S_q, D)``, k/v ``(B, H, S_k, D)``, fp16/bf16/fp32, any strides: in kernel order, or in
    token order with the permutations ``q_perm`` ``(B, H, S_q)`` / ``kv_perm`` ``(B, H, S_k)`` (int32
    or int64; row ``i`` of kernel order is token ``perm[b, h, i]``), which the kernel folds into its
    loads and stores. ``kv_block_counts`` int32 ``(B, H, NQ)``, ``kv_block_indices`` int32
    ``(B, H, NQ, MAXK)`` over kernel-order blocks (batch/head dims of the layout and permutations may
    be 1 or stride 0); ``block_q``/``block_k`` powers of two in [16, 256]; ``scale`` defaults to
    1/sqrt(D). Returns O ``(B, H, S_q, D)`` in q's dtype, token-major (:func:`attention_output_like`), in
    q's row order, plus the fp32 natural-log LSE ``(B, H, S_q)`` when ``return_lse``. Rows whose q
    block keeps nothing give 0 and LSE ``-inf``. Shapes are checked here (``ValueError``); layout and
    permutation *values* on the CPU path only. Runs the kernel :func:`kernel_choice` picks (the Gluon
    kernel on sm_90 where it takes the call, else the Triton kernel; the reference on CPU).
    """
    out, lse = torch.ops.sparse_compile.block_sparse_attention(
        q, k, v, kv_block_counts, kv_block_indices, block_q, block_k, scale, q_perm, kv_perm
    )
    return (out, lse) if return_lse else out
