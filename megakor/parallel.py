"""The parallel layout: which rank does what, the process groups, and the `mpu` DeepSpeed expects.

Ranks are ordered tensor-parallel innermost, then data-parallel, then pipeline:

    rank = pp_rank · (dp · tp) + dp_rank · tp + tp_rank

which is the order of DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model), so the
pipeline mode hands the same layout to DeepSpeed's `PipelineModule` (`deepspeed_topology`, checked
rank by rank against DeepSpeed's grid by `check_deepspeed_grid`). TP ranks are neighbours
because they talk on every layer: on a GPU node they share NVLink.

`init_distributed()` joins the job however it was launched:
- env:// (`deepspeed` launcher, torchrun, slurm/pretrain.sh): RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK;
- `mpirun` (Open MPI's OMPI_COMM_WORLD_* variables): rank and size from the environment, the master
  address from rank 0 through mpi4py;
- none of those: a single process.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megakor.config import ConfigError


@dataclass(frozen=True)
class Topology:
    """Pure arithmetic of the layout (no process groups): usable before any process starts."""

    world_size: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        if self.tp < 1 or self.pp < 1 or self.world_size < 1:
            raise ConfigError(f"world size {self.world_size}, parallel.tensor={self.tp} and parallel.pipeline={self.pp} "
                              "must all be at least 1")
        if self.world_size % (self.tp * self.pp):
            raise ConfigError(
                f"{self.world_size} processes cannot be split into parallel.tensor={self.tp} × "
                f"parallel.pipeline={self.pp}; use a world size that is a multiple of {self.tp * self.pp}")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        pp_rank, rest = divmod(rank, self.dp * self.tp)
        dp_rank, tp_rank = divmod(rest, self.tp)
        return pp_rank, dp_rank, tp_rank

    def rank(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.dp * self.tp + dp_rank * self.tp + tp_rank

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def model_parallel_groups(self) -> list[list[int]]:
        """TP × PP ranks holding one full model replica together (one per data-parallel rank)."""
        return [[self.rank(p, d, t) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)]


class ParallelState:
    """This rank's coordinates and process groups. Also the `mpu` object DeepSpeed reads: Megatron's
    names, where "model parallel" means tensor parallel (ZeRO's gradient norm sums TP-split
    parameters over it; replicated ones it counts on model-parallel rank 0 only)."""

    def __init__(self, topology: Topology, rank: int):
        self.topology, self.global_rank = topology, rank
        self.pp_rank, self.dp_rank, self.tp_rank = topology.coords(rank)
        self.tp_group = self.dp_group = self.pp_group = self.model_parallel_group = None
        self._dp_ranks: list[int] = [rank]
        # Every rank must create every group, in the same order (torch.distributed.new_group's rule).
        for kind in ("tp", "dp", "pp", "model_parallel"):
            for ranks in getattr(topology, f"{kind}_groups")():
                group = dist.new_group(ranks)
                if rank in ranks:
                    setattr(self, f"{kind}_group", group)
                    if kind == "dp":
                        self._dp_ranks = ranks

    @property
    def tp(self) -> int:
        return self.topology.tp

    @property
    def dp(self) -> int:
        return self.topology.dp

    @property
    def pp(self) -> int:
        return self.topology.pp

    def tp_group_or_none(self):
        """The TP group for the model's layers; None at TP = 1 so they run as plain layers."""
        return self.tp_group if self.tp > 1 else None

    # -- the mpu interface ------------------------------------------------------------------------
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self):
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group."""
        return self.global_rank - self.tp_rank

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._dp_ranks)

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp

    def get_pipeline_model_parallel_group(self):
        return self.pp_group

    def __repr__(self) -> str:
        return (f"ParallelState(rank={self.global_rank}, tp={self.tp_rank}/{self.tp}, dp={self.dp_rank}/{self.dp}, "
                f"pp={self.pp_rank}/{self.pp})")


# ---- DeepSpeed's pipeline topology ----------------------------------------------------------------

def deepspeed_topology(topology: Topology):
    """DeepSpeed's `PipeModelDataParallelTopology` for our layout: its axes (pipe, data, model) order ranks
    as we do, so its pipeline grid builds the same DP, PP and TP groups as `ParallelState`."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=topology.pp, num_mp=topology.tp, num_dp=topology.dp)


