"""fedmoe ServerApp: a thin Flower shell over fedmoe.fl_server.federation. Holds no secret key."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedmoe.fl_server.console import ConsoleReporter
from fedmoe.fl_server.federation import Federation
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.flower import quick_object_pulls

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.getLogger("fedmoe.fl_server").setLevel(logging.INFO)
    quick_object_pulls()  # a reply's missing objects: asked again after 0.02 s, not 1 s (fedmoe/protocol/flower.py)
    job = JobConfig.from_run_config(context.run_config)
    reporter = ConsoleReporter(Console(force_terminal=False, width=120))
    state = Federation(grid=grid, job=job, reporter=reporter).run()
    failed = [r.round for r in state.rounds if not r.aggregated]
    if not state.finished or (failed and failed[-1] == state.completed_round):
        # The launcher and `flwr` report a failed run: never "completed" over a missing last aggregate.
        raise RuntimeError(f"job {job.job_id!r} did not complete: {state.end_reason}")
