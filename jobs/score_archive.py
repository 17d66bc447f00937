"""Ray job entrypoint: score an inspection archive against a normal bank, or against the banks of a routing table.

For `ray job submit` and KubeRay RayJobs; the arguments are those of `spade-ray score`:

    python jobs/score_archive.py s3://plant/2026-11-28/ --bank s3://plant/banks/line3 --output s3://plant/scored/2026-11-28
    python jobs/score_archive.py s3://plant/2026-11-28/ --routes s3://plant/routes.yaml --output s3://plant/scored/2026-11-28

When the environment has ROUTES (a key of the spade-ray-params ConfigMap, which the Ray head's
environment holds: a path such as /etc/spade-ray/routes/routes.yaml, where the spade-ray-routes
ConfigMap is mounted, or a URL), the run scores with `--routes ROUTES` in place of the `--bank`
argument, so one RayJob entrypoint serves a one-bank line and a mixed archive alike.  Empty or
unset: `--bank` as given.

Inside a Ray job the driver joins the job's cluster (RAY_ADDRESS is set by Ray).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from spade_ray.apps.cli import main


def score_argv(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The `spade-ray score` arguments: ``argv``, with ``--bank B`` replaced by ``--routes $ROUTES`` when ROUTES is set."""
    argv = list(argv)
    routes = environ.get("ROUTES", "").strip()
    if not routes or "--routes" in argv:
        return ["score", *argv]
    for i, arg in enumerate(argv):
        if arg == "--bank" and i + 1 < len(argv):
            del argv[i:i + 2]
            break
        if arg.startswith("--bank="):
            del argv[i]
            break
    print(f"score_archive: ROUTES={routes}: each image is scored against its route's bank (--routes)", file=sys.stderr)
    return ["score", *argv, "--routes", routes]


if __name__ == "__main__":
    sys.exit(main(score_argv(sys.argv[1:], os.environ)))
