"""``method="radial"``: Radial attention, a static O(n log n) energy-decay block pattern.

The video part of every call runs the fixed-block kernel (:func:`~sparse_compile.methods.block_kernel.fixed_block_attention`)
with the layout of :mod:`sparse_compile.methods.radial_pattern` (see there for the exact rule):
same and adjacent frames dense, farther frame pairs a spatial band whose half-width halves each
time the frame distance doubles (scaled by ``decay``), and below one block only every m-th frame
pair. Text tokens of joint attention are dense (:func:`attend_video_and_text`).

The pattern depends only on the grid, so it is built once per (grid, block, decay, sink, device)
and shared by all sites, steps, CFG branches and models (module-level LRU cache); a call reads no
device value on the host. A grid whose pattern keeps every block (e.g. one or two frames) runs
dense SDPA instead. Calls the block-sparse kernel cannot take (a non key-padding mask, head dim
outside 16/32/64/128, value head dim != query head dim, dtype other than fp16/bf16/fp32) run
dense, with the reason logged once per site.

Options:
    decay: scale of the band half-widths at frame distance >= 2, in (0, 1]; default 0.2 (the
        published Wan setting; HunyuanVideo used 0.95 without the sink).
    block: query and key block size of the pattern and kernel (16, 32, 64, 128 or 256; default
        128 as published).
    first_frame_sink: every frame attends the whole first frame (default True, as published for
        Wan).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_compile.methods.base import AttentionCall, AttentionMethod
from sparse_compile.methods.block_kernel import fixed_block_attention
from sparse_compile.methods.radial_pattern import RadialLayout, radial_layout
from sparse_compile.registry import MethodConfig, bool_option, choice_option, fraction_option, register_method

BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class RadialConfig(MethodConfig):
    """Options of ``method="radial"`` (see the module doc)."""

    decay: float = fraction_option(0.2)
    block: int = choice_option(128, BLOCK_SIZES)
    first_frame_sink: bool = bool_option(True)


@register_method
class RadialMethod(AttentionMethod):
    """Radial attention on the fixed-block kernel; one cached static layout per grid."""

    name = "radial"
    config_type = RadialConfig
    needs_block_kernel = True
    config: RadialConfig

    def keeps_every_pair(self, call: AttentionCall) -> bool:
        """Short clips (e.g. one or two frames): the radial mask keeps every block."""
        return self.layout_for(call).kept_density == 1.0

    def predicted_density(self, call: AttentionCall) -> float:
        return self.layout_for(call).kept_density

    def plans_from_inputs(self, call: AttentionCall) -> bool:
        """Never: its layout depends on the grid only."""
        return False

    def video_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall):
        """Video tokens ``(B, H, Sv, D)`` -> (out ``(B, H, Sv, D)``, LSE ``(B, H, Sv)`` fp32, density)."""
        layout = self.layout_for(call)
        out, lse = fixed_block_attention(q, k, v, layout.counts, layout.indices, layout.block, call.softmax_scale,
                                         self.options.precision)  # fmt: skip
        return out, lse, layout.kept_density

    def layout_for(self, call: AttentionCall) -> RadialLayout:
        """The cached layout of this call's grid on the query's device."""
        cfg = self.config
        return radial_layout(*call.layout.grid, cfg.block, float(cfg.decay), cfg.first_frame_sink, call.query.device)
