"""fedmoe ServerApp: a thin Flower shell over fl_server.federation. Holds no secret key."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fl_client.config import JobConfig
from fl_server.federation import Federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.getLogger("fl_server").setLevel(logging.INFO)
    job = JobConfig.from_run_config(context.run_config)
    Federation(grid=grid, job=job, console=Console(force_terminal=False, width=120)).run()
