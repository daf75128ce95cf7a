"""The build tools behind the editions: the execution cache shared by nbval and the book, the derived
configurations of the PDF and the student edition, the notebook archives, and the LaTeX maths macros."""

from __future__ import annotations

import json
import re
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import editions  # noqa: E402
import notebook_cache  # noqa: E402

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())


def test_latex_preamble_defines_exactly_the_mathjax_macros() -> None:
    sphinx = CONFIG["sphinx"]["config"]
    mathjax = set(sphinx["mathjax3_config"]["tex"]["macros"])
    preamble = sphinx["latex_elements"]["preamble"]
    latex = set(re.findall(r"\\(?:newcommand|DeclareMathOperator)\{\\([A-Za-z]+)\}", preamble))
    assert latex == mathjax, f"LaTeX defines {sorted(latex)}, MathJax {sorted(mathjax)}"
    assert "providecommand" not in preamble  # a clash with an existing command must fail loudly
    assert sphinx["latex_use_xindy"] is False


@pytest.mark.parametrize("edition", sorted(editions.EDITIONS))
def test_derived_config_is_config_plus_the_edition_settings(edition: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(editions, "BUILD", tmp_path)
    derived = yaml.safe_load(editions.derived_config(edition).read_text())
    assert derived["sphinx"]["config"]["hide_solutions"] is True
    derived["sphinx"]["config"].pop("hide_solutions")
    for name, folder in derived["sphinx"]["local_extensions"].items():    # absolute: the file is elsewhere
        assert Path(folder) == (ROOT / CONFIG["sphinx"]["local_extensions"][name]).resolve()
        derived["sphinx"]["local_extensions"][name] = CONFIG["sphinx"]["local_extensions"][name]
    assert derived == CONFIG           # nothing else differs: one configuration to edit


def test_archive_holds_every_chapter_and_is_reproducible(tmp_path: Path) -> None:
    files = sorted((ROOT / "book").glob("*.ipynb"))
    a, b = tmp_path / "1" / "a.zip", tmp_path / "2" / "a.zip"
    for path in (a, b):
        path.parent.mkdir()
        editions.write_zip(path, files, ROOT / "book", "readme\n")
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as z:
        names = z.namelist()
        assert names[0] == "a/README.txt"
        assert sorted(names[1:]) == sorted(f"a/{f.name}" for f in files)
        nbformat.validate(nbformat.reads(z.read(f"a/{files[0].name}").decode(), as_version=4))


def _nbval_item(path: Path, cell_num: int, outputs):
    return SimpleNamespace(parent=SimpleNamespace(fspath=path), cell_num=cell_num, test_outputs=outputs)


def _report(when: str, outcome: str = "passed"):
    return SimpleNamespace(when=when, passed=outcome == "passed", failed=outcome == "failed",
                           skipped=outcome == "skipped")


@pytest.fixture
def notebook(tmp_path: Path) -> Path:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("print(1)"),
                nbformat.v4.new_code_cell("2")]
    path = tmp_path / "t.ipynb"
    nbformat.write(nb, path)
    return path


def _run(recorder, notebook: Path, second: str = "passed") -> None:
    stream = nbformat.from_dict({"output_type": "stream", "name": "stdout", "text": "1\n"})
    result = nbformat.from_dict({"output_type": "execute_result", "data": {"text/plain": "2"},
                                 "metadata": {}, "execution_count": 7})
    for cell, outs, outcome in ((0, [stream], "passed"), (1, [result], second)):
        item = _nbval_item(notebook, cell, outs)
        for when in ("setup", "call", "teardown"):
            recorder.record(item, _report(when, outcome if when == "call" else "passed"))


