"""schemathesis against a live kktd, from kktd/openapi.yaml: requests that fit the description and requests
that break it, for every operation. Checked on every answer: no 5xx, the status is documented, the body and
headers match its schema, a request that breaks the description is refused, and a refused receipt is not
stored. At the end kktd's log holds no error and no traceback: nothing a client sent was an internal error.

`make test`: 800 derandomized cases per operation with parameters or a body (3,203 in all; a failure
reproduces on every run).
`make fuzz`: KKTD_FUZZ_EXAMPLES cases per operation, randomized unless KKTD_FUZZ_SEED is set.
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kktd.openapi import spec
from tests.fuzzing import fuzz_settings
from tests.support import KktdProcess

# Starts kktd, a mock or another program as a process: the rest of `make test`, not the fast tier.
pytestmark = pytest.mark.process

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]

schema = schemathesis.openapi.from_dict(spec())
schema.config.generation.update(modes=list(GenerationMode), allow_x00=True)


class Live:
    def __init__(self, kktd: KktdProcess) -> None:
        self.kktd = kktd
        self.session = requests.Session()

    def stored(self) -> int:
        counts = self.session.get(f"{self.kktd.url}/v1/kkt/buffer/status", timeout=10).json()["counts"]
        return int(counts["pending"] + counts["sent"] + counts["failed"])


@pytest.fixture(scope="module")
def live(module_kktd: KktdProcess) -> Live:
    return Live(module_kktd)


@schema.parametrize()
@fuzz_settings(800)
def test_live_kktd_conforms_to_its_description(case: schemathesis.Case, live: Live) -> None:
    intake = case.operation.method.upper() == "POST" and case.operation.path == "/v1/kkt/receipt"
    before = live.stored() if intake else 0
    response = case.call_and_validate(base_url=live.kktd.url, session=live.session, checks=CHECKS, timeout=10)
    if intake and response.status_code >= 300:
        assert live.stored() == before, f"a refused receipt ({response.status_code}) was stored"


def test_log_holds_no_internal_error_after_fuzzing(live: Live) -> None:
    log = live.kktd.log()
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if " ERROR " in line or " CRITICAL " in line]
    assert errors == [], errors[:5]
    assert live.kktd.proc is not None and live.kktd.proc.poll() is None, "kktd is still running"
