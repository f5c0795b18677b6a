"""The fp32 losses of 15 layouts through ``gigatrain.trainer.train``, written exactly (repr) as JSON.

A refactor must keep them bit-identical. Run it on two commits and compare the files::

    git worktree add /tmp/before <commit>
    (cd /tmp/before && PYTHONPATH=. python /path/to/scripts/layout_losses.py /tmp/before.json)
    python scripts/layout_losses.py /tmp/after.json
    python -c "import json,sys; a,b=(json.load(open(f)) for f in sys.argv[1:]); print(a == b)" /tmp/before.json /tmp/after.json

Layouts: one process (sgd, adamw); dp2 with ZeRO 0-3, CPU and NVMe offload; pp2 with 1f1b, gpipe,
interleaved, zero-bubble, and zero-bubble V=2 with ZeRO-1. Tiny GPT, 8 steps, about a minute on 2 cores.
"""
import json, os, sys, tempfile
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

BASE = ["model.n_layer=4", "model.n_head=2", "model.d_model=32", "model.seq_len=32",
        "data.name=pystdlib", "data.max_chars=200000", "train.steps=8", "train.global_batch=8",
        "train.micro_batch=2", "train.warmup_steps=2", "train.sample_tokens=0", "precision=fp32", "nproc=null"]

CASES2 = {
    "dp2-z0-sgd": ["train.optimizer=sgd", "train.lr=0.5"],
    "dp2-z0-adamw": [],
    "dp2-z1-sgd": ["train.optimizer=sgd", "train.lr=0.5", "parallel.zero=1"],
    "dp2-z2-sgd": ["train.optimizer=sgd", "train.lr=0.5", "parallel.zero=2"],
    "dp2-z3-sgd": ["train.optimizer=sgd", "train.lr=0.5", "parallel.zero=3"],
    "dp2-z2-cpu-adamw": ["parallel.zero=2", "parallel.offload=cpu"],
    "dp2-z3-cpu-adamw": ["parallel.zero=3", "parallel.offload=cpu"],
    "dp2-z3-nvme-sgd": ["train.optimizer=sgd", "train.lr=0.5", "parallel.zero=3", "parallel.offload=nvme"],
    "pp2-1f1b-sgd": ["train.optimizer=sgd", "train.lr=0.5", "parallel.pp=2"],
    "pp2-gpipe-adamw": ["parallel.pp=2", "parallel.pp_schedule=gpipe"],
    "pp2-interleaved-sgd": ["train.optimizer=sgd", "train.lr=0.5", "parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.pp_virtual=2"],
    "pp2-zb-sgd": ["train.optimizer=sgd", "train.lr=0.5", "parallel.pp=2", "parallel.pp_schedule=zb"],
    "pp2-zb2-z1-sgd": ["train.optimizer=sgd", "train.lr=0.5", "parallel.pp=2", "parallel.pp_schedule=zb", "parallel.pp_virtual=2", "parallel.zero=1"],
}


def cfg(tmp, name, extra):
    from gigatrain.config import load_config
    return load_config(None, BASE + [f"data.cache_dir={tmp}/cache", f"out={tmp}/{name}",
                                     f"parallel.offload_dir={tmp}/nvme-{name}"] + extra)


def run2(rank, world, tmp):
    from gigatrain.trainer import train
    return {k: [repr(x) for x in train(cfg(tmp, k, v), quiet=True).losses] for k, v in CASES2.items()}


def main():
    from dist_utils import spawn
    from gigatrain.data import prepare_dataset
    tmp = tempfile.mkdtemp()
    c = cfg(tmp, "x", [])
    prepare_dataset(c.data, c.model.seq_len)
    from gigatrain.trainer import train
    out = {}
    out["one-sgd"] = [repr(x) for x in train(cfg(tmp, "one-sgd", ["train.optimizer=sgd", "train.lr=0.5"]), quiet=True).losses]
    out["one-adamw"] = [repr(x) for x in train(cfg(tmp, "one-adamw", []), quiet=True).losses]
    res = spawn(run2, 2, tmp, timeout_s=300)
    assert res[0] == res[1]
    out.update(res[0])
    json.dump(out, open(sys.argv[1], "w"), indent=1)
    print("wrote", sys.argv[1], len(out))


if __name__ == "__main__":
    main()
