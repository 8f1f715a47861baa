"""Convert a TRL trainer config (DPOConfig / KTOConfig / BCOConfig, TrainingArguments, and the
ModelConfig / ScriptArguments keys of TRL's CLI YAML) into a compo run config.

The key map is data (compo/interop/trl_map.py). Mapped keys convert; inert keys at a value under which
TRL trains as compo does are accepted silently; ignored keys (no effect on the trained model)
are accepted with one warning naming them; a mapped key whose conversion differs from TRL's
default (``use_peft`` without ``lora_target_modules``) converts with a warning of its own. Any
other value of an inert key, a key of another trainer's config, and any key not in the map fail
together in one error, one line per key.
Used by ``compo config --from-trl FILE``; docs/from_trl.md's table is :func:`markdown_table`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from compo.core.config import ConfigError, RunConfig, apply_overrides, parse_override
from compo.core.errors import one_line
from compo.interop.trl_map import ALL3, DPO, KTO, TRAINERS, Bad, Key, all_keys, keys

_EXP_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _number(v: Any) -> Any:
    """``"5e-7"`` -> ``5e-07``: YAML 1.1 (PyYAML) reads exponent floats without a dot as strings."""
    return float(v) if isinstance(v, str) and _EXP_FLOAT.fullmatch(v.strip()) else v


def _show(v: Any) -> str:
    """A value for an error line; a mapping by its keys only (model_init_kwargs may hold a token)."""
    if isinstance(v, dict):
        return "a mapping with keys " + (", ".join(map(str, v)) or "none")
    return one_line(repr(v), 80)


@dataclass
class Conversion:
    config: dict  # nested compo config: only the keys the TRL file set
    trainer: str  # dpo, kto or bco
    ignored: list[str] = field(default_factory=list)  # accepted, no effect on the trained model
    warnings: list[str] = field(default_factory=list)  # "key: what differs from TRL", per converted key
    sources: dict[str, str] = field(default_factory=dict)  # compo key -> the TRL key it came from


def infer_trainer(src: dict, table: dict[str, Key]) -> str:
    """dpo, kto or bco from the keys only one TRL trainer config has (dpo when none does)."""
    seen: dict[str, str] = {}
    for k, v in src.items():
        where = set(table[k].where) if k in table else set()
        if len(where) == 1 and where <= set(ALL3):
            seen.setdefault(next(iter(where)), k)
        if k == "loss_type" and v == "kto":
            seen.setdefault(KTO, "loss_type: kto")
    if len(seen) > 1:
        parts = ", ".join(f"{cls} ({key})" for cls, key in seen.items())
        raise ConfigError("the keys of several TRL trainers are mixed: " + parts + "; pass --trl-trainer", "--from-trl")
    name = next(iter(seen), DPO)
    return {v: k for k, v in TRAINERS.items()}[name]


def convert(src: dict, trainer: str | None = None, origin: str = "TRL config") -> Conversion:
    """The compo config for TRL keys ``src``; every key that does not convert fails in one
    :class:`~compo.core.config.ConfigError` (exit 2), one line per key."""
    table = keys()
    if trainer is not None and trainer not in TRAINERS:
        raise ConfigError(f"unknown TRL trainer {trainer!r}; one of {', '.join(TRAINERS)}", "--trl-trainer")
    trainer = trainer or infer_trainer(src, table)
    cls = TRAINERS[trainer]
    src = {k: _number(v) for k, v in src.items()}
    ctx = {**src, "_trainer": trainer}
    flat: dict[str, Any] = {"stage1.loss": trainer} if trainer != "dpo" else {}
    out = Conversion({}, trainer, sources={"stage1.loss": "the TRL trainer"} if trainer != "dpo" else {})
    problems: list[tuple[str, str]] = []
    converted: list[tuple[int, str, dict]] = []
    order = {k: i for i, k in enumerate(table)}
    unknown = [k for k in src if k not in table]
    for k, v in src.items():
        key = table.get(k)
        if key is None:
            continue
        if not (set(key.where) - set(ALL3)) and cls not in key.where:
            problems.append((f"{origin}: {k}", f"a {'/'.join(key.where)} key, but this is a {cls}"))
        elif key.ignored:
            out.ignored.append(k)
        elif key.convert is None:
            if not key.inert(v, ctx):
                problems.append((f"{origin}: {k}", f"{_show(v)} has no compo equivalent (accepted: "
                                 f"{key.accepts}){'; ' + key.note if key.note else ''}"))
        else:
            try:
                converted.append((order[k], k, key.convert(v, ctx)))
            except Bad as e:
                problems.append((f"{origin}: {k}", str(e)))
                continue
            note = key.warning(v, ctx) if key.warning is not None else None
            if note:
                out.warnings.append(f"{k}: {note}")
    if unknown:
        problems.append((f"{origin}: {', '.join(map(str, unknown))}", "unknown key(s): not a TRL DPOConfig/KTOConfig/BCOConfig/"
                         "TrainingArguments/ModelConfig/ScriptArguments key compo knows (see docs/from_trl.md)"))
    if problems:
        raise ConfigError(problems)
    for _, k, part in sorted(converted, key=lambda c: c[0]):  # map order: warmup_steps beats warmup_ratio, ...
        for ck, cv in part.items():
            flat[ck] = cv
            out.sources[ck] = k
    for ck, cv in flat.items():
        node = out.config
        *parents, last = ck.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = cv
    return out


def validate(conv: Conversion, origin: str) -> RunConfig:
    """The converted config as compo reads it; a bad value names the TRL key it came from."""
    try:
        return RunConfig.model_validate(conv.config)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            ck = ".".join(str(p) for p in err["loc"])
            src = conv.sources.get(ck)
            where = f"{origin}: {src} (compo {ck})" if src else f"{origin}: {ck or 'config'}"
            problems.append((where, err["msg"].removeprefix("Value error, ") + f" (got {err.get('input')!r})"))
        raise ConfigError(problems) from None


def read_trl(path: str | Path) -> dict:
    """A TRL config file (YAML, or JSON such as ``TrainingArguments.to_json_string()``) as a dict."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise ConfigError(f"cannot read the TRL config: {e.strerror or e}", str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("not valid UTF-8", str(path)) from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'} ({one_line(e, 200)})",
                          str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("must hold a mapping of TRL config keys at the top level", str(path))
    return data


