"""Run the served `nightly-retrain/manual` deployment as the Prefect UI form does, once it
is registered, and print its final state, its markdown report and the timezone of the
`nightly` deployment as one JSON line. Usage: python run_manual_deployment.py PARAMS_JSON
(PREFECT_API_URL, and the auth string where the server wants one, come from the environment)."""

import asyncio
import json
import sys

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.deployments import run_deployment


async def registered():
    # `llmrec serve` registers its deployments a few seconds after it starts.
    async with get_client() as client:
        for _ in range(240):
            try:
                return await client.read_deployment_by_name("nightly-retrain/manual")
            except Exception:
                await asyncio.sleep(0.5)


async def outcome(run) -> dict:
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["nightly-report"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        nightly = await client.read_deployment_by_name("nightly-retrain/nightly")
    return {"state": run.state.type.value, "report": found[0].data if found else "",
            "nightly_timezone": nightly.schedules[0].schedule.timezone}


asyncio.run(registered())
run = run_deployment("nightly-retrain/manual", parameters=json.loads(sys.argv[1]), timeout=500)
print(json.dumps(asyncio.run(outcome(run))))
