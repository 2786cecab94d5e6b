"""Locators shared by the browser tests."""

from __future__ import annotations

import re


def download_button(page, name: str = ""):
    """The page's st.download_button whose label starts with "Download " (then ``name``, a
    regular expression). Scoped to Streamlit's download buttons: a chart's "Download plot as
    a PNG" or a table's "Download as CSV" button (of this page, or of the page before while
    the new one draws) never matches."""
    label = re.compile(r"^Download .*" + name if name else r"^Download ")
    return page.get_by_test_id("stDownloadButton").get_by_role("button", name=label)
