"""`mpplan validate`: bad input exits 2 with one line, nothing feasible exits 3, and a real 2-rank validation of
two plans writes the figures; plus the runtime calibration runs (runtime/profile_runtime.py)."""
import json

import typer
from typer.testing import CliRunner

from cli.validate_cmd import spread, validate_command
from planner.profile import RuntimeCalibration
from tests.unit.test_validate import TINY, synthetic_profile

app = typer.Typer()
app.command("validate")(validate_command)


@app.callback()
def _group() -> None:
    """Keeps `validate` a sub-command, as in cli/app.py."""


def invoke(*args: str):
    return CliRunner().invoke(app, ["validate", *args])


def profile_file(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(synthetic_profile().to_json())
    return path


def one_line(result, code: int, needle: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def test_bad_input_exits_2_with_one_line(tmp_path):
    prof = profile_file(tmp_path)
    one_line(invoke("--profile", str(prof), "--steps", "1"), 2, "--steps 1")
    one_line(invoke("--profile", str(prof), "--ranks", "1"), 2, "--ranks 1")
    one_line(invoke("--profile", str(tmp_path / "missing.json")), 2, "missing.json")
    (tmp_path / "out.json").write_text("{}")
    one_line(invoke("--profile", str(prof), "--report", str(tmp_path / "out.json")), 2, "--force")


def test_no_feasible_plan_exits_3(tmp_path):
    result = invoke("--profile", str(profile_file(tmp_path)), "--memory-limit", "1000")
    one_line(result, 3, "no feasible plan")


def test_spread_keeps_the_first_and_spans_the_ranking():
    assert [r for r, _ in spread(list("abcdefghij"), 4)] == [1, 4, 7, 10]
    assert [r for r, _ in spread(list("abc"), 1)] == [1]
    assert len(spread(list("abc"), None)) == 3


def test_two_plans_run_and_are_compared(tmp_path):
    report = tmp_path / "validate.json"
    result = invoke("--profile", str(profile_file(tmp_path)), "--pp", "2", "--mbs", "4", "--schedule", "1f1b",
                    "--steps", "2", "--max-plans", "2", "--repeats", "2", "--report", str(report), "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads(report.read_text())
    assert printed["feasible_plans"] == 3  # 1f1b, pp 2, mbs 4: one per recompute mode
    summary = printed["summary"]
    assert (summary["plans"], summary["ran"], summary["failed"]) == (2, 2, 0)
    assert summary["regret"] >= 1.0 and summary["step_time_mape"] is not None
    assert summary["run_spread"] >= 0  # two rounds: the noise floor is measured
    assert list(summary["by_kind"]) == ["pp2"] and summary["by_kind"]["pp2"]["plans"] == 2
    for o in printed["outcomes"]:
        assert o["measured_step_time_s"] > 0 and len(o["ranks"]) == 2 and len(o["repeat_step_times_s"]) == 2
        assert all(r["measured_bytes"] > 0 and r["predicted_bytes"] > 0 for r in o["ranks"])
    assert printed["outcomes"][0]["solver_rank"] == 1


def test_the_table_ends_with_the_error_per_kind_of_plan():
    import io

    from rich.console import Console

    from cli.validate_cmd import render
    from planner.validate import PlanOutcome, RankMemory, summarize

    def ran(rank: int, pred: float, meas: float, tp: int, dp: int) -> PlanOutcome:
        return PlanOutcome(solver_rank=rank, label=f"plan{rank}", config={"tp": tp, "pp": 1, "dp": dp, "zero": 0},
                           predicted_step_time_s=pred, predicted_peak_bytes=100, measured_step_time_s=meas,
                           ranks=[RankMemory(0, 100, 100)])

    outcomes = [ran(1, 1.0, 1.1, 1, 2), ran(2, 3.0, 2.0, 2, 1)]
    out = io.StringIO()
    render(Console(file=out, width=200), outcomes, summarize(outcomes))
    assert "step-time error by kind: dp2 9.1% (1 plan, priced low by 9.1% on average), tp2 50.0% (1 plan, priced " \
           "high by 50.0% on average)" in out.getvalue()


def test_runtime_calibration_measures_positive_overheads():
    from runtime.profile_runtime import calibrate_runtime

    prof = synthetic_profile()
    cal = calibrate_runtime(TINY, prof.layers, prof.precision, "cpu", prof.optimizer_bytes_per_param)
    assert isinstance(cal, RuntimeCalibration)
    assert [(r.micro_batch_size, r.num_microbatches) for r in cal.runs] == [(1, 1), (1, 4), (4, 1)]
    assert all(r.step_time_s > 0 and r.peak_bytes > 0 for r in cal.runs)
    # calibrated at the smallest and the largest profiled micro-batch
    assert sorted(cal.microbatch_overhead_by_mbs) == [1, 4]
    assert cal.microbatch_overhead_by_mbs[1] == cal.microbatch_overhead_s
    # AdamW on a CPU core: between 0.1 and 100 ns per parameter
    assert 1e-10 < cal.optimizer_s_per_param < 1e-7
    assert cal.activation_peak_factor >= 1.0
