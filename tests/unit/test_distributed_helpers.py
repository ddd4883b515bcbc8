"""hp_fast.distributed, distributed_work and distributed_launch without torchrun.

Collectives and the head split run in 2 forked processes joined in a gloo group (file
rendezvous; torch is already imported, so no start-up cost). Checked: ``somp_heads_split``
equals the plain ``somp_heads`` (the reference twin) bit for bit on fresh random inputs of
several shapes (one head, fewer heads than ranks, odd counts, duplicate heads, one sample, one
step, a large dictionary, bf16 inputs) and all three criteria; rows of unequal sizes gather in
rank order; a mismatch raises on every rank and names the rank and the field; a failure on one
rank raises on every rank; ``no_split`` turns splitting off; rank 0's progress bar counts the
global work; the torchrun placement rules and the CLI's refusals.
"""
from __future__ import annotations

import json
import multiprocessing
import os

import pytest
import torch
import torch.distributed as dist

from hp_fast import distributed as hd
from hp_fast.cli import main
from hp_fast.distributed_launch import backend_for, rank_placement, torchrun_env
from hp_fast.distributed_work import head_block, somp_heads_split
from hp_fast.pursuit import somp_heads

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with gloo is not built in")]

# (heads, samples, head dim, model dim, atoms, k, criterion, duplicate heads, z dtype)
CASES = [(1, 6, 4, 16, 30, 3, "l1", False, torch.float32),     # fewer heads than ranks
         (2, 5, 4, 16, 30, 4, "l2", False, torch.float32),
         (5, 7, 8, 24, 50, 5, "l1", True, torch.float32),      # odd count, duplicate heads
         (7, 1, 4, 16, 40, 3, "ormp", False, torch.float32),   # one sample
         (6, 9, 8, 24, 60, 1, "l1", False, torch.bfloat16),    # one step, bf16 inputs
         (3, 11, 8, 16, 4500, 3, "l1", False, torch.float32),  # dictionary-space path
         (4, 8, 8, 16, 4500, 4, "ormp", True, torch.float32)]


def _inputs(case, seed):
    B, n, dh, d, v, k, crit, dup, dtype = case
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, n, dh, generator=g)  # (B, n, dh)
    w = torch.randn(B, dh, d, generator=g) / dh ** 0.5  # (B, dh, d)
    if dup:
        z[-1], w[-1] = z[0], w[0]
    D = torch.randn(v, d, generator=g)  # (v, d)
    return z.to(dtype), w, D, k, crit


def _child(target, r, world, folder):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=r,
                                world_size=world)
        out = target()
        dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        out = {"crash": f"{type(err).__name__}: {err}"}
    (folder / f"rank{r}.json").write_text(json.dumps(out))
    os._exit(0)  # no pytest teardown in the fork


def _run_group(tmp_path, target, world=2) -> list:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_child, args=(target, r, world, tmp_path), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert not any(isinstance(o, dict) and "crash" in o for o in outs), outs
    return outs


def test_somp_heads_split_equals_somp_heads_bit_for_bit(tmp_path):
    def target():
        res = []
        for i, case in enumerate(CASES):
            z, w, D, k, crit = _inputs(case, seed=100 + i)
            r = somp_heads_split(z, w, D, k, criterion=crit)
            lo, hi = head_block(len(z), hd.rank(), hd.world_size())
            res.append({"support": r.support.tolist(), "evr": r.evr.double().tolist(),
                        "mine": hi - lo})
        return res

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = []
        for i, case in enumerate(CASES):
            z, w, D, k, crit = _inputs(case, seed=100 + i)
            want.append(somp_heads(z, w, D, k, criterion=crit))
    finally:
        torch.set_num_threads(threads)
    outs = _run_group(tmp_path, target)
    for case, ref, r0, r1 in zip(CASES, want, *outs):
        for got in (r0, r1):  # the whole batch on every rank
            assert got["support"] == ref.support.tolist(), case
            assert got["evr"] == ref.evr.double().tolist(), case
        assert r0["mine"] + r1["mine"] == case[0]  # the heads were dealt out


