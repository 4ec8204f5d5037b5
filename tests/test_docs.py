"""Documentation and data files that must stay true to the code."""

import re
import tomllib
from pathlib import Path

import pytest

from intercom.config import load_settings, parse_settings, wiring_warnings
from intercom.configdoc import render

ROOT = Path(__file__).resolve().parent.parent
BASE = """
[station]
id = "t"
[[hardware.buttons]]
pin = 17
flat = "1"
"""


def test_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == render(), "run scripts/config-doc"


def test_config_reference_names_every_section():
    text = render()
    for header in ("[station]", "[[hardware.buttons]]", "[hardware.relay]", "[media.camera]"):
        assert f"`{header}`" in text


def test_example_config_is_valid_and_safe():
    settings = load_settings(ROOT / "docs" / "intercom.example.toml")
    assert settings.station.id == "front-door"
    assert wiring_warnings(settings) == []


@pytest.mark.parametrize("path", sorted((ROOT / "hw" / "pinmaps").glob("*.toml")), ids=str)
def test_pin_maps_fit_the_config(path: Path):
    data = tomllib.loads(path.read_text())
    assert data["board"]["name"]
    relay = data["hardware"]["relay"]
    text = (
        BASE
        + "[hardware.relay]\n"
        + "".join(
            f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in relay.items()
        )
    )
    settings = parse_settings(text)
    assert settings.hardware.relay.pin == relay["pin"]
    # An active-low board is valid but warned about (released pin energises it).
    assert bool(wiring_warnings(settings)) == (not relay["active_high"])


def test_relay_on_pulled_up_pin_is_warned():
    settings = parse_settings(BASE + "[hardware.relay]\npin = 4\n")
    (warning,) = wiring_warnings(settings)
    assert warning.startswith("hardware.relay.pin: GPIO4 is pulled up at power-on")


def test_the_vulnerability_disclosure_policy_is_there_and_linked():
    """EN 303 645 5.2-1: how to report privately, what the reporter hears and when, versions."""
    policy = (ROOT / "SECURITY.md").read_text()
    for needed in ("privately", "Report a vulnerability", "5 working days", "90 days",
                   "Which versions receive fixes"):
        assert needed in policy, needed
    assert "(SECURITY.md)" in (ROOT / "README.md").read_text()


def test_the_docs_stand_on_their_own():
    """No page points at a file outside the repository or at an issue tracker's thread."""
    pages = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "hw").rglob("*.md")), *sorted((ROOT / "integrations").rglob("*.md"))]
    outside = re.compile(r"/work/|/notes/|\bSTYLE\.md\b|\bissues? ?#\d+"
                         r"|\b(?:the|this|that) (?:\w+ )?issue\b", re.IGNORECASE)
    found = [f"{page.relative_to(ROOT)}:{number}: {line.strip()}"
             for page in pages
             for number, line in enumerate(page.read_text().splitlines(), 1)
             if outside.search(line)]
    assert found == []
