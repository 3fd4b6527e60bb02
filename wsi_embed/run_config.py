"""Config files for every command (`--config FILE`, TOML or YAML, one section per command,
flags overriding them), their template and their resolved view. Unknown sections and keys
are errors naming the closest valid one."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from .errors import UsageError

#: options a config file never sets (they only make sense on a command line)
NOT_CONFIGURABLE = {"help", "log_level", "as_json"}


def read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001 - TOML and YAML raise their own types
        raise UsageError(f"--config {path}: not valid {path.suffix.lstrip('.') or 'YAML'} "
                         f"({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected sections (command: {{option: value}})")
    return data


def _params(cmd: object) -> dict[str, object]:
    return {p.name: p for p in cmd.params
            if p.param_type_name == "option" and p.name not in NOT_CONFIGURABLE}


def _closest(word: str, choices) -> str:
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else ""


def default_map(group: object, data: dict, path: Path) -> dict:
    """The file's sections as Click's default_map: {command: {parameter: value}}; option
    names may be written with dashes or underscores."""
    out = {}
    for section, values in data.items():
        cmd = group.commands.get(section)
        if cmd is None:
            raise UsageError(f"--config {path}: unknown section {section!r}"
                             f"{_closest(section, group.commands)}; sections are commands")
        values = {} if values is None else values  # a template's section, all commented
        if not isinstance(values, dict):
            raise UsageError(f"--config {path}: section {section!r} must map options to values")
        params = _params(cmd)
        out[section] = {}
        for key, value in values.items():
            name = str(key).lstrip("-").replace("-", "_")
            if name not in params:
                raise UsageError(f"--config {path}: [{section}] has no option {key!r}"
                                 f"{_closest(name, params)}")
            out[section][name] = value
    return out


def template(group: object) -> str:
    """A commented YAML file with every configurable option of every command and its
    default: uncomment what a project fixes."""
    lines = ["# wsi-embed config: one section per command; command-line flags override it.",
             "# Use with: wsi-embed --config this.yaml COMMAND ... (or COMMAND ... --config",
             "# this.yaml). Option names as on the command line, without the dashes.", ""]
    for name, cmd in sorted(group.commands.items()):
        params = _params(cmd)
        if not params or hasattr(cmd, "commands"):
            continue
        lines.append(f"{name}:")
        for pname, p in params.items():
            help_text = " ".join((getattr(p, "help", "") or "").split())
            default = p.default if not callable(p.default) else None
            if isinstance(default, tuple | list):
                default = list(default)
            value = json.dumps(default.value if hasattr(default, "value") else default)
            lines.append(f"  # {help_text}" if help_text else "  #")
            lines.append(f"  # {pname}: {value}")
        lines.append("")
    return "\n".join(lines)


def resolved(group: object, dmap: dict, command: str | None = None) -> dict:
    """Every configurable option's value per command: the file's, else the default."""
    out = {}
    for name, cmd in sorted(group.commands.items()):
        if command and name != command or hasattr(cmd, "commands"):
            continue
        values = {}
        for pname, p in _params(cmd).items():
            if pname in dmap.get(name, {}):
                values[pname] = dmap[name][pname]
            else:
                d = p.default if not callable(p.default) else None
                values[pname] = d.value if hasattr(d, "value") else d
        out[name] = values
    return out


def hoist_config(args: list[str]) -> list[str]:
    """`wsi-embed COMMAND ... --config FILE` → `wsi-embed --config FILE COMMAND ...`: the
    file is read before the command's options (the group's option, given anywhere)."""
    out, config = [], []
    i = 0
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args):
            config = ["--config", args[i + 1]]
            i += 2
            continue
        if args[i].startswith("--config="):
            config = ["--config", args[i].split("=", 1)[1]]
            i += 1
            continue
        out.append(args[i])
        i += 1
    return config + out
