"""The report as a browser shows it: every thumbnail decodes (headless Chromium from Debian's `chromium` package,
which .ci/run installs)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from curator.stages.clean import CleanSettings, clean
from tests.conftest import write_odd_tree

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const good = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const out = document.createElement('pre');
  out.id = 'image-check';
  out.textContent = 'IMAGES ' + good + '/' + imgs.length;
  document.body.appendChild(out);
});
</script>"""


def dump_dom(page, tmp_path) -> subprocess.CompletedProcess:
    """The DOM headless Chromium holds after loading `page` (scripts run, 10 s of virtual time)."""
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=10000", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.fixture(scope="module")
def odd_report(tmp_path_factory):
    """`curator clean` on the odd tree, once for the tests of this module."""
    tmp = tmp_path_factory.mktemp("report")
    write_odd_tree(tmp / "raw")
    return clean(CleanSettings(root=tmp / "raw", workspace=tmp / "ws", workers=1))


def loaded_with(result, script: str, name: str, tmp_path) -> subprocess.CompletedProcess:
    """The report with `script` appended to its body, saved as `name` beside it (so that its relative links hold), as
    headless Chromium's DOM after loading it."""
    page = result.report_path.read_text(encoding="utf-8")
    checked = result.report_path.with_name(name)
    checked.write_text(page.replace("</body>", script + "</body>"), encoding="utf-8")
    return dump_dom(checked, tmp_path)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_every_report_image_loads_in_chromium(odd_report, tmp_path):
    out = loaded_with(odd_report, CHECK, "report_check.html", tmp_path)
    found = re.search(r"IMAGES (\d+)/(\d+)", out.stdout)
    assert found, out.stderr[-2000:]
    good, total = int(found.group(1)), int(found.group(2))
    assert total >= 8 and good == total


EXPLORE = """<script>
window.addEventListener('load', () => {
  const visible = () => [...document.querySelectorAll('figure.item')].filter(f => f.offsetParent !== null).length;
  const all = visible();
  const select = document.getElementById('f-status');
  select.value = 'duplicate';
  select.dispatchEvent(new Event('change'));
  const duplicates = visible();
  select.value = '';
  select.dispatchEvent(new Event('change'));
  document.querySelector('figure.item img').click();
  const open = !document.getElementById('lightbox').classList.contains('hidden');
  const fields = document.querySelectorAll('#lb-row tr').length;
  const out = document.createElement('pre');
  out.id = 'explore-check';
  out.textContent = 'EXPLORE ' + all + ' ' + duplicates + ' ' + open + ' ' + fields;
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_the_explorer_filters_and_opens_an_image(odd_report, tmp_path):
    result = odd_report
    out = loaded_with(result, EXPLORE, "report_explore.html", tmp_path)
    found = re.search(r"EXPLORE (\d+) (\d+) (\w+) (\d+)", out.stdout)
    assert found, out.stderr[-2000:]
    everything, duplicates, opened, fields = int(found[1]), int(found[2]), found[3], int(found[4])
    expected = int((result.manifest["status"] == "duplicate").sum())
    assert 0 < expected == duplicates < everything
    assert opened == "true" and fields >= 5  # the lightbox shows the image's manifest row
