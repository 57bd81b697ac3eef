"""The README and docs/*.md point at things that exist: every file or module path they cite in
backticks (`tasks/jobrun.py`, `avatarq/ledger/`, `devstack/avatarq_dev/faults/lab.py`) is in
the repository, and every relative link between the pages resolves, down to its `#anchor`.

When code moves (a module into a package, a file renamed), this fails on each page that still
names the old place, so the docs cannot fall behind silently."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Fenced code blocks: the fence, its info string (`bash`, `python`, empty for a diagram) and body.
FENCE = re.compile(r"^(`{3,}|~{3,})([^\n]*)\n(.*?)^\1[ \t]*$", re.M | re.S)
#: Inline code spans (CommonMark: a run of backticks closed by a run of the same length).
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
#: Markdown links and images: [text](target) or ![alt](target "title").
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)

#: What a cited file ends with; a bare name with one of these must be some file's name.
EXTENSIONS = ("py", "md", "yaml", "yml", "json", "lua", "toml", "png", "ogg", "sh", "ts", "lock")
FILE_NAME = re.compile(r"^[\w.-]+\.(?:" + "|".join(EXTENSIONS) + r")$")
#: Directories at the top of the repository: in code blocks, only words starting with one of
#: them are taken for paths (a YAML value such as Europe/Berlin is not one).
TOP_DIRS = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("."))
CODE_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(map(re.escape, TOP_DIRS)) + r")/[\w./*-]*)")
#: Content types, not paths.
MIME = re.compile(r"^(?:text|application|audio|video|image|multipart)/")

#: Paths the pages name on purpose that are not in a checkout: built or created when it runs.
NOT_IN_REPO = (
    ".venv/",  # infra/bootstrap's virtualenv (livekit-server, helm, avatarq)
    "var/",  # test artefacts (screenshots of the console)
    "producers/console_dist/",  # the built console, package data, not committed
)
#: Words in backticks that look like paths and are none: a Docker image, an S3 key's form,
#: the default S3 prefix of rendered speech, the schedule file an operator writes.
NOT_PATHS = {"livekit/livekit-server", "bucket/key", "tts/", "schedules.yaml"}
#: Directories never searched for a cited bare file name.
SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__", "var", "build", "console_dist"}


def _repo_names() -> set[str]:
    names: set[str] = set()
    for _, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        names.update(files)
    return names


REPO_NAMES = _repo_names()


@dataclass(frozen=True)
class Citation:
    line: int
    text: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.text}"


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _blank(match: re.Match[str]) -> str:
    """A match replaced by as many newlines as it held, so line numbers stay right."""
    return "\n" * match.group(0).count("\n")


def _as_path(word: str) -> str | None:
    """`word` as a repository path to check, or None when it is not one (a URL, an HTTP route,
    an identifier, a template, a content type, something built at run time)."""
    word = word.strip("\"'()[],;:!?")
    explicit = word.startswith("./")  # `./devstack`: a path even without a slash after
    word = word.removeprefix("./").rstrip(".")
    if not word or word.startswith(("/", "~", "$", "-")) or "://" in word:
        return None
    if any(c in word for c in "{}<>@=|…\\"):
        return None
    if word in NOT_PATHS:
        return None
    if "/" not in word:
        if explicit:
            return word + "/"
        return word if FILE_NAME.match(word) else None
    first = word.split("/", 1)[0]
    if ":" in first or ("." in first and not first.startswith(".")):
        return None  # host:port/..., github.com/..., registry.example/...
    if MIME.match(word) or word.startswith(NOT_IN_REPO):
        return None
    return word


def _exists(path: str) -> bool:
    if "/" not in path:
        return path in REPO_NAMES
    if "*" in path or "?" in path:
        return any(ROOT.glob(path))
    target = (ROOT / path).resolve()
    return target.is_relative_to(ROOT) and target.exists()


def cited_paths(text: str) -> list[Citation]:
    """Every path the page cites: words of inline code spans, and in code blocks the words
    that start with a top-level directory of the repository (diagrams, commands)."""
    found: list[Citation] = []
    for fence in FENCE.finditer(text):
        for word in CODE_PATH.finditer(fence.group(3)):
            path = _as_path(word.group(1))
            if path is not None:
                found.append(Citation(_line(text, fence.start(3) + word.start()), path))
        if not fence.group(2).strip():
            # A diagram may name a module without its directory: it must be some file's name.
            for word in re.finditer(r"[\w-]+\.(?:py|lua)\b", fence.group(3)):
                found.append(Citation(_line(text, fence.start(3) + word.start()), word.group(0)))
    prose = FENCE.sub(_blank, text)
    for span in CODE_SPAN.finditer(prose):
        for word in span.group(2).split():
            path = _as_path(word)
            if path is not None:
                found.append(Citation(_line(prose, span.start()), path))
    return sorted(found, key=lambda c: c.line)


def missing_paths(text: str) -> list[Citation]:
    return [c for c in cited_paths(text) if not _exists(c.text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for match in HEADING.finditer(FENCE.sub(_blank, text)):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(page: Path, text: str) -> list[Citation]:
    """Relative links of `page` whose file, or whose #anchor in a Markdown file, is not there."""
    broken: list[Citation] = []
    prose = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), FENCE.sub(_blank, text))
    for link in LINK.finditer(prose):
        target = link.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # https:, mailto:: not between the pages
        path_part, _, anchor = target.partition("#")
        where = Citation(_line(prose, link.start()), target)
        if not path_part:  # an anchor of this page
            if anchor not in anchors(text):
                broken.append(where)
            continue
        resolved = (page.parent / path_part).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(where)
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            broken.append(where)
    return broken


