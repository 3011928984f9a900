"""docs/detect.md's table of what is detected is generated from the detectors' own text: every kind of every detector
has its row (what, count, cost, fix), and the page says exactly what the detectors say."""

from __future__ import annotations

import os

from shims import detect
from shims.detect import catalogue
from tests.conftest import REPO

PAGE = os.path.join(REPO, "docs", "detect.md")  # the checkout's page (shims may be installed from a wheel)


def test_every_kind_has_its_row_in_its_detector():
    for cls in detect.detector_classes():
        assert set(cls.docs) == set(cls.kinds), cls.name
        for kind, row in cls.docs.items():
            assert len(row) == 4 and all(isinstance(cell, str) and cell and "|" not in cell for cell in row), kind


def test_the_page_says_what_the_detectors_say():
    with open(PAGE) as f:
        page = catalogue.page_table(f.read())
    assert page == catalogue.table(), "regenerate: python -m shims.detect.catalogue --write"
    assert [line.split("`")[1] for line in page.splitlines()[2:]] == list(detect.kinds())
