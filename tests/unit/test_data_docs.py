"""Data Docs: every page loads its CSS, JS, fonts and images from files inside the site (so it renders offline), the
vendored files are the npm packages' bytes, and the pages name the suite, asset and run and say how many records
were quarantined."""

import hashlib
import html
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pytest

from llmops.common.errors import StageError
from llmops.common.io import RECORD_SCHEMA
from llmops.data.data_docs import ASSETS_DIR, manifest, offline_template
from llmops.data.expectations import validate_records
from llmops.params.validate import ValidateConfig

pytestmark = pytest.mark.unit

GOOD = 8


def corpus() -> pa.Table:
    """8 valid records, one empty text (text_length) and one more with a repeated id (id_unique: both quarantined)."""
    texts = {f"good{i}.py": f"def f{i}(x):\n    return x + {i}\n" for i in range(GOOD)}
    rows = [{"id": rid, "text": text, "source": "test", "meta": "{}", "ingest_error": None} for rid, text in texts.items()]
    rows.append({"id": "empty.py", "text": "", "source": "test", "meta": "{}", "ingest_error": None})
    rows.append({"id": "good0.py", "text": "x = 1\n", "source": "test", "meta": "{}", "ingest_error": None})
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs") / "data_docs"
    validate_records(corpus(), ValidateConfig(min_pass_rate=0.5), root)
    return root


class AssetLoads(HTMLParser):
    """The URLs a browser fetches by itself when it opens the page: <link href>, <script src>, <img src>."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"link": "href", "script": "src", "img": "src"}.get(tag)
        self.urls += [value for name, value in attrs if name == wanted and value]


def asset_loads(page: Path) -> list[str]:
    parser = AssetLoads()
    parser.feed(page.read_text())
    return parser.urls


def page_text(page: Path) -> str:
    source = re.sub(r"<script.*?</script>|<style.*?</style>", " ", page.read_text(), flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", source)))


def validation_page(docs: Path, suite: str) -> Path:
    (page,) = (docs / "validations" / suite).rglob("*.html")
    return page


def test_the_site_has_the_index_both_suites_and_both_validations(docs):
    pages = {p.relative_to(docs).parts[0] for p in docs.rglob("*.html")}
    assert pages == {"index.html", "expectations", "validations"}
    assert {p.stem for p in (docs / "expectations").glob("*.html")} == {"record_rules", "quarantine_gate"}
    assert {p.name for p in (docs / "validations").iterdir()} == {"record_rules", "quarantine_gate"}


def test_no_page_loads_anything_from_the_network(docs):
    for page in docs.rglob("*.html"):
        urls = asset_loads(page)
        assert len(urls) >= 16, page  # 15 CSS/JS files and the favicon at least: the parser saw the head
        remote = [u for u in urls if urlsplit(u).scheme or u.startswith("//")]
        assert not remote, f"{page.relative_to(docs)} loads {remote}"


def test_every_local_asset_a_page_loads_exists_inside_the_site(docs):
    for page in docs.rglob("*.html"):
        for url in asset_loads(page):
            target = (page.parent / urlsplit(url).path).resolve()
            assert target.is_file(), f"{page.relative_to(docs)} loads {url}: {target} is missing"
            assert target.is_relative_to(docs.resolve()), f"{page.relative_to(docs)} loads {url} from outside the site"


def test_vendored_css_loads_only_files_that_exist(docs):
    sheets = list((docs / "static" / "vendor").rglob("*.css"))
    assert len(sheets) == 7
    for sheet in sheets:
        for ref in re.findall(r"url\(\s*['\"]?([^'\")]+)", sheet.read_text()):
            if ref.startswith("data:"):
                continue
            assert not urlsplit(ref).scheme, f"{sheet} loads {ref}"
            assert (sheet.parent / urlsplit(ref).path).is_file(), f"{sheet} loads {ref}, which is missing"


def test_vendored_files_are_the_bytes_assets_json_records():
    files = manifest()["files"]
    assert set(manifest()["urls"].values()) <= set(files)
    on_disk = {str(p.relative_to(ASSETS_DIR)) for p in ASSETS_DIR.rglob("*") if p.is_file()} - {"assets.json", "README.md"}
    assert on_disk == set(files)
    for name, info in files.items():
        assert hashlib.sha256((ASSETS_DIR / name).read_bytes()).hexdigest() == info["sha256"], name
        assert info["package"] in manifest()["packages"], name


def test_a_template_that_loads_an_unknown_url_stops_the_build_naming_it():
    with pytest.raises(StageError, match=r"page\.j2 loads https://cdn\.example\.org/lib\.js"):
        offline_template("page.j2", '<head><script src="https://cdn.example.org/lib.js"></script></head>')


def test_pages_name_the_suite_the_asset_and_the_run(docs):
    rules = page_text(validation_page(docs, "record_rules"))
    assert "Expectation Suite: record_rules Data asset: record_profile" in rules
    assert "Run Name validate" in rules
    for page in docs.rglob("*.html"):
        text = page_text(page)
        assert "__none__" not in text and "Data asset: None" not in text, page.relative_to(docs)


def test_rules_page_names_each_rule_and_says_succeeded_when_the_pass_rate_holds(docs):
    rules = page_text(validation_page(docs, "record_rules"))
    assert "Status: Succeeded" in rules
    assert "text_length: text_chars is between 1 and 2,000,000 (at least 50.00% of records; the others are quarantined)" in rules


def test_gate_page_says_succeeded_with_the_count_quarantined(docs):
    gate = page_text(validation_page(docs, "quarantine_gate"))
    assert "Status: Succeeded" in gate
    assert f"pass_rate: {GOOD - 1} of {GOOD + 2} records pass every rule (70.00%), at least 50.00% required; 3 quarantined" in gate


def test_gate_page_says_failed_when_the_pass_rate_is_under_the_minimum(tmp_path):
    validate_records(corpus(), ValidateConfig(min_pass_rate=0.9), tmp_path / "data_docs")
    gate = page_text(validation_page(tmp_path / "data_docs", "quarantine_gate"))
    assert "Status: Failed" in gate and "at least 90.00% required; 3 quarantined" in gate