def test_clean_notebook_is_cached_with_its_outputs_and_matched_by_code(notebook: Path, tmp_path: Path) -> None:
    from jupyter_cache import get_cache

    cache_dir = tmp_path / "cache"
    recorder = notebook_cache.NbvalRecorder(cache_dir)
    _run(recorder, notebook)
    assert recorder.finish() == [str(notebook)]
    cache = get_cache(str(cache_dir))
    fresh = nbformat.read(notebook, as_version=4)        # what the book build reads: no outputs
    _, merged = cache.merge_match_into_notebook(fresh)
    code = [c for c in merged.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [1, 2]
    assert code[0].outputs[0]["text"] == "1\n"
    assert code[1].outputs[0]["data"]["text/plain"] == "2" and code[1].outputs[0]["execution_count"] == 2
    assert json.loads((cache_dir / notebook_cache.FINGERPRINT).read_text()) == notebook_cache.fingerprint()
    fresh.cells[1].source = "print(3)"                    # other code: no match, the build executes it
    with pytest.raises(KeyError):
        cache.match_cache_notebook(fresh)


def test_failed_or_partial_notebook_is_not_cached(notebook: Path, tmp_path: Path) -> None:
    recorder = notebook_cache.NbvalRecorder(tmp_path / "cache")
    _run(recorder, notebook, second="failed")
    assert recorder.finish() == []
    partial = notebook_cache.NbvalRecorder(tmp_path / "cache")
    item = _nbval_item(notebook, 0, [])
    for when in ("setup", "call", "teardown"):
        partial.record(item, _report(when))                # the second cell was deselected
    assert partial.finish() == [] and not (tmp_path / "cache").exists()


def test_check_drops_a_cache_made_with_other_code(notebook: Path, tmp_path: Path, monkeypatch) -> None:
    cache_dir = tmp_path / "cache"
    recorder = notebook_cache.NbvalRecorder(cache_dir)
    _run(recorder, notebook)
    recorder.finish()
    assert notebook_cache.check(cache_dir) is True and cache_dir.exists()
    other = dict(notebook_cache.fingerprint(), files="0" * 64)    # relgrad/ edited since
    monkeypatch.setattr(notebook_cache, "fingerprint", lambda: other)
    assert notebook_cache.check(cache_dir) is False
    assert json.loads((cache_dir / notebook_cache.FINGERPRINT).read_text()) == other   # empty, relabelled
    assert not [p for p in cache_dir.iterdir() if p.name != notebook_cache.FINGERPRINT]


def test_fingerprint_follows_relgrad_sources(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "relgrad").mkdir()
    (tmp_path / "relgrad" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(notebook_cache, "ROOT", tmp_path)
    before = notebook_cache.fingerprint()
    (tmp_path / "relgrad" / "a.py").write_text("x = 2\n")
    assert notebook_cache.fingerprint()["files"] != before["files"]
    assert notebook_cache.fingerprint()["packages"] == before["packages"]


def test_fingerprint_is_the_same_in_pytest_and_in_make_book() -> None:
    """pytest (which stores) and `make book` (which checks) see different sys.path: the fingerprint must not."""
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "tools" / "notebook_cache.py"), "fingerprint"], cwd=ROOT / "tools",
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == notebook_cache.fingerprint()


def test_nothing_is_stored_when_the_code_changed_while_the_notebooks_ran(notebook: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    recorder = notebook_cache.NbvalRecorder(tmp_path / "cache")
    _run(recorder, notebook)
    other = dict(notebook_cache.fingerprint(), files="1" * 64)     # e.g. relgrad/ edited mid-run
    monkeypatch.setattr(notebook_cache, "fingerprint", lambda: other)
    assert recorder.finish() == [] and not (tmp_path / "cache").exists()


def test_records_without_a_fingerprint_are_not_adopted(notebook: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "global.db").write_text("an older build's records")           # no stamp next to them
    recorder = notebook_cache.NbvalRecorder(cache_dir)
    _run(recorder, notebook)
    recorder.finish()
    assert not (cache_dir / "global.db").read_bytes().startswith(b"an older")   # cleared, then a fresh cache
    assert json.loads((cache_dir / notebook_cache.FINGERPRINT).read_text()) == notebook_cache.fingerprint()
