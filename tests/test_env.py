"""moe_ep/env.py's table of settings against the code that reads them, and ``python -m moe_ep info``."""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from moe_ep import env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A setting is a string literal that is exactly "MOE_EP_..." (getenv's argument or a constant passed
# to it, os.environ's key); compiler defines ("-DMOE_EP_...") and prose are neither.
PY_NAME = re.compile(r"""["'](MOE_EP_[A-Z0-9_]*[A-Z0-9])["']""")
C_NAME = re.compile(r'"(MOE_EP_[A-Z0-9_]*[A-Z0-9])"')


def _names(pattern: re.Pattern, paths: list[str]) -> set[str]:
    found: set[str] = set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            found.update(pattern.findall(f.read()))
    return found


def _read_by_code() -> set[str]:
    py = [p for p in glob.glob(os.path.join(ROOT, "moe_ep", "**", "*.py"), recursive=True)
          if not os.path.basename(p).startswith("bench") and os.path.basename(p) != "env.py"]
    py += [os.path.join(ROOT, "setup.py")] + glob.glob(os.path.join(ROOT, "tests", "*.py"))
    py = [p for p in py if os.path.basename(p) != "test_env.py"]
    c = glob.glob(os.path.join(ROOT, "csrc", "**", "*.c*"), recursive=True)
    return _names(PY_NAME, py) | _names(C_NAME, c)


def test_every_setting_the_code_reads_is_in_the_table():
    missing = sorted(_read_by_code() - set(env.BY_NAME))
    assert not missing, f"read by the code but not in moe_ep/env.py's SETTINGS: {missing}"


def test_every_setting_in_the_table_is_read_somewhere():
    read = _read_by_code()
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        setup = f.read()
    with open(os.path.join(ROOT, "moe_ep", "_build_paths.py"), encoding="utf-8") as f:
        build_paths = f.read()
    stale = [s.name for s in env.SETTINGS
             if s.name not in read and f'"{s.name}"' not in setup and f'"{s.name}"' not in build_paths]
    assert not stale, f"in moe_ep/env.py's SETTINGS but read nowhere: {stale}"


def test_intranode_defaults_match_the_knobs():
    from moe_ep.comm.backends.intranode import IntranodeKnobs

    knobs = IntranodeKnobs()
    for field, var in IntranodeKnobs.ENV.items():
        assert env.BY_NAME[var].default.split(" ")[0] == str(getattr(knobs, field)), \
            f"{var}: table says {env.BY_NAME[var].default!r}, IntranodeKnobs has {getattr(knobs, field)!r}"


def test_unknown_settings_are_named():
    environ = {"MOE_EP_TIMEOUT_S": "5", "MOE_EP_TIMEOUTS": "5", "MOE_EP_LL_FUSE": "0", "PATH": "/bin"}
    assert env.unknown_settings(environ) == ["MOE_EP_LL_FUSE", "MOE_EP_TIMEOUTS"]
    rows = {r["name"]: r for r in env.rows(environ)}
    assert rows["MOE_EP_TIMEOUT_S"]["value"] == "5" and rows["MOE_EP_LL_FUSED"]["value"] is None


def _info(*args: str, extra_env: dict) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(env.PREFIX)}
    environ.update(extra_env)
    return subprocess.run([sys.executable, "-m", "moe_ep", "info", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=120)


def test_info_reports_settings_and_typos():
    done = _info(extra_env={"MOE_EP_TIMEOUT_S": "7", "MOE_EP_RECV_POOL_BYTE": "1"})
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "MOE_EP_RECV_POOL_BYTE" in out.split("WARNING")[-1], out
    line = next(l for l in out.splitlines() if l.strip().startswith("MOE_EP_TIMEOUT_S"))
    assert "* '7'" in line, line
    for call in ("get_dispatch_layout", "dispatch", "combine", "low_latency_dispatch", "low_latency_combine"):
        assert re.search(rf"^\s+{call}\s+on GPU groups: (kernels|reference \()", out, re.M), (call, out)


def test_info_json_is_consistent_with_the_build():
    done = _info("--json", extra_env={})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    ext = report["extension"]
    assert report["unknown_settings"] == []
    assert [r["name"] for r in report["settings"]] == [s.name for s in env.SETTINGS]
    assert set(ext["families_enabled"]) <= set(ext["families_built"])
    if not ext["built"]:
        assert ext["why_not"] and ext["families_built"] == [], ext
        assert all(how.startswith("reference") for how in ext["gpu_calls"].values())
    try:
        import torch
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover - torch is a dependency
        gpus = 0
    assert report["gpus"]["count"] == gpus


def test_buffer_warns_about_unknown_settings(monkeypatch, caplog):
    import torch.distributed as dist

    from moe_ep.comm import Buffer
    from moe_ep.comm import buffer as buffer_module

    if dist.is_initialized():
        pytest.skip("needs a fresh process group of one rank")
    monkeypatch.setenv("MOE_EP_EXPERIMENTAL_KERNEL", "low_latency")  # the real name ends in S
    monkeypatch.setattr(buffer_module, "_announced_backends", set())
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        with caplog.at_level(logging.WARNING, logger="moe_ep"):
            Buffer(dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    assert any("MOE_EP_EXPERIMENTAL_KERNEL" in r.getMessage() and "typo" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
