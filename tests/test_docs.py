"""The documentation holds together: README.md is a map of at most 250 lines, every page starts with a
title and a sentence, every relative link in README.md and docs/*.md resolves (file and, for
``#anchor`` links, heading), and every ``compo ...`` command shown in their code blocks runs as
written on a fresh clone.

A full run of every command would take minutes, so each command is checked dry, the way the CLI
starts: compo's own argument parser reads it (an unknown flag fails), its config file is loaded
with its ``--set`` overrides and validated (a missing file, an unknown key, a bad value or a
combination the validators refuse fails), ``compo study`` validates every cell, and where stage 2
would run its oracles are checked as at start-up: built with ``compo.zo.oracles.build_oracles``
(which runs ``check_estimator``: the projected estimator or a vocabulary support with a judge)
when they can be built offline, otherwise ``check_estimator`` against the oracle's class.
``compo config`` commands print or convert configs only, so they run for real. No model is
loaded or trained.

Commands run in a scratch directory standing in for the user's, where the placeholders the docs
use are real files:

- ``my.yaml`` ("your run config") is a copy of ``configs/quickstart.yaml``;
- ``configs/`` is the repository's ``configs/`` (a link);
- ``dpo.yaml`` / ``kto.json`` (a TRL config the user has) are small TRL DPOConfig / KTOConfig
  files (``TRL_FILES`` below), and ``compo.yaml`` is what the documented
  ``compo config --from-trl dpo.yaml -o compo.yaml`` writes from the first;
- ``mypkg.judges:LengthJudge`` is the documented ``LengthJudge`` code block itself, written to
  ``mypkg/judges.py`` there.

Paths that only a real run would open (``model.path=path/to/dpo-model``, ``runs/exp1``) are not
checked. A command holding a ``<placeholder>`` or an elided ``...`` is a template and is skipped.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250

TRL_FILES = {
    "dpo.yaml": "beta: 0.1\nloss_type: sigmoid\nper_device_train_batch_size: 4\n"
                "gradient_accumulation_steps: 2\nlearning_rate: 5.0e-7\nnum_train_epochs: 1\n"
                "output_dir: runs/trl-dpo\n",
    "kto.json": '{"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0, '
                '"per_device_train_batch_size": 4}\n',
}
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
STOP_TOKENS = {"|", "||", "&&", ";", "&", ">", ">>", "2>", "2>&1", "<"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- markdown ---------------------------------------------------------------------------------


def code_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the block's first line, its lines) of every fenced block."""
    blocks, lang, start, lines, indent = [], None, 0, [], 0
    for i, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if lang is None:
            if stripped.startswith("```"):
                lang, start, lines, indent = stripped[3:].strip().split(" ")[0], i + 1, [], len(line) - len(stripped)
        elif stripped.startswith("```"):
            blocks.append((lang, start, lines))
            lang = None
        else:
            lines.append(line[indent:] if line[:indent].strip() == "" else line)
    return blocks


