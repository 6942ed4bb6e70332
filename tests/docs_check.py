"""Checks of the docs against the code: the documented commands parse, the paths they name exist, the links resolve.

Commands. Every fenced block (but ``yaml``, ``json``, ``python`` and the like) is read as shell: lines joined at a
trailing ``\\``, split into commands at ``&&``, ``||``, ``;`` and ``|``. A command whose tokens hold
``-m mllm_safety...`` (whatever comes before: ``.venv/bin/python``, ``srun python``, ``torchrun ...``) is dry-parsed
by that entry point's own parser, built without building anything (:func:`entry_parser`): an option it does not know,
dotted config keys included (``--model.lora.rr``), or a value of the wrong type, is reported with the parser's
message. ``--help`` and ``--print_config`` run as the user would run them (their output is swallowed).

Placeholders, the values a reader fills in, are a token in capitals (``DIR``, ``RUN_CONFIG``,
``ENTITY/PROJECT/SWEEP_ID``), or one holding ``<...>``, ``…``, ``...`` or ``$`` (``$PWD/runs``), or starting
``/path/to/``. A placeholder is never checked as a path, and ``--config PLACEHOLDER`` is left out of the dry parse
(the parser's defaults stand in); other placeholder values are parsed as given, so an option whose type is not a
string needs a real example value. Every option name is checked all the same.

Paths. In every command of a shell block, and in its comments, a relative token whose first part is one of the
repository's folders (:data:`REPO_FOLDERS`: ``configs/demo.yaml``, ``scripts/setup.sh``) must exist (a glob must
match). Other paths (``/data/...``, ``runs/...``, ``eval/demo``, ``.venv/bin/python``) are the reader's own or a
command's output and are not checked.

Links. Every ``[text](target)``, ``![alt](target)``, reference definition ``[name]: target`` and HTML ``src``/``href``
outside code whose target is relative must name an existing file or folder; a ``#anchor`` must be the slug of a
heading in the target Markdown file (GitHub's rule: :func:`slug`) or an HTML ``id``/``name`` there.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).parents[1]
REPO_FOLDERS = ("benchmarks", "configs", "docker", "docs", "mllm_safety", "scripts", "tests")
"""Folders of the repository: a relative path starting with one of them is the repository's and must exist."""
NOT_SHELL = {"yaml", "yml", "json", "jsonl", "python", "py", "toml", "text", "txt", "csv", "markdown", "md", "diff"}
"""Languages of fenced blocks that are not commands."""
RUN_CLIS = {
    "mllm_safety.fit": "mllm_safety.fit:SafetyCLI",
    "mllm_safety.evaluate": "mllm_safety.evaluate:EvaluateCLI",
    "mllm_safety.export": "mllm_safety.export:ExportCLI",
    "mllm_safety.sweep": "mllm_safety.sweep:SweepCLI",
    "mllm_safety.experiments": "mllm_safety.experiments.runner:ExperimentsCLI",
}
"""Entry points built on :class:`mllm_safety.cli.RunCLI` (LightningCLI): module -> its CLI class."""
AUTO_CLIS = {
    "mllm_safety.data.convert": "mllm_safety.data.convert:convert",
    "mllm_safety.world.tower": "mllm_safety.world.tower:TowerSettings",
}
"""Entry points built with jsonargparse's ``auto_cli``: module -> the component it is given."""
WORLD = "mllm_safety.world"
"""The world's driver: its own argparse options; the rest goes to every fit run, so fit's parser checks it."""

_PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(/[A-Z][A-Z0-9_]*)*|.*(<.*>|…|\.\.\.|\$).*|/path/to/.*")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_SEPARATORS = {"&&", "||", ";", "|"}


def is_placeholder(token: str) -> bool:
    return _PLACEHOLDER.fullmatch(token) is not None


@dataclass
class Block:
    """A fenced block: its language, the line its first body line has in the file, and its body lines."""

    lang: str
    line: int
    body: list[str] = field(default_factory=list)


