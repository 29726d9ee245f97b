"""The documentation stays true to the tree and to the command line.

README.md and docs/*.md: every relative link reaches an existing file (and an `#anchor` an
existing heading, with GitHub's slugs); every `stackfast ...` command in a shell code block
parses with the CLI's own parser, and its `--set` keys name config fields, so a renamed or
removed flag fails here; and no page points into the development setup's shared folder (a
sibling of the checkout), which users do not have.
"""
import contextlib
import dataclasses
import io
import os
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SKIP_DIRS = {".git", ".venv", "build", "runs", "shared", "node_modules", "__pycache__"}


def split_page(path: Path):
    """(prose lines, code blocks): prose as (line number, text) outside fences; each code
    block as (language, [(line number, text), ...])."""
    prose, blocks, block = [], [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = FENCE.match(line)
        if block is None and fence:
            block = (fence.group(2).lower(), [])
        elif block is not None and fence and not fence.group(2):
            blocks.append(block)
            block = None
        elif block is not None:
            block[1].append((number, line))
        else:
            prose.append((number, line))
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in split_page(path)[0]:
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def test_relative_links_reach_files_and_headings():
    problems = []
    for page in PAGES:
        for number, line in split_page(page)[0]:
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (page.parent / file_part).resolve() if file_part else page
                where = f"{page.relative_to(REPO)}:{number}: {target}"
                if not dest.exists():
                    problems.append(f"{where}: no such file")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    problems.append(f"{where}: no heading with that anchor in {dest.name}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def shell_commands(page: Path):
    """(line number, argv) of every `stackfast ...` command, and of the arguments given to
    `stackfast/train.py` (torchrun's launch of `stackfast train`), in the page's shell blocks."""
    for language, lines in split_page(page)[1]:
        if language not in SHELL_BLOCKS:
            continue
        joined: list[tuple[int, str]] = []
        continued = False
        for number, text in lines:
            if continued:
                joined[-1] = (joined[-1][0], joined[-1][1] + " " + text.strip())
            else:
                joined.append((number, text.strip()))
            continued = joined[-1][1].endswith("\\")
            if continued:
                joined[-1] = (joined[-1][0], joined[-1][1][:-1])
        for number, text in joined:
            text = text[2:] if text.startswith("$ ") else text
            if "..." in text or "<" in re.split(r"\s#", text, maxsplit=1)[0]:  # a placeholder, not a command
                continue
            if text.startswith("stackfast "):
                yield number, text, words(text[len("stackfast "):])
            elif "stackfast/train.py " in text:
                yield number, text, ["train", *words(text.split("stackfast/train.py ", 1)[1])]


def words(command: str) -> list[str]:
    """The shell words of one command: up to a comment or an operator (`&`, `;`, `|`, `>` ...)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out = []
    for word in lexer:
        if set(word) <= set("();<>|&"):
            break
        out.append(word)
    return out


def test_documented_commands_parse():
    from stackfast.cli import build_parser
    from stackfast.config import Config

    fields = {f"{section.name}.{field.name}" for section in dataclasses.fields(Config)
              for field in dataclasses.fields(getattr(Config(), section.name))}
    problems, checked = [], 0
    for page in PAGES:
        for number, text, argv in shell_commands(page):
            where = f"{page.relative_to(REPO)}:{number}: {text}"
            stderr = io.StringIO()
            try:
                with contextlib.redirect_stderr(stderr):
                    args = build_parser().parse_args(argv)
            except SystemExit:
                problems.append(f"{where}\n    {(stderr.getvalue().strip().splitlines() or ['?'])[-1]}")
                continue
            checked += 1
            for override in getattr(args, "set", None) or []:
                key = override.split("=", 1)[0]
                if key not in fields:
                    problems.append(f"{where}\n    --set {key}: no such config field")
    assert not problems, "documented commands that the CLI refuses:\n" + "\n".join(problems)
    assert checked >= 10  # the scan found the pages' commands


# The development setup's folder beside the checkout, spelled in parts so that this file,
# which looks for it, does not itself contain the path.
SHARED = "/".join(("..", "shared"))


def test_no_page_points_into_shared():
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith(".md"):
                path = Path(root) / name
                for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                    if SHARED in line:
                        found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, f"pages pointing into {SHARED} (absent outside the development setup):\n" + "\n".join(found)


def test_slugs_follow_github():
    assert slug("Fused linear cross-entropy: peak memory (CPU)") == "fused-linear-cross-entropy-peak-memory-cpu"
    assert slug("Hugging Face models: apply_stackfast_kernels and patch_llama") == \
        "hugging-face-models-apply_stackfast_kernels-and-patch_llama"
    assert slug("The `stackfast demo` run") == "the-stackfast-demo-run"
