"""Ray job entrypoint: rebuild (or extend) a normal bank from a folder/prefix of normal images.

Runs `spade-ray extract` into a features prefix, then `spade-ray build-bank` from it:

    python jobs/rebuild_bank.py s3://plant/normals/line3/ --features s3://plant/features/line3 \\
        --output s3://plant/banks/line3 --shards 8
    python jobs/rebuild_bank.py s3://plant/normals/new/ --features s3://plant/features/line3-new --add-to s3://plant/banks/line3

Several banks from the routing table `score --routes` reads: each route that names its normal images
and a features prefix (`normals:` and `features:`) gets its bank rebuilt, one after the other
(routes sharing a bank rebuild it once; routes without `normals` are skipped):

    python jobs/rebuild_bank.py --routes s3://plant/routes.yaml --shards 4

ROUTES in the environment (the spade-ray-params ConfigMap key, see jobs/score_archive.py) means
`--routes ROUTES`: INPUT, --features and --output then name the one-bank rebuild the table replaces.
Extraction skips images already in the features prefix, so a failed rebuild resumes.
"""

from __future__ import annotations

import argparse
import os
import sys

from spade_ray.apps.cli import main


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    from_env = os.environ.get("ROUTES", "").strip()
    # With --routes on the command line there is no INPUT: without the positional, a pass-through
    # flag's value (--calibration-samples 2) cannot be taken for it.
    positional = not any(a == "--routes" or a.startswith("--routes=") for a in argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Other flags pass through to `spade-ray build-bank` (e.g. --calibration-samples, "
                                     "--target-fpr, --image-k, --pixel-k, --kappa).")
    if positional:
        parser.add_argument("input", nargs="?", help="folder, URL prefix, glob or list of normal images")
    parser.add_argument("--features", help="prefix for the Parquet feature shards")
    parser.add_argument("--routes", help="routing table (.yaml/.csv): rebuild the bank of every route with "
                        "normals and features, instead of INPUT --features --output")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--output", help="bank prefix (a new version is written inside)")
    target.add_argument("--add-to", help="existing bank to extend with a new version")
    parser.add_argument("--shards", default="1", help="number of bank shards (default 1)")
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--image-size", default="224")
    parser.add_argument("--protocol", default="full")
    parser.add_argument("--batch-size", default="16")
    parser.add_argument("--tile", default="0", help="tile size for high-resolution frames (default 0: untiled; "
                        "the bank then scores tiled, see `spade-ray extract --tile`)")
    parser.add_argument("--tile-overlap", help="pixels shared by neighbouring tiles (default: a quarter of --tile)")
    parser.add_argument("--scale", default="1", help="resize frames by this factor before tiling (default 1)")
    parser.add_argument("--max-actors", help="upper bound of the extractor actor pool (default: fit the cluster)")
    parser.add_argument("--gpus-per-actor", default="auto",
                        help="GPUs per extractor actor (default auto: 1 when the Ray cluster has GPUs, else 0)")
    parser.add_argument("--address")
    parser.add_argument("--storage-options")
    parser.add_argument("--quiet", action="store_true")
    args, extra = parser.parse_known_args(argv)
    args.input = getattr(args, "input", None)
    if from_env and not args.routes:  # the ConfigMap's table replaces the one-bank arguments it comes with
        args.routes, args.input, args.features, args.output, args.add_to = from_env, None, None, None, None
    if args.routes and (args.input or args.features or args.output or args.add_to):
        parser.error("--routes names the normals, features and bank of each route: give no INPUT, --features, "
                     "--output or --add-to with it")
    if not args.routes and not (args.input and args.features and (args.output or args.add_to)):
        parser.error("give INPUT, --features and --output (or --add-to), or --routes")
    return args, extra


def _common(args: argparse.Namespace) -> list[str]:
    return ((["--address", args.address] if args.address else []) +
            (["--storage-options", args.storage_options] if args.storage_options else []) +
            (["--quiet"] if args.quiet else []))


def rebuild(args: argparse.Namespace, normals: str, features: str, target: list[str], build_extra: list[str]) -> int:
    """Extract ``normals`` into ``features``, then build the bank ``target`` names (``--output B`` or ``--add-to B``)."""
    common = _common(args)
    code = main(["extract", normals, "--output", features, "--backbone", args.backbone,
                 "--image-size", args.image_size, "--protocol", args.protocol, "--batch-size", args.batch_size,
                 "--gpus-per-actor", args.gpus_per_actor, "--tile", args.tile, "--scale", args.scale,
                 *(["--tile-overlap", args.tile_overlap] if args.tile_overlap else []),
                 *(["--max-actors", args.max_actors] if args.max_actors else []), *common])
    if code != 0:
        return code
    return main(["build-bank", features, *target, "--shards", args.shards, *build_extra, *common])


def rebuild_routes(args: argparse.Namespace, build_extra: list[str]) -> int:
    """Each routed bank in table order, once; stops at the first that fails (its exit code), the rest untouched."""
    import json

    from spade_ray.storage.routes import load_routes

    options = json.loads(args.storage_options) if args.storage_options else None
    table = load_routes(args.routes, options)
    done: set[str] = set()
    for route in table.routes:
        if route.bank in done:
            continue
        if not route.normals or not route.features:
            print(f"rebuild_bank: {route.where}: no normals/features, bank {route.bank} left as it is", file=sys.stderr)
            continue
        print(f"rebuild_bank: {route.label} -> {route.bank}", file=sys.stderr)
        code = rebuild(args, route.normals, route.features, ["--output", route.bank], build_extra)
        if code != 0:
            return code
        done.add(route.bank)
    if not done:
        print(f"rebuild_bank: no route of {args.routes} names normals and features", file=sys.stderr)
        return 2
    return 0


def run(argv: list[str]) -> int:
    args, build_extra = parse(argv)
    if args.routes:
        return rebuild_routes(args, build_extra)
    target = ["--output", args.output] if args.output else ["--add-to", args.add_to]
    return rebuild(args, args.input, args.features, target, build_extra)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
