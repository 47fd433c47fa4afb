import json

from typer.testing import CliRunner

from cli.app import app

runner = CliRunner()


def test_help_reads_like_a_manual():
    out = runner.invoke(app, ["--help"]).output
    assert "mpplan solve --gpus 64" in out and "mpplan demo" in out
    solve_help = runner.invoke(app, ["solve", "--help"]).output
    assert "Example: mpplan solve --gpus 1024" in solve_help


def test_json_prints_only_json_with_the_chosen_plan_first():
    res = runner.invoke(app, ["solve", "--gpus", "16", "--model", "gpt3-1.3b", "--global-batch", "64", "--top", "3",
                              "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc) >= {"plans", "rejected", "solve_time_s"}
    times = [p["predicted"]["step_time_s"] for p in doc["plans"]]
    assert times == sorted(times) and len(times) == 3
    first = doc["plans"][0]
    for key in ("schema_version", "model", "cluster", "train", "parallel", "micro_batch_size", "num_microbatches",
                "recompute", "zero", "schedule", "mesh_order", "stages", "predicted"):
        assert key in first


def test_out_writes_plan_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "plan.json"
    args = ["solve", "--gpus", "8", "--model", "gpt3-1.3b", "--global-batch", "32", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    written = out.read_text()
    assert json.loads(written)["parallel"]["tp"] * json.loads(written)["parallel"]["pp"] * json.loads(written)["parallel"]["dp"] == 8
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output and out.read_text() == written
    assert runner.invoke(app, args + ["--force"]).exit_code == 0


def test_bad_input_exits_2_with_one_line():
    for args, needle in ((["solve", "--gpus", "12"], "not a multiple of gpus_per_node 8"),
                         (["solve", "--gpus", "8", "--model", "gpt9"], "no such preset"),
                         (["solve", "--gpus", "8", "--cluster", "local"], "mpplan profile"),
                         (["solve", "--gpus", "8", "--seq-len", "-1"], "--seq-len -1: must be positive")):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output


def test_no_plan_fits_exits_3_naming_the_fix():
    res = runner.invoke(app, ["solve", "--gpus", "8", "--model", "gpt3-175b", "--global-batch", "64", "--json"])
    assert res.exit_code == 3
    assert "GiB more per GPU" in res.output and "more GPUs" in res.output


def test_defaults_are_said_out_loud():
    res = runner.invoke(app, ["solve", "--gpus", "64", "--top", "1"])
    assert res.exit_code == 0
    assert "defaults used" in res.output and "gpt3-13b" in res.output and "dgx-a100" in res.output


def test_solve_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys; from typer.testing import CliRunner; from cli.app import app; "
            "r = CliRunner().invoke(app, ['solve', '--gpus', '8', '--model', 'gpt3-1.3b', '--global-batch', '32']); "
            "assert r.exit_code == 0, r.output; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_tables_keep_their_columns_when_stderr_is_a_log(monkeypatch):
    """Piped or redirected, rich would render at 80 columns and cut every cell of the plan table to "…"."""
    monkeypatch.delenv("COLUMNS", raising=False)
    res = runner.invoke(app, ["solve", "--gpus", "16", "--model", "gpt3-1.3b", "--global-batch", "64", "--top", "2"])
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if "TP" in line and "DP" in line)
    for column in ("MBS", "µbatches", "recompute", "schedule", "tokens/s", "TFLOP/s/GPU", "peak GiB"):
        assert column in header
    assert "…" not in res.output.split("Rejected")[0]
