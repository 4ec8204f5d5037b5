"""The config reference (docs/config.md), written from the config models themselves."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from intercom.config import Settings

HEADER = """\
# Configuration reference

The station reads one TOML file, by default `/etc/intercom/intercom.toml`.
`intercom check-config FILE` validates it: exit 0 when valid, 2 with one line per
problem naming its line in the file, the key path and the reason in plain words
(`line 12: hardware.relay.pulse: unknown key; did you mean 'pulse_s'?`). Unknown keys
are errors.

A running station changes its file only through its one config writer
(`intercom/configwriter.py`): `intercom config set KEY VALUE ...` (and the installer
console) send key paths such as `hardware.relay.pulse_s` or `hardware.buttons[0].flat`
with new values; the writer validates the whole file with these same models, refuses a
bad value naming the key and the reason, writes the file atomically (a temporary file
beside it, fsynced, renamed over it, its mode kept) and logs a `PrivilegedAction`
(`config-set`) with who changed which keys, never the values. It refuses `station.id`,
`station.state_dir` and secrets (`mqtt.password`: give `password_file` or
`password_credential`). Privacy zones take effect at once; other keys at the next
start, and the answer says which. The file is written back without its comments.
The daemon must be able to write the file's folder.

This page is generated from the config models (`intercom/config.py`) by
`scripts/config-doc`; a test keeps it in step with the code.
"""


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The config models inside a field's type (``X``, ``X | None``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_models(arg))
    return found


def _type_name(annotation: Any) -> str:  # noqa: PLR0911 - one return per kind of type
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f'`"{a}"`' for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if annotation is type(None):
        return "absent"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return getattr(annotation, "__name__", str(annotation))


def _limits(info: FieldInfo) -> str:
    words = []
    for meta in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                words.append(f"{sign} {value}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            words.append(f"matches `{pattern}`")
    return ", ".join(words)


def _default(info: FieldInfo) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "**required**"
    if isinstance(info.default, BaseModel) or info.default_factory is not None:
        return "see below"
    if info.default is None:
        return "absent"
    value = info.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def render() -> str:
    """The whole reference page as Markdown."""
    out = [HEADER]
    queue: list[tuple[str, type[BaseModel]]] = [
        (name, model)
        for name, info in Settings.model_fields.items()
        for model in _models(info.annotation)
    ]
    seen: set[str] = set()
    while queue:
        path, model = queue.pop(0)
        if path in seen:
            continue
        seen.add(path)
        doc = (model.__doc__ or "").strip().splitlines()[0]
        header = f"[[{path[:-2]}]]" if path.endswith("[]") else f"[{path}]"
        out.append(f"\n## `{header}`\n\n{doc}\n")
        out.append("| key | type | default | limits | meaning |\n|---|---|---|---|---|")
        for name, info in model.model_fields.items():
            subs = _models(info.annotation)
            desc = (
                info.description or (subs[0].__doc__ or "").strip().splitlines()[0] if subs else ""
            )
            desc = (info.description or desc).replace("\n", " ")
            out.append(
                f"| `{name}` | {_type_name(info.annotation)} | {_default(info)} | "
                f"{_limits(info)} | {desc} |"
            )
            for sub in subs:
                suffix = "[]" if typing.get_origin(info.annotation) is list else ""
                queue.append((f"{path}.{name}{suffix}", sub))
    return "\n".join(out) + "\n"
