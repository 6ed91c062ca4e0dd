"""moe_ep.config: shipped configs load, round-trip, and every bad input names file, key and the fix."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from moe_ep import config as C
from moe_ep.config import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = ["demo.yaml", "deepseek_v3.yaml", "qwen3_moe_235b.yaml", "mixtral_8x7b.yaml"]

MINIMAL_MODEL = "model:\n  hidden_size: 256\n  moe_intermediate_size: 128\n  num_experts: 16\n  top_k: 4\n"


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def demo_dict() -> dict:
    return yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())


def load_with(tmp_path: Path, section: str, key: str, value) -> C.MoEEPConfig:
    """Load the demo config with one key changed, from a file so errors carry a path."""
    data = demo_dict()
    data[section][key] = value
    return C.load(write(tmp_path, yaml.safe_dump(data)))


def raises(tmp_path: Path, *patterns: str):
    """pytest.raises(ConfigError) matching the file name and every pattern, in any order."""
    return pytest.raises(ConfigError, match="(?s)" + "".join(f"(?=.*{p})" for p in (re.escape("cfg.yaml"), *patterns)))


# ---------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    cfg = C.load(CONFIG_DIR / name)
    assert isinstance(cfg, C.MoEEPConfig)
    assert cfg.model.num_experts % cfg.parallel.ep_size == 0
    assert cfg.num_local_experts * cfg.parallel.ep_size == cfg.model.num_experts


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_spell_out_every_key(name):
    # Shipped files document the whole layout: no key left to a default.
    data = yaml.safe_load((CONFIG_DIR / name).read_text())
    assert data == C.load(CONFIG_DIR / name).to_dict()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_say_how_to_run(name):
    text = (CONFIG_DIR / name).read_text()
    assert text.startswith("#")
    assert f"python -m moe_ep run --config configs/{name} --nproc" in text


def test_real_model_dimensions():
    v3 = C.load(CONFIG_DIR / "deepseek_v3.yaml")
    assert (v3.model.hidden_size, v3.model.moe_intermediate_size, v3.model.num_experts, v3.model.top_k) == (7168, 2048, 256, 8)
    assert (v3.gating.rule, v3.gating.n_group, v3.gating.topk_group, v3.gating.routed_scaling_factor) == ("deepseek_v3", 8, 4, 2.5)
    assert v3.precision.fp8 and v3.model.num_shared_experts == 1 and v3.parallel.low_latency_max_tokens == 128
    assert v3.model.shared_intermediate_size == 2048

    qwen = C.load(CONFIG_DIR / "qwen3_moe_235b.yaml")
    assert (qwen.model.hidden_size, qwen.model.moe_intermediate_size, qwen.model.num_experts, qwen.model.top_k) == (4096, 1536, 128, 8)
    assert qwen.gating.rule == "softmax" and qwen.model.num_shared_experts == 0

    mixtral = C.load(CONFIG_DIR / "mixtral_8x7b.yaml")
    assert (mixtral.model.hidden_size, mixtral.model.moe_intermediate_size, mixtral.model.num_experts, mixtral.model.top_k) == (4096, 14336, 8, 2)
    assert mixtral.num_local_experts == 4

    demo = C.load(CONFIG_DIR / "demo.yaml")
    assert demo.precision.dtype == "float32" and not demo.precision.fp8
    assert demo.run.decode_batch <= demo.parallel.low_latency_max_tokens
    assert demo.model.hidden_size % C.FP8_ALIGNMENT == 0  # fp8 can be switched on
    dataclasses.replace(demo, precision=C.PrecisionConfig(fp8=True))


def test_fp8_alignment_matches_quantizer():
    from moe_ep.comm.fp8 import FP8_BLOCK_SIZE, FP8_GROUP_SIZE

    assert C.FP8_ALIGNMENT == FP8_GROUP_SIZE == FP8_BLOCK_SIZE


# ---------------------------------------------------------------------------- defaults, round trip


def test_minimal_file_gets_defaults():
    cfg = C.loads(MINIMAL_MODEL)
    assert cfg.gating == C.GatingConfig() and cfg.parallel == C.ParallelConfig()
    assert cfg.precision == C.PrecisionConfig() and cfg.run == C.RunConfig()
    assert cfg.parallel.num_nvl_bytes == "auto" and cfg.parallel.num_rdma_bytes == "auto"
    assert cfg.model.num_shared_experts == 0 and cfg.num_local_experts == 16


def test_empty_sections_get_defaults():
    cfg = C.loads(MINIMAL_MODEL + "gating:\nrun:\n")
    assert cfg.gating == C.GatingConfig() and cfg.run == C.RunConfig()


@pytest.mark.parametrize("name", SHIPPED)
def test_round_trip(name):
    cfg = C.load(CONFIG_DIR / name)
    d = cfg.to_dict()
    assert C.from_dict(d) == cfg
    assert C.loads(yaml.safe_dump(d)) == cfg
    assert C.loads(yaml.safe_dump(d)).to_dict() == d


def test_round_trip_explicit_buffer_bytes_and_int_scaling_factor(tmp_path):
    data = demo_dict()
    data["parallel"]["num_nvl_bytes"] = 1 << 30
    data["parallel"]["num_rdma_bytes"] = 0
    data["gating"]["routed_scaling_factor"] = 2
    cfg = C.load(write(tmp_path, yaml.safe_dump(data)))
    assert cfg.parallel.num_nvl_bytes == 1 << 30 and cfg.parallel.num_rdma_bytes == 0
    assert isinstance(cfg.gating.routed_scaling_factor, float)
    assert C.loads(yaml.safe_dump(cfg.to_dict())) == cfg


def test_frozen_and_torch_dtype():
    import torch

    cfg = C.load(CONFIG_DIR / "demo.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.parallel.ep_size = 4  # type: ignore[misc]
    assert cfg.precision.torch_dtype is torch.float32
    assert C.PrecisionConfig().torch_dtype is torch.bfloat16


def test_python_construction_is_validated_too():
    model = C.ModelConfig(hidden_size=256, moe_intermediate_size=128, num_experts=16, top_k=4)
    with pytest.raises(ConfigError, match=r"^parallel\.ep_size: must divide model\.num_experts \(16\)"):
        C.MoEEPConfig(model=model, parallel=C.ParallelConfig(ep_size=3))


# ---------------------------------------------------------------------------- errors


def test_file_not_found(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing)) + ".*not found"):
        C.load(missing)


def test_invalid_yaml(tmp_path):
    with raises(tmp_path, "invalid YAML"):
        C.load(write(tmp_path, "model: [unclosed\n"))


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path, text):
    with raises(tmp_path, "top level must be a mapping", "model, gating, parallel, precision, run"):
        C.load(write(tmp_path, text))


def test_section_not_a_mapping(tmp_path):
    with raises(tmp_path, r"parallel: expected a mapping", "list"):
        C.load(write(tmp_path, MINIMAL_MODEL + "parallel: [1, 2]\n"))


def test_unknown_section(tmp_path):
    with raises(tmp_path, r"paralel: unknown section", "did you mean 'parallel'", "allowed: model, gating"):
        C.load(write(tmp_path, MINIMAL_MODEL + "paralel:\n  ep_size: 2\n"))


def test_unknown_key(tmp_path):
    with raises(tmp_path, r"parallel\.ep_sise: unknown key", "did you mean 'ep_size'", "allowed: ep_size, num_sms"):
        C.load(write(tmp_path, MINIMAL_MODEL + "parallel:\n  ep_sise: 2\n"))


def test_unknown_key_without_close_match(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.zzz: unknown key; allowed: prefill_tokens") as info:
        C.load(write(tmp_path, MINIMAL_MODEL + "run:\n  zzz: 1\n"))
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("key", ["hidden_size", "moe_intermediate_size", "num_experts", "top_k"])
def test_missing_required_model_key(tmp_path, key):
    data = demo_dict()
    del data["model"][key]
    with raises(tmp_path, rf"model\.{key}: missing required key", "hidden_size, moe_intermediate_size, num_experts, top_k"):
        C.load(write(tmp_path, yaml.safe_dump(data)))


def test_missing_model_section(tmp_path):
    with raises(tmp_path, r"model\.hidden_size: missing required key"):
        C.load(write(tmp_path, "parallel:\n  ep_size: 2\n"))


def test_empty_file(tmp_path):
    with raises(tmp_path, r"model\.hidden_size: missing required key"):
        C.load(write(tmp_path, "# nothing here\n"))


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("parallel", "ep_size", True),
        ("model", "num_experts", False),
        ("model", "top_k", True),
        ("run", "decode_batch", True),
    ],
)
def test_bool_rejected_where_int_expected(tmp_path, section, key, value):
    with raises(tmp_path, rf"{section}\.{key}: expected an integer", "got bool", "yes/no/on/off"):
        load_with(tmp_path, section, key, value)


def test_yaml_yes_is_a_bool_not_an_int(tmp_path):
    text = (CONFIG_DIR / "demo.yaml").read_text().replace("ep_size: 2 ", "ep_size: yes ")
    assert "ep_size: yes" in text
    with raises(tmp_path, r"parallel\.ep_size: expected an integer", r"got bool \(true\)"):
        C.load(write(tmp_path, text))


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("model", "hidden_size", "256", "expected an integer"),
        ("model", "hidden_size", 256.0, "expected an integer"),
        ("model", "num_layers", None, "expected an integer"),
        ("gating", "norm_topk_prob", 1, "expected true or false"),
        ("gating", "norm_topk_prob", "true", "expected true or false"),
        ("precision", "fp8", "yes please", "expected true or false"),
        ("gating", "routed_scaling_factor", "1e-3", "expected a number"),
        ("gating", "routed_scaling_factor", True, "expected a number"),
        ("gating", "rule", 3, "expected one of deepseek_v3, deepseek_v2, softmax"),
        ("parallel", "num_nvl_bytes", "big", r"expected an integer >= 0 \(bytes\) or 'auto'"),
        ("parallel", "num_rdma_bytes", True, r"expected an integer >= 0 \(bytes\) or 'auto'"),
        ("parallel", "num_nvl_bytes", -1, r"expected an integer >= 0 \(bytes\) or 'auto'"),
        ("parallel", "recv_pool_bytes", -1, r"expected an integer >= 0 \(bytes\) or 'auto'"),
        ("parallel", "recv_pool_bytes", "lots", r"expected an integer >= 0 \(bytes\) or 'auto'"),
    ],
)
def test_wrong_types(tmp_path, section, key, value, expected):
    with raises(tmp_path, rf"{section}\.{key}: {expected}"):
        load_with(tmp_path, section, key, value)


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("model", "hidden_size", 0, "must be >= 1"),
        ("model", "num_shared_experts", -1, "must be >= 0"),
        ("model", "num_layers", 0, "must be >= 1"),
        ("parallel", "ep_size", 0, "must be >= 1"),
        ("parallel", "low_latency_max_tokens", 0, "must be >= 1"),
        ("gating", "routed_scaling_factor", 0.0, "must be > 0"),
        ("gating", "n_group", 0, "must be >= 1"),
        ("run", "prefill_tokens", 0, "must be >= 1"),
        ("run", "decode_steps", -1, "must be >= 0"),
        ("run", "seed", -5, "must be >= 0"),
    ],
)
def test_out_of_range(tmp_path, section, key, value, expected):
    with raises(tmp_path, rf"{section}\.{key}: {expected}"):
        load_with(tmp_path, section, key, value)


def test_ep_size_must_divide_num_experts(tmp_path):
    with raises(tmp_path, r"parallel\.ep_size: must divide model\.num_experts \(16\), got 3", "allowed: 1, 2, 4, 8, 16"):
        load_with(tmp_path, "parallel", "ep_size", 3)


@pytest.mark.parametrize("key", ["hidden_size", "moe_intermediate_size"])
def test_fp8_needs_multiple_of_128(tmp_path, key):
    data = demo_dict()
    data["precision"]["fp8"] = True
    data["model"][key] = 192
    with raises(tmp_path, rf"model\.{key}: must be a multiple of 128 when precision\.fp8 is true", "got 192"):
        C.load(write(tmp_path, yaml.safe_dump(data)))
    data["precision"]["fp8"] = False
    assert getattr(C.load(write(tmp_path, yaml.safe_dump(data))).model, key) == 192


def test_fp8_round_scale_needs_fp8(tmp_path):
    with raises(tmp_path, r"precision\.fp8_round_scale: true needs precision\.fp8: true"):
        load_with(tmp_path, "precision", "fp8_round_scale", True)


def test_n_group_must_divide_num_experts(tmp_path):
    with raises(tmp_path, r"gating\.n_group: must divide model\.num_experts \(16\), got 3", "allowed: 1, 2, 4, 8, 16"):
        load_with(tmp_path, "gating", "n_group", 3)


def test_topk_group_at_most_n_group(tmp_path):
    with raises(tmp_path, r"gating\.topk_group: must be <= gating\.n_group \(4\), got 5"):
        load_with(tmp_path, "gating", "topk_group", 5)


def test_top_k_at_most_num_experts(tmp_path):
    data = demo_dict()
    data["gating"] = {"rule": "softmax"}
    data["model"]["top_k"] = 17
    with raises(tmp_path, r"model\.top_k: must be <= model\.num_experts \(16\), got 17"):
        C.load(write(tmp_path, yaml.safe_dump(data)))


@pytest.mark.parametrize("rule", ["deepseek_v3", "deepseek_v2"])
def test_top_k_reachable_through_groups(tmp_path, rule):
    # 4 groups of 4 experts, 1 group per token: at most 4 experts can be chosen.
    data = demo_dict()
    data["gating"].update(rule=rule, n_group=4, topk_group=1)
    data["model"]["top_k"] = 5
    data["run"]["decode_batch"] = 8
    with raises(tmp_path, r"model\.top_k: must be <= gating\.topk_group \* \(model\.num_experts / gating\.n_group\) = 1 \* 4 = 4", f"rule {rule}", "got 5"):
        C.load(write(tmp_path, yaml.safe_dump(data)))


def test_softmax_ignores_groups_for_top_k(tmp_path):
    data = demo_dict()
    data["gating"].update(rule="softmax", n_group=4, topk_group=1)
    data["model"]["top_k"] = 5
    assert C.load(write(tmp_path, yaml.safe_dump(data))).model.top_k == 5


def test_deepseek_v3_needs_two_experts_per_group(tmp_path):
    data = demo_dict()
    data["gating"].update(n_group=16, topk_group=4)
    with raises(tmp_path, r"gating\.n_group: rule deepseek_v3 needs >= 2 experts per group", "got 1"):
        C.load(write(tmp_path, yaml.safe_dump(data)))
    data["gating"]["rule"] = "deepseek_v2"
    assert C.load(write(tmp_path, yaml.safe_dump(data))).gating.n_group == 16


@pytest.mark.parametrize("value", [23, 1, 0])
def test_num_sms_even_and_at_least_two(tmp_path, value):
    expected = "must be even" if value == 23 else "must be >= 2"
    with raises(tmp_path, rf"parallel\.num_sms: {expected}", f"got {value}"):
        load_with(tmp_path, "parallel", "num_sms", value)


def test_decode_batch_at_most_low_latency_max_tokens(tmp_path):
    with raises(tmp_path, r"run\.decode_batch: must be <= parallel\.low_latency_max_tokens \(16\), got 17"):
        load_with(tmp_path, "run", "decode_batch", 17)


@pytest.mark.parametrize(
    "section, key, value, allowed, suggestion",
    [
        ("gating", "rule", "deepseek_v4", "deepseek_v3, deepseek_v2, softmax", "deepseek_v3"),
        ("gating", "rule", "topk", "deepseek_v3, deepseek_v2, softmax", None),
        ("parallel", "default_phase", "prefil", "prefill, decode, auto", "prefill"),
        ("precision", "dtype", "float16", "bfloat16, float32", "bfloat16"),
    ],
)
def test_unknown_enum_values(tmp_path, section, key, value, allowed, suggestion):
    patterns = [rf"{section}\.{key}: '{value}' is not allowed", f"allowed: {allowed}"]
    if suggestion:
        patterns.append(f"did you mean '{suggestion}'")
    with raises(tmp_path, *patterns):
        load_with(tmp_path, section, key, value)


def test_loads_names_its_source():
    with pytest.raises(ConfigError, match=r"^<string>: parallel\.ep_size: must divide"):
        C.loads(MINIMAL_MODEL + "parallel:\n  ep_size: 3\n")
    with pytest.raises(ConfigError, match=r"^cli-override: parallel\.ep_size: must divide") as info:
        C.loads(MINIMAL_MODEL + "parallel:\n  ep_size: 3\n", source="cli-override")
    err = info.value
    assert (err.source, err.key) == ("cli-override", "parallel.ep_size")
    assert isinstance(err, ValueError)


def test_error_pickles():
    # Ranks started by a launcher may send the error back to the parent process.
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("parallel.ep_size", "must divide", "f.yaml")))
    assert (err.key, err.problem, err.source, str(err)) == ("parallel.ep_size", "must divide", "f.yaml", "f.yaml: parallel.ep_size: must divide")


# ------------------------------------------------------------------ intranode kernel knobs
def test_intranode_knobs_defaults_and_env(monkeypatch):
    from moe_ep.comm.backends.intranode import IntranodeKnobs

    for var in IntranodeKnobs.ENV.values():
        monkeypatch.delenv(var, raising=False)
    assert IntranodeKnobs.from_env() == IntranodeKnobs(unroll=8, chunk_rows=4, send_warps=6, combine_send_warps=4,
                                                       combine_staged_vectors=16, direct_send_warps=0)
    assert IntranodeKnobs().launch_tuple(2)[5] == 8 and IntranodeKnobs().launch_tuple(4)[5] == 12
    monkeypatch.setenv("MOE_EP_INTRANODE_CHUNK_ROWS", "32")
    monkeypatch.setenv("MOE_EP_INTRANODE_SEND_WARPS", " 12 ")
    monkeypatch.setenv("MOE_EP_INTRANODE_COMBINE_SEND_WARPS", "2")
    monkeypatch.setenv("MOE_EP_INTRANODE_COMBINE_STAGED_VECTORS", "0")
    monkeypatch.setenv("MOE_EP_INTRANODE_DIRECT_SEND_WARPS", "6")
    assert IntranodeKnobs.from_env().astuple() == (8, 32, 12, 2, 0, 6)
    assert IntranodeKnobs.from_env().launch_tuple(2) == (8, 32, 12, 2, 0, 6)


@pytest.mark.parametrize("var,value", [("MOE_EP_INTRANODE_CHUNK_ROWS", "7"), ("MOE_EP_INTRANODE_UNROLL", "eight"),
                                       ("MOE_EP_INTRANODE_SEND_WARPS", "16"),
                                       ("MOE_EP_INTRANODE_COMBINE_SEND_WARPS", "3"),
                                       ("MOE_EP_INTRANODE_COMBINE_STAGED_VECTORS", "8"),
                                       ("MOE_EP_INTRANODE_DIRECT_SEND_WARPS", "16")])
def test_intranode_knobs_reject_bad_values_naming_the_variable(monkeypatch, var, value):
    from moe_ep.comm.backends.intranode import IntranodeKnobs

    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        IntranodeKnobs.from_env()


# ------------------------------------------------------------------ low-latency combine partials
def _w_agreed_partials(ctx, settings: list) -> object:
    """This rank sets MOE_EP_LL_COMBINE_PARTIALS to settings[rank] ('' = unset) and asks the group."""
    from moe_ep.comm.backends.low_latency import PARTIALS_ENV, _agreed_bf16_partials
    from tests.env import environ

    with environ(**{PARTIALS_ENV: settings[ctx.rank]}):
        try:
            return _agreed_bf16_partials(ctx.group)
        except ValueError as error:
            return f"ValueError: {error}"


@pytest.mark.parametrize("settings,expected", [
    (["", ""], [True, True]),  # unset: bfloat16, the default
    (["float32", "float32"], [False, False]),
    (["bfloat16", "bfloat16"], [True, True]),
    (["bfloat16", "float32"], ["differs"] * 2),
    (["fp16", "fp16"], ["must be one of"] * 2),
])
def test_ll_combine_partials_are_agreed_by_every_rank(dist_pool, settings, expected):
    """The partials' dtype is part of the low-latency combine's protocol (the sender writes what the
    receiver reads): a setting that differs across ranks, or a bad one, raises on EVERY rank (no
    rank is left waiting in a collective), naming the variable."""
    results = dist_pool(2).run(_w_agreed_partials, settings)
    for got, want in zip(results, expected):
        if isinstance(want, bool):
            assert got is want, results
        else:
            assert isinstance(got, str) and "MOE_EP_LL_COMBINE_PARTIALS" in got and want in got, results
