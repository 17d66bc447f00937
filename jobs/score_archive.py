"""Ray job entrypoint: score an inspection archive against a normal bank.

For `ray job submit` and KubeRay RayJobs; the arguments are those of `spade-ray score`:

    python jobs/score_archive.py s3://plant/2026-11-28/ --bank s3://plant/banks/line3 --output s3://plant/scored/2026-11-28

Inside a Ray job the driver joins the job's cluster (RAY_ADDRESS is set by Ray).
"""

from __future__ import annotations

import sys

from spade_ray.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
