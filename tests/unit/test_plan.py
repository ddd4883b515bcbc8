"""`hp-fast plan`: sizes, parameter counts, pursuit memory and times from a config alone."""
from __future__ import annotations

import json

import pytest

import hp_fast.plan as plan_mod
from hp_fast.cli import main
from hp_fast.plan import measure_gflops, model_shape, parameter_count, plan_run
from helpers.tiny_models import ARCHS, tiny_model

LLAMA3_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
              "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
              "intermediate_size": 28672, "vocab_size": 128256, "tie_word_embeddings": False}

# Hand computation for the config above (dh = 8192 / 64 = 128, KV width 8 * 128 = 1024):
#   embeddings + untied lm_head  2 * 128256 * 8192                          =  2 101 346 304
#   per layer: q, o  2 * 8192 * 8192 = 134 217 728; k, v  2 * 8192 * 1024 =  16 777 216
#              MLP   3 * 8192 * 28672                                       = 704 643 072
#              two RMSNorms 2 * 8192                                        =      16 384
#              layer total                                                  = 855 654 400
#   80 layers 68 452 352 000 + final norm 8192 + embeddings                 = 70 553 706 496
PARAMS_70B = 70_553_706_496


@pytest.fixture
def folder_70b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_70B))
    return tmp_path


@pytest.fixture
def fixed_memory(monkeypatch):
    """Pretend every device has `free` bytes, so fit checks do not depend on this machine."""
    box = {"free": 1 << 50}
    monkeypatch.setattr(plan_mod, "device_memory",
                        lambda name: {"name": name, "free_bytes": box["free"], "total_bytes": box["free"]})
    return box


def test_llama3_70b_sizes(folder_70b, fixed_memory):
    p = plan_run(folder_70b, 10_000, devices="cpu", gflops=100.0)
    assert (p["layers"], p["heads"], p["kv_heads"], p["head_dim"], p["hidden"], p["vocab"]) == \
        (80, 64, 8, 128, 8192, 128256)
    assert p["capture_bytes"] == 10000 * 80 * 64 * 128 * 4 == 26_214_400_000
    assert p["parameters"] == PARAMS_70B and abs(p["parameters"] / 1e9 - 70.55) < 0.01
    assert p["weights_bytes"] == 4 * PARAMS_70B
    assert p["shards"] == 10 and p["capture_bytes_per_shard"] == 1000 * 80 * 64 * 128 * 4
    assert plan_run(folder_70b, 10_000, shard_size=3000, devices="cpu", gflops=1.0)["shards"] == 4
    assert plan_run(folder_70b, 10_001, devices="cpu", gflops=1.0)["shards"] == 11
    assert p["warnings"] == []


def test_llama3_70b_description_memory_and_time(folder_70b, fixed_memory):
    v, n, d, r, k, heads = 128256, 10_000, 8192, 128, 5, 10
    # torch backend, per head and step: 48 v + 8 (k d + r d + n r + k k) + 4 v r (L1's F)
    per_head = 48 * v + 8 * (k * d + r * d + n * r + k * k) + 4 * v * r
    assert per_head == 90_779_848  # 10 heads = 908 MB < 1 GiB: one batch
    held = heads * n * r * 4 + heads * r * d * 4  # fp32 z and W_O slices of the described heads
    loop = (heads * per_head             # per-step state
            + (1 << 30) // 8             # start-up chunk, max(16 MiB, memory / 8)
            + heads * k * d * 4)         # support rows Q of the batch
    checks = 7 * v * d                   # isfinite(D).all(): 1.75x the fp32 dictionary, measured
    assert (held, loop, checks) == (93_143_040, 1_043_654_608, 7_354_712_064)
    expected = held + max(loop, checks)  # the input checks run before the loop allocates
    assert expected == 7_447_855_104
    p = plan_run(folder_70b, n, devices="cpu", gflops=100.0)
    assert p["describe"]["head_batch"] == heads
    assert p["describe"]["peak_bytes"] == expected
    assert p["describe"]["parts"]["state"] == heads * per_head
    bf16 = plan_run(folder_70b, n, devices="cpu", gflops=100.0, dtype="bf16")
    assert bf16["describe"]["peak_bytes"] == expected + v * d * 4  # .float() of the unembedding
    assert bf16["weights_bytes"] == 2 * PARAMS_70B
    # with a 16 GiB state budget 189 heads share a batch and the loop outgrows the checks
    big = plan_run(folder_70b, n, devices="cpu", gflops=1.0, top=200, memory=16 << 30)
    assert big["describe"]["head_batch"] == (16 << 30) // per_head == 189
    loop = 189 * per_head + (16 << 30) // 8 + 189 * k * d * 4
    assert loop > checks
    assert big["describe"]["peak_bytes"] == 200 * (n * r + r * d) * 4 + loop
    flops = heads * (k * (2 * v * n * r + v * d) + 2 * v * d * r)  # section-6 floor, L1
    assert p["describe"]["flops"] == pytest.approx(flops)
    assert p["describe"]["seconds"] == pytest.approx(flops / 100e9)
    l2 = plan_run(folder_70b, n, devices="cpu", gflops=100.0, criterion="l2")
    assert l2["describe"]["flops"] == pytest.approx(heads * (k * (v * d + 2 * v * r) + 2 * v * d * r))


