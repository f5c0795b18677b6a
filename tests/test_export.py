"""``gigatrain export`` (ladder 0 and 3): a checkpoint as consolidated safetensors in
HuggingFace's layout, read back by a one-process model, by ``gigatrain.initialize(weights=...)``
in another layout, and by HuggingFace's ``GPT2LMHeadModel`` for a GPT-2 trained through
``gigatrain.initialize`` on 2 ranks with ZeRO-3: the same outputs everywhere."""
import functools
import json
from types import SimpleNamespace

import pytest
import torch

from dist_utils import one_process, spawn

GPT = SimpleNamespace(name="gpt", n_layer=2, n_head=2, d_model=32, seq_len=16)


def _gpt(meta=False):
    from gigatrain.models import build_model

    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return build_model(GPT, vocab_size=60)
    return build_model(GPT, vocab_size=60)


def _ctx():
    return torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(5))


def test_export_of_a_one_process_checkpoint_loads_into_plain_and_initialized_models(tmp_path):
    import gigatrain
    from gigatrain.cli import main
    from gigatrain.export import INDEX_NAME
    from safetensors.torch import load_file

    cfg = {"train": {"optimizer": "sgd", "lr": 0.5, "global_batch": 4, "micro_batch": 4}}
    with one_process():
        with gigatrain.initialize(_gpt(meta=True), cfg) as eng:
            x, y = eng.model.example_batch(4, torch.Generator().manual_seed(1))
            for _ in range(2):
                eng.train_step([(x, y)])
            eng.save(tmp_path / "ck")
            want = eng.predict(_ctx())
    # Small files: the model is cut into several, with HuggingFace's index.
    assert main(["export", str(tmp_path / "ck"), "--out", str(tmp_path / "hf"), "--max-shard-mb", "0.05"]) == 0
    index = json.loads((tmp_path / "hf" / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    state = {}
    for f in files:
        state.update(load_file(str(tmp_path / "hf" / f)))
    assert sum(t.numel() * 4 for t in state.values()) == index["metadata"]["total_size"]
    plain = _gpt()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert missing == ["head.lm_head.weight"] and not unexpected     # tied to stem.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(plain(_ctx()), want, rtol=0, atol=0)
    # Another layout starts from it (meta model, ZeRO-3, reading its shard of each tensor).
    with one_process():
        with gigatrain.initialize(_gpt(meta=True), {"parallel": {"zero": 3}, **cfg}, weights=tmp_path / "hf") as eng:
            torch.testing.assert_close(eng.predict(_ctx()), want, rtol=0, atol=0)


def _hf_config():
    from transformers import GPT2Config

    return GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=16, bos_token_id=0, eos_token_id=0)


def _hf_ranks(rank, world, root):
    import gigatrain
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(_hf_config())
    cfg = {"parallel": {"zero": 3}, "train": {"optimizer": "adamw", "lr": 1e-2, "global_batch": 4, "micro_batch": 2}}
    data = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(0))
    loss = lambda out, y: torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())  # noqa: E731
    with gigatrain.initialize(model, cfg, loss_fn=loss) as eng:
        mine = data[eng.dp_rank * 2:(eng.dp_rank + 1) * 2]
        for _ in range(3):
            eng.train_step([(mine[:, :-1], mine[:, 1:])])
        eng.save(f"{root}/ck")
        eng.model.eval()
        return eng.predict(data[:2, :-1], post=lambda out: out.logits)


@functools.lru_cache(maxsize=None)
def _hf_run():
    import tempfile

    root = tempfile.mkdtemp(prefix="gigatrain-export-")
    return root, spawn(_hf_ranks, 2, root, timeout_s=120)


@pytest.mark.rung3
def test_a_gpt2_trained_through_initialize_loads_into_huggingface(tmp_path):
    pytest.importorskip("transformers")
    from transformers import GPT2LMHeadModel

    from gigatrain.export import export_checkpoint

    root, res = _hf_run()
    export_checkpoint(f"{root}/ck/step_000003", tmp_path / "hf")
    _hf_config().save_pretrained(tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    data = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = hf(data[:2, :-1]).logits
    for want in res:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The weights moved: an untrained model gives other outputs.
    torch.manual_seed(0)
    with torch.no_grad():
        assert (GPT2LMHeadModel(_hf_config()).eval()(data[:2, :-1]).logits - got).abs().max() > 1e-3
