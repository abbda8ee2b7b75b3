"""Typed configs. Field docstrings (the string under each field) are the help text; every
``__post_init__`` rejects bad values with a message that says what to do."""

from __future__ import annotations

import difflib
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Union

from .errors import LorakitError

__all__ = ["LoraConfig", "from_dict", "BIAS_CHOICES"]

BIAS_CHOICES = ("none", "all", "lora_only")


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``; an unknown key is an error naming the closest known one."""
    if not isinstance(data, dict):
        raise LorakitError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise LorakitError(f"{where}: unknown key {key!r}{hint}")
    return cls(**data)


@dataclass
class LoraConfig:
    """Which modules get adapters, and their rank, scaling and init."""

    r: int = 8
    """Rank of the update B·A (A is r×in, B is out×r)."""
    alpha: float = 16.0
    """Scaling numerator: s = alpha/r (or alpha/sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training (0 = off, the fast path)."""
    target_modules: Union[list[str], str, None] = None
    """Modules to adapt: names or '.suffix' matches (list), a regex (full match), or 'all-linear'. None: the model's default."""
    exclude_modules: Union[list[str], str, None] = None
    """Modules never adapted, in the same forms as target_modules."""
    layers_to_transform: Union[list[int], int, None] = None
    """Only adapt these layer indices (the first number in a module's path)."""
    layers_pattern: Union[list[str], str, None] = None
    """Name of the layer list whose index layers_to_transform refers to (e.g. 'layers', 'h')."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module ranks: {regex: r}, matched against the end of the module path (PEFT semantics)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alphas: {regex: alpha}, like rank_pattern."""
    modules_to_save: Union[list[str], None] = None
    """Modules trained in full and saved with the adapter (e.g. ['lm_head'])."""
    bias: str = "none"
    """Which base biases train too: none | all | lora_only (biases of adapted modules)."""
    use_rslora: bool = False
    """rsLoRA scaling alpha/sqrt(r): keeps updates stable at large ranks."""
    init: str = "default"
    """A/B init: default (kaiming A, zero B: no-op at start) | gaussian | pissa | pissa_niter_<N>."""
    fan_in_fan_out: bool = False
    """Base weights stored (in, out), as GPT-2's Conv1D; set automatically for Conv1D."""
    task_type: Union[str, None] = None
    """PEFT task type written to adapter_config.json; None: CAUSAL_LM for language models, else unset."""
    base_model_name_or_path: Union[str, None] = None
    """Where the base model came from (written to adapter_config.json)."""

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise LorakitError(f"lora.r must be a positive integer (typical: 8, 16, 32), got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise LorakitError(f"lora.alpha must be a positive number (typical: 2·r), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LorakitError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise LorakitError(f"lora.bias must be one of {', '.join(BIAS_CHOICES)}, got {self.bias!r}")
        if not (self.init in ("default", "gaussian", "pissa") or re.fullmatch(r"pissa_niter_\d+", self.init)):
            raise LorakitError(
                f"lora.init must be default, gaussian, pissa or pissa_niter_<N>, got {self.init!r}")
        for key in ("target_modules", "exclude_modules"):
            value = getattr(self, key)
            if isinstance(value, (tuple, set)):
                setattr(self, key, sorted(value))
            elif isinstance(value, list) and not value:
                raise LorakitError(f"lora.{key} is an empty list; leave it unset to use the default")
            if isinstance(value, str) and value != "all-linear":
                _check_regex(value, f"lora.{key}")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        for key, table, kind in (("rank_pattern", self.rank_pattern, int), ("alpha_pattern", self.alpha_pattern, (int, float))):
            for pattern, value in table.items():
                _check_regex(pattern, f"lora.{key}[{pattern!r}]")
                if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
                    raise LorakitError(f"lora.{key}[{pattern!r}] must be a positive number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> its docstring (used as CLI help)."""
        return _field_docs(cls)


def _check_regex(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise LorakitError(f"{where}: {pattern!r} is not a valid regular expression ({err})") from None


def _field_docs(cls: type) -> dict[str, str]:
    """Read the string literal under each dataclass field from the class source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs


def default_of(cls: type, name: str) -> Any:
    """The declared default of field ``name`` of dataclass ``cls`` (so no default is written twice)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
    raise KeyError(name)
