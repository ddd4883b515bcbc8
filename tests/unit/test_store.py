"""Sharded, resumable capture (hp_fast.store) on a tiny random model.

Checked: a capture killed with SIGKILL and run again equals an uninterrupted one bit for bit
and leaves the complete shards untouched; truncated / corrupt shards are reported, set aside
and captured again; a resume with another model, prompts or settings fails before any forward
pass and names the field; --overwrite starts fresh and keeps foreign files; rankings from the
memory-mapped store equal those from memory bit for bit (with several head batches) without
reading z whole; the sink buffers at most one shard, and the peak RSS of a sharded capture
stays far below that of an in-memory one.
"""
from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hp_fast
from hp_fast import store as store_mod
from hp_fast.capture import (HeadActivations, capture_batches, format_prompts, model_fingerprint,
                             text_batch_encoder)
from hp_fast.ranking import logit_lens_ids, vocabulary_pursuit
from hp_fast.store import ShardedStore, ShardSink
from hp_fast.store_read import ShardedZ
from helpers.rss import capture_rss_growth
from helpers.tiny_models import WORDS, tiny_model, tiny_tokenizer

capture_mod = importlib.import_module("hp_fast.capture")  # hp_fast.capture is the function
N, SHARD, BATCH = 40, 8, 4  # 5 shards of 2 batches


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, 12))) for _ in range(n)]


PROMPTS = _prompts(N)
KW = dict(batch_size=BATCH, chat_template=False, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one thread (also in the forked children, so the bits are comparable)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def reference(model, tok):
    return hp_fast.capture(model, tok, PROMPTS, **KW)


def _stats(folder: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, store_mod.file_sha256(p))
            for p in sorted(folder.glob("shard-*.safetensors"))}


def _count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_sharded_capture_equals_memory_and_files_are_standard(model, tok, reference, tmp_path):
    out = tmp_path / "acts"
    acts = hp_fast.capture(model, tok, PROMPTS, out=out, shard_size=SHARD, **KW)
    assert isinstance(acts.z, ShardedZ) and acts.z.shape == reference.z.shape
    assert torch.equal(acts.z[:], reference.z)  # SHARD % BATCH == 0: the same batches
    assert torch.equal(acts.z[[37, 2, 9], 1], reference.z[[37, 2, 9], 1])
    assert torch.equal(acts.head_outputs(2, 5), reference.head_outputs(2, 5))
    man = json.loads((out / "manifest.json").read_text())
    assert man["format"] == store_mod.FORMAT and man["shape"] == list(reference.z.shape)
    assert man["settings"]["aggregates"] == ["mean"] and man["settings"]["max_length"] == 512
    assert [(s["start"], s["stop"]) for s in man["shards"]] == [(i, i + SHARD) for i in range(0, N, SHARD)]
    for s in man["shards"]:  # plain safetensors files, checksums as recorded
        assert store_mod.file_sha256(out / s["file"]) == s["sha256"]
        assert torch.equal(load_file(str(out / s["file"]))["z.mean"], reference.z[s["start"]:s["stop"]])
    assert acts.prompts == PROMPTS and acts.meta["prompt_hash"] == reference.meta["prompt_hash"]
    back = HeadActivations.load(out, model=model, verify=True)
    assert torch.equal(back.z[:], reference.z)
    with pytest.raises(ValueError, match="different model"):
        HeadActivations.load(out, model=tiny_model("llama", seed=1))
    assert not list(out.glob(".*.tmp"))


def _forked(target, *args):
    """Run ``target(*args)`` in a forked child (torch is already imported: no 10-30 s start)."""
    proc = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _slow_capture(model, tok, out):
    torch.set_num_threads(1)
    model.register_forward_pre_hook(lambda *_: time.sleep(0.1))  # slow enough to kill midway
    hp_fast.capture(model, tok, PROMPTS, out=out, shard_size=SHARD, **KW)


