"""One rank of the context-parallel test (run as a script by ``test_context_parallel.py``).

Builds the tiny Wan transformer of :func:`tiny_models.wan` (seeded, so every process has the same
weights and inputs), enables diffusers' Ulysses attention over all ranks, compiles it with the
``sparse_video`` backend, calls it once per timestep (one denoising step each) and saves the
``sample`` of every call and the report's sites to ``OUT`` (``torch.save``)::

    python context_parallel_worker.py RANK WORLD STORE OUT OPTIONS_JSON LATENT_JSON TIMESTEPS_JSON

``STORE`` is the file that rendezvouses the gloo process group; ``LATENT_JSON`` is
``[frames, height, width]`` of the latent video.
"""

from __future__ import annotations

import datetime
import json
import sys
from unittest import mock

import torch
import torch._inductor.config as inductor_config
import torch.distributed as dist

import sparse_compile
import tiny_models

SEED = 0


def build_wan(frames: int, height: int, width: int) -> tuple[torch.nn.Module, dict]:
    """The seeded tiny Wan (2 heads, 2 layers) and its inputs: identical in every process."""
    torch.manual_seed(SEED)
    model, inputs, _ = tiny_models.wan(frames, height, width)
    return model, inputs


def run_steps(model: torch.nn.Module, inputs: dict, options: dict, timesteps: list[int]) -> dict:
    """``{"samples": [sample per timestep], "sites": report sites}`` of the model compiled with the backend."""
    compiled = torch.compile(model, backend="sparse_video", options=options)
    with torch.no_grad():
        samples = [compiled(**{**inputs, "timestep": torch.tensor([t])}).sample for t in timesteps]
    return {"samples": samples, "sites": list(sparse_compile.report(compiled).sites)}


def enable_ulysses(model: torch.nn.Module, degree: int) -> None:
    """``model.enable_parallelism`` with ``ContextParallelConfig(ulysses_degree=degree)``, on a CPU.

    Two diffusers 0.42.1 limits are stepped around, neither touching the attention path:
    ``ModelMixin._resolve_parallel_config`` picks the device as ``rank % torch.accelerator.device_count()``
    (0 without an accelerator: ZeroDivisionError), so one device is reported while it runs; and Wan's
    ``_cp_plan`` entry ``""`` (split a 2-D Wan 2.2 timestep) warns about a 1-D timestep through
    ``logger.warning_once``, which diffusers' loggers lack unless ``transformers`` is imported, so
    that entry is left out (it splits nothing for a 1-D timestep).
    """
    from diffusers import ContextParallelConfig

    plan = {name: split for name, split in model._cp_plan.items() if name != ""}
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree), cp_plan=plan)


def main(rank: int, world: int, store: str, out: str, options: dict, latent: list[int], timesteps: list[int]) -> None:
    # Compile time is most of this test's time: no pool of compile subprocesses (two ranks share
    # two cores) and scalar C++ kernels (faster to generate and build; speed is not tested here).
    inductor_config.compile_threads = 1
    inductor_config.cpp.vec_isa_ok = False
    # A rank waits in a collective while the other compiles; on a loaded machine that took over 60 s once (gloo
    # then aborts the process). The test's own limit (RANKS_TIMEOUT_S) still catches a hang.
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=240)
    )
    try:
        model, inputs = build_wan(*latent)
        enable_ulysses(model, world)
        with torch.no_grad():
            # diffusers' split hook reads the block's signature (inspect.signature) on its first
            # call, which Dynamo cannot trace: compiled before any eager call, the graph breaks at
            # every hooked module and the attention graphs lose the patch embedding (the grid).
            model(**inputs)
        result = run_steps(model, inputs, options, timesteps)
    finally:
        dist.destroy_process_group()
    torch.save(result, out)


if __name__ == "__main__":
    rank_arg, world_arg, store_arg, out_arg, options_arg, latent_arg, timesteps_arg = sys.argv[1:]
    main(int(rank_arg), int(world_arg), store_arg, out_arg, *(json.loads(a) for a in (options_arg, latent_arg, timesteps_arg)))
