"""The search space: Hydra's sweep syntax (the stock optuna sweeper's) turned into Optuna distributions.

    hydra.sweeper.params:
      optim.lr: tag(log, interval(1e-4, 1e-2))   # FloatDistribution(log=True)
      optim.warmup_steps: int(interval(0, 100))  # IntDistribution
      train.global_batch: choice(16, 32, 64)     # CategoricalDistribution
      train.steps: range(100, 500, 100)          # IntDistribution(step=100): 100..400

The same expressions may stand on the command line (`-m 'optim.lr=tag(log,interval(1e-4,1e-2))'`);
a plain value there (or in params) is fixed for every trial. Each problem is a ConfigError naming the
key and what would be valid, raised before any trial starts.
"""

import math
import re
from typing import Any, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from orchestrator.validate import ConfigError

_PLAIN = re.compile(r"^[\w.\-+/:@]+$")


def encode(value: Any) -> str:
    """A value as Hydra's override grammar reads it back (`0.001`, `null`, `'a b'`, `{tp:2,pp:1}`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(encode(v) for v in value) + "]"
    text = str(value)
    if _PLAIN.match(text) and text not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _categorical(key: str, values: list) -> CategoricalDistribution:
    # Optuna keeps None, bool, int, float and str; a dict or list choice travels as its override text.
    plain = [v if v is None or isinstance(v, (bool, int, float, str)) else encode(v) for v in values]
    if not plain:
        raise ConfigError(f"{key}: no choices to search")
    return CategoricalDistribution(plain)


def distribution(key: str, override: Override, line: str) -> BaseDistribution:
    """One swept key's distribution; `line` (key=expression) names it in errors."""
    value = override.value()
    text = line
    if isinstance(value, ChoiceSweep):
        return _categorical(key, list(override.sweep_iterator()))
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise ConfigError(f"{text} is empty: range(start, stop, step) counts from start up to (not including) stop")
        if all(isinstance(v, int) for v in values) and len(values) > 1:
            return IntDistribution(values[0], values[-1], step=value.step) if value.step > 0 else _categorical(key, values)
        return _categorical(key, values)
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        log = "log" in value.tags
        if not low < high:
            raise ConfigError(f"{text} is empty: interval(low, high) needs low < high")
        if log and low <= 0:
            raise ConfigError(f"{text}: a log interval needs low > 0")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log)
        return FloatDistribution(float(low), float(high), log=log)
    raise ConfigError(f"{text}: not a search expression (valid: choice(...), range(...), interval(a, b), "
                      "int(interval(a, b)), tag(log, interval(a, b)))")


def parse(params: dict, arguments: Sequence[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """(distributions by key, fixed overrides) from hydra.sweeper.params and the command line's overrides.

    The command line wins over params for a key that both name (as in the stock optuna sweeper).
    """
    parser = OverridesParser.create()
    lines = [(f"{k}={v}", f"hydra.sweeper.params.{k}={v}") for k, v in (params or {}).items()]
    lines += [(line, line) for line in arguments]
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for line, label in lines:
        try:
            override = parser.parse_override(line)
        except Exception as e:  # Hydra's grammar errors carry the position; one line is enough here
            raise ConfigError(f"{label!r} is not a valid override: {str(e).splitlines()[0]}") from None
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            if override.is_hydra_override() or override.key_or_group.startswith("hydra"):
                raise ConfigError(f"{key}: Hydra's own settings cannot be searched")
            space[key] = distribution(key, override, label)
        else:
            fixed[key] = line
    return space, list(fixed.values())


def param_overrides(params: dict[str, Any]) -> list[str]:
    """A trial's sampled values as command-line overrides."""
    return [f"{k}={v if isinstance(v, str) and v[:1] in '{[' else encode(v)}" for k, v in params.items()]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
