"""The README and docs/ pages: every command in them parses, the runnable ones run, links resolve.

* Every shell line of a fenced block (```sh, ```bash, ```console or no info string) that runs
  `jaxrast ...` (also after `&&`, `;`, `time`, `VAR=value`, or as `python -m jaxrast ...` and
  `scripts/*/launch.sh COMMAND ...`) must be accepted by `jaxrast.cli.build_parser()`; a
  `python SCRIPT.py` must name a script that exists, and so must every repository path in a
  command (`configs/...`, `jaxrast/...`, `benchmarks/...`). A `--config` in the repository
  with `--set` overrides is also validated as the command would (decode, train).
* Blocks whose info string is `sh toy` run as written, in order, one bash script per page,
  from a temporary directory that looks like a checkout's root (its `jaxrast/`, `configs/`,
  ... are links to this one), with `HF_HUB_OFFLINE=1` and one plain CPU device. They use
  the shipped toy family, the shipped benchmarks and files created earlier on the same page.
* README.md has at most 200 lines, holds the CI test command verbatim, and every relative
  link (and `#anchor`) of README.md and docs/*.md resolves; docs/architecture.md's module
  map names every module under jaxrast/ and nothing that does not exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "sh", "bash", "shell", "console"}
RUN_TAG = "toy"  # ```sh toy: runs in the slow test
# Top-level entries of a checkout that the runnable blocks may read (linked into their directory).
CHECKOUT = ("jaxrast", "configs", "benchmarks", "train", "decode", "scripts", "notebooks", "docs")
# A command argument starting with one of these names a file of this repository.
REPO_PREFIXES = ("jaxrast/", "configs/", "benchmarks/", "train/", "decode/", "scripts/", "notebooks/", "docs/",
                 "tests/")
# Entry scripts that are `jaxrast COMMAND` under another name.
ENTRY_SCRIPTS = {"decode/rast.py": "decode", "train/grpo.py": "train"}
MAX_README_LINES = 200
PAGE_TIMEOUT_S = 300


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------
# Markdown: fenced blocks, shell commands in them
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Block:
    path: Path
    start: int  # 1-based line number of the block's first content line
    lang: str
    tags: tuple[str, ...]
    lines: list[str]


def fenced_blocks(path: Path) -> list[Block]:
    blocks, fence, current = [], None, None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if fence is None:
            m = re.match(r"^ {0,3}(`{3,})\s*([^`]*)$", line)
            if m:
                fence = m.group(1)
                words = m.group(2).split()
                current = Block(path, number + 1, words[0].lower() if words else "", tuple(words[1:]), [])
        elif re.match(rf"^ {{0,3}}{fence}`*\s*$", line):
            blocks.append(current)
            fence = current = None
        else:
            current.lines.append(line)
    assert fence is None, f"{rel(path)}: a fenced block opened at line {current.start - 1} is never closed"
    return blocks


def shell_blocks(path: Path) -> list[Block]:
    return [b for b in fenced_blocks(path) if b.lang in SHELL_LANGS]


def tokenize(text: str) -> list[str]:
    """Shell words and operators (`&&`, `;`, `|`, `>`...); comments dropped. ValueError on an open quote."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def logical_lines(block: Block):
    """(line number, tokens) per command line: backslash continuations joined, `$ ` prompts
    dropped, a quoted string that spans lines (`python -c "..."`) read to its end."""
    text, start = "", None
    for i, raw in enumerate(block.lines):
        line = raw
        if not text:
            start = block.start + i
            if line.lstrip().startswith("$ "):
                line = line.lstrip()[2:]
        if line.rstrip().endswith("\\"):
            text += line.rstrip()[:-1] + " "
            continue
        text += line
        try:
            tokens = tokenize(text)
        except ValueError:  # an open quote: the string goes on on the next line
            text += "\n"
            continue
        if tokens:
            yield start, tokens
        text = ""
    assert not text.strip(), f"{rel(block.path)}:{start}: unterminated command {text!r}"


CONTROL = {";", "&", "&&", "||", "|", "|&", ";;", "(", ")"}
REDIRECT = {">", ">>", "<", ">&", "&>", ">|", "<<<"}
PREFIX_WORDS = {"do", "then", "else", "time", "exec", "nohup", "!", "{"}
SKIP_WORDS = {"done", "fi", "}", "wait", "cd", "mkdir", "rm", "ls", "cat", "echo", "export", "pip", "git", "head",
              "tail", "du", "test", "[", "source", "."}
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def simple_commands(tokens: list[str]):
    """Split a command line into simple commands at control operators; redirections dropped."""
    command, it = [], iter(tokens)
    for tok in it:
        if tok in CONTROL:
            yield command
            command = []
        elif tok in REDIRECT:
            next(it, None)
        else:
            command.append(tok)
    yield command