def check_deepspeed_grid(grid, ps: ParallelState) -> None:
    """Raise unless DeepSpeed's pipeline grid placed this rank exactly as `ps` does. DeepSpeed all-reduces
    gradients over its DP group and sends activations along its PP group while our layers talk on our TP
    group; if the two disagreed, training would silently mix the wrong shards."""
    topo, me = ps.topology, ps.global_rank
    ours = {"pipeline stage": ps.pp_rank, "data-parallel rank": ps.dp_rank, "tensor-parallel rank": ps.tp_rank,
            "data-parallel group": next(g for g in topo.dp_groups() if me in g),
            "pipeline group": next(g for g in topo.pp_groups() if me in g),
            "tensor-parallel group": next(g for g in topo.tp_groups() if me in g)}
    theirs = {"pipeline stage": grid.get_stage_id(), "data-parallel rank": grid.get_data_parallel_id(),
              "tensor-parallel rank": grid.get_slice_parallel_rank(),
              "data-parallel group": sorted(grid.dp_group), "pipeline group": sorted(grid.pp_group),
              "tensor-parallel group": sorted(grid.slice_group)}
    for what, value in ours.items():
        if theirs[what] != value:
            raise RuntimeError(f"rank {me}: DeepSpeed's pipeline grid gives {what} {theirs[what]} but megakor's layout "
                               f"gives {value}; the two rank orders must agree (see megakor.parallel)")


# ---- joining the job ------------------------------------------------------------------------------

def launch_world_size(environ=os.environ) -> int:
    """The number of processes the launcher started, read before any process group exists."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if environ.get(key):
            return int(environ[key])
    return 1


def free_port() -> int:
    """A TCP port free on this host now (for a single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_address() -> str:
    """This host's first address as `hostname -I` lists it (the name may resolve to loopback in
    /etc/hosts, which other nodes cannot reach); set MASTER_ADDR to choose another interface."""
    try:
        addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        addresses = []
    return addresses[0] if addresses else socket.gethostbyname(socket.gethostname())


def _env_from_mpi(environ) -> None:
    """Fill the env:// variables from Open MPI's, with rank 0's address broadcast through mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("launched by mpirun but mpi4py is not installed; pip install mpi4py "
                           "(or launch with the deepspeed launcher or torchrun)") from None
    comm = MPI.COMM_WORLD
    addr = environ.get("MASTER_ADDR") or (_host_address() if comm.Get_rank() == 0 else None)
    port = environ.get("MASTER_PORT") or (str(free_port()) if comm.Get_rank() == 0 else None)
    addr, port = comm.bcast((addr, port), root=0)
    environ.update(RANK=str(comm.Get_rank()), WORLD_SIZE=str(comm.Get_size()), MASTER_ADDR=addr, MASTER_PORT=port,
                   LOCAL_RANK=environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))


def device_for(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(environ=os.environ, timeout_seconds: int | None = None) -> tuple[int, int, torch.device]:
    """Join (or start) the default process group; returns (rank, world_size, device). Idempotent.
    `timeout_seconds` (parallel.timeout_seconds) bounds the rendezvous and every collective: a rank that
    waits longer for a peer fails instead of holding the allocation (torch's default is 30 minutes)."""
    if not environ.get("RANK") and environ.get("OMPI_COMM_WORLD_SIZE"):
        _env_from_mpi(environ)
    if not environ.get("RANK"):
        environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        environ.setdefault("MASTER_ADDR", "127.0.0.1")
        environ.setdefault("MASTER_PORT", str(free_port()))
    environ.setdefault("LOCAL_RANK", "0")
    device = device_for(int(environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        import deepspeed

        kwargs = {"timeout": datetime.timedelta(seconds=timeout_seconds)} if timeout_seconds else {}
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False, **kwargs)
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu" and dist.get_world_size() > 1:
            release_cpu_shm_name(environ)
    return dist.get_rank(), dist.get_world_size(), device


def release_cpu_shm_name(environ=os.environ) -> None:
    """DeepSpeed's CPU accelerator maps one shared-memory allreduce buffer per rank,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (66 MiB), and never
    unlinks it: every single-node run from the deepspeed launcher (which sets LOCAL_SIZE) left them
    behind, in RAM, until reboot. Once every rank has mapped every buffer (init_distributed maps them
    before it returns; the barrier says all ranks are past it) the names are no longer needed: each rank
    unlinks its own, and the memory is freed when the last rank unmaps it at exit, however the run ends."""
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{environ.get('MASTER_ADDR', '')}_"
            f"{environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(name)
    except FileNotFoundError:  # no shm allreduce: LOCAL_SIZE unset or not the world (torchrun, mpirun, srun, several hosts)
        pass


def build_parallel_state(tp: int, pp: int = 1) -> ParallelState:
    """Process groups for this layout in the already-initialised world."""
    return ParallelState(Topology(dist.get_world_size(), tp, pp), dist.get_rank())


def shutdown_distributed() -> None:
    """Tear the process groups down before exit (gloo's threads abort at interpreter exit otherwise,
    which mpirun reports as a failed rank)."""
    if dist.is_initialized():
        dist.destroy_process_group()
