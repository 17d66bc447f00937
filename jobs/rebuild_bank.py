"""Ray job entrypoint: rebuild (or extend) a normal bank from a folder/prefix of normal images.

Runs `spade-ray extract` into a features prefix, then `spade-ray build-bank` from it:

    python jobs/rebuild_bank.py s3://plant/normals/line3/ --features s3://plant/features/line3 \\
        --output s3://plant/banks/line3 --shards 8
    python jobs/rebuild_bank.py s3://plant/normals/new/ --features s3://plant/features/line3-new --add-to s3://plant/banks/line3

Extraction skips images already in the features prefix, so a failed rebuild resumes.
"""

from __future__ import annotations

import argparse
import sys

from spade_ray.apps.cli import main


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Other flags pass through to `spade-ray build-bank` (e.g. --calibration-samples, "
                                     "--target-fpr, --image-k, --pixel-k, --kappa).")
    parser.add_argument("input", help="folder, URL prefix, glob or list of normal images")
    parser.add_argument("--features", required=True, help="prefix for the Parquet feature shards")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="bank prefix (a new version is written inside)")
    target.add_argument("--add-to", help="existing bank to extend with a new version")
    parser.add_argument("--shards", default="1", help="number of bank shards (default 1)")
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--image-size", default="224")
    parser.add_argument("--protocol", default="full")
    parser.add_argument("--batch-size", default="16")
    parser.add_argument("--max-actors", help="upper bound of the extractor actor pool (default: fit the cluster)")
    parser.add_argument("--gpus-per-actor", default="auto",
                        help="GPUs per extractor actor (default auto: 1 when the Ray cluster has GPUs, else 0)")
    parser.add_argument("--address")
    parser.add_argument("--storage-options")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_known_args(argv)


def run(argv: list[str]) -> int:
    args, build_extra = parse(argv)
    common = (["--address", args.address] if args.address else []) + \
             (["--storage-options", args.storage_options] if args.storage_options else []) + \
             (["--quiet"] if args.quiet else [])
    code = main(["extract", args.input, "--output", args.features, "--backbone", args.backbone,
                 "--image-size", args.image_size, "--protocol", args.protocol, "--batch-size", args.batch_size,
                 "--gpus-per-actor", args.gpus_per_actor,
                 *(["--max-actors", args.max_actors] if args.max_actors else []), *common])
    if code != 0:
        return code
    target = ["--output", args.output] if args.output else ["--add-to", args.add_to]
    return main(["build-bank", args.features, *target, "--shards", args.shards, *build_extra, *common])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