@dataclasses.dataclass
class Command:
    path: Path
    line: int
    kind: str  # "jaxrast" (argv = the CLI's arguments) or "script" (argv[0] = the script)
    argv: list[str]
    tagged: bool  # in a runnable (```sh toy) block

    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}"

    def text(self) -> str:
        program = ["jaxrast"] if self.kind == "jaxrast" else ["python"] if self.argv[0].endswith(".py") else []
        return shlex.join(program + self.argv)


def page_commands(path: Path) -> list[Command]:
    return block_commands(path, shell_blocks(path))


def block_commands(path: Path, blocks: list[Block]) -> list[Command]:
    """Every jaxrast invocation and script of a page's shell blocks, with `$VAR`s (assigned
    earlier on the page, or a `for` loop's first value) expanded."""
    found: list[Command] = []
    env: dict[str, str] = {}

    def expand(word: str) -> str:
        return VARIABLE.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), word)

    for block in blocks:
        tagged = RUN_TAG in block.tags
        for line, tokens in logical_lines(block):
            for words in simple_commands(tokens):
                while words and words[0] in PREFIX_WORDS:
                    words = words[1:]
                if not words or words[0] in SKIP_WORDS:
                    if words[:1] == ["export"]:
                        env.update(m.groups() for m in map(ASSIGNMENT.match, words[1:]) if m)
                    continue
                if words[0] == "for" and len(words) >= 4 and words[2] == "in":
                    env[words[1]] = expand(words[3])
                    continue
                assigned = {}
                while words and ASSIGNMENT.match(words[0]):
                    name, value = ASSIGNMENT.match(words[0]).groups()
                    assigned[name] = expand(value)
                    words = words[1:]
                if not words:  # VAR=value on its own: a shell variable for later lines
                    env.update(assigned)
                    continue
                words = [expand(w) for w in words]
                program, args = words[0], words[1:]
                if program == "jaxrast":
                    found.append(Command(path, line, "jaxrast", args, tagged))
                elif os.path.basename(program) in ("python", "python3"):
                    if args[:2] in (["-m", "jaxrast"], ["-m", "jaxrast.cli"]):
                        found.append(Command(path, line, "jaxrast", args[2:], tagged))
                    elif args and args[0].endswith(".py"):
                        found.append(Command(path, line, "script", args, tagged))
                        if args[0] in ENTRY_SCRIPTS:  # the same as `jaxrast COMMAND ...`
                            found.append(Command(path, line, "jaxrast", [ENTRY_SCRIPTS[args[0]], *args[1:]], tagged))
                elif program.endswith(".sh"):
                    found.append(Command(path, line, "script", words, tagged))
                    if os.path.basename(program) == "launch.sh":  # launch.sh [--dry-run] COMMAND ARGS...
                        rest = [w for w in args if w != "--dry-run"]
                        if rest and rest[0] != "...":
                            found.append(Command(path, line, "jaxrast", rest, tagged))
    return found


def all_commands() -> list[Command]:
    return [c for page in PAGES for c in page_commands(page)]


# ---------------------------------------------------------------------------------------------
# (a) every command parses, every script and repository path exists
# ---------------------------------------------------------------------------------------------