def _ids(pages: list[Path]) -> list[str]:
    return [p.relative_to(ROOT).as_posix() for p in pages]


def test_the_pages_are_there() -> None:
    assert (ROOT / "README.md").exists()
    assert len(PAGES) > 5, PAGES


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_cited_path_exists(page: Path) -> None:
    missing = missing_paths(page.read_text())
    assert not missing, (
        f"{page.relative_to(ROOT)} cites paths that are not in the repository:\n"
        + ("\n".join(map(str, missing)))
    )


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = broken_links(page, page.read_text())
    assert not broken, f"{page.relative_to(ROOT)} has links that lead nowhere:\n" + (
        "\n".join(map(str, broken))
    )


def test_the_checks_catch_a_wrong_path_and_a_dead_link() -> None:
    """The checker itself: what it must find, and what it must leave alone."""
    page = ROOT / "docs" / "example.md"
    text = (
        "# Example\n\n"
        "The run is `tasks/jobrun.py` and `tasks/no_such_module.py`; the ledger\n"
        "`avatarq/ledger/`, its scripts `avatarq/ledger/lua/*.lua`, `avatarq/ledger/lua/*.nope`;\n"
        "the lab `devstack/avatarq_dev/faults/lab.py`, `nowhere.py`, `./devstack`, `./nodir`.\n"
        "Not paths: `/jobs/{id}`, `s3://bucket/key`, `text/event-stream`, `.venv/bin/helm`,\n"
        "`github.com/livekit/livekit-server/cmd/server@v1.13.5`, `redis:events:{job_id}`.\n\n"
        "```\ntasks/link/links.py  warm (warm.py) or cold (gone.py)\n```\n\n"
        "```yaml\ntimezone: Europe/Berlin\nfile: tasks/missing.py\n```\n\n"
        "[ok](usage.md#http-api) [ok](../README.md) [ok](#example) [web](https://example.com)\n"
        "[no file](nothing.md) [no anchor](usage.md#no-such-section) [no](#nope)\n"
    )
    assert [str(c) for c in missing_paths(text)] == [
        "line 3: tasks/no_such_module.py",
        "line 4: avatarq/ledger/lua/*.nope",
        "line 5: nowhere.py",
        "line 5: nodir/",
        "line 10: gone.py",
        "line 15: tasks/missing.py",
    ]
    assert [str(c) for c in broken_links(page, text)] == [
        "line 19: nothing.md",
        "line 19: usage.md#no-such-section",
        "line 19: #nope",
    ]


def test_slug_is_githubs() -> None:
    assert slug("Brokers: Redis or RabbitMQ") == "brokers-redis-or-rabbitmq"
    assert slug("Results, events, webhooks") == "results-events-webhooks"
    assert slug("The fleet: lanes against polling (`avatarq bench`)") == (
        "the-fleet-lanes-against-polling-avatarq-bench"
    )
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}