def test_collectives_mismatches_and_failures_reach_every_rank(tmp_path):
    def target():
        r = hd.rank()
        out = {"rows": hd.all_gather_rows(torch.arange(3 - 2 * r)[:, None].repeat(1, 2)).tolist(),
               "evr": hd.all_gather_rows(torch.full((r + 1,), 0.5 + r, dtype=torch.float64)).tolist(),
               "objects": hd.all_gather_objects({"rank": r}),
               "main": hd.gather_to_main(r * 10), "split": hd.splitting()}
        with hd.no_split():
            out["split_inside"] = hd.splitting()
        hd.agree("same floats", {"x": 1.0 + r * 1e-9, "n": 3})  # within rtol: passes
        for name, call in [
                ("agree", lambda: hd.agree("a test call", {"n": 3, "prompt_hash": f"h{r}"})),
                ("failed", lambda: hd.raise_if_any_failed(
                    KeyError("boom") if r == 1 else None, "a test step"))]:
            try:
                call()
                out[name] = None
            except (ValueError, KeyError) as err:
                out[name] = f"{type(err).__name__}: {err}"
        return out

    r0, r1 = _run_group(tmp_path, target)
    for got in (r0, r1):
        assert got["rows"] == [[0, 0], [1, 1], [2, 2], [0, 0]]  # 3 rows of rank 0, then 1
        assert got["evr"] == [0.5, 1.5, 1.5]
        assert got["objects"] == [{"rank": 0}, {"rank": 1}]
        assert got["split"] and not got["split_inside"]
        assert "rank 1" in got["agree"] and "prompt_hash" in got["agree"]
    assert r0["main"] == [0, 10] and r1["main"] is None
    assert r1["failed"].startswith("KeyError") and "boom" in r1["failed"]
    assert r0["failed"].startswith("ValueError") and "rank 1" in r0["failed"]


def test_head_blocks_cover_every_head_once():
    for B in (0, 1, 2, 5, 17, 270):
        for world in (1, 2, 3, 8):
            blocks = [head_block(B, r, world) for r in range(world)]
            assert blocks[0][0] == 0 and blocks[-1][1] == B
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            sizes = [b - a for a, b in blocks]
            assert max(sizes) - min(sizes) <= 1


def test_global_progress_counts_every_ranks_work():
    bar = hd.GlobalProgress(22, 8, 14, 8, desc="capture", unit="prompt")
    bar.update(4)
    assert bar.bar.n == 8 + 7  # rank 0's 4 of its 8 stand for 7 of the 14 left
    bar.update(4)
    assert bar.bar.n == 22
    bar.close()
    assert bar.bar.n == 22


def test_torchrun_env_and_placement_rules():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert torchrun_env(env) == {"rank": 3, "world_size": 4, "local_rank": 1,
                                 "local_world_size": 2}
    assert torchrun_env({"RANK": "0"}) is None
    with pytest.raises(ValueError, match="malformed"):
        torchrun_env(dict(env, RANK="x"))
    base = {"dtype": None, "device": None, "device_map": None, "max_memory": None}
    assert rank_placement(base, 1, 2, 0) == base  # no GPU: as given
    assert rank_placement(base, 1, 2, 2)["device"] == "cuda:1"  # one replica per GPU
    assert rank_placement(dict(base, device="cpu"), 1, 2, 2)["device"] == "cpu"
    with pytest.raises(ValueError, match="no GPU of its own"):
        rank_placement(base, 2, 4, 2)
    auto = dict(base, device_map="auto")
    assert rank_placement(auto, 1, 2, 4, lambda i: 100 + i)["max_memory"] == {2: 102, 3: 103}
    assert rank_placement(dict(auto, max_memory={0: "1GiB"}), 1, 2, 4)["max_memory"] == {0: "1GiB"}
    with pytest.raises(ValueError, match="no GPU per process"):
        rank_placement(auto, 0, 4, 2)
    assert backend_for(base) == ("gloo", None) and backend_for(dict(base, device="cpu"))[0] == "gloo"


def test_backend_is_nccl_when_the_model_goes_to_cuda(monkeypatch):
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    base = {"device": None, "device_map": None, "max_memory": None}
    assert backend_for(dict(base, device="cuda:1")) == ("nccl", 1)
    assert backend_for(dict(base, device_map="auto", max_memory={3: 1, 2: 1, "cpu": 1})) == ("nccl", 2)
    assert backend_for(dict(base, device_map={"model": 1, "lm_head": "cpu"})) == ("nccl", 1)
    assert backend_for(dict(base, device_map={"model": "cpu"})) == ("gloo", None)


def test_cli_refuses_what_does_not_split_under_torchrun(tmp_path, monkeypatch, capsys):
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\n")
    assert main(["capture", "--prompts", str(prompts), "--out", str(tmp_path / "a.safetensors")]) == 2
    assert "must be a folder" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "does not split" in capsys.readouterr().err
    assert not dist.is_initialized()
