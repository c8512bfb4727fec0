"""resolve_options: what the backend, find(), the CLI and sq.compile make of the options they are
given (a QuantConfig, or flat data with an optional "preset"), including the two steps that read
files: adopting a save's options (`load`) and allocating formats from measured sensitivity
(format="auto"). config.py stays a leaf; these steps live here, above it."""
from __future__ import annotations

from collections.abc import Mapping

from segquant_compile.allocation import allocate
from segquant_compile.config import AUTO, GROUPS, OPTION_GROUP, QuantConfig
from segquant_compile.saved_files import saved_options
from segquant_compile.presets import PRESETS
from segquant_compile.sensitivity_report import Sensitivity

# options that say how to run, not what the saved numbers are: never adopted from a save
RUN_OPTIONS = tuple(f for f, g in OPTION_GROUP.items() if GROUPS[g] is GROUPS["run"])


def resolve_options(options: QuantConfig | Mapping | None = None, mode: str | None = None) -> QuantConfig:
    """The QuantConfig of `options`: flat options (`{"preset": name, **overrides}`) or a
    QuantConfig; `mode` is torch.compile's (it refuses mode= beside options=, so it is an option
    too). Unknown options and wrong types are errors naming the expected values."""
    options = expand_preset(options)
    if options.get("load") is not None:
        options = _adopt_saved(options)
    if mode is not None:
        if "mode" in options and options["mode"] != mode:
            raise ValueError(f"segquant: mode {mode!r} and options['mode'] {options['mode']!r} disagree")
        options["mode"] = mode
    config = QuantConfig.from_flat(options)
    if config.format == AUTO and not config.formats:
        config = config.replace(formats=_allocated(config))
    return config


def expand_preset(options: QuantConfig | Mapping | None) -> dict:
    """Flat options: a preset's with the given ones over them; a QuantConfig's every option."""
    if isinstance(options, QuantConfig):
        return options.to_flat()
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"segquant options must be a dict or a QuantConfig, got {type(options).__name__}")
    options = dict(options or {})
    name = options.pop("preset", None)
    if name is None:
        return options
    if isinstance(name, QuantConfig):
        return {**name.to_flat(), **options}
    if name not in PRESETS:
        raise ValueError(f"invalid value {name!r} for segquant option 'preset'; valid values: {sorted(PRESETS)}")
    return {**PRESETS[name], **options}


def _allocated(config: QuantConfig) -> tuple[tuple[str, str], ...]:
    """format="auto": per site, the format the allocation picks from the measured sensitivity."""
    try:
        measured = Sensitivity.load(config.sensitivity)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"option 'sensitivity': {e}") from None
    chosen = allocate(measured, **{str(k): v for k, v in config.budget})
    return tuple(chosen.formats.items())


def _adopt_saved(options: dict) -> dict:
    """options={'load': path} alone is enough: the options the save was made with fill every
    option not given; one given with another value is an error naming both (the saved numbers
    would not match it)."""
    path = options["load"]
    if not isinstance(path, (str, bytes)) and not hasattr(path, "__fspath__"):
        return options   # QuantConfig names the bad type
    saved = {k: v for k, v in saved_options(path).items() if k in OPTION_GROUP and k not in RUN_OPTIONS}
    for key, value in saved.items():
        if key in options and not _same(options[key], value):
            raise ValueError(f"segquant: options[{key!r}]={options[key]!r} conflicts with {path}, saved with "
                             f"another plan or options ({key}={value!r}); drop {key!r} to adopt the saved value")
    return {**saved, **options}


def _same(given, saved) -> bool:
    """Compared as JSON holds them: mappings as [key, value] pairs (as QuantConfig holds
    `formats` and `budget`), tuples as lists, a lone string as a one-item list."""
    if isinstance(given, str) and isinstance(saved, list):
        given = [given]
    return _as_json(given) == saved


def _as_json(value):
    if isinstance(value, dict):
        return [[str(k), _as_json(v)] for k, v in value.items()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_as_json(v) for v in value]
    return value
