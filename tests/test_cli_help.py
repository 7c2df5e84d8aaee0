"""The front door of `aim-mlx`: help, usage errors, exit codes and the choices, checked for every command."""

import re

import pytest
import typer
from typer.testing import CliRunner

from aim_mlx.checkpoints.variants import DEFAULT_MODEL, DEFAULT_TEXT_MODEL
from aim_mlx.cli import app
from aim_mlx.cli import common as cli
from aim_mlx.cli.root import ORDER

runner = CliRunner()


def click_commands():
    """Every leaf command as Click sees it (typer.main.get_command is Typer's public bridge to Click)."""
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for sub, leaf in getattr(command, "commands", {}).items() or [(None, command)]:
            yield (name if sub is None else f"{name} {sub}"), leaf


# Every command and group, from the app itself: what is added to it is checked.
COMMANDS = sorted({tuple(name.split()[: n + 1]) for name, _ in click_commands() for n in range(2)})
COMMANDS = [list(command) for command in COMMANDS]


def invoke(*args, **extra):
    return runner.invoke(app, [str(a) for a in args], **extra)


def help_text(*command, width: int = 80) -> str:
    result = invoke(*command, "-h", env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", [[], *COMMANDS], ids=lambda c: " ".join(c) or "app")
def test_help_is_plain_with_one_usage_style(command):
    for flag in ("-h", "--help"):
        result = invoke(*command, flag)
        assert result.exit_code == 0 and result.stdout.startswith(
            f"Usage: aim-mlx {' '.join(command)}".rstrip()
        )
    text = help_text(*command)
    assert not re.search(r"<(bool|str|int|int range|float|path|list\[.*?\])>", text), (
        f"{command}: Typer's type label"
    )
    assert not set(text) & set("╭╮╰╯│─"), "help in a rich box"
    usage = text.splitlines()[0]
    assert re.fullmatch(
        r"Usage: aim-mlx( [a-z]+)* \[OPTIONS\]"
        r"( COMMAND \[ARGS\]\.\.\.| \[(IMAGES|FOLDERS|QUERY)\]\.\.\.| \[DATA\]| \[TEXT\])?",
        usage,
    )


@pytest.mark.parametrize("group", [[], ["eval"], ["export"]], ids=["app", "eval", "export"])
def test_command_summaries_are_whole_sentences(group):
    """Click cuts a summary that does not fit with '...'; each command's first sentence must fit."""
    commands = help_text(*group).split("Commands:")[1].split("\n\n")[0]
    assert "..." not in commands


def test_commands_are_listed_in_the_order_they_are_added():
    """root.py adds them in the order a user needs them; Typer alone would list the groups last."""
    text = help_text()
    listed = re.findall(r"^  ([a-z]+)  ", text.split("Commands:")[1], flags=re.M)
    assert listed == ORDER and len(ORDER) == len(set(ORDER))


def test_the_app_help_has_the_exit_code_table():
    text = help_text()
    rows = dict(re.findall(r"^    (\d+) +(.+)$", text.split("Exit codes:")[1], flags=re.M))
    assert {int(code) for code in rows} == {0, 1, 2, 3, 130}
    assert rows == {str(int(code)): line for code, line in cli.EXIT_CODES.items()}


@pytest.mark.parametrize(
    "command, ids",
    [
        (["embed"], [DEFAULT_MODEL, DEFAULT_TEXT_MODEL]),
        (["classify"], [DEFAULT_TEXT_MODEL]),
        (["eval", "imagenet"], [DEFAULT_TEXT_MODEL]),
        (["export", "coreml"], [DEFAULT_MODEL]),
        (["bench"], [DEFAULT_MODEL]),
    ],
)
def test_the_default_model_is_whole_on_one_line_at_80_columns(command, ids):
    text = help_text(*command, width=80)
    for model_id in ids:
        assert any(re.search(rf"(^|[ (]){re.escape(model_id)}($|[ )])", line) for line in text.splitlines())


@pytest.mark.parametrize("command", [[], *COMMANDS], ids=lambda c: " ".join(c) or "app")
def test_help_fits_80_columns(command):
    """Click wraps prose to the terminal; verbatim blocks (examples, exit codes) must fit by themselves."""
    assert max(len(line) for line in help_text(*command, width=80).splitlines()) <= 80


@pytest.mark.parametrize("command", [[], *COMMANDS], ids=lambda c: " ".join(c) or "app")
def test_help_paragraphs_have_no_hard_line_breaks(command):
    """Given room, Click puts each paragraph of a command's description on one line; a line break that
    survives was written into the help (a verbatim block, rich markup). Examples and exit codes are
    verbatim on purpose."""
    result = invoke(*command, "-h", max_content_width=1000, terminal_width=1000)
    description = result.stdout.split("\n\n")[1:]  # after the usage line
    for paragraph in description:
        if paragraph.startswith(("Options:", "Commands:", "Arguments:", "  Examples:", "  Exit codes:")):
            break
        assert len(paragraph.strip().splitlines()) == 1, paragraph


def test_option_help_breaks_lines_only_between_paragraphs():
    for name, command in click_commands():
        for param in command.params:
            help = getattr(param, "help", None) or ""
            assert not re.search(r"(?<!\n)\n(?!\n)", help), f"{name} {param.name}: {help!r}"


@pytest.mark.parametrize(
    "command, flag, choice",
    [
        (["embed"], "--dtype", cli.DType),
        (["embed"], "--pool", cli.Pool),
        (["classify"], "--templates", cli.Templates),
        (["convert"], "--q-bits", cli.QBits),
        (["convert"], "--q-group-size", cli.QGroupSize),
        (["convert"], "--quant-predicate", cli.QuantRecipe),
        (["export", "coreml"], "--precision", cli.Precision),
        (["export", "coreml"], "--compress", cli.Compress),
        (["export", "coreml"], "--min-deployment-target", cli.Target),
        (["export", "coreml"], "--input", cli.InputKind),
        (["export", "coreml"], "--outputs", cli.Outputs),
        (["bench"], "--dtype", cli.DType),
        (["bench"], "--q-bits", cli.QBits),
    ],
)
def test_every_choice_shows_its_values(command, flag, choice):
    values = "|".join(member.value for member in choice)
    assert f"{flag} <{values}>" in help_text(*command, width=200)


def test_the_choices_are_the_librarys():
    """The Enums repeat the library's lists so that --help imports nothing heavy; this keeps them equal.
    DType is platform.devices' own list (no MLX there): every dtype it names is one the loader builds."""
    from aim_mlx.convert import convert as conversion
    from aim_mlx.convert import recipes
    from aim_mlx.convert.coreml import export as coreml

    from aim_mlx.loading import DTYPES
    from aim_mlx.models.quantized import GROUP_SIZES
    from aim_mlx.platform import devices
    from aim_mlx.tasks.embed import POOLS
    from aim_mlx.tasks.zeroshot import template_set

    def values(enum):
        return [member.value for member in enum]

    assert values(cli.DType) == list(devices.DTYPES) == list(DTYPES) and values(cli.Pool) == list(POOLS)
    assert values(cli.QBits) == [str(b) for b in conversion.Q_BITS]
    assert values(cli.QGroupSize) == [str(g) for g in GROUP_SIZES]
    assert values(cli.QuantRecipe) == list(recipes.RECIPES)
    assert values(cli.Precision) == list(coreml.PRECISIONS) and values(cli.Compress) == list(
        coreml.COMPRESSIONS
    )
    assert values(cli.Target) == list(coreml.TARGETS) and values(cli.InputKind) == list(coreml.INPUTS)
    assert values(cli.Outputs) == list(coreml.OUTPUTS)
    for name in values(cli.Templates):
        template_set(None, name)


@pytest.mark.parametrize(
    "args, message",
    [
        (["embed", "--batch-size", "0", "a.jpg"], "Invalid value for '--batch-size'"),
        (
            ["embed", "--pool", "max", "a.jpg"],
            "Invalid value for '--pool': Value error, 'max' is not one of 'mean', 'none'.",
        ),
        (["embed", "--no-such-flag"], "No such option: --no-such-flag"),
        (["classify", "a.jpg", "--top-k", "0", "--labels", "a,b"], "Invalid value for '--top-k'"),
        (["convert"], "Missing option '--hf-path'"),
        (["convert", "--hf-path", "x", "--q-bits", "3"], "Invalid value for '--q-bits'"),
        (
            ["export", "coreml", "-o", "x.mlpackage", "--precision", "float8"],
            "Invalid value for '--precision'",
        ),
        (["bench", "-q", "4"], "Got unexpected extra argument(s) (4)"),
        (["bench", "--q-bits", "3"], "Invalid value for '--q-bits'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    command = " ".join(args[:2] if args[0] == "export" else args[:1])
    error, hint = result.stderr.splitlines()
    assert error.startswith("error: ") and message in error
    assert hint == f"Try 'aim-mlx {command} -h' for help."
    assert result.stdout == ""


@pytest.mark.parametrize("group", [[], ["eval"], ["export"]], ids=["app", "eval", "export"])
def test_a_group_without_a_command_shows_its_help(group):
    result = invoke(*group)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == help_text(*group)


def test_an_unknown_command_is_a_usage_error():
    result = invoke("embedd")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: No such command 'embedd'. Did you mean 'embed'?",
        "Try 'aim-mlx -h' for help.",
    ]


def test_python_keyword_names_match_the_flags():
    for name, command in click_commands():
        for param in command.params:
            if param.param_type_name != "option" or param.name == "help":
                continue
            longest = max(param.opts, key=len)
            assert param.name == longest.lstrip("-").replace("-", "_"), f"{name}: {longest} -> {param.name}"


def test_h_works_on_every_command():
    names = {name for name, _ in click_commands()}
    assert {name.split()[0] for name in names} == set(ORDER)  # each added once, each listed
    for name in names:
        assert invoke(*name.split(), "-h").exit_code == 0


def test_labels_help_points_to_labels_file_for_commas():
    result = invoke("classify", "-h", max_content_width=1000, terminal_width=1000)
    text = " ".join(result.stdout.split())
    assert "For labels that contain commas, use --labels-file." in text


@pytest.mark.parametrize(
    "args, flag",
    [
        (["embed", "photo.jpg", "-m", "apple/aimv2-huge-patch14-224"], "--model DIR"),
        (["classify", "photo.jpg", "--labels", "a,b"], "--model DIR"),
        (
            ["convert", "--hf-path", "apple/aimv2-huge-patch14-224", "--mlx-path", "{tmp}/out"],
            "--hf-path DIR",
        ),
        (["export", "coreml", "-m", "someone/else", "-o", "{tmp}/m.mlpackage"], "--model DIR"),
    ],
)
def test_a_model_not_found_suggests_a_local_folder_flag(cache, tmp_path, args, flag):
    (tmp_path / "photo.jpg").write_bytes(b"")
    result = invoke(*[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and flag in line and "aim_mlx.load" not in line


def test_python_keywords_in_library_messages_become_flags(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"")
    (tmp_path / "model" / "config.json").parent.mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    result = invoke("embed", tmp_path / "photo.jpg", "-m", tmp_path / "model", "--revision", "main")
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert "--revision 'main' applies only to hub ids" in line and "revision=" not in line


def test_debug_shows_the_traceback(cache, monkeypatch):
    monkeypatch.setenv("AIM_MLX_DEBUG", "1")
    result = invoke("embed", "photo.jpg", "-m", "apple/aimv2-huge-patch14-224")
    assert result.exit_code == 1 and type(result.exception).__name__ == "ModelNotFoundError"
