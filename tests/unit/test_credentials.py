"""The producer's credentials are botocore's default chain, whichever way it is read.

With AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set, `kinesis.load_credentials` reads them through botocore's
own `EnvProvider` and skips importing `botocore.session`; these tests check it returns what the whole chain
returns, for the environment alone, with a session token, with a profile naming other credentials, and with no
environment at all (the shared credentials file).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import botocore.exceptions
import botocore.session
import pytest

from treasure_engine import kinesis

CHAIN_VARS = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CREDENTIAL_EXPIRATION",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_EC2_METADATA_DISABLED",
]


@pytest.fixture
def isolated_chain(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An environment where the chain sees only what a test sets: its own files, no metadata service."""
    for var in CHAIN_VARS:
        monkeypatch.delenv(var, raising=False)
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = filesecret\n\n"
        "[other]\naws_access_key_id = OTHERKEY\naws_secret_access_key = othersecret\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return credentials


def frozen(creds: object) -> tuple[str, str, str | None]:
    f = creds.get_frozen_credentials()  # type: ignore[attr-defined]
    return f.access_key, f.secret_key, f.token


def chain() -> tuple[str, str, str | None]:
    return frozen(botocore.session.Session().get_credentials())


@pytest.mark.parametrize(
    "env",
    [
        {"AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_SECRET_ACCESS_KEY": "envsecret"},
        {"AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_SECRET_ACCESS_KEY": "envsecret", "AWS_SESSION_TOKEN": "tok"},
        {"AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_SECRET_ACCESS_KEY": "envsecret", "AWS_PROFILE": "other"},
        {"AWS_PROFILE": "other"},
        {},
    ],
    ids=["env", "env+token", "env+profile", "profile", "file"],
)
def test_same_credentials_as_the_whole_chain(
    env: dict[str, str], isolated_chain: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    got = kinesis.load_credentials()
    assert got is not None
    assert frozen(got) == chain()
    if "AWS_ACCESS_KEY_ID" in env:
        assert frozen(got)[0] == "ENVKEY"


def test_half_set_environment_raises_as_the_chain_does(isolated_chain: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key id without its secret is botocore's PartialCredentialsError either way, never a silent fallback."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    with pytest.raises(botocore.exceptions.PartialCredentialsError):
        botocore.session.Session().get_credentials()
    with pytest.raises(botocore.exceptions.PartialCredentialsError):
        kinesis.load_credentials()


def test_environment_credentials_do_not_import_botocore_session(isolated_chain: Path) -> None:
    code = (
        "import sys\n"
        "from treasure_engine import Producer, ProducerConfig, kinesis\n"
        "creds = kinesis.load_credentials()\n"
        "assert creds.get_frozen_credentials().access_key == 'ENVKEY'\n"
        "print('botocore.session' in sys.modules)\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "AWS_ACCESS_KEY_ID": "ENVKEY",
        "AWS_SECRET_ACCESS_KEY": "envsecret",
        "AWS_SHARED_CREDENTIALS_FILE": str(isolated_chain),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
