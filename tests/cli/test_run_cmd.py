"""`mpplan run`: exit codes and messages for bad input, the launch lines, and one real 2-rank run."""
import json

import pytest
import typer
from typer.testing import CliRunner

from cli.run_cmd import run_command
from planner.plan import Plan
from planner.specs import load_cluster
from tests.distributed.plans import make_plan

app = typer.Typer()
app.command("run")(run_command)


@app.callback()
def _group() -> None:
    """Keeps `run` a sub-command, as in cli/app.py."""


def invoke(*args: str):
    return CliRunner().invoke(app, ["run", *args])


def write_plan(tmp_path, plan: Plan, name: str = "plan.json"):
    path = tmp_path / name
    path.write_text(plan.to_json())
    return path


def assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0]


def test_malformed_plan_exits_2_with_one_line(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    assert_one_line_error(invoke(str(path)), 2, "plan.json", "not valid JSON")


def test_wrong_schema_version_exits_2(tmp_path):
    data = json.loads(make_plan(dp=2).to_json())
    data["schema_version"] = 7
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    assert_one_line_error(invoke(str(path)), 2, "schema_version 7")


def test_unknown_key_exits_2(tmp_path):
    data = json.loads(make_plan(dp=2).to_json())
    data["parallel"]["tpp"] = 2
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    assert_one_line_error(invoke(str(path)), 2, "parallel.tpp", "unknown key")


def test_world_size_mismatch_names_both(tmp_path):
    path = write_plan(tmp_path, make_plan(pp=2, dp=2, nmb=2))
    assert_one_line_error(invoke(str(path), "--nproc", "2"), 2, "world size 4", "2 ranks")


def test_world_size_mismatch_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    path = write_plan(tmp_path, make_plan(dp=2))
    assert_one_line_error(invoke(str(path), "--device", "cpu"), 2, "world size 2", "launched 3 ranks")


def test_unsupported_combination_exits_2(tmp_path):
    path = write_plan(tmp_path, make_plan(pp=2, nmb=2, tie_embeddings=True))
    assert_one_line_error(invoke(str(path)), 2, "cannot execute", "tied embeddings")


def test_bad_steps_and_data_exit_2(tmp_path):
    path = write_plan(tmp_path, make_plan(dp=2))
    assert_one_line_error(invoke(str(path), "--steps", "0"), 2, "--steps 0")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert_one_line_error(invoke(str(path), "--data", str(short)), 2, "shorter than seq_len")


def test_print_launch_multi_node(tmp_path):
    plan = make_plan(dp=16)
    plan = Plan.model_validate({**plan.model_dump(), "cluster": load_cluster("dgx-a100", 16).model_dump()})
    path = write_plan(tmp_path, plan)
    result = invoke(str(path), "--print-launch")
    assert result.exit_code == 0, result.output
    torchrun, srun = result.stdout.strip().splitlines()
    assert torchrun.startswith("torchrun --nnodes=2 --nproc-per-node=8 ")
    assert torchrun.endswith(f"mpplan run {path}")
    assert srun.startswith("srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 ")


def test_print_launch_single_node(tmp_path):
    path = write_plan(tmp_path, make_plan(pp=2, dp=2, nmb=2))
    result = invoke(str(path), "--print-launch")
    assert result.stdout.splitlines()[0] == f"torchrun --standalone --nproc-per-node=4 --no-python mpplan run {path}"


@pytest.mark.distributed
def test_real_run_on_text_data_writes_the_report(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    path = write_plan(tmp_path, make_plan(pp=2, nmb=2, schedule="1f1b"))
    report = tmp_path / "run.json"
    result = invoke(str(path), "--steps", "4", "--data", str(text), "--json", "--report", str(report),
                    "--device", "cpu", "--log-dir", str(tmp_path / "logs"))
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads(report.read_text())
    assert str(text) in printed["data"]
    assert len(printed["losses"]) == 4 and printed["losses"][-1] < printed["losses"][0]  # English is learnable
    assert printed["plan"]["pp"] == 2 and printed["wrappers"]["pipeline"] == "Schedule1F1B"


def test_existing_report_is_not_overwritten_without_force(tmp_path):
    from tests.distributed.plans import make_plan
    plan = tmp_path / "plan.json"
    plan.write_text(make_plan(dp=2, nmb=1).to_json())
    report = tmp_path / "run.json"
    report.write_text("mine")
    res = CliRunner().invoke(app, ["run", str(plan), "--report", str(report)])
    assert res.exit_code == 2 and "exists" in res.output and report.read_text() == "mine"
