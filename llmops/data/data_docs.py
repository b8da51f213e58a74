"""Great Expectations Data Docs that render offline: the site config the validate stage builds its Data Docs with.

GX 1.24's page templates load Bootstrap, jQuery, bootstrap-table, Font Awesome and Vega from CDNs (15 <link> and
<script> tags on every page) and the GX logo from a web bucket; offline a page renders unstyled and the index's
validation list stays empty, because bootstrap-table draws it. `data_docs_assets/` holds byte-identical copies of those files from their
npm packages (assets.json maps each CDN URL to its copy and records the sha256). The site config below swaps in
GX's own extension points (a section builder's `view` and `renderer` classes): the views load GX's templates
through a loader that points each CDN URL at `static/vendor/<copy>` relative to the page, and `copy_assets`
puts the copies there. A template that loads anything else from the network stops the build with the URL.
"""

from __future__ import annotations

import json
import re
import shutil
from functools import cache
from pathlib import Path
from typing import Any

from great_expectations.render.renderer import ValidationResultsPageRenderer
from great_expectations.render.view import DefaultJinjaIndexPageView, DefaultJinjaPageView
from jinja2 import BaseLoader, Environment, pass_context

from llmops.common.errors import StageError

ASSETS_DIR = Path(__file__).parent / "data_docs_assets"
VENDOR_DIR = "static/vendor"  # inside the Data Docs site
# GX's logos live in a web bucket; the site's own static/images/ (copied by GX) has the one the navbar shows.
GX_WEB_ASSETS = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
# An http(s) URL the browser fetches by itself: <link href>, <script src>, <img src>, CSS url(), or a Jinja
# string that becomes one (the navbar's logo directory).
NETWORK_LOAD_RE = re.compile(
    r"""<(?:link|script|img)\b[^>]*?\b(?:href|src)=["'](https?://[^"']+)"""
    r"""|url\(\s*["']?(https?://[^"')]+)"""
    r"""|{%-?\s*set\s+\w+\s*=\s*["'](https?://[^"']+)"""
)


@cache
def manifest() -> dict[str, Any]:
    """assets.json: `urls` (CDN URL -> vendored file), `files` (file -> npm package, sha256), `packages` (license)."""
    return json.loads((ASSETS_DIR / "assets.json").read_text())


@pass_context
def docs_root(context: Any) -> str:
    """The site root relative to the page being rendered, by the page's kind (the layout GX's navbar uses)."""
    renderer = context.get("renderer_type") or ""
    depth = (context.get("expectation_suite_name") or "").count(".")
    if "ValidationResults" in renderer or "ProfilingResults" in renderer:
        return "../" * (depth + 4)  # validations/<suite>/<run name>/<run time>/<batch>.html
    if "ExpectationSuite" in renderer:
        return "../" * (depth + 1)  # expectations/<suite>.html
    return "./"  # index.html


def offline_template(name: str, source: str) -> str:
    """GX template `name` with every CDN load pointed at the vendored copy; StageError for a load we have no copy of."""
    root = "{{ docs_root() }}"
    for url, file in manifest()["urls"].items():
        source = source.replace(f'"{url}"', f'"{root}{VENDOR_DIR}/{file}"')
    # The navbar logo (a Jinja string) and the dark-theme logo (CSS) come from GX's web bucket.
    source = source.replace(f'"{GX_WEB_ASSETS}"', '(docs_root() ~ "static/images/")')
    source = re.sub(rf"url\('{re.escape(GX_WEB_ASSETS)}[^']*'\)", f"url('{root}static/images/logo-long.png')", source)
    # GX's favicon path skips one level on validation pages; the site root is the same for every static file.
    source = source.replace('static_images_dir + "favicon.ico"', 'docs_root() ~ "static/images/favicon.ico"')
    for match in NETWORK_LOAD_RE.finditer(source):
        url = next(group for group in match.groups() if group)
        raise StageError(
            f"Data Docs: GX template {name} loads {url} from the network and {ASSETS_DIR / 'assets.json'} has no copy of it; "
            f"vendor the file (npm pack the package named in the URL) and map the URL in assets.json"
        )
    return source


class OfflineTemplates(BaseLoader):
    """GX's template loader with `offline_template` applied to every template it returns."""

    def __init__(self, inner: BaseLoader) -> None:
        self.inner = inner

    def get_source(self, environment: Environment, template: str) -> tuple[str, str | None, Any]:
        source, filename, uptodate = self.inner.get_source(environment, template)
        return offline_template(template, source), filename, uptodate


def _offline(env: Environment) -> None:
    env.loader = OfflineTemplates(env.loader)
    env.globals["docs_root"] = docs_root


class OfflinePageView(DefaultJinjaPageView):
    """GX's page view (validation results, expectation suites) with the vendored assets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _offline(self.env)


class OfflineIndexPageView(DefaultJinjaIndexPageView):
    """GX's index page view with the vendored assets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _offline(self.env)


class ValidationPageRenderer(ValidationResultsPageRenderer):
    """GX's validation page, with the data asset named: GX reads it from a batch spec that a dataframe asset leaves
    without one, and the page said "Data asset: None"."""

    @classmethod
    def _render_validation_header(cls, validation_results: Any) -> Any:
        header = super()._render_validation_header(validation_results)
        header.subheader.string_template["params"]["data_asset_name"] = validation_results.asset_name
        return header


def site_config(docs_dir: Path) -> dict[str, Any]:
    """A local Data Docs site at `docs_dir` whose pages load only files inside it (after `copy_assets`)."""
    view = {"module_name": __name__, "class_name": OfflinePageView.__name__}
    return {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,  # tutorial pop-ups and footers that link to GX's website
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())},
        "site_index_builder": {
            "class_name": "DefaultSiteIndexBuilder",
            "view": {"module_name": __name__, "class_name": OfflineIndexPageView.__name__},
        },
        "site_section_builders": {
            "expectations": {"view": view},
            "validations": {"view": view, "renderer": {"module_name": __name__, "class_name": ValidationPageRenderer.__name__}},
            "profiling": {"view": view},
        },
    }


def copy_assets(docs_dir: Path) -> None:
    """Put the vendored files (with their licenses and assets.json) at `docs_dir`/static/vendor/."""
    shutil.copytree(ASSETS_DIR, Path(docs_dir) / VENDOR_DIR, dirs_exist_ok=True)
