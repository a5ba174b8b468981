"""A local AWS endpoint for the tests: moto's server (the moto_url and aws fixtures are in conftest.py)."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path
from typing import Any

import boto3

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
REGION = "eu-west-1"


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
            return True
    except OSError:
        return False


def moto_api(url: str, path: str, body: bytes = b"") -> None:
    request = urllib.request.Request(f"{url}/moto-api/{path}", data=body, method="POST",
                                     headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10):
        pass


class Moto:
    """Clients straight to moto, for seeding resources and reading back what the actions did."""

    def __init__(self, url: str) -> None:
        self.url = url

    def client(self, service: str, **kwargs: Any) -> Any:
        return boto3.client(service, endpoint_url=self.url, region_name=REGION, **kwargs)
