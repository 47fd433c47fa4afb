"""`mpplan profile`: one-line exit-2 errors for bad input, no silent overwrite, and one real run."""
import json

import pytest
from typer.testing import CliRunner

from cli.app import app
from planner.profile import check_profile_matches, load_profile
from planner.presets import MODELS
from runtime.profile_comm import CommConfig


def invoke(*args: str):
    return CliRunner().invoke(app, ["profile", *args])


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("args, needles", [
    (["--mbs", "1,x"], ["--mbs 1,x", "comma-separated positive integers"]),
    (["--mbs", "0"], ["--mbs 0"]),
    (["--tp", "3"], ["--tp 3 does not divide tiny-gpt's num_heads (4)"]),
    (["--model", "tiny-llama", "--tp", "4"], ["--tp 4 does not divide tiny-llama's num_kv_heads (2)"]),
    (["--model", "no-such-model"], ["--model no-such-model: no such preset"]),
    (["--device", "tpu"], ["--device tpu: must be cpu or cuda"]),
    (["--ranks", "0"], ["--ranks 0"]),
    (["--seq-len", "-1"], ["--seq-len -1"]),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, needles):
    assert_one_line_error(invoke(*args, "--out", str(tmp_path / "p.json")), *needles)
    assert not (tmp_path / "p.json").exists()


def test_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "profile.json"
    out.write_text("keep me")
    assert_one_line_error(invoke("--out", str(out)), f"{out} exists; pass --force")
    assert out.read_text() == "keep me"


def test_real_run_writes_a_valid_profile_and_prints_json(tmp_path):
    out = tmp_path / "profile.json"
    out.write_text("old")
    result = invoke("--mbs", "2,1", "--tp", "1,2", "--ranks", "2", "--out", str(out), "--json", "--force")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)  # stdout is only JSON
    prof = load_profile(out)
    assert printed == prof.model_dump(mode="json")
    check_profile_matches(prof, MODELS["tiny-gpt"])
    assert {(lp.kind, lp.tp, lp.micro_batch_size) for lp in prof.layers} == {
        (k, t, m) for k in ("embedding", "block", "head") for t in (1, 2) for m in (1, 2)}
    assert {c.op for c in prof.collectives} == {"all_reduce", "all_gather", "reduce_scatter", "send_recv"}
    comm = CommConfig()
    for fit in prof.collectives:  # 2^(k + 1/4) and the powers of two 64 KiB .. 64 MiB fitted apart, the middles
        assert [n for n, _ in fit.points] == comm.sizes()  # of every other gap held out
        assert [n for n, _ in fit.aligned_points] == [1 << e for e in range(16, 27)]
        assert [n for n, _ in fit.holdout_points] == comm.holdout_sizes() and len(comm.holdout_sizes()) == 8
        assert fit.holdout_median_rel_error is not None
    assert prof.optimizer_bytes_per_param == 8 and prof.precision == "fp32"
    assert {(t.tp, t.micro_batch_size) for t in prof.tp_blocks} == {(2, 1), (2, 2)}  # DTensor blocks, tp > 1
    assert {(t.zero, t.dp, t.micro_batch_size) for t in prof.fsdp_blocks} == {
        (z, 2, m) for z in (2, 3) for m in (1, 2)}  # FSDP2-wrapped blocks over both ranks
    assert prof.pipeline is not None and prof.pipeline.message_bytes == 1 * 64 * 64 * 4  # mbs 1 x seq x hidden
    assert [r.schedule for r in prof.pipeline.runs] == ["1f1b", "gpipe", "interleaved"]
