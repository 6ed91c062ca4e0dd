"""YAML run configs: one typed, validated description of a model's MoE layer and how to run it.

A file has up to five sections (``model``, ``gating``, ``parallel``, ``precision``, ``run``), each
mapped onto a frozen dataclass below. Everything except the four model dimensions that define an
MoE layer has a default, so a file may give only what differs. Validation happens at load time,
before any process group or GPU memory exists, and every error names the file, the dotted key
and what would have been accepted::

    cfg = moe_ep.config.load("configs/deepseek_v3.yaml")
    cfg.parallel.ep_size, cfg.num_local_experts

The dataclasses validate themselves in ``__post_init__`` too, so configs built in Python (tests,
``dataclasses.replace``) get the same checks as loaded ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Union

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "GatingConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "RunConfig",
    "MoEEPConfig",
    "load",
    "loads",
    "from_dict",
]

# FP8 quantizes activations in groups of 128 hidden elements and weights in 128x128 blocks; must
# equal moe_ep.comm.fp8.FP8_GROUP_SIZE (a test checks). Not imported from there so that reading a
# config never imports the communication package.
FP8_ALIGNMENT = 128

GATING_RULES = ("deepseek_v3", "deepseek_v2", "softmax")
PHASES = ("prefill", "decode", "auto")
DTYPES = ("bfloat16", "float32")
AUTO = "auto"

GatingRule = Literal["deepseek_v3", "deepseek_v2", "softmax"]
Phase = Literal["prefill", "decode", "auto"]
DType = Literal["bfloat16", "float32"]
BufferBytes = Union[int, Literal["auto"]]


class ConfigError(ValueError):
    """A config that cannot run. ``source`` is the file (or ``<string>``), ``key`` the dotted key
    (empty for whole-file problems); the message carries both so a traceback alone is enough."""

    def __init__(self, key: str, problem: str, source: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {problem}" if where else problem)

    def __reduce__(self):
        # Exceptions pickle as cls(*args); keep the three fields across process boundaries.
        return (type(self), (self.key, self.problem, self.source))


# --------------------------------------------------------------------------------------------
# Field checks. They raise ConfigError without a source; load()/loads() add it.


def _yaml_type(value: Any) -> str:
    """Name a value's type as the YAML author wrote it, not as Python sees it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"bool ({str(value).lower()})"
    if isinstance(value, int):
        return f"int ({value})"
    if isinstance(value, float):
        return f"float ({value})"
    if isinstance(value, str):
        return f"string ({value!r})"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


def _check_int(key: str, value: Any, minimum: int | None = None) -> None:
    # bool is a subclass of int, and YAML turns yes/no/on/off/true/false into bools: a bare
    # isinstance(value, int) would quietly read `ep_size: yes` as 1.
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " (YAML reads yes/no/on/off/true/false as booleans)" if isinstance(value, bool) else ""
        allowed = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ConfigError(key, f"expected {allowed}, got {_yaml_type(value)}{hint}")
    if minimum is not None and value < minimum:
        raise ConfigError(key, f"must be >= {minimum}, got {value}")


