"""Tags on a flow run, so that the Prefect UI filters lmforge's runs by flow and by where their
stages ran: `lmforge`, the flow's name and `profile:<cluster profile>`, added to the tags the run
was started with (a deployment's in prefect.yaml, `demo` from `python -m flows.lifecycle`). The
profile is a parameter, known only once the run has started: so the run tags itself."""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.runtime import flow_run

from cluster.profiles import profile_path


async def tag_flow_run(profile: str | None) -> None:
    """Tag the flow run we are in; `profile` as the flow's `run.profile` (None: the default)."""
    tags = {"lmforge", flow_run.get_flow_name(), f"profile:{profile_path(profile).stem}"}
    async with get_client() as client:
        run = await client.read_flow_run(flow_run.get_id())
        await client.update_flow_run(run.id, tags=sorted(set(run.tags) | tags))
