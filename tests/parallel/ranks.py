"""Running a test's body on several ranks: torch.multiprocessing processes joined into one
torch.distributed world through a free local port (gloo on the CPU, NCCL on GPUs), each with
torchrun's environment so that lf.from_pretrained(tp_size=..., pp_size=...) initialises from it.
A rank's exception fails the test with its traceback; a world that does not finish within
`timeout` seconds (a rank waiting on a collective the others never make) is stopped and fails."""
from __future__ import annotations

import os
import socket
import time

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, backend: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      NCCL_NVLS_ENABLE="0")   # NVLink multicast stays off on the shared machines
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)   # two ranks on CI's two cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, backend: str = "gloo", timeout: float = 240.0) -> None:
    """fn(rank, world, *args) in `world` processes (fn and args picklable: a module-level function).
    gloo ranks are forked: they start with the test process's imports and parsed standard library
    (seconds a rank on CI's cores); NCCL ranks, and any rank of a process that has initialised
    CUDA, are spawned (CUDA cannot be forked)."""
    import torch
    fork = backend == "gloo" and not torch.cuda.is_initialized()
    ctx = mp.start_processes(_entry, args=(world, free_port(), backend, fn, args), nprocs=world, join=False,
                             start_method="fork" if fork else "spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"the {world} ranks did not finish within {timeout:.0f} s (a rank waits on a "
                               f"collective the others never make?)")