def test_sigkill_then_resume_is_bit_identical_and_keeps_shards(model, tok, reference, tmp_path,
                                                               capsys, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    out = tmp_path / "acts"
    proc = _forked(_slow_capture, model, tok, out)
    deadline = time.time() + 60
    try:
        while not list(out.glob("shard-*.safetensors")):
            assert proc.is_alive() and time.time() < deadline, "the child died or hung"
            time.sleep(0.01)
        time.sleep(random.uniform(0.0, 0.25))  # anywhere in the next shard or two
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(10)
    assert proc.exitcode == -signal.SIGKILL  # it was killed, not finished
    done = {s["file"] for s in json.loads((out / "manifest.json").read_text())["shards"]}
    assert 1 <= len(done) < N // SHARD
    before = {k: v for k, v in _stats(out).items() if k in done}
    capsys.readouterr()
    acts = hp_fast.capture(model, tok, PROMPTS, out=out, **dict(KW, progress=True))  # shard size: stored
    bar = capsys.readouterr().err
    assert re.search(rf"(\d+)/{N}", bar).group(1) == str(SHARD * len(done))  # starts where it resumed
    assert torch.equal(acts.z[:], reference.z)
    after = _stats(out)
    assert all(after[name] == st for name, st in before.items())  # inode, mtime, sha256
    assert len(after) == N // SHARD and not list(out.glob(".*.tmp"))


def test_truncated_and_corrupt_shards_are_set_aside_and_recaptured(model, tok, reference, tmp_path):
    out = tmp_path / "acts"
    hp_fast.capture(model, tok, PROMPTS, out=out, shard_size=SHARD, **KW)
    s1, s3 = out / "shard-000001.safetensors", out / "shard-000003.safetensors"
    s1.write_bytes(s1.read_bytes()[:1000])  # truncated
    data = bytearray(s3.read_bytes())
    data[-3] ^= 0xFF  # same size, one flipped byte
    s3.write_bytes(bytes(data))
    (out / ".shard-000004.safetensors.tmp").write_bytes(b"half a file")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        HeadActivations.load(out, verify=True)
    keep = {k: v for k, v in _stats(out).items() if k not in (s1.name, s3.name)}
    with pytest.warns(UserWarning) as warned:
        acts = hp_fast.capture(model, tok, PROMPTS, out=out, shard_size=SHARD, **KW)
    text = " ".join(str(w.message) for w in warned)
    assert "shard-000001.safetensors is truncated" in text and "shard-000003.safetensors fails" in text
    assert len(list(out.glob("shard-000001.safetensors.corrupt-*"))) == 1
    assert len(list(out.glob("shard-000003.safetensors.corrupt-*"))) == 1
    assert torch.equal(acts.z[:], reference.z)
    after = _stats(out)
    assert all(after[k] == v for k, v in keep.items()) and not list(out.glob(".*.tmp"))


def test_unrecorded_complete_shard_is_adopted_not_rewritten(model, tok, reference, tmp_path):
    """Killed between a shard's rename and the manifest write: the shard is kept."""
    out = tmp_path / "acts"
    hp_fast.capture(model, tok, PROMPTS, out=out, shard_size=SHARD, **KW)
    man = json.loads((out / "manifest.json").read_text())
    man["shards"] = man["shards"][:2]
    (out / "manifest.json").write_text(json.dumps(man))
    (out / "prompts.json").unlink()  # killed right after creating the manifest: written again
    before = _stats(out)
    calls, handle = _count_forwards(model)
    try:
        acts = hp_fast.capture(model, tok, PROMPTS, out=out, shard_size=SHARD, **KW)
    finally:
        handle.remove()
    assert not calls and _stats(out) == before and torch.equal(acts.z[:], reference.z)
    assert acts.prompts == PROMPTS


@pytest.mark.parametrize("change, field", [
    ("model", "model.checksum"), ("prompts", "prompt_hash"), ("max_length", "settings.max_length"),
    ("aggregate", "settings.aggregates"), ("shard_size", "shard_size"),
    ("dtype", "settings.model_dtype")])
def test_resume_mismatch_fails_before_any_forward_and_names_the_field(model, tok, tmp_path,
                                                                      change, field):
    out = tmp_path / "acts"
    hp_fast.capture(model, tok, PROMPTS[:16], out=out, shard_size=SHARD, **KW)
    before = _stats(out)
    other = {"model": lambda: tiny_model("llama", seed=1),
             "dtype": lambda: tiny_model("llama").double()}.get(change, lambda: model)()
    kw = dict(KW, shard_size=SHARD)
    prompts = PROMPTS[:15] + ["a different last prompt"] if change == "prompts" else PROMPTS[:16]
    kw.update({"max_length": {"max_length": 64}, "aggregate": {"aggregate": "last"},
               "shard_size": {"shard_size": 4}}.get(change, {}))
    calls, handle = _count_forwards(other)
    try:
        with pytest.raises(ValueError, match=rf"{field} is .* there but .* in this run") as err:
            hp_fast.capture(other, tok, prompts, out=out, **kw)
    finally:
        handle.remove()
    assert "overwrite=True" in str(err.value) and "--overwrite" in str(err.value)
    assert not calls and _stats(out) == before


def test_overwrite_starts_fresh_and_keeps_foreign_files(model, tok, tmp_path):
    out = tmp_path / "acts"
    hp_fast.capture(model, tok, PROMPTS, out=out, shard_size=SHARD, **KW)
    (out / "notes.txt").write_text("mine")
    (out / "shard-000004.safetensors").write_bytes(b"broken")  # set aside by the next line
    with pytest.warns(UserWarning, match="shard-000004"):
        hp_fast.capture(model, tok, PROMPTS, out=out, shard_size=SHARD, **KW)
    aside = list(out.glob("*.corrupt-*"))
    new = _prompts(12, seed=5)
    acts = hp_fast.capture(model, tok, new, out=out, shard_size=SHARD, overwrite=True, **KW)
    assert torch.equal(acts.z[:], hp_fast.capture(model, tok, new, **KW).z)
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == [
        "shard-000000.safetensors", "shard-000001.safetensors"]
    assert (out / "notes.txt").read_text() == "mine" and list(out.glob("*.corrupt-*")) == aside


def test_foreign_folder_and_incomplete_store_are_refused(model, tok, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("a,b")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not an hp_fast capture"):
            hp_fast.capture(model, tok, PROMPTS, out=out, overwrite=overwrite, **KW)
    assert os.listdir(out) == ["data.csv"]
    part = tmp_path / "part"
    hp_fast.capture(model, tok, PROMPTS, out=part, shard_size=SHARD, **KW)
    (part / "shard-000002.safetensors").unlink()
    man = json.loads((part / "manifest.json").read_text())
    man["shards"] = [s for s in man["shards"] if s["id"] != 2]
    (part / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="incomplete: 1 of 5 shards missing"):
        HeadActivations.load(part)


def test_ranking_from_store_equals_memory_bit_for_bit(model, tok, reference, tmp_path, monkeypatch):
    acts = hp_fast.capture(model, tok, PROMPTS, out=tmp_path / "acts", shard_size=SHARD, **KW)
    # 7 heads per batch: several head batches, one of them partial (18 heads in all)
    monkeypatch.setattr(capture_mod, "HEAD_BATCH_BYTES", 7 * N * reference.z.shape[3] * 4)
    assert [len(c) for c, _ in reference.head_batches([(l, h) for l in range(3) for h in range(6)])] == [7, 7, 4]
    mem = reference.bind(model)

    def no_full_read(*_a, **_k):
        raise AssertionError("the ranking read z whole")

    monkeypatch.setattr(ShardedZ, "__getitem__", no_full_read)
    for kw in (dict(k=6), dict(k=6, baseline="none", criterion="l2", layers=[1, 2]),
               dict(method="logit_lens")):
        a = hp_fast.rank_heads(mem, model, tok, "colors", progress=False, **kw)
        b = hp_fast.rank_heads(acts, model, tok, "colors", progress=False, **kw)
        assert torch.equal(a.scores.nan_to_num(-9), b.scores.nan_to_num(-9))
        assert (a.support is None and b.support is None) or torch.equal(a.support, b.support)
    heads = [(2, 5), (0, 0), (1, 3), (2, 1), (0, 4), (1, 1), (2, 2), (0, 2)]
    assert hp_fast.describe_heads(mem, model, tok, heads, k=4) == \
        hp_fast.describe_heads(acts, model, tok, heads, k=4)
    assert logit_lens_ids(mem, model, heads) == logit_lens_ids(acts, model, heads)
    va, vb = vocabulary_pursuit(mem, model, 5), vocabulary_pursuit(acts, model, 5)
    assert torch.equal(va.support, vb.support) and torch.equal(va.evr, vb.evr)
    monkeypatch.undo()
    whole = vocabulary_pursuit(mem, model, 5)  # one head batch: the same up to rounding
    assert torch.equal(whole.support, va.support)
    torch.testing.assert_close(whole.evr, va.evr, rtol=1e-5, atol=1e-6)


def test_sink_buffers_one_shard_and_writers_merge(model, tok, reference, tmp_path, monkeypatch):
    sinks = []
    monkeypatch.setattr(store_mod, "ShardSink",
                        lambda *a, **k: sinks.append(ShardSink(*a, **k)) or sinks[-1])
    hp_fast.capture(model, tok, PROMPTS, out=tmp_path / "one", shard_size=SHARD, batch_size=3,
                    chat_template=False, progress=False)  # 8 = 3 + 3 + 2: batches stop at shard edges
    assert sinks[0].max_buffered_rows == SHARD and sinks[0].written == list(range(N // SHARD))
    # two writers (ranks) on disjoint shards, each with its own part file, then merged
    texts, used = format_prompts(tok, PROMPTS, False)
    meta = {"model": model_fingerprint(model),
            "prompt_hash": reference.meta["prompt_hash"], "num_samples": N,
            "shape": list(reference.z.shape)}
    header = store_mod.store_header(model, meta, {"aggregates": ["mean"]}, SHARD)
    store = ShardedStore.open(tmp_path / "two", header, prompts={"prompts": PROMPTS})
    make = text_batch_encoder(model, tok, texts, used_template=used, aggregates=("mean",),
                              max_length=512)
    for rank in (1, 0):
        mine = store.pending()[rank::2]
        peer = ShardedStore.open(tmp_path / "two", header, writer=False)
        sink = ShardSink(peer, shard_ids=mine, part=f"rank{rank}")
        capture_batches(model, N, make, ("mean",), sink, batch_size=BATCH, progress=False,
                        batches=peer.batches(mine, BATCH))
        restarted = ShardedStore.open(tmp_path / "two", header, writer=False)
        assert not set(mine) & set(restarted.pending())  # a restarted rank skips its shards
    assert len(list((tmp_path / "two").glob("manifest.part-*.json"))) == 2
    store.merge_parts()
    assert not list((tmp_path / "two").glob("manifest.part-*.json"))
    assert torch.equal(HeadActivations.load(tmp_path / "two").z[:], reference.z)


@pytest.mark.skipif(os.getloadavg()[0] > 3, reason="RSS growth is not measurable while other "
                    "processes load the machine (load average above 3)")
def test_peak_rss_is_bounded_by_a_shard(tmp_path, monkeypatch):
    """The sharded run must not grow by the whole z; the in-memory run goes second (the peak
    only rises) and must grow by most of z, which shows the measurement can fail."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    ctx = multiprocessing.get_context("spawn")  # fresh interpreter: see helpers/rss.py
    proc = ctx.Process(target=capture_rss_growth, args=(tmp_path, tmp_path / "rss.txt"))
    proc.start()
    proc.join(240)
    assert proc.exitcode == 0
    sharded_kib, memory_kib = map(int, (tmp_path / "rss.txt").read_text().split())
    print("peak RSS growth KiB: sharded", sharded_kib, "in memory", memory_kib)
    assert sharded_kib < 20 * 1024, (sharded_kib, memory_kib)
    assert memory_kib > 40 * 1024, (sharded_kib, memory_kib)


def test_cli_capture_folder_resume_overwrite_and_acts_dir(tmp_path, capsys):
    from hp_fast.cli import main
    folder, pfile = tmp_path / "model", tmp_path / "prompts.txt"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    pfile.write_text("\n".join(PROMPTS[:12]) + "\n")
    common = ["--model", str(folder), "--prompts", str(pfile), "--batch-size", "4", "--no-chat-template"]
    out, single = tmp_path / "acts", tmp_path / "acts.safetensors"
    assert main(["capture", *common, "--out", str(out), "--shard-size", "4"]) == 0
    assert main(["capture", *common, "--out", str(single)]) == 0
    assert "(3 shards)" in capsys.readouterr().out and single.is_file()
    before = _stats(out)
    assert main(["capture", *common, "--out", str(out)]) == 0 and _stats(out) == before  # resumed: done
    assert main(["capture", *common, "--out", str(out), "--aggregate", "last"]) == 2
    err = capsys.readouterr().err
    assert "settings.aggregates is ['mean'] there but ['last']" in err and "--overwrite" in err
    describe = ["describe", "--model", str(folder), "--heads", "2.1,0.4", "--k-tokens", "3", "--acts"]
    assert main([*describe, str(out)]) == 0
    from_dir = capsys.readouterr().out
    assert main([*describe, str(single)]) == 0
    assert capsys.readouterr().out == from_dir and "L 2 H 1" in from_dir
    assert main(["capture", *common, "--out", str(out), "--aggregate", "last", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["aggregates"] == ["last"]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("x")
    capsys.readouterr()
    assert main(["capture", "--model", "/nonexistent", "--prompts", str(pfile), "--out",
                 str(tmp_path / "foreign")]) == 2  # refused before the model loads
    assert "not an hp_fast capture" in capsys.readouterr().err


def test_image_capture_into_a_store_equals_memory(tmp_path):
    from helpers.tiny_vlms import tiny_vlm
    from PIL import Image
    from hp_fast.capture_images import capture_images_many
    model, proc = tiny_vlm("llava")
    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy())
              for _ in range(5)]
    kw = dict(aggregates=("image", "text"), batch_size=2, progress=False)
    mem = capture_images_many(model, proc, images, "what is this", **kw)
    got = capture_images_many(model, proc, images, "what is this", out=tmp_path / "acts",
                              shard_size=2, **kw)
    for a in ("image", "text"):
        assert torch.equal(got[a].z[:], mem[a].z)
        for key in ("images", "prompts", "num_image_tokens", "prompt_hash", "modality"):
            assert got[a].meta[key] == mem[a].meta[key]
    with pytest.raises(ValueError, match="prompt_hash"):
        capture_images_many(model, proc, images[:4], "what is this", out=tmp_path / "acts",
                            shard_size=2, **kw)
    with pytest.raises(ValueError, match="pass aggregate"):
        HeadActivations.load(tmp_path / "acts")