def prose(text: str, inline_code: bool = False) -> str:
    """The text outside fenced blocks, and outside inline code spans unless ``inline_code`` (line
    count kept)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line if inline_code else re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link texts kept, lower case, punctuation but - and _ dropped,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text(encoding="utf-8"), inline_code=True).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(path: Path) -> list[tuple[int, str]]:
    text = prose(path.read_text(encoding="utf-8"))
    return [(i, m.group(1)) for i, line in enumerate(text.splitlines(), 1) for m in LINK.finditer(line)]


# --- documented commands ----------------------------------------------------------------------


@dataclass
class Command:
    page: str
    line: int
    text: str  # as shown (continuations joined)
    argv: list[str]  # compo's arguments: what follows `compo`, `-m compo.cli` or scripts/slurm_compo.sh

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def template(self) -> str | None:
        for tok in self.argv:
            if tok == "..." or re.fullmatch(r"<[^>]+>", tok):
                return f"{tok!r} is a placeholder"
        return None


def compo_argv(tokens: list[str]) -> list[str] | None:
    """compo's arguments in one shell command, or None when it does not run compo."""
    for i, tok in enumerate(tokens):
        if tok in STOP_TOKENS or tok.startswith((">", "2>")):
            tokens = tokens[:i]
            break
    words = list(tokens)
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "compo.cli":
            return words[i + 2:]
    for i, tok in enumerate(words):
        if tok.endswith("scripts/slurm_compo.sh"):
            return words[i + 1:]
    program = next((t for t in words if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", t)), None)
    if program is not None and (program == "compo" or program.endswith("/compo")):
        return words[words.index(program) + 1:]
    return None


RUNS_COMPO = re.compile(r"^([A-Za-z_]\w*=\S*\s+)*(\S*/)?compo\s|-m compo\.cli\b|slurm_compo\.sh\b")


def documented_commands() -> list[Command]:
    found = []
    for path in PAGES:
        for lang, start, lines in code_blocks(path.read_text(encoding="utf-8")):
            if lang not in SHELL_LANGS:
                continue
            i = 0
            while i < len(lines):
                first, joined = i, lines[i]
                while joined.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    joined = joined.rstrip()[:-1] + " " + lines[i].strip()
                i += 1
                shown = joined.strip().removeprefix("$ ")
                if not shown or shown.startswith("#"):
                    continue
                try:
                    tokens = shlex.split(shown, comments=True)
                except ValueError as e:  # unbalanced quotes: would not run in a shell either
                    if RUNS_COMPO.search(shown):
                        found.append(Command(rel(path), start + first, shown, ["<unparsable: " + str(e) + ">"]))
                    continue
                argv = compo_argv(tokens)
                if argv is not None:
                    found.append(Command(rel(path), start + first, shown, argv))
    return found


COMMANDS = documented_commands()


def length_judge_source() -> str:
    for path in PAGES:
        for lang, _, lines in code_blocks(path.read_text(encoding="utf-8")):
            if lang == "python" and any(line.startswith("class LengthJudge(") for line in lines):
                return "\n".join(lines) + "\n"
    raise AssertionError("the documented LengthJudge code block is gone: update tests/test_docs.py")


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A directory standing in for the user's, with the docs' placeholder files (module docstring)."""
    from compo.cli import main

    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    shutil.copy(ROOT / "configs" / "quickstart.yaml", tmp_path / "my.yaml")
    for name, text in TRL_FILES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "judges.py").write_text(length_judge_source())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in ("mypkg", "mypkg.judges"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    assert main(["config", "--quiet", "--from-trl", "dpo.yaml", "-o", "compo.yaml"]) == 0
    yield tmp_path
    for mod in ("mypkg", "mypkg.judges"):
        sys.modules.pop(mod, None)


def _offline(spec) -> bool:
    """Whether an oracle spec can be built here (no API key, model download or person needed)."""
    if spec is None or spec.name == "likelihood":
        return True
    judge = spec.options.get("judge")
    return spec.name == "generation" and isinstance(judge, str) and ":" in judge


def check_stage2(cfg) -> None:
    """Stage 2's start-up checks of its oracles (compo.zo.oracles.build_oracles)."""
    from compo.zo.oracles import build_oracles
    from compo.zo.oracles import check_estimator
    from oracles.base import _REGISTRY, load_object

    if _offline(cfg.zo.oracle) and _offline(cfg.zo.accept_oracle):
        for oracle in build_oracles(cfg):
            if oracle is not None:
                oracle.close()
        return
    cls = load_object(cfg.zo.oracle.name, "compo.oracles", _REGISTRY)
    check_estimator(cfg.zo, SimpleNamespace(name=cfg.zo.oracle.name, needs=cls.needs))


def dry_run(argv: list[str], capsys) -> None:
    """Everything `compo` checks from the command line and the config, without loading a model."""
    from compo import cli

    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"the argument parser refused it (exit {e.code}): "
                             f"{capsys.readouterr().err.strip()}") from None
    assert args.command is not None, "no compo command"
    if args.command == "config":
        rc = cli.main(argv)
        assert rc == 0, f"exit {rc}: {capsys.readouterr().err.strip()}"
        return
    if args.command == "study":
        from compo.research.study import load_study

        _, cells = load_study(args.config, args.overrides, args.study_dir)
        for cfg in cells.values():
            if cfg.zo.enabled:
                check_stage2(cfg)
        return
    cfg = cli.resolve(args)
    if args.command == "zo" or (args.command == "pipeline" and cfg.zo.enabled):
        check_stage2(cfg)


def explain(argv: list[str], capsys) -> str | None:
    """None when the command passes the dry check, else why not (as compo would print it)."""
    from compo.cli import report

    try:
        dry_run(argv, capsys)
    except AssertionError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - compo's error path
        rc = report(e, debug=False)
        return f"exit {rc}: {capsys.readouterr().err.strip()}"
    return None


# --- tests ------------------------------------------------------------------------------------


def test_readme_is_a_map_of_at_most_250_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move reference material into docs/"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_page_starts_with_a_title_and_a_sentence(page):
    lines = [line for line in page.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert re.fullmatch(r"# \S.*", lines[0]), f"{rel(page)}: the first line should be '# Title'"
    assert not lines[1].startswith(("#", "```", "|", "<!--")), \
        f"{rel(page)}: a sentence of what it covers should follow the title"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for line, target in links(page):
            if re.match(r"(https?|mailto|ftp):", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{rel(page)}:{line}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{rel(page)}:{line}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_docs_commands_are_found():
    """The extraction itself: it sees the commands this test exists for."""
    shown = {c.text for c in COMMANDS}
    assert len(COMMANDS) >= 15, [c.id for c in COMMANDS]
    assert any("LengthJudge" in t for t in shown), "the custom-judge command is not found"
    assert any(t.startswith("compo pipeline") for t in shown)
    assert any("-m compo.cli" in t for t in shown)
    assert any("slurm_compo.sh" in t for t in shown)
    for c in COMMANDS:
        assert c.argv and not c.argv[0].startswith("<unparsable"), f"{c.id}: {c.text}"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.id)
def test_documented_command_runs_as_written(command, sandbox, capsys):
    if command.template:
        pytest.skip(f"a template: {command.template}")
    why = explain(command.argv, capsys)
    assert why is None, f"{command.id}: `{command.text}` would fail: {why}"


def test_the_dry_check_refuses_a_judge_with_the_projected_estimator(sandbox, capsys):
    """The custom-judge command as it once was documented: on a copy of configs/quickstart.yaml
    (zo.estimator: projected) it exits 2 at start-up, and the dry check says so."""
    argv = ["zo", "-c", "my.yaml", "--set", "zo.oracle.name=generation",
            "--set", "zo.oracle.options.judge=mypkg.judges:LengthJudge",
            "--set", "zo.oracle.options.judge_options.slack=10"]
    why = explain(argv, capsys)
    assert why is not None and why.startswith("exit 2") and "zo.estimator=projected is exact only" in why, why
    assert explain(argv + ["--set", "zo.estimator=full"], capsys) is None
    why = explain(argv + ["--set", "zo.estimator=full", "--set", "zo.support=topk"], capsys)
    assert why is not None and "zo.support=topk" in why, why
    # an option the judge does not take fails as at start-up too
    why = explain(argv + ["--set", "zo.estimator=full", "--set", "zo.oracle.options.judge_options.slak=1"], capsys)
    assert why is not None and why.startswith("exit 2") and "slak" in why, why
