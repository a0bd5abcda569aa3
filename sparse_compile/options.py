"""User options of the ``sparse_video`` backend, validated before anything is compiled.

``torch.compile(model, backend="sparse_video", options={...})`` hands the dict to the
backend on the first call; :func:`validate_options` turns it into a frozen
:class:`SparseOptions` or raises ``ValueError`` naming the offending key and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from sparse_compile.registry import METHODS, MethodConfig

TEXT_POSITIONS = ("prefix", "suffix")
PRECISIONS = ("native", "fp8")
DEFAULT_DENSE_TIMESTEP_FRACTION = 0.07
"""Flow-matching schedules of 50 steps run their first 20% (shift 3) to 28% (shift 5) of steps dense
under it, 36% at shift 7; a schedule linear in the noise level its first 8-10%."""


@dataclass(frozen=True)
class SparseOptions:
    """Validated backend options.

    Attributes:
        method: attention method run at video self/joint attention sites.
        dense_steps: the first ``dense_steps`` denoising steps run dense attention.
        dense_timestep_fraction: ``f`` in ``[0, 1)``: the steps whose timestep is above
            ``(1 - f)`` times the generation's first timestep run dense attention (the warm-up the
            backend applies without knowing the step count). Forwards without a timestep input are
            not warmed up by it. Given ``dense_steps`` alone, it is 0; given both, a step runs dense
            when either says so.
        dense_layers: the first ``dense_layers`` video attention sites (graph order) always run dense.
        min_seq_len: self-attention over fewer tokens than this stays dense.
        grid: ``(frames, height, width)`` of the video tokens, overriding inference.
        text_tokens: number of text tokens joined to the video tokens (only with ``grid``).
        text_position: where those text tokens sit in the sequence (only with ``grid``).
        break_even_guard: on CUDA, a single method's call (svg2: head) whose kept density is past
            the device's break-even density runs dense SDPA (``False``: always the method's pattern,
            e.g. to check or time a method there). ``auto`` always chooses by the cost model; ``False`` only
            stops it timing its calls against dense (:mod:`~sparse_compile.methods.call_timing`).
        precision: ``"native"``: the kernels compute in q/k/v's dtype; ``"fp8"``: the fixed-block kernel
            without token permutations (adaspa, radial, auto's block heads) runs both GEMMs in e4m3 where
            the GPU and the call allow it (:func:`~sparse_compile.methods.block_kernel.fixed_block_attention`),
            the rest in q/k/v's dtype.
        method_config: the chosen method's own options (its typed config; ``None``: its defaults).
    """

    method: str = "auto"
    dense_steps: int = 0
    dense_timestep_fraction: float = DEFAULT_DENSE_TIMESTEP_FRACTION
    dense_layers: int = 0
    min_seq_len: int = 1024
    grid: tuple[int, int, int] | None = None
    text_tokens: int = 0
    text_position: str = "suffix"
    break_even_guard: bool = True
    precision: str = "native"
    method_config: MethodConfig | None = None


def available_methods() -> tuple[str, ...]:
    """Names accepted by the ``method`` option (the registered attention methods)."""
    return tuple(METHODS)


def _require_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"sparse_video option {key!r} must be an int >= {minimum}, got {value!r}")
    return value


def _validate_grid(value: Any) -> tuple[int, int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(
            "sparse_video option 'grid' must be (frames, height, width): three ints >= 1, "
            f"got {value!r}"
        )
    return (value[0], value[1], value[2])


def _dense_timestep_fraction(options: Mapping[str, Any]) -> float:
    """The timestep warm-up: as given, else 0 when ``dense_steps`` is given, else the default."""
    key = "dense_timestep_fraction"
    if key not in options:
        return 0.0 if "dense_steps" in options else DEFAULT_DENSE_TIMESTEP_FRACTION
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(
            f"sparse_video option {key!r} must be a number in [0, 1) (the top share of the generation's "
            f"first timestep that runs dense; 0 turns the warm-up off), got {value!r}"
        )
    return float(value)


def validate_options(options: Mapping[str, Any] | None) -> SparseOptions:
    """Check user options and return them as :class:`SparseOptions`.

    Raises:
        ValueError: an unknown key, or a value outside what the key allows (the message names both).
    """
    options = dict(options or {})
    method = options.get("method", SparseOptions.method)
    methods = available_methods()
    if method not in methods:
        raise ValueError(f"sparse_video option 'method' must be one of {list(methods)}, got {method!r}")
    core_keys = [f.name for f in fields(SparseOptions) if f.name != "method_config"]
    config_type: type[MethodConfig] = METHODS[method].config_type
    method_keys = sorted(set(options) - set(core_keys))
    for key in method_keys:
        if key not in config_type.keys():
            owners = [name for name, cls in METHODS.items() if key in cls.config_type.keys()]
            where = f" (an option of method {owners})" if owners else ""
            raise ValueError(
                f"unknown sparse_video option {key!r}{where} for method {method!r}; allowed keys: "
                f"{core_keys + sorted(config_type.keys())}"
            )
    checked: dict[str, Any] = {"method": method, "method_config": config_type(**{k: options[k] for k in method_keys})}
    for key, minimum in (("dense_steps", 0), ("dense_layers", 0), ("min_seq_len", 1), ("text_tokens", 0)):
        if key in options:
            checked[key] = _require_int(key, options[key], minimum)
    if "break_even_guard" in options:
        if not isinstance(options["break_even_guard"], bool):
            raise ValueError(f"sparse_video option 'break_even_guard' must be True or False, "
                             f"got {options['break_even_guard']!r}")
        checked["break_even_guard"] = options["break_even_guard"]
    checked["dense_timestep_fraction"] = _dense_timestep_fraction(options)
    if "grid" in options and options["grid"] is not None:
        checked["grid"] = _validate_grid(options["grid"])
    if "precision" in options:
        if options["precision"] not in PRECISIONS:
            raise ValueError(f"sparse_video option 'precision' must be one of {list(PRECISIONS)}, "
                             f"got {options['precision']!r}")
        checked["precision"] = options["precision"]
    if "text_position" in options:
        if options["text_position"] not in TEXT_POSITIONS:
            raise ValueError(
                f"sparse_video option 'text_position' must be one of {list(TEXT_POSITIONS)}, "
                f"got {options['text_position']!r}"
            )
        checked["text_position"] = options["text_position"]
    text_keys = {"text_tokens", "text_position"} & set(options)
    if text_keys and checked.get("grid") is None:
        raise ValueError(
            f"sparse_video option(s) {sorted(text_keys)} override the inferred text placement and "
            "need 'grid' as well: give grid=(frames, height, width) too, or leave them out to infer both"
        )
    return SparseOptions(**checked)