def from_trl_file(path: str | Path, trainer: str | None = None, overrides: list[str] | None = None) -> tuple[str, Conversion]:
    """(compo YAML text, the conversion) for a TRL config file, with compo ``--set`` overrides on top."""
    conv = convert(read_trl(path), trainer, str(path))
    if overrides:
        conv.config = apply_overrides(conv.config, overrides)
        for item in overrides:  # a bad --set value is the user's, not the TRL file's
            conv.sources.pop(".".join(parse_override(item)[0]), None)
    validate(conv, str(path))
    head = f"# compo run config converted from the TRL {TRAINERS[conv.trainer]} in {path}\n"
    return head + yaml.safe_dump(conv.config, sort_keys=False), conv


def ignored_message(conv: Conversion) -> str:
    """The one warning for accepted keys that change nothing compo trains (names only, no values)."""
    return (f"warning: ignored TRL keys (no effect on what compo trains; see docs/from_trl.md): "
            f"{', '.join(conv.ignored)}")


def markdown_table() -> str:
    """The key map as docs/from_trl.md shows it: a table of the mapped and inert keys, then the
    ignored keys (those with a note first)."""
    rows = ["| TRL key | defined in | compo | notes |", "|---|---|---|---|"]
    noted, plain = [], []
    for k in all_keys():
        if k.ignored:
            (noted.append(f"- `{k.trl}`: {k.note}") if k.note else plain.append(f"`{k.trl}`"))
            continue
        compo = f"none; accepted: {k.accepts}" if k.convert is None else f"`{k.target}`"
        rows.append(f"| `{k.trl}` | {', '.join(k.where)} | {compo} | {k.note} |")
    ignored = "\n".join(noted + ["- " + ", ".join(plain)])
    return "\n".join(rows) + "\n\nIgnored (accepted with one warning that names them; no effect on what compo trains):\n\n" + ignored + "\n"


def main(path: str | None, trainer: str | None, overrides: list[str], output: str | None,
         config: str | None = None, listing: bool = False) -> None:
    """``compo config --from-trl FILE [-o OUT]``: the compo YAML to OUT (atomically) or stdout;
    the ignored keys and where the YAML went on stderr."""
    import sys

    from compo.core.rundir import atomic_write_text

    if not path:
        raise ConfigError("--output and --trl-trainer go with --from-trl FILE", "compo config")
    if config or listing:
        raise ConfigError("--from-trl writes a new config: give compo keys with --set, not "
                          + ("--config" if config else "--list"), "compo config")
    text, conv = from_trl_file(path, trainer, overrides)
    for line in conv.warnings:
        print(f"warning: {path}: {line}", file=sys.stderr)
    if conv.ignored:
        print(ignored_message(conv), file=sys.stderr)
    if output:
        atomic_write_text(output, text)
        print(f"compo: wrote {output} (from the TRL {TRAINERS[conv.trainer]} in {path}); run it with "
              f"compo pipeline -c {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
