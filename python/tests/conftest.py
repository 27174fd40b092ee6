"""Shared fixtures: the ddpm command-line binary (for the tests that hold the bindings against
the CLI), found at $DDPM_BIN or ../target/release/ddpm; those tests are skipped without it."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ddpm_bin():
    path = pathlib.Path(os.environ.get("DDPM_BIN", ROOT / "target" / "release" / "ddpm"))
    if not path.is_file():
        pytest.skip(f"no ddpm binary at {path} (cargo build --release, or set DDPM_BIN)")
    return path


@pytest.fixture(scope="session")
def run_cli(ddpm_bin):
    def run(*args, check=True):
        r = subprocess.run([str(ddpm_bin), *map(str, args)], capture_output=True, text=True)
        if check and r.returncode != 0:
            raise AssertionError(f"ddpm {' '.join(map(str, args))} failed:\n{r.stderr}")
        return r

    return run
