"""Where a job runs: its device, its dtype, its process group. Training and inference both ask here.

- Device: "auto" is the first CUDA GPU when one is visible, else the CPU.
- Dtype / precision: "auto" is bf16 on GPUs that support it (Ampere and newer), fp16 on older GPUs, fp32 on the
  CPU (guide §2.2: the tensor cores need 16-bit inputs; a CPU gains nothing from bf16 autocast here).
- Process group: under torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) `setup()` joins it, nccl on GPUs and gloo
  on CPUs; a plain process is world size 1 and every collective below is then a no-op.

Model wrapping (DDP / FSDP) and full-state gathering are training's business: `llmkit.train.distributed`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> the first CUDA GPU when one is visible, else the CPU; other names as torch.device()."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA GPU is visible to torch here; use 'cpu' or 'auto'")
    return device


def resolve_dtype(name: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """"auto" -> bf16 (or fp16 without bf16 support) on a GPU, fp32 on the CPU; or one of fp32, bf16, fp16."""
    if isinstance(name, torch.dtype):
        return name
    device = device or torch.device("cpu")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward passes of `device` in `dtype`; a no-op in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def return_freed_memory_to_the_os(threshold: int = 1 << 20) -> bool:
    """On glibc (Linux), allocate every block of >= `threshold` bytes with its own mmap, so a freed activation
    goes back to the OS instead of staying in a fragmented heap (M_MMAP_THRESHOLD, fixed). CPU training
    allocates and frees activations of a different size every step (rows as wide as the batch's longest
    example); with glibc's default sliding threshold they pile up in the heap and the process grows step after
    step (LoRA on a 0.5B model: 8.2 GB peak and rising after 3 steps; 6 layers of it: 2.44 -> 2.04 GB peak,
    1.9 -> 1.2 GB between steps). Returns whether it was applied."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(requested_device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; a plain process gets world size 1.

    Backend: nccl when the device is a GPU (each process takes GPU `LOCAL_RANK`), gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(requested_device)
    if world == 1:
        return DistInfo(device=device)
    if "RANK" not in os.environ:
        raise RuntimeError(f"WORLD_SIZE={world} but RANK is not set: launch with torchrun "
                           f"(torchrun --nproc_per_node N -m llmkit pretrain ...)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {visible} GPU(s) are visible: "
                               f"--nproc_per_node must not exceed the GPUs of one node")
        device = torch.device("cuda", local_rank)  # one GPU per process, whatever index was requested
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            # device_id binds the process group to this GPU: eager NCCL init, and barriers use the right GPU
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        _keep_until_exit(dist.group.WORLD)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


# Shutting down a gloo process group: a known PyTorch hazard (pytorch/pytorch#56297), seen here as a hang
# in about 1 run in 10. Gloo's worker threads free each finished collective, and the Python tensors it
# holds, after the caller has already seen it complete; that needs the GIL. ~ProcessGroupGloo joins those
# threads. When the last reference to the group goes away inside a C++ destructor that keeps the GIL
# (DDP's Reducer, freed when the trainer returns), the join waits for a thread that waits for the GIL:
# deadlock. At interpreter exit (FSDP's device mesh keeps the group alive until then) the same thread
# can abort the process instead (SIGABRT). Hence: teardown() waits, GIL released, until the workers are done, and we
# hold a Python reference to the group until exit, so it is freed from Python, which releases the GIL.
_KEEP_ALIVE: list = []


def _keep_until_exit(group) -> None:
    if not _KEEP_ALIVE:
        atexit.register(_KEEP_ALIVE.clear)
    _KEEP_ALIVE[:] = [group]  # a group from an earlier setup() in this process is idle by now


def _drain_gloo(timeout_s: float = 5.0) -> None:
    """Return once gloo's worker threads have freed the collectives they ran (see _KEEP_ALIVE)."""
    for _ in range(2):  # the default group runs collectives on 2 worker threads
        probe = torch.zeros(1)
        dist.all_reduce(probe)
        deadline = time.monotonic() + timeout_s
        while probe._use_count() > 1 and time.monotonic() < deadline:  # the finished work still holds it
            time.sleep(0.001)


def teardown(info: DistInfo) -> None:
    """Destroy the process group (collective: every rank calls it after its last collective)."""
    if info.enabled and dist.is_initialized():
        if dist.get_backend() == "gloo":
            _drain_gloo()
        dist.destroy_process_group()


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is true on any rank (e.g. one rank received SIGTERM)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a scalar tensor over every rank (itself in a single process); collective."""
    if not info.enabled:
        return value
    t = value.detach().clone().to(info.device)
    dist.all_reduce(t)
    return t / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
