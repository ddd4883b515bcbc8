"""torchrun with 2 processes (gloo, CPU) against one process (hp_fast.distributed*).

Every distributed run is a real launcher, ``python -m torch.distributed.run --standalone
--nproc-per-node 2 -m hp_fast ...`` or a user script, in subprocesses with one thread each, on a
tiny random llama saved to a folder; the one-process references run here, with one thread too
(the same kernels, so the bits are comparable). Checked: a 2-process capture writes the very
store of one process (manifest and every shard bit for bit, verified, nothing left over) and
rank 0 alone prints; a 2-process rank and describe write the same JSON as one process while
each rank pursues half of the heads; a 2-process capture killed with SIGKILL (launcher and
workers) and run again resumes, keeps its finished shards and equals the uninterrupted store;
inside a user's torchrun script ``hp_fast.capture(out=DIR)``, ``rank_heads`` and
``describe_heads`` return the one-process results on every rank, mismatched prompts fail on
every rank before any forward pass, a folder that is not shared is refused on every rank, and
``no_split`` lets each rank work alone.

About 2.5 minutes on this 2-core machine under load (workers spend ~15 s importing hp_fast);
deselect with ``-m "not distributed"``.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

import hp_fast
from hp_fast.cli import main
from hp_fast.store import ShardedStore, file_sha256
from helpers.tiny_models import WORDS, tiny_model, tiny_tokenizer

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with gloo is not built in")]

N, SHARD, BATCH = 22, 4, 2  # 6 shards (the last of 2 prompts): 3 per rank
TIMEOUT = 300
COLORS = "red green blue yellow black white pink brown".split()
_rng = random.Random(0)
PROMPTS = [" ".join(_rng.choices(WORDS, k=_rng.randint(2, 10))) for _ in range(N)]
BAR = r"capture prompts:[^\r\n]*? (\d+)/(\d+) \["  # the capture's tqdm bar
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")

SLOW_SHARDS = '''\
import os
if os.environ.get("RANK") and os.environ.get("HP_FAST_TEST_SHARD_DELAY"):  # workers only
    import time
    from hp_fast import store
    _write = store.ShardedStore.write
    def write(self, *args, **kwargs):
        entry = _write(self, *args, **kwargs)
        time.sleep(float(os.environ["HP_FAST_TEST_SHARD_DELAY"]))  # slow enough to kill midway
        return entry
    store.ShardedStore.write = write
'''

USER_SCRIPT = '''\
import json, sys
import torch.distributed as dist
import hp_fast
from hp_fast import distributed as hd, distributed_work
from hp_fast.cli import read_prompts

model_dir, prompt_file, colors, out, result = sys.argv[1:6]
dist.init_process_group("gloo")
r = dist.get_rank()
model, tok = hp_fast.load_model(model_dir)
prompts = read_prompts(prompt_file)
kw = dict(shard_size=4, batch_size=2, chat_template=False, progress=False)
acts = hp_fast.capture(model, tok, prompts, out=out, **kw)
ranking = hp_fast.rank_heads(acts, model, tok, colors, k=4, progress=False)
heads = ranking.top(5)
desc = hp_fast.describe_heads(acts, model, tok, heads, k=3)
lens = hp_fast.logit_lens_tokens(acts, model, tok, heads, k=3)
calls = []
hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
errors = {}
try:  # rank 1 drops a prompt: refused on every rank before any forward pass
    hp_fast.capture(model, tok, prompts[:-1] if r else prompts, out=out + "-bad", **kw)
except ValueError as err:
    errors["mismatch"] = str(err)
distributed_work.PROBE_WAIT_S = 0.5
try:  # each rank its own folder: as if the folder were not on a shared filesystem
    hp_fast.capture(model, tok, prompts, out=f"{out}-rank{r}", **kw)
except ValueError as err:
    errors["unshared"] = str(err)
hook.remove()
with hd.no_split():  # per-rank work: another k on each rank, no collective
    alone = hp_fast.rank_heads(acts, model, tok, colors, k=2 + r, progress=False)
with open(f"{result}.rank{r}.json", "w") as f:
    json.dump({"ranking": ranking.to_json(), "alone": alone.to_json(), "forwards": len(calls),
               "describe": [{"layer": l, "head": h, "somp": desc[(l, h)],
                             "logit_lens": lens[(l, h)]} for l, h in heads],
               "errors": errors, "world": hd.world_size()}, f)
dist.destroy_process_group()
'''


# ---- launching ----------------------------------------------------------------------------

def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _launcher(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", *args]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers (torchrun starts each worker in its own session,
    so killing the launcher's process group would leave them running)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [psutil.Process(proc.pid), *family] if proc.poll() is None else family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)
    psutil.wait_procs(family, timeout=30)


def torchrun(*args, env=None, module=True) -> subprocess.CompletedProcess:
    cmd = _launcher(*(["-m", "hp_fast"] if module else []), *map(str, args))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or _env())
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise
    assert proc.returncode == 0, f"{cmd}\n{out[-3000:]}\n{err[-5000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ---- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "colors.txt").write_text("\n".join(COLORS) + "\n")
    return root


def capture_args(files: Path, out: Path) -> list:
    return ["capture", "--model", files / "model", "--prompts", files / "prompts.txt",
            "--no-chat-template", "--shard-size", SHARD, "--batch-size", BATCH, "--out", out]


def rank_args(files: Path, acts: Path, command: str = "rank") -> list:
    more = ["--top", "5", "--k-tokens", "3"] if command == "describe" else []
    return [command, "--model", files / "model", "--acts", acts, "--concept-file",
            files / "colors.txt", "--k", "4", *more]


@pytest.fixture(scope="module")
def single(files) -> Path:
    """The one-process references (CLI in this process, one thread): store, rank, describe."""
    out = files / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(list(map(str, capture_args(files, out / "store")))) == 0
        for command in ("rank", "describe"):
            args = rank_args(files, out / "store", command) + ["--json", out / f"{command}.json"]
            assert main(list(map(str, args))) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _same_store(a: Path, b: Path) -> None:
    """Complete, verified, nothing left over, and equal to ``b`` (manifest and bits)."""
    assert ShardedStore.read(a).pending() == []
    assert not list(a.glob("manifest.part-*")) and not list(a.glob(".*.tmp"))
    ma, mb = (json.loads((x / "manifest.json").read_text()) for x in (a, b))
    assert ma == mb  # every shard's range, batch size, bytes and sha256
    za = hp_fast.HeadActivations.load(a, verify=True).z[:]
    assert torch.equal(za, hp_fast.HeadActivations.load(b, verify=True).z[:])
    assert za.shape[0] == N and za.abs().sum() > 0


# ---- tests --------------------------------------------------------------------------------

def test_two_process_capture_equals_one_process(files, single, tmp_path):
    proc = torchrun(*capture_args(files, tmp_path / "store"))
    _same_store(tmp_path / "store", single / "store")
    assert proc.stdout.count("captured (") == 1  # rank 0 alone prints
    counts = [(int(a), int(b)) for a, b in re.findall(BAR, proc.stderr)]
    assert counts and {b for _, b in counts} == {N} and max(a for a, _ in counts) == N
    assert counts[0][0] == 0  # one bar over both ranks' work (a rank's own bar would start at
    #                            the other rank's share)


def test_two_process_rank_and_describe_equal_one_process(files, single, tmp_path):
    for command in ("rank", "describe"):
        out = tmp_path / f"{command}.json"
        proc = torchrun(*rank_args(files, single / "store", command), "--json", out)
        assert out.read_text() == (single / f"{command}.json").read_text()
        assert proc.stdout.count("wrote") == 1  # rank 0 alone writes
        assert "somp l1 (9 heads)" in proc.stderr  # each rank pursued 9 of the 18 heads
    assert json.loads(out.read_text())  # describe: a non-empty list


def test_killed_two_process_capture_resumes_and_equals_one_process(files, single, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_SHARDS)
    out, log = tmp_path / "store", tmp_path / "killed.log"
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    env = _env(PYTHONPATH=path, HP_FAST_TEST_SHARD_DELAY="1.5")
    with open(log, "w") as f:
        proc = subprocess.Popen(_launcher("-m", "hp_fast", *map(str, capture_args(files, out))),
                                stdout=f, stderr=f, env=env)
    deadline = time.time() + TIMEOUT
    try:
        while len(list(out.glob("manifest.part-*.json"))) < 2:  # both ranks finished a shard
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    parts = [json.loads(p.read_text()) for p in out.glob("manifest.part-*.json")]
    recorded = {s["file"] for part in parts for s in part["shards"]}
    assert 2 <= len(recorded) < -(-N // SHARD)
    before = {name: ((out / name).stat().st_ino, file_sha256(out / name)) for name in recorded}
    proc = torchrun(*capture_args(files, out))  # the same command again: resumes
    _same_store(out, single / "store")
    assert all(((out / n).stat().st_ino, file_sha256(out / n)) == st for n, st in before.items())
    first = int(re.search(BAR, proc.stderr).group(1))
    assert first >= SHARD * len(recorded)  # the bar starts at what was done


def test_python_api_in_a_user_torchrun_script(files, single, tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    out, result = tmp_path / "store", tmp_path / "result"
    torchrun(script, files / "model", files / "prompts.txt", files / "colors.txt", out, result,
             module=False)
    _same_store(out, single / "store")
    want_rank = json.loads((single / "rank.json").read_text())
    want_describe = json.loads((single / "describe.json").read_text())
    model, tok = hp_fast.load_model(str(files / "model"))
    acts = hp_fast.HeadActivations.load(single / "store", model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = [hp_fast.rank_heads(acts, model, tok, str(files / "colors.txt"), k=2 + r,
                                    progress=False).to_json() for r in (0, 1)]
    finally:
        torch.set_num_threads(threads)
    for r in (0, 1):  # the full result on every rank
        got = json.loads(Path(f"{result}.rank{r}.json").read_text())
        assert got["world"] == 2
        assert json.dumps(got["ranking"]) == json.dumps(want_rank)
        assert got["describe"] == want_describe
        assert json.dumps(got["alone"]) == json.dumps(alone[r])
        assert got["forwards"] == 0  # both refused captures stopped before any forward pass
        assert "prompt_hash" in got["errors"]["mismatch"] and "rank 1" in got["errors"]["mismatch"]
        assert "not visible on rank 1" in got["errors"]["unshared"]
    assert not (tmp_path / "store-rank1" / "manifest.json").exists()
