"""Launch environment, mesh arithmetic (ladder 0) and mesh construction on a fake group (ladder 1)."""
import pytest
import torch

from gigatrain.distributed import LayoutError, ParallelDims, expand_nodelist, read_env


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("n[8-10]") == ["n8", "n9", "n10"]
    assert expand_nodelist("node-a") == ["node-a"]
    assert expand_nodelist("a[098-100]b") == ["a098b", "a099b", "a100b"]


def test_read_env_torchrun_slurm_single():
    e = read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.source) == \
        (3, 8, 1, "h0", 1234, "torchrun")
    s = read_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
                  "SLURM_JOB_NODELIST": "gpu[12-15]", "SLURM_JOB_ID": "4242", "SLURM_NTASKS_PER_NODE": "4"})
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.source) == (5, 16, 1, "gpu12", "slurm")
    assert s.master_port == 20000 + 4242 and s.local_world_size == 4
    assert read_env({}).source == "single"
    # The batch script itself (no step id) is not a rank; uneven task counts parse.
    assert read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).source == "single"
    u = read_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_STEPID": "1", "SLURM_TASKS_PER_NODE": "2,1"})
    assert (u.world_size, u.local_world_size, u.source) == (3, 2, "slurm")


def test_parallel_dims():
    d = ParallelDims.infer(8, pp=2, tp=2)
    assert (d.dp, d.pp, d.tp) == (2, 2, 2)
    assert d.coords(5) == {"dp": 1, "pp": 0, "tp": 1}
    assert d.rank_of(1, 0, 1) == 5
    assert d.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert d.group_ranks("pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert d.group_ranks("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with pytest.raises(LayoutError, match="not divisible"):
        ParallelDims.infer(6, pp=4)
    with pytest.raises(LayoutError, match="--nproc 4"):
        ParallelDims(dp=2, pp=2).validate(2)
    with pytest.raises(LayoutError):
        ParallelDims(dp=0)


@pytest.mark.rung1
@pytest.mark.parametrize("dims,rank", [((2, 2, 2), 5), ((4, 4, 4), 37), ((8, 1, 8), 63)])
def test_mesh_groups_at_scale_on_a_fake_group(fake_group, dims, rank):
    """Mesh construction at 8-64 simulated ranks: each axis group holds the ranks that differ
    from this one on that axis only, tp innermost."""
    import torch

    from gigatrain.distributed.mesh import Mesh

    pd = ParallelDims(*dims)
    fake_group(pd.world_size, rank)
    mesh = Mesh(pd, torch.device("cpu"))
    assert mesh.coords == pd.coords(rank)
    for axis in ("dp", "pp", "tp"):
        comm = mesh.comm(axis)
        mine = [g for g in pd.group_ranks(axis) if rank in g]
        assert len(mine) == 1 and comm.ranks == mine[0] and comm.size == len(mine[0])
        assert comm.rank == mine[0].index(rank)
    assert mesh.tp.ranks == list(range(rank - rank % pd.tp, rank - rank % pd.tp + pd.tp))
