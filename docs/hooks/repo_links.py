"""mkdocs hook: links from docs/ to the repository's other files, e.g. ``../results/README.md``.

The pages link to the committed results beside docs/, so that they read right on a forge. mkdocs
knows only the files under docs/: it would report every such link as not found (an error under
``--strict``), and the site would lack the files. This hook checks those links itself: a target
that does not exist is a warning (so ``mkdocs build --strict`` fails, as for a broken link between
pages); an existing one is copied into the site under ``repo/`` and the link points at the copy.
A link to a directory points at its README.md, or else at a generated list of its files.
Links that stay inside docs/ are left to mkdocs and its own checks.
"""

from __future__ import annotations

import html
import logging
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mkdocs.utils import get_relative_url

log = logging.getLogger("mkdocs.hooks.repo_links")  # under "mkdocs", so --strict counts its warnings

SITE_FOLDER = "repo"  # the copies: SITE/repo/<path in the repository>
# A URL scheme of our own: mkdocs leaves links with a scheme alone, and on_page_content puts the
# copy's relative URL in its place once the page's own URL is known.
_MARK = "couplings-repo:"
# The target of a Markdown link or image, and the src or href of raw HTML.
_LINK = re.compile(r"(?P<lead>\]\(\s*)(?P<url>[^)\s]+)|(?P<attr>\b(?:src|href)=\")(?P<quoted>[^\"]+)")

_repo: Path
_docs: Path
_copies: set[str] = set()  # repository paths (POSIX) to copy into the site


def on_config(config):
    global _repo, _docs
    _repo = Path(config.config_file_path).resolve().parent
    _docs = Path(config.docs_dir).resolve()
    _copies.clear()
    return config


def on_page_markdown(markdown: str, page, config, files) -> str:
    page_dir = Path(page.file.abs_src_path).parent

    def replace(match: re.Match) -> str:
        lead = match.group("lead") or match.group("attr")
        url = match.group("url") or match.group("quoted")
        return lead + _outside_link(url, page_dir, page.file.src_uri)

    return _LINK.sub(replace, markdown)


def _outside_link(url: str, page_dir: Path, src_uri: str) -> str:
    """``url`` itself, or for a target outside docs/ inside the repository, a marked link to its copy."""
    parts = urlsplit(url)
    if parts.scheme or parts.netloc or not parts.path or url.startswith(("/", "\\")):
        return url
    target = (page_dir / unquote(parts.path)).resolve()
    if target.is_relative_to(_docs) or not target.is_relative_to(_repo):
        return url  # mkdocs checks links between pages (and reports any that leave the repository)
    path = target.relative_to(_repo).as_posix()
    if not target.exists():
        log.warning(f"Doc file '{src_uri}' links to '{url}', but {path} does not exist in the repository.")
        return url
    if target.is_dir() and (target / "README.md").is_file():
        path = f"{path}/README.md"
    elif target.is_dir():
        path = f"{path}/index.html"
    _copies.add(path)
    return _MARK + path + (f"?{parts.query}" if parts.query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def on_page_content(html_text: str, page, config, files) -> str:
    return re.sub(re.escape(_MARK) + r"([^\"'\s>#?]+)",
                  lambda m: get_relative_url(f"{SITE_FOLDER}/{m.group(1)}", page.url), html_text)


def on_post_build(config) -> None:
    site = Path(config.site_dir) / SITE_FOLDER
    for path in sorted(_copies):
        if path.endswith("/index.html") and not (_repo / path).is_file():
            _copy_listing(_repo / path.removesuffix("/index.html"), site / path)
        else:
            (site / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(_repo / path, site / path)


def _copy_listing(directory: Path, index: Path) -> None:
    """Copies ``directory``'s files beside ``index``, an HTML list of them."""
    names = []
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = file.relative_to(directory).as_posix()
        (index.parent / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, index.parent / name)
        names.append(name)
    items = "".join(f'<li><a href="{html.escape(n)}">{html.escape(n)}</a></li>\n' for n in names)
    title = html.escape(directory.relative_to(_repo).as_posix())
    index.write_text(f"<!doctype html>\n<title>{title}</title>\n<h1>{title}</h1>\n<ul>\n{items}</ul>\n")
