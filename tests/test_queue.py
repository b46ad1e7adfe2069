"""scripts/cpu_queue.sh: bad arguments get one sentence and exit 2 before anything runs; the body is parsed
whole before it runs (editing the script cannot derail a running queue)."""
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUEUE = ROOT / "scripts" / "cpu_queue.sh"


@pytest.mark.parametrize("args, says", [(["--from", "9"], "--from needs a stage 1-6"),
                                        (["--from"], "--from needs a stage 1-6"),
                                        (["--profile"], "--profile needs a value"),
                                        (["--bogus"], "unknown argument --bogus")])
def test_bad_arguments_stop_with_one_sentence(args, says):
    r = subprocess.run(["bash", str(QUEUE), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr and r.stdout == ""  # no stage started


def test_the_body_is_one_function_called_at_the_end():
    lines = [l for l in QUEUE.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "main() {" and lines[-3:] == ["}", 'main "$@"', "exit"]