def parse_error(parser, argv: list[str]) -> tuple[str | None, object]:
    """The argparse error of `jaxrast ARGV` (None when it parses) and the namespace."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:
            if not exit_.code:  # --help
                return None, None
            message = [line for line in err.getvalue().splitlines() if "error:" in line]  # not the usage
            return "\n".join(message) or err.getvalue().strip() or f"exit status {exit_.code}", None
    if not getattr(args, "_run", None):
        return "no command given", None
    return None, args


def repo_paths(argv: list[str]) -> list[str]:
    out = []
    for word in argv:
        for part in (word, *word.split("=")[1:]):  # also the value of KEY=PATH (--set, --model NAME=PATH)
            if part.startswith(REPO_PREFIXES):
                out.append(part)
    return out


def config_error(args) -> str | None:
    """What `jaxrast decode|train --config FILE --set ...` would refuse before touching a device."""
    if getattr(args, "config", None) is None or not (ROOT / args.config).is_file():
        return None
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        if args.command == "decode":
            from jaxrast.commands.decode import config_from_args
            config_from_args(args)
        elif args.command == "train":
            from jaxrast.grpo.config import GRPOConfig
            from jaxrast.runtime.config import load_config
            load_config(GRPOConfig, args.config, args.set).validate()
    except (ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    finally:
        os.chdir(cwd)
    return None


def test_every_documented_command_parses():
    from jaxrast.cli import build_parser

    parser = build_parser()
    commands = all_commands()
    failures = []
    for c in commands:
        for p in repo_paths(c.argv[1:] if c.kind == "script" else c.argv):
            if not (ROOT / p).exists():
                failures.append(f"{c.where()}: `{c.text()}`\n    {p} does not exist in the repository")
        if c.kind == "script":
            script = c.argv[0]
            if not (ROOT / script).is_file():
                failures.append(f"{c.where()}: `{c.text()}`\n    script {script} does not exist")
            continue
        error, _ = parse_error(parser, c.argv)
        if error:
            failures.append(f"{c.where()}: `{c.text()}`\n    " + error.replace("\n", "\n    "))
    assert not failures, "documented commands that would not run:\n" + "\n".join(failures)

    # the extraction itself works: the front page shows every command, and some blocks run
    from jaxrast.cli import COMMANDS

    names = set(COMMANDS)
    shown = {c.argv[0] for c in page_commands(ROOT / "README.md") if c.kind == "jaxrast" and c.argv}
    assert names <= shown, f"README.md has no example of: {sorted(names - shown)}"
    assert sum(c.tagged for c in commands) >= 5, "the runnable (```sh toy) blocks hold too few commands"


def test_documented_configs_load_with_their_overrides():
    """`jaxrast decode|train --config FILE --set ...` with a FILE of this repository: the config
    and its overrides are what the command reads first, before any model or device."""
    from jaxrast.cli import build_parser

    parser = build_parser()
    failures, checked = [], 0
    for c in all_commands():
        if c.kind != "jaxrast":
            continue
        _, args = parse_error(parser, c.argv)
        if args is not None and args.command in ("decode", "train") and args.config:
            checked += (ROOT / args.config).is_file()
            error = config_error(args)
            if error:
                failures.append(f"{c.where()}: `{c.text()}`\n    {error}")
    assert checked, "no documented command with a --config of this repository"
    assert not failures, "documented configs that the command would refuse:\n" + "\n".join(failures)


def test_command_extraction():
    lines = [  # the block's first line is line 10 of its page
        "F=jaxrast/toy/family  # the family",
        "$ jaxrast decode --base $F/m_base \\",
        "    --n 2 && time jaxrast eval \\",
        "  --pred a.jsonl > log.txt",
        "for i in 0 1; do",
        "  X=1 jaxrast decode --process-id $i &",
        "done; wait",
        'python -c "import json',
        'print(1)" > x.jsonl',
        "HOSTS='a b' scripts/gpu/launch.sh --dry-run train --config c",
        "python decode/rast.py --n 2",
        "# jaxrast demo: a comment",
        "pip install -e . && jaxrast demo  # x",
    ]
    page = ROOT / "docs" / "example.md"
    got = [(c.line, c.kind, c.argv) for c in block_commands(page, [Block(page, 10, "sh", (), lines)])]
    assert got == [
        (11, "jaxrast", ["decode", "--base", "jaxrast/toy/family/m_base", "--n", "2"]),
        (11, "jaxrast", ["eval", "--pred", "a.jsonl"]),
        (15, "jaxrast", ["decode", "--process-id", "0"]),
        (19, "script", ["scripts/gpu/launch.sh", "--dry-run", "train", "--config", "c"]),
        (19, "jaxrast", ["train", "--config", "c"]),
        (20, "script", ["decode/rast.py", "--n", "2"]),
        (20, "jaxrast", ["decode", "--n", "2"]),
        (22, "jaxrast", ["demo"]),
    ]


# ---------------------------------------------------------------------------------------------
# (c) the README is a front page; links resolve
# ---------------------------------------------------------------------------------------------


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; keep it to {MAX_README_LINES}"


def test_readme_holds_the_ci_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    marker = next(i for i, line in enumerate(ci) if "the README's test command, verbatim" in line)
    command = ci[marker + 1]
    readme = [line for b in shell_blocks(ROOT / "README.md") for line in b.lines]
    assert any(line == command or line.startswith(command + " ") for line in readme), (
        f".ci/run runs `{command}` as the README's test command; README.md's quick start must show it verbatim")


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"  # [text](target "title")
                  r"|<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"")  # <img src="..."> <a href="...">


def prose(path: Path, code: bool = False) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced blocks, inline code removed unless `code`."""
    out, fence = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = re.match(r"^ {0,3}(`{3,})", line)
        if m and (fence is None or m.group(1).startswith(fence)):
            fence = m.group(1) if fence is None else None
            continue
        if fence is None:
            out.append((number, line if code else re.sub(r"`+[^`]*`+", "", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"`|\*\*|__|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose(path, code=True):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def test_relative_links_resolve():
    assert (ROOT / "docs" / "README.md").is_file(), "docs/README.md (the index of the docs pages) is missing"
    failures = []
    for page in PAGES:
        for number, line in prose(page):
            for m in LINK.finditer(line):
                target = m.group(1) or m.group(2)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file, _, anchor = target.partition("#")
                dest = (page.parent / file).resolve() if file else page
                if not dest.exists():
                    failures.append(f"{rel(page)}:{number}: {target} -> {file} does not exist")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    failures.append(f"{rel(page)}:{number}: {target} -> no heading #{anchor} in {rel(dest)}")
    assert not failures, "broken links:\n" + "\n".join(failures)


def test_docs_pages_are_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in PAGES if p.parent.name == "docs" and p.name != "README.md" and f"({p.name}" not in index]
    assert not missing, f"docs/README.md does not link {missing}"


def test_architecture_module_map_matches_the_tree():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| `jaxrast/")]
    named = {p for row in rows for p in re.findall(r"`(jaxrast/[\w/]+\.py)`", row.split("|")[1])}
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "jaxrast").rglob("*.py")
               if p.name != "__init__.py" or p.parent == ROOT / "jaxrast"}
    assert not named - modules, f"docs/architecture.md names modules that do not exist: {sorted(named - modules)}"
    assert not modules - named, f"docs/architecture.md's module map has no row for {sorted(modules - named)}"


# ---------------------------------------------------------------------------------------------
# (b) the runnable blocks run
# ---------------------------------------------------------------------------------------------


def runnable_scripts() -> dict[Path, str]:
    scripts = {}
    for page in PAGES:
        blocks = [b for b in shell_blocks(page) if RUN_TAG in b.tags]
        if blocks:
            body = "\n".join(f"# {rel(page)}:{b.start}\n" + "\n".join(b.lines) for b in blocks)
            scripts[page] = "set -euxo pipefail\n" + body + "\n"
    return scripts


def run_page(page: Path, script: str, root: Path) -> tuple[Path, int, float, str]:
    work = root / page.stem
    bin_dir = root / "bin"
    work.mkdir()
    for name in CHECKOUT:
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg",
           "TOKENIZERS_PARALLELISM": "false", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           # Pages decode the same toy programs: JAX's persistent cache compiles each once
           # (speed only: a cached executable computes what a fresh compile would).
           "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    (work / "docs_script.sh").write_text(script, encoding="utf-8")
    start = time.perf_counter()
    try:
        proc = subprocess.run(["bash", "docs_script.sh"], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=PAGE_TIMEOUT_S)
        code, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as err:
        code, output = -1, f"timed out after {PAGE_TIMEOUT_S} s\n{err.stdout or ''}"
    return page, code, time.perf_counter() - start, output


@pytest.mark.slow
def test_runnable_blocks_run_as_written(tmp_path):
    scripts = runnable_scripts()
    assert scripts, "no ```sh toy blocks found"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, line in (("jaxrast", f'exec "{sys.executable}" -m jaxrast "$@"'),
                       ("python", f'exec "{sys.executable}" "$@"'), ("python3", f'exec "{sys.executable}" "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{line}\n")
        (bin_dir / name).chmod(0o755)
    # Two pages at a time (a toy decode keeps about one core busy). decode.md first: its RAST
    # decode is the program that analyze.md and eval.md decode again, so theirs hit the cache.
    first = [ROOT / "docs" / name for name in ("decode.md", "analyze.md", "eval.md")]
    order = [p for p in first if p in scripts] + [p for p in scripts if p not in first]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: run_page(p, scripts[p], tmp_path), order))
    for page, code, seconds, _ in results:
        print(f"{rel(page)}: exit {code} in {seconds:.1f} s")
    failures = [f"{rel(page)}: exit status {code} after {seconds:.0f} s; the end of its output:\n{out[-4000:]}"
                for page, code, seconds, out in results if code != 0]
    assert not failures, "\n\n".join(failures)
