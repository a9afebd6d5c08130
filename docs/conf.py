"""Sphinx configuration of qi's documentation site (MyST Markdown pages, Furo theme).

Built strictly in CI (`.ci/run`): `sphinx-build -W --keep-going -n docs docs/_build/html`, so
a broken link, a page outside the table of contents or a missing page fails the build. The
reference pages under `reference/` are written by `python -m qi.cli.reference`.
"""

project = "qi"
author = "the qi developers"
copyright = "2026, the qi developers"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# `page.md#a-heading` links resolve to headings down to level 3, checked at build time
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

html_theme = "furo"
html_title = "qi"
html_static_path: list[str] = []
