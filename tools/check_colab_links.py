#!/usr/bin/env python3
"""Check the Colab launch links of the built website and of README.md.

After ``make book`` (``_build/html``), every Colab link must read

    https://colab.research.google.com/github/OWNER/REPO/blob/main/book/NAME.ipynb

with OWNER/REPO from ``repository.url`` in _config.yml (the one place naming the repository) and the branch
``main`` (``repository.branch``; the theme's default would be ``master``). Checked:

* every built page's Colab links point at that page's own twin ``book/NAME.ipynb``, and the twin exists;
* every paired chapter (``book/NAME.md`` with a jupytext header) was built and its page has such a link;
* README.md's Colab links (badges) follow the same rule and name a chapter whose twin exists.

A twin that exists but is not tracked by git is a warning (Colab opens GitHub: commit it); with
``--require-committed`` it is an error. Exit status 0 when all links are right; 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import List, Optional, Sequence, Set, Tuple

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebooks import ROOT, chapter_sources  # noqa: E402

COLAB = "https://colab.research.google.com"
BRANCH = "main"


def github_slug(url: str) -> Tuple[str, str]:
    """('owner', 'repo') of a https://github.com/OWNER/REPO URL."""
    m = re.match(r"^https?://github\.com/([^/\s]+)/([^/\s]+?)(?:\.git)?/?$", url.strip())
    if not m:
        raise ValueError(f"repository.url {url!r} is not https://github.com/OWNER/REPO")
    return m.group(1), m.group(2)


def expected_link(owner: str, repo: str, name: str, branch: str = BRANCH) -> str:
    return f"{COLAB}/github/{owner}/{repo}/blob/{branch}/book/{name}.ipynb"


def is_launch_link(url: str) -> bool:
    """A Colab URL that opens something (not the badge image under /assets/)."""
    return url.startswith(COLAB) and not url.startswith(f"{COLAB}/assets/")


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: List[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href)


def links_in_html(text: str) -> List[str]:
    parser = _Anchors()
    parser.feed(text)
    return [h for h in parser.hrefs if is_launch_link(h)]


def links_in_markdown(text: str) -> List[str]:
    """Colab launch URLs in Markdown, ignoring code (fenced blocks and `inline` spans, where placeholders such
    as ``book/<chapter>.ipynb`` are prose, not links)."""
    text = re.sub(r"(?ms)^\s*(```|~~~).*?^\s*\1", "", text)
    text = re.sub(r"`[^`\n]*`", "", text)
    urls = re.findall(r"https://colab\.research\.google\.com/[^\s)\]\"'<>]+", text)
    return [u for u in urls if is_launch_link(u)]


def link_target(url: str, owner: str, repo: str) -> Optional[str]:
    """NAME when ``url`` is exactly a Colab link to book/NAME.ipynb on main of OWNER/REPO, else None."""
    prefix = f"{COLAB}/github/{owner}/{repo}/blob/{BRANCH}/book/"
    if url.startswith(prefix) and url.endswith(".ipynb"):
        name = url[len(prefix):-len(".ipynb")]
        if name and "/" not in name:
            return name
    return None


def tracked_files(root: Path) -> Optional[Set[str]]:
    """Paths git tracks under ``root`` (relative, POSIX), or None when ``root`` is not a git work tree."""
    proc = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return {p for p in proc.stdout.split("\0") if p}


