"""First boot's installer code: it pairs the installer's phone the way residents pair."""

from __future__ import annotations

import asyncio
import re
import time

from joserfc.jwk import OKPKey

from intercom.calls.pairing import Pairing
from intercom.events import EventBus
from intercom.security import Registry
from intercom.security.principals import Role
from intercom.security.secretbox import create_key
from tests.test_firstboot import dirs, firstboot, installer_file

__all__ = ["dirs"]  # the fixture, used by name


def test_first_boot_spools_a_code_for_the_installers_phone(dirs):
    text = installer_file().split("[installer]")[0] + "[installer]\nphone = true\nvalid_hours = 8\n"
    (dirs["boot"] / "intercom.toml").write_text(text)
    started = time.time()
    result = firstboot(dirs)
    assert result.returncode == 0, result.stderr
    link = re.search(r"installer link: (https://\S+/)installer\.html#pair=(\w+)&fp=([0-9a-f]{64})",
                     result.stdout)
    assert link is not None, result.stdout
    assert "stays valid 8 h once paired" in result.stdout
    code = link.group(2)
    assert code not in (dirs["state"] / "pairing-spool.json").read_text()

    async def redeem() -> None:  # as the station does at its start
        state = dirs["state"]  # as the station opens it: made at its first start
        registry = Registry.for_state_dir(state, create_key(state), EventBus(), create=True)
        await registry.open()
        pairing = Pairing(dirs["state"], "door-1", frozenset({"1"}), EventBus(), registry)
        pairing.open()
        try:
            jwk = OKPKey.generate_key("Ed25519").as_dict(private=False)
            paired = await pairing.redeem(code, jwk)
            installer = registry.get(paired.principal)
            assert installer is not None
            assert installer.role is Role.INSTALLER
            assert installer.valid_until is not None
            assert 8 * 3600 - 5 < installer.valid_until - started < 8 * 3600 + 60
        finally:
            pairing.close()
            await registry.close()

    asyncio.run(redeem())


def test_phone_and_a_public_key_do_not_mix(dirs):
    (dirs["boot"] / "intercom.toml").write_text(installer_file().replace(
        "valid_hours = 72", "valid_hours = 72\nphone = true"))
    result = firstboot(dirs)
    assert result.returncode != 0
    assert "installer.public_key: not with phone = true" in result.stderr
