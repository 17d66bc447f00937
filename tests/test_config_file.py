"""``--config FILE``: every command reads its options from YAML or TOML; the command line wins."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from spade_ray.apps.cli import main
from spade_ray.apps.cli_parser import build_parser
from spade_ray.apps.config_file import parse_args

TOML = """
storage-options = {endpoint_url = "http://minio:9000"}
batch_size = 8                      # '_' or '-': both name --batch-size
bank = "s3://plant/banks/line3"     # top level: every command with a --bank

[score]
output = "runs/scored"
image-k = 5
visuals = "all"
quiet = true
write = ["masks", "heatmaps"]
"""

YAML = """
storage-options: {endpoint_url: "http://minio:9000"}
batch_size: 8
bank: s3://plant/banks/line3
score:
  output: runs/scored
  image-k: 5
  visuals: all
  quiet: true
  write: [masks, heatmaps]
"""


def config(tmp_path: Path, text: str, name: str = "spade-ray.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def parse(*argv: str) -> argparse.Namespace:
    return parse_args(build_parser(), list(argv))


def test_a_config_file_sets_options_and_the_command_line_wins(tmp_path) -> None:
    args = parse("score", "day/", "--config", config(tmp_path, TOML), "--image-k", "2")
    assert args.image_k == 2  # the flag, not the file's 5
    assert (args.bank, args.output, args.visuals, args.quiet) == ("s3://plant/banks/line3", "runs/scored", "all", True)
    assert (args.batch_size, args.write) == (8, "masks,heatmaps")
    assert args.storage_options == '{"endpoint_url": "http://minio:9000"}'  # a mapping goes on as JSON
    # what neither the flags nor the file set stays None: the bank's setting, then the default
    assert (args.pixel_k, args.kappa, args.aggregate) == (None, None, None)


def test_yaml_and_toml_files_say_the_same(tmp_path) -> None:
    from_toml = parse("score", "day/", "--config", config(tmp_path, TOML))
    from_yaml = parse("score", "day/", "--config", config(tmp_path, YAML, "spade-ray.yaml"))
    assert vars(from_toml) | {"config": None} == vars(from_yaml) | {"config": None}


COMMANDS = {"demo": [], "bench": [], "evaluate": ["ds"], "extract": ["images/"], "build-bank": ["features/"],
            "score": ["images/"]}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_its_options_from_a_config_file(tmp_path, capsys, command: str) -> None:
    path = config(tmp_path, "log-format: json\n"  # an option every command has
                  "evaluate: {output: out}\nextract: {output: out}\nbuild-bank: {output: bank}\n"
                  "score: {bank: bank, output: out}\n", "c.yml")
    args = parse(command, *COMMANDS[command], "--config", path)  # required options may come from the file
    assert args.log_format == "json" and args.config == path
    with pytest.raises(SystemExit):
        parse(command, "--help")
    assert "--config FILE" in capsys.readouterr().out


def test_a_top_level_key_only_some_commands_have_is_skipped_by_the_others(tmp_path) -> None:
    args = parse("extract", "images/", "--output", "features", "--config", config(tmp_path, TOML))
    assert args.batch_size == 8 and not hasattr(args, "bank")


def test_a_flag_wins_over_the_files_mutually_exclusive_alternative(tmp_path) -> None:
    path = config(tmp_path, "[build-bank]\noutput = 'runs/bank'\n")
    assert parse("build-bank", "features/", "--config", path).output == "runs/bank"
    args = parse("build-bank", "features/", "--config", path, "--add-to", "s3://plant/banks/line3")
    assert (args.output, args.add_to) == (None, "s3://plant/banks/line3")


@pytest.mark.parametrize(("text", "named"), [
    ("imagek = 3\n", "'imagek' is not an option of any spade-ray command"),
    ("[score]\nshards = 3\n", "[score] 'shards' is not an option of spade-ray score"),
    ("[score]\ninput = 'day/'\n", "positional arguments go on the command line"),
    ("[scores]\nbank = 'b'\n", "'scores' is not an option of any spade-ray command"),
    ("[score]\nimage-k = 'three'\n", "image-k: invalid value 'three'"),
    ("[score]\nvisuals = 'some'\n", "visuals: 'some' is not one of all, anomalous, none"),
    ("[score]\nmax-error-rate = 2\n", "max-error-rate: invalid value '2' (must be a fraction"),
    ("[score]\nquiet = 'yes'\n", "quiet is a flag: set it to true or false"),
    ("[score]\nbank = true\n", "bank takes a value"),
    ("[score\n", "not valid TOML"),
])
def test_a_wrong_key_or_value_is_a_usage_error_naming_it_and_the_file(tmp_path, capsys, text: str, named: str) -> None:
    path = config(tmp_path, text)
    with pytest.raises(SystemExit) as exit_:
        parse("score", "day/", "--bank", "b", "--output", "o", "--config", path)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and named in err and path in err


def test_a_missing_or_unknown_kind_of_file_is_a_usage_error(tmp_path, capsys) -> None:
    (tmp_path / "c.ini").write_text("[score]\n")
    for path, says in [(tmp_path / "none.yaml", "no such file"), (tmp_path / "c.ini", "use a .yaml, .yml or .toml file")]:
        with pytest.raises(SystemExit) as exit_:
            parse("demo", "--config", str(path))
        assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_the_command_runs_with_the_files_settings(tmp_path, capsys) -> None:
    # the file's bank reaches the score job, which refuses it with the one-line reason naming it (exit 1)
    path = config(tmp_path, f"[score]\nbank = '{tmp_path / 'no-bank'}'\noutput = '{tmp_path / 'out'}'\n")
    assert main(["score", str(tmp_path), "--config", path]) == 1
    assert f"{tmp_path / 'no-bank'}: no complete bank version" in capsys.readouterr().err