def test_ranking_batches_heads_to_the_memory_budget(folder_70b, fixed_memory):
    v, n, d, r, k = 256, 10_000, 8192, 128, 50
    per_head = 48 * v + 8 * (k * d + r * d + n * r + k * k) + 4 * v * r
    p = plan_run(folder_70b, n, devices="cpu", gflops=1.0, concept_size=v, k=k)
    assert p["rank"]["head_batch"] == (1 << 30) // per_head == 48
    assert p["rank"]["parts"]["state"] == 48 * per_head
    assert p["rank"]["parts"]["z_copy"] == p["capture_bytes"]  # every head's z, fp32
    assert p["rank"]["parts"]["gram"] == v * v * 4  # atom space for a small dictionary
    assert plan_run(folder_70b, n, devices="cpu", gflops=1.0, concept_size=v, k=500)["rank"]["k"] == v


def test_warnings_when_it_does_not_fit(folder_70b, fixed_memory, capsys):
    fixed_memory["free"] = 64 << 30
    p = plan_run(folder_70b, 10_000, devices="cpu", gflops=1.0)
    assert any("weights" in w and "do not fit cpu" in w for w in p["warnings"])
    fixed_memory["free"] = 300 << 30  # weights (263 GiB) fit, weights + capture + pursuit do not
    p = plan_run(folder_70b, 10_000, devices="cpu", gflops=1.0)
    assert len(p["warnings"]) == 1 and "needs about" in p["warnings"][0]


def test_absent_cuda_device_is_reported(folder_70b):
    p = plan_run(folder_70b, 100, devices="cuda:99", gflops=1.0)
    assert any("cuda:99 is not present" in w for w in p["warnings"])


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_parameter_count_matches_the_built_model(arch):
    model = tiny_model(arch)
    shape = model_shape(model.config.to_dict())
    assert parameter_count(shape)["total"] == sum(p.numel() for p in model.parameters())


def test_mixture_of_experts_multiplies_the_mlp():
    cfg = dict(LLAMA3_70B, model_type="mixtral", num_local_experts=8, num_experts_per_tok=2)
    dense = parameter_count(model_shape(LLAMA3_70B))["total"]
    moe = parameter_count(model_shape(cfg))
    mlp, router = 3 * 8192 * 28672, 8192 * 8
    assert moe["total"] == dense + 80 * (7 * mlp + router)
    assert moe["active"] == moe["total"] - 80 * 6 * mlp


def test_vlm_uses_its_text_config():
    cfg = {"model_type": "llava", "text_config": dict(LLAMA3_70B), "vision_config": {"hidden_size": 1024}}
    assert model_shape(cfg)["hidden"] == 8192 and model_shape(cfg)["vocab"] == 128256


def test_bad_inputs_are_clear(tmp_path, folder_70b):
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        plan_run(empty, 10)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="num_prompts must be a positive"):
            plan_run(folder_70b, bad)
    (tmp_path / "mamba").mkdir()
    (tmp_path / "mamba" / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(ValueError, match="'mamba' is not supported"):
        plan_run(tmp_path / "mamba", 10)
    with pytest.raises(ValueError, match="local HF cache"):
        plan_run("nobody-xyz/not-a-cached-model", 10)  # local_files_only: no download attempted
    with pytest.raises(ValueError, match="--devices"):
        plan_run(folder_70b, 10, devices="tpu")
    with pytest.raises(ValueError, match="dtype"):
        plan_run(folder_70b, 10, dtype="int8")


def test_cli_plan_prints_and_writes_json(folder_70b, tmp_path, fixed_memory, monkeypatch, capsys):
    import hp_fast.models.loading as loading
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("plan loaded weights"))
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(folder_70b), "--prompts", "10000", "--gflops", "50",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "26,214,400,000 bytes" in text and "70.55 B" in text and "10 shard(s)" in text
    data = json.loads(out.read_text())
    assert data["capture_bytes"] == 26_214_400_000 and data["warnings"] == []
    assert main(["plan", "--model", str(tmp_path / "missing"), "--prompts", "0"]) == 2
    assert "positive" in capsys.readouterr().err


def test_measured_gemm_rate_is_positive():
    assert measure_gflops("cpu", size=64, reps=1) > 0