def _check_float(key: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # PyYAML follows YAML 1.1: `1e-3` (no dot) is a string, `1.0e-3` a float.
        hint = " (write exponents with a dot, e.g. 1.0e-3)" if isinstance(value, str) else ""
        raise ConfigError(key, f"expected a number, got {_yaml_type(value)}{hint}")
    if positive and not value > 0:
        raise ConfigError(key, f"must be > 0, got {value}")
    return float(value)


def _check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {_yaml_type(value)}")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if isinstance(value, str) and value in choices:
        return
    allowed = ", ".join(choices)
    if isinstance(value, str):
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(key, f"{value!r} is not allowed{hint}; allowed: {allowed}")
    raise ConfigError(key, f"expected one of {allowed}, got {_yaml_type(value)}")


def _check_buffer_bytes(key: str, value: Any) -> None:
    if value == AUTO and isinstance(value, str):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, f"expected an integer >= 0 (bytes) or 'auto', got {_yaml_type(value)}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


# --------------------------------------------------------------------------------------------
# Sections.


@dataclass(frozen=True)
class ModelConfig:
    """Shape of one MoE layer (and how many of them the demo stacks)."""

    SECTION: ClassVar[str] = "model"
    REQUIRED: ClassVar[tuple[str, ...]] = ("hidden_size", "moe_intermediate_size", "num_experts", "top_k")

    hidden_size: int
    """Model width H: the row size dispatch/combine move. Multiple of 128 when ``precision.fp8``."""
    moe_intermediate_size: int
    """Intermediate size of one routed expert's SwiGLU MLP. Multiple of 128 when ``precision.fp8``."""
    num_experts: int
    """Routed experts in the layer (all ranks together); >= 1."""
    top_k: int
    """Routed experts each token goes to; 1 <= top_k <= num_experts."""
    num_shared_experts: int = 0
    """Shared experts every token also goes through, as one local MLP of intermediate size
    ``moe_intermediate_size * num_shared_experts`` (DeepSeek's layout); 0 = none."""
    num_layers: int = 2
    """Layers of the small transformer stack the demo builds (not the real model's depth); >= 1."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _check_int(f"{s}.hidden_size", self.hidden_size, minimum=1)
        _check_int(f"{s}.moe_intermediate_size", self.moe_intermediate_size, minimum=1)
        _check_int(f"{s}.num_experts", self.num_experts, minimum=1)
        _check_int(f"{s}.top_k", self.top_k, minimum=1)
        _check_int(f"{s}.num_shared_experts", self.num_shared_experts, minimum=0)
        _check_int(f"{s}.num_layers", self.num_layers, minimum=1)
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"{s}.top_k", f"must be <= model.num_experts ({self.num_experts}), got {self.top_k}"
            )

    @property
    def shared_intermediate_size(self) -> int:
        """Intermediate size of the fused shared-expert MLP (0 when there is none)."""
        return self.moe_intermediate_size * self.num_shared_experts


@dataclass(frozen=True)
class GatingConfig:
    """How the router turns logits into top-k experts and weights.

    ``deepseek_v3``: sigmoid scores plus a per-expert bias for selection, groups ranked by the sum
    of their two best scores. ``deepseek_v2``: softmax scores, groups ranked by their best score.
    ``softmax``: plain softmax top-k (Mixtral, Qwen3); ``n_group``/``topk_group`` are ignored.
    """

    SECTION: ClassVar[str] = "gating"

    rule: GatingRule = "softmax"
    """deepseek_v3 | deepseek_v2 | softmax."""
    n_group: int = 1
    """Expert groups for group-limited routing (DeepSeek's device/node limit); divides num_experts."""
    topk_group: int = 1
    """Groups a token may pick experts from; 1 <= topk_group <= n_group."""
    norm_topk_prob: bool = True
    """Renormalize the chosen top-k weights to sum to 1 (true for V3, Qwen3, Mixtral; false for V2)."""
    routed_scaling_factor: float = 1.0
    """Multiplier on routed-expert weights (2.5 in DeepSeek-V3); > 0."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _check_choice(f"{s}.rule", self.rule, GATING_RULES)
        _check_int(f"{s}.n_group", self.n_group, minimum=1)
        _check_int(f"{s}.topk_group", self.topk_group, minimum=1)
        _check_bool(f"{s}.norm_topk_prob", self.norm_topk_prob)
        # Frozen: store the int a YAML author may write (`1`) as the float the router uses.
        object.__setattr__(
            self, "routed_scaling_factor", _check_float(f"{s}.routed_scaling_factor", self.routed_scaling_factor, positive=True)
        )
        if self.topk_group > self.n_group:
            raise ConfigError(
                f"{s}.topk_group", f"must be <= gating.n_group ({self.n_group}), got {self.topk_group}"
            )

    @property
    def is_group_limited(self) -> bool:
        """Whether n_group/topk_group restrict selection (only the DeepSeek rules group experts)."""
        return self.rule in ("deepseek_v3", "deepseek_v2")


@dataclass(frozen=True)
class ParallelConfig:
    """How experts are spread over ranks and what the communication Buffer gets."""

    SECTION: ClassVar[str] = "parallel"

    ep_size: int = 1
    """Ranks the experts are sharded over (launch this many: ``--nproc``); divides num_experts.
    Default 1 because it is the only size valid for every model."""
    num_sms: int = 24
    """SMs the normal (prefill) kernels may hold; even (one sender and one receiver per channel), >= 2."""
    num_nvl_bytes: BufferBytes = AUTO
    """Intranode buffer bytes, or "auto": kept as the string here; the Buffer (or the runner) sizes
    it from the model and rank count via ``moe_ep.comm.config`` hints."""
    num_rdma_bytes: BufferBytes = AUTO
    """Internode / low-latency buffer bytes, or "auto" (same as ``num_nvl_bytes``)."""
    low_latency_max_tokens: int = 128
    """``num_max_dispatch_tokens_per_rank`` of the low-latency (decode) path: the low-latency buffers
    have a slot per (expert, rank, token) up to this many tokens per rank; >= 1."""
    default_phase: Phase = "auto"
    """Which kernels the MoE layer uses when the caller does not say: prefill (normal), decode
    (low-latency), or auto (decode when a rank's batch fits ``low_latency_max_tokens``)."""
    recv_pool_bytes: BufferBytes = "auto"
    """Bytes per rank of the intranode receive pool (prefill dispatch outputs that peers store rows
    straight into, and combine inputs that peers read in place: fewer passes over the data, more
    memory); "auto" (the default since the 2-GPU run of README's rule): two dispatches' outputs and
    one combine input of 4096 tokens per rank (240 MiB for DeepSeek-V3's FP8 dispatch on 2 ranks),
    unless MOE_EP_RECV_POOL_BYTES is set; 0: off unless MOE_EP_RECV_POOL_BYTES sets it."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _check_int(f"{s}.ep_size", self.ep_size, minimum=1)
        _check_int(f"{s}.num_sms", self.num_sms, minimum=2)
        if self.num_sms % 2:
            raise ConfigError(f"{s}.num_sms", f"must be even (one sender and one receiver SM per channel), got {self.num_sms}")
        _check_buffer_bytes(f"{s}.num_nvl_bytes", self.num_nvl_bytes)
        _check_buffer_bytes(f"{s}.num_rdma_bytes", self.num_rdma_bytes)
        _check_int(f"{s}.low_latency_max_tokens", self.low_latency_max_tokens, minimum=1)
        _check_choice(f"{s}.default_phase", self.default_phase, PHASES)
        _check_buffer_bytes(f"{s}.recv_pool_bytes", self.recv_pool_bytes)


@dataclass(frozen=True)
class PrecisionConfig:
    """Numeric formats of activations, expert GEMMs and dispatch payloads."""

    SECTION: ClassVar[str] = "precision"

    dtype: DType = "bfloat16"
    """bfloat16 | float32. Activations and weights; float32 is for exact CPU checks."""
    fp8: bool = False
    """FP8 (e4m3) expert GEMMs with 128x128 weight blocks, and FP8 rows with per-128 scales in dispatch."""
    fp8_round_scale: bool = False
    """Round FP8 scales up to powers of two (UE8M0, DeepGEMM's / Blackwell's format). Needs ``fp8``."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _check_choice(f"{s}.dtype", self.dtype, DTYPES)
        _check_bool(f"{s}.fp8", self.fp8)
        _check_bool(f"{s}.fp8_round_scale", self.fp8_round_scale)
        if self.fp8_round_scale and not self.fp8:
            # Nothing would be quantized, so the setting would silently do nothing.
            raise ConfigError(f"{s}.fp8_round_scale", "true needs precision.fp8: true (nothing is quantized otherwise)")

    @property
    def torch_dtype(self):
        """The ``torch.dtype`` for ``dtype`` (torch imported lazily: reading a config needs no torch)."""
        import torch

        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[self.dtype]


@dataclass(frozen=True)
class RunConfig:
    """The demo job of ``python -m moe_ep run``: one prefill batch, then a few decode steps."""

    SECTION: ClassVar[str] = "run"

    prefill_tokens: int = 256
    """Tokens per rank in the prefill batch (normal kernels); >= 1."""
    decode_steps: int = 4
    """Decode steps after prefill (low-latency kernels); 0 skips decode."""
    decode_batch: int = 16
    """Tokens per rank per decode step; 1 <= decode_batch <= parallel.low_latency_max_tokens."""
    seed: int = 0
    """Seed for weights and inputs, so every rank builds the same model; >= 0."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _check_int(f"{s}.prefill_tokens", self.prefill_tokens, minimum=1)
        _check_int(f"{s}.decode_steps", self.decode_steps, minimum=0)
        _check_int(f"{s}.decode_batch", self.decode_batch, minimum=1)
        _check_int(f"{s}.seed", self.seed, minimum=0)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "gating": GatingConfig,
    "parallel": ParallelConfig,
    "precision": PrecisionConfig,
    "run": RunConfig,
}


@dataclass(frozen=True)
class MoEEPConfig:
    """A whole config file. ``__post_init__`` holds the checks that span sections."""

    model: ModelConfig
    gating: GatingConfig = field(default_factory=GatingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        m, g, p = self.model, self.gating, self.parallel
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(name, f"expected a {cls.__name__}, got {type(getattr(self, name)).__name__}")

        if m.num_experts % p.ep_size:
            raise ConfigError(
                "parallel.ep_size",
                f"must divide model.num_experts ({m.num_experts}), got {p.ep_size}; allowed: {_divisors(m.num_experts)}",
            )

        if self.precision.fp8:
            for key in ("hidden_size", "moe_intermediate_size"):
                value = getattr(m, key)
                if value % FP8_ALIGNMENT:
                    raise ConfigError(
                        f"model.{key}",
                        f"must be a multiple of {FP8_ALIGNMENT} when precision.fp8 is true "
                        f"(FP8 scales cover groups of {FP8_ALIGNMENT}), got {value}",
                    )

        if m.num_experts % g.n_group:
            raise ConfigError(
                "gating.n_group",
                f"must divide model.num_experts ({m.num_experts}), got {g.n_group}; allowed: {_divisors(m.num_experts)}",
            )
        if g.is_group_limited:
            experts_per_group = m.num_experts // g.n_group
            reachable = g.topk_group * experts_per_group
            if m.top_k > reachable:
                raise ConfigError(
                    "model.top_k",
                    f"must be <= gating.topk_group * (model.num_experts / gating.n_group) = "
                    f"{g.topk_group} * {experts_per_group} = {reachable} for rule {g.rule}, got {m.top_k}",
                )
            if g.rule == "deepseek_v3" and experts_per_group < 2:
                # V3 ranks a group by the sum of its two best experts' scores.
                raise ConfigError(
                    "gating.n_group",
                    f"rule deepseek_v3 needs >= 2 experts per group (model.num_experts / gating.n_group), "
                    f"got {experts_per_group}; allowed: divisors of {m.num_experts} up to {m.num_experts // 2}",
                )

        if self.run.decode_batch > p.low_latency_max_tokens:
            raise ConfigError(
                "run.decode_batch",
                f"must be <= parallel.low_latency_max_tokens ({p.low_latency_max_tokens}), got {self.run.decode_batch}",
            )

    @property
    def num_local_experts(self) -> int:
        """Routed experts each rank holds."""
        return self.model.num_experts // self.parallel.ep_size

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict in file layout; ``from_dict(cfg.to_dict()) == cfg``."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading.


def _unknown_key(key: Any, valid: list[str], prefix: str) -> ConfigError:
    name = str(key)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    what = "key" if prefix else "section"
    return ConfigError(f"{prefix}{name}", f"unknown {what}{hint}; allowed: {', '.join(valid)}")


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:  # a section header with every key commented out
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(name, f"expected a mapping of keys, got {_yaml_type(raw)}")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in valid:
            raise _unknown_key(key, valid, f"{name}.")
    for key in getattr(cls, "REQUIRED", ()):
        if key not in raw:
            required = ", ".join(cls.REQUIRED)
            raise ConfigError(f"{name}.{key}", f"missing required key; {name} needs: {required}")
    return cls(**raw)


def from_dict(data: Any, source: str | None = None) -> MoEEPConfig:
    """Build and validate a config from parsed YAML (or ``to_dict()`` output)."""
    try:
        if data is None:  # empty file: fall through to the missing-model error
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError("", f"top level must be a mapping of sections ({', '.join(_SECTIONS)}), got {_yaml_type(data)}")
        for key in data:
            if key not in _SECTIONS:
                raise _unknown_key(key, list(_SECTIONS), "")
        sections = {name: _build_section(name, cls, data.get(name)) for name, cls in _SECTIONS.items()}
        return MoEEPConfig(**sections)
    except ConfigError as err:
        if source is None:
            raise
        raise ConfigError(err.key, err.problem, source) from None


def loads(text: str, source: str = "<string>") -> MoEEPConfig:
    """Parse YAML text; ``source`` names it in errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError("", f"invalid YAML: {err}", source) from None
    return from_dict(data, source)


def load(path: str | os.PathLike[str]) -> MoEEPConfig:
    """Read and validate a YAML config file."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("", f"config file not found (looked at {os.path.abspath(source)})", source) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise ConfigError("", f"cannot read config file: {err}", source) from None
    return loads(text, source)
