"""Fixtures of the live-server tests: a smoke model trained once per module and a server on 127.0.0.1 around it.

Used by `pytest tests/serve/test_server.py tests/serve/test_server_guards.py`.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from server_support import AUTH, KEY, SLOW_R
from support import smoke_run

from recurchat.checkpoint import load_model
from recurchat.serve.server import create_app, start_in_thread


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, small_text):
    return load_model(str(smoke_run(tmp_path_factory.mktemp("runs"), small_text)), "cpu")


@pytest.fixture(scope="module")
def server(bundle):
    # a deep recursion limit lets the disconnect tests ask for replies that take seconds, not milliseconds
    srv = start_in_thread(create_app(bundle, api_key=KEY, max_recur_limit=SLOW_R))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c