def check(root: Path = ROOT, build: Optional[Path] = None, require_committed: bool = False
          ) -> Tuple[List[str], List[str], dict]:
    """(problems, warnings, counts) for the repository at ``root`` and its built site ``build``."""
    build = build or root / "_build" / "html"
    problems: List[str] = []
    warnings: List[str] = []
    counts = {"pages": 0, "links": 0, "chapters": 0, "readme": 0}

    config = yaml.safe_load((root / "_config.yml").read_text()) or {}
    repository = config.get("repository") or {}
    try:
        owner, repo = github_slug(str(repository.get("url", "")))
    except ValueError as exc:
        return [f"_config.yml: {exc}"], warnings, counts
    branch = repository.get("branch", "master")
    if branch != BRANCH:
        problems.append(f"_config.yml: repository.branch is {branch!r}; the Colab links must open {BRANCH!r}")

    tracked = tracked_files(root)

    def twin_problem(name: str, where: str) -> None:
        twin = root / "book" / f"{name}.ipynb"
        rel = f"book/{name}.ipynb"
        if not twin.is_file():
            problems.append(f"{where}: links to {rel}, which does not exist (run `make sync` and commit it)")
        elif tracked is not None and rel not in tracked:
            msg = f"{where}: {rel} exists but is not committed: Colab would not find it on GitHub"
            (problems if require_committed else warnings).append(msg)

    chapters = {md.stem for md in chapter_sources(root / "book")}
    wrong: Set[str] = set()  # pages whose Colab links are wrong
    counts["chapters"] = len(chapters)
    if not build.is_dir():
        problems.append(f"{build}: no built site; run `make book` first")
    else:
        for page in sorted(build.rglob("*.html")):
            rel = page.relative_to(build)
            if rel.parts[0].startswith("_"):
                continue  # _static, _sources, _images
            links = links_in_html(page.read_text(encoding="utf-8", errors="replace"))
            if not links:
                continue
            counts["pages"] += 1
            counts["links"] += len(links)
            own = rel.with_suffix("").name if rel.parts[:-1] == ("book",) else None
            for url in sorted(set(links)):
                name = link_target(url, owner, repo)
                if name != own and own is not None:
                    wrong.add(own)  # reported here; not again as "no link" below
                if name is None:
                    want = expected_link(owner, repo, own or "NAME")
                    problems.append(f"{rel}: Colab link {url} is not of the form {want}")
                elif name != own:
                    problems.append(f"{rel}: Colab link opens book/{name}.ipynb, not this page's own twin"
                                    + (f" book/{own}.ipynb" if own else ""))
                else:
                    twin_problem(name, str(rel))
        for name in sorted(chapters):
            page = build / "book" / f"{name}.html"
            want = expected_link(owner, repo, name)
            if not page.is_file():
                problems.append(f"book/{name}.md is a paired chapter but {page.relative_to(build)} was not built "
                                "(is it in _toc.yml?)")
            elif name not in wrong and want not in links_in_html(page.read_text(encoding="utf-8", errors="replace")):
                stale = page.stat().st_mtime < (root / "book" / f"{name}.md").stat().st_mtime
                problems.append(f"{page.relative_to(build)}: chapter page has no Colab launch link to {want}"
                                + (" (the page is older than its source: rebuild with `make book`)" if stale else ""))

    readme = root / "README.md"
    if readme.is_file():
        for url in links_in_markdown(readme.read_text(encoding="utf-8")):
            counts["readme"] += 1
            name = link_target(url, owner, repo)
            if name is None:
                problems.append(f"README.md: Colab link {url} is not of the form {expected_link(owner, repo, 'NAME')}")
                continue
            if name not in chapters:
                problems.append(f"README.md: Colab link opens book/{name}.ipynb, but book/{name}.md is not a paired chapter")
            twin_problem(name, "README.md")
    return problems, warnings, counts


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this repository)")
    parser.add_argument("--build", type=Path, default=None, help="built site (default: ROOT/_build/html)")
    parser.add_argument("--require-committed", action="store_true",
                        help="fail, not just warn, when a linked twin is not tracked by git")
    args = parser.parse_args(argv)
    problems, warnings, counts = check(args.root.resolve(), args.build, args.require_committed)
    for line in warnings:
        print("COLAB-LINK warning:", line)
    for line in problems:
        print("COLAB-LINK:", line)
    print(f"colab links: {counts['links']} link(s) on {counts['pages']} page(s), {counts['chapters']} paired chapter(s), "
          f"{counts['readme']} README link(s); {len(problems)} problem(s), {len(warnings)} warning(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
