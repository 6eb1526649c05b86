"""Config files in, one validated `JobConfig` out.

Every YAML file under conf/ is a partial job config (top-level sections data/model/train/...).
A file may list `defaults:`, other files relative to the conf root (`data/voc_aug`,
`model/resnet101_os16`), merged in order beneath its own keys. On the command line,
`section.key=value` sets a value (parsed as YAML) and `group=name` swaps the default of that
group, e.g. `model=mobilenet_v2_os16`. The result is validated once; any problem becomes a
`ConfigError` with a one-line message naming the key, before Ray or MLflow is touched.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from deeplab_sweep.errors import ConfigError
from deeplab_sweep.search.job_config import JobConfig, SearchParam
from deeplab_sweep.search.overrides import set_dotted
from deeplab_sweep.trainable.credentials import redacted
from deeplab_sweep.trainable.run_config import RunConfig

GROUPS = ("data", "model", "train", "sweep", "cluster", "mlflow", "space", "storage")


def packaged_conf() -> Path:
    """The conf/ folder installed with the package (the checkout's own in an editable install)."""
    import deeplab_sweep.conf as conf  # a namespace package: conf/ holds YAML only

    return next(Path(p) for p in conf.__path__ if Path(p).is_dir())


def find_config(path: str | Path) -> Path:
    """A config file as given when it exists, else the same name in the installed conf/: so
    `deeplab sweep conf/sweep/demo.yaml` (or `sweep/demo`) works from any folder."""
    given = Path(path)
    if given.is_file():
        return given
    name = given if given.suffix == ".yaml" else given.with_name(given.name + ".yaml")
    parts = name.parts[1:] if name.parts[:1] == ("conf",) else name.parts
    packaged = packaged_conf().joinpath(*parts) if parts and not name.is_absolute() else None
    return packaged if packaged is not None and packaged.is_file() else given


def default_conf_root(config_path: Path) -> Path:
    """conf/ is the nearest folder above the config file that holds the group folders, else
    the installed conf/."""
    start = config_path.resolve().parent
    for folder in (start, *start.parents):
        if (folder / "data").is_dir() and (folder / "model").is_dir():
            return folder
    return packaged_conf()


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "space":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _compose(path: Path, conf_root: Path, swaps: dict[str, str], used: set[str], seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: defaults form a cycle")
    raw = _read_yaml(path)
    defaults = raw.pop("defaults", []) or []
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{path}: `defaults` must be a list of names like data/voc")
    merged: dict = {}
    for entry in defaults:
        folder = entry.rpartition("/")[0]
        group = folder.rsplit("/", 1)[-1]  # sweep/space/demo is of the group `space`
        if group in swaps:
            entry = f"{folder}/{swaps[group]}"
            used.add(group)
        dep = conf_root / f"{entry}.yaml"
        if not dep.exists():
            options = (
                sorted(p.stem for p in (conf_root / folder).glob("*.yaml")) if (conf_root / folder).is_dir() else []
            )
            raise ConfigError(
                f"{path}: default {entry!r} not found under {conf_root}"
                + (f"; {group} options: {', '.join(options)}" if options else "")
            )
        merged = deep_merge(merged, _compose(dep, conf_root, swaps, used, seen + (path,)))
    return deep_merge(merged, raw)


_SCI_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _parse_value(raw: str) -> Any:
    if raw == "":
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str) and _SCI_NUMBER.fullmatch(value):
        # YAML 1.1 reads 1e-3 as a string; on the command line it is meant as a number.
        return float(value)
    return value


def parse_overrides(overrides: list[str]) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    swaps: dict[str, str] = {}
    sets: list[tuple[str, Any]] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=0.01")
        value = _parse_value(raw)
        if "." not in key:
            if key not in GROUPS:
                raise ConfigError(f"override {item!r}: unknown group {key!r}; allowed: {', '.join(GROUPS)}")
            swaps[key] = str(raw)
        else:
            sets.append((key, value))
    return swaps, sets


def compose(path: str | Path, overrides: list[str] = (), conf_root: Path | None = None) -> dict:
    path = find_config(path)
    swaps, sets = parse_overrides(list(overrides))
    used: set[str] = set()
    merged = _compose(path, conf_root or default_conf_root(path), swaps, used)
    for group in swaps.keys() - used:  # silently ignored, it would run the config unchanged
        raise ConfigError(f"override {group}={swaps[group]}: {path.name} has no {group}/ default to swap")
    for key, value in sets:
        if key.startswith("space."):
            set_space(merged, key, value)
        else:
            set_dotted(merged, key, value)
    return merged


SPACE_FIELDS = tuple(SearchParam.model_fields)


def set_space(merged: dict, key: str, value: Any) -> None:
    """`space.<config key>=ENTRY` sets a searched key (null drops it); `space.<config key>.<field>=V`
    one field of a searched key, e.g. space.train.lr.high=0.1. Space keys are dotted config
    paths themselves: the last part names a field only where the rest is searched."""
    space = merged.setdefault("space", {})
    path = key.removeprefix("space.")
    head, _, field = path.rpartition(".")
    if field in SPACE_FIELDS and head in space:
        space[head] = {**space[head], field: value}
    elif value is None and path in space:
        del space[path]
    elif isinstance(value, dict):
        space[path] = value
    else:
        raise ConfigError(
            f"override {key}={value!r}: give a whole entry (space.{path}={{type: choice, values: [...]}}) or one "
            f"field ({', '.join(SPACE_FIELDS)}) of a searched key; searched: {', '.join(space) or 'none'}"
        )


def _loc_str(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-")))


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the field at `loc`, to list its allowed keys."""
    model: Any = JobConfig
    for part in loc[:-1]:
        if model is JobConfig and part == "space":
            return None
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def format_validation_error(err: ValidationError) -> str:
    e = err.errors(include_url=False)[0]
    loc = tuple(e["loc"])
    where = _loc_str(loc)
    if e["type"] == "extra_forbidden":
        model = _model_at(loc)
        allowed = f"; allowed: {', '.join(model.model_fields)}" if model else ""
        return f"{where}: unknown key{allowed}"
    if e["type"] == "missing":
        return f"{where}: required key is missing"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    if isinstance(got, (dict, list)):
        return f"{where}: {msg}"
    return f"{where} = {got!r}: {msg}"


def validate(data: dict) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_job(path: str | Path, overrides: list[str] = (), conf_root: Path | None = None) -> JobConfig:
    data = compose(path, overrides, conf_root)
    _, sets = parse_overrides(list(overrides))
    for key, value in sets:
        if key in data.get("space", {}):
            data["space"] = pin(data["space"], key, value)
            print(f"note: {key} = {value!r} is pinned: space.{key} is left out of this sweep", file=sys.stderr)
    return validate(data)


def pin(space: dict, key: str, value: Any) -> dict:
    """The space without `key`, its value fixed: the entries that depend on it become plain
    choices of the case for that value."""
    out = {}
    for k, entry in space.items():
        if k == key:
            continue
        if isinstance(entry, dict) and entry.get("depends_on") == key:
            cases = entry.get("cases") or {}
            if str(value) not in cases:
                raise ConfigError(
                    f"{key} = {value!r}: space.{k}.cases has no entry for it; allowed: {', '.join(map(str, cases))}"
                )
            entry = {"type": "choice", "values": cases[str(value)]}
        out[k] = entry
    return out


def dump_yaml(job: JobConfig | RunConfig) -> str:
    """The resolved config as YAML, credentials in URIs replaced by ***."""
    return yaml.safe_dump(redacted(job.to_dict()), sort_keys=False)


def load_yaml_config(text: str) -> JobConfig:
    """Inverse of `dump_yaml` for a job."""
    return validate(yaml.safe_load(text))