def split_markdown(text: str) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced blocks, and the lines outside them (numbered from 1)."""
    blocks, prose = [], []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(2)
            blocks.append(Block(match.group(3).lower(), number + 1))
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip(fence[0]).strip():
            fence = None
        elif fence is not None:
            blocks[-1].body.append(line)
        else:
            prose.append((number, line))
    return blocks, prose


def shell_lines(block: Block) -> Iterator[tuple[int, str]]:
    """Logical lines of a shell block (``\\`` continuations joined), with the file line each starts on."""
    pending, start = "", block.line
    for offset, line in enumerate(block.body):
        if not pending:
            start = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if pending + line:
            yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def commands(line: str) -> tuple[list[list[str]], list[str]]:
    """The line's commands (token lists) and its comment words."""
    code, _, comment = line.partition(" #") if not line.lstrip().startswith("#") else ("", "", line.lstrip()[1:])
    lexer = shlex.shlex(code, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    groups: list[list[str]] = [[]]
    for token in lexer:
        if token in _SEPARATORS:
            groups.append([])
        else:
            groups[-1].append(token)
    return [g for g in groups if g], comment.split()


def repo_path_problem(token: str) -> str | None:
    """Why ``token`` names a path of the repository that does not exist (None when it exists or is not one)."""
    token = token.strip("'\"`,:;()")
    path = Path(token)
    if is_placeholder(token) or path.is_absolute() or len(path.parts) < 2 or path.parts[0] not in REPO_FOLDERS:
        return None
    exists = any(ROOT.glob(token)) if any(c in token for c in "*?[") else (ROOT / path).exists()
    return None if exists else f"{token} does not exist"


def _load(spec: str) -> object:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class _Parser(Exception):
    """Carries the parser LightningCLI built out of its constructor, before it parses anything."""


@cache
def entry_parser(module: str):
    """The parser of entry point ``module``, raising instead of exiting on a bad command: a RunCLI's is taken from
    LightningCLI's ``parse_arguments`` hook (nothing is parsed, instantiated or built), an ``auto_cli`` one is
    jsonargparse's ``auto_parser`` of the same component."""
    from jsonargparse import auto_parser

    if module in RUN_CLIS:

        class Probe(_load(RUN_CLIS[module])):
            def parse_arguments(self, parser, args) -> None:
                raise _Parser(parser)

        try:
            Probe([])
        except _Parser as built:
            parser = built.args[0]
    elif module in AUTO_CLIS:
        parser = auto_parser(_load(AUTO_CLIS[module]), as_positional=False)
    else:
        raise KeyError(module)
    parser.exit_on_error = False
    return parser


def _dry_parse(parse: Callable[[], object]) -> str | None:
    """Run ``parse`` with its output swallowed; the error it reports, if any (``--help`` exits 0: no error)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            parse()
    except SystemExit as done:
        if done.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {done.code}"
    except Exception as error:  # noqa: BLE001 - the parser's own message is the report
        return " ".join(str(error).split())
    return None


def parse_problem(module: str, argv: list[str]) -> str | None:
    """What the entry point's parser says of ``argv`` (None: it parses)."""
    argv = list(argv)
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv) and is_placeholder(argv[i + 1]):
            del argv[i : i + 2]
            break
    if module == WORLD:
        from mllm_safety.world.driver import parse_args

        leftover: list[str] = []
        problem = _dry_parse(lambda: leftover.extend(parse_args(argv)[1]))
        if problem or not leftover:
            return problem
        problem = _dry_parse(lambda: entry_parser("mllm_safety.fit").parse_args(leftover))
        return problem and f"the options it hands to every fit run: {problem}"
    if module not in RUN_CLIS and module not in AUTO_CLIS:
        try:
            importlib.import_module(module)
        except ImportError:
            return f"no module {module}"
        return f"{module} is not an entry point docs_check knows: add its parser to tests/docs_check.py"
    return _dry_parse(lambda: entry_parser(module).parse_args(argv))


def check_commands(text: str, where: str = "") -> tuple[list[str], list[str]]:
    """The entry points the shell blocks of ``text`` run, and every problem found (``where:line: ...``)."""
    blocks, _ = split_markdown(text)
    checked: list[str] = []
    problems: list[str] = []
    for block in blocks:
        if block.lang in NOT_SHELL:
            continue
        shell = block.lang in ("bash", "sh", "shell", "console", "zsh")
        for line_number, line in shell_lines(block):
            if not shell and "-m mllm_safety" not in line:
                continue  # a block of output or a diagram
            try:
                parsed, comment = commands(line)
            except ValueError as error:
                problems.append(f"{where}:{line_number}: cannot read {line.strip()!r} as shell ({error})")
                continue
            tokens = [t for command in parsed for t in command]
            for token in [*tokens, *comment] if shell else []:
                values = [token, token.split("=", 1)[1]] if token.startswith("--") and "=" in token else [token]
                problems += [f"{where}:{line_number}: {p}" for v in values if (p := repo_path_problem(v))]
            for command in parsed:
                starts = [i for i in range(len(command) - 1) if command[i] == "-m"]
                if not starts or not command[starts[0] + 1].startswith("mllm_safety"):
                    continue
                module, argv = command[starts[0] + 1], command[starts[0] + 2 :]
                checked.append(module)
                if problem := parse_problem(module, argv):
                    problems.append(f"{where}:{line_number}: python -m {module}: {problem}")
    return checked, problems


_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
_HTML = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"']+)["']""")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ID = re.compile(r"""\b(?:id|name)\s*=\s*["']([^"']+)["']""")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (Markdown marks and links stripped) in lower case, every character
    but letters, digits, spaces, ``-`` and ``_`` dropped, spaces made ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown file: its headings' slugs (a repeated one as ``slug-1``, ``slug-2``...) and ids."""
    _, prose = split_markdown(text)
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose:
        if heading := _HEADING.match(line):
            base = slug(heading.group(2))
            found.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
        found.update(_HTML_ID.findall(line))
    return found


def _outside_code(line: str) -> str:
    return re.sub(r"(`+).*?\1", "", line)


def check_links(text: str, source: Path) -> list[str]:
    """Every relative link of ``text`` (the file ``source``) that names no existing file, or no anchor in it."""
    _, prose = split_markdown(text)
    problems = []
    for number, line in prose:
        line = _outside_code(line)
        targets = _LINK.findall(line) + _HTML.findall(line) + (_REFERENCE.findall(line) if "]:" in line else [])
        for target in targets:
            if re.match(r"[a-z][a-z0-9+.-]*:|//", target, re.IGNORECASE):
                continue  # http:, https:, mailto:, protocol-relative: not the repository's
            path_part, _, anchor = target.partition("#")
            file = (source.parent / path_part).resolve() if path_part else source
            where = f"{source.name}:{number}: {target}"
            if not file.exists():
                problems.append(f"{where}: {path_part} does not exist")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading #{anchor} in {file.name}")
    return problems


def doc_files() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
