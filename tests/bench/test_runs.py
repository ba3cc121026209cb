"""Run files: the format does not change, so that old runs still load."""

from pathlib import Path

from moebench.bench import runs, targets
from moebench.bench.records import RECORD_FIELDS

ROOT = Path(__file__).resolve().parents[2]
OLD_RUN = ROOT / "results" / "gpu-h200" / "run-20261126T035724Z.json"


def test_a_run_from_before_the_move_still_loads_and_evaluates():
    env, frame = runs.load_run(OLD_RUN)
    assert env["profile"] == "gpu" and env["harness_version"] == "1"
    assert set(RECORD_FIELDS) <= set(frame.columns) and len(frame) > 0
    table = targets.evaluate(env, frame)
    assert len(table) == 9 and table["points"].sum() > 0  # three quant targets: no points


def test_a_run_written_now_reads_back_as_the_same_records(tmp_path):
    old = runs.read_run(OLD_RUN)
    env, records = old["env"], old["records"][:5]
    path = runs.write_run(tmp_path / "run.json", env, records)
    assert runs.read_run(path) == {"env": env, "profile": env["profile"], "records": records}
