"""schemathesis against the app's own OpenAPI schema: no 5xx and responses that match the schema."""

from __future__ import annotations

import shutil
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

import cosmos3
from cosmos3.loading.tiny import write_pipeline
from cosmos3.server.app import Settings, create_app
from cosmos3.server.limits import Limits

ROOT = Path(__file__).parent.parent / ".pytest_cache" / "schemathesis"
shutil.rmtree(ROOT, ignore_errors=True)
# Small work limits keep every accepted request to a fraction of a second on a CPU.
APP = create_app(
    cosmos3.load(write_pipeline(ROOT / "tiny", seed=2)),
    Settings(
        model_name="tiny",
        jobs_db=ROOT / "jobs.db",
        outputs_dir=ROOT / "outputs",
        sync_timeout_s=60,
        limits=Limits(max_steps=2, max_pixels=64 * 64, max_frames=9, max_tokens=8),
    ),
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)  # its client runs the app's startup (the worker)


# A schema-valid request may still be refused with a 400 that names the field (a model mismatch, a value past the
# server's work limits, a mode that needs an image): positive_data_acceptance is off; every other check is on.
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
